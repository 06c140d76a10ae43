"""Inference test fixtures: tiny models saved as real checkpoint folders, servers on free ports.

Models are depth 2 over a ~400-id tokenizer. The "random" ones get noise on every weight (a fresh
model's zero lm_head gives the same output for every prompt). The "scripted" one is a bigram
model built by hand (blocks left at their zero output projections, lm_head = a transition table
over the normalised embeddings), so its greedy reply is a chain we choose: text, a calculator
call `7*3`, the engine's forced result, more text, `<|assistant_end|>`.
"""

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
import uvicorn
from inference.api import create_app
from inference.settings import Settings
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from prometheus_client.parser import text_string_to_metric_families

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is 7*3? It is 21. Numbers like 1,234 add up. "
    "Unicode too: héllo wörld, naïve café, 日本語のテキスト, emoji 🙂🚀. "
)
SCRIPT_WORDS = ["The", " quick", " fox", ",", " naïve", " café", "."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=400)


def random_model(tok: Tokenizer, seed: int, sequence_len: int = 256) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def script_chain(tok: Tokenizer) -> list[int]:
    """The scripted model's greedy reply, token by token (forced calculator tokens included)."""
    sp = tok.encode_special
    words = [tok.encode(w) for w in SCRIPT_WORDS]
    assert all(len(w) == 1 for w in words), "each script word must be one token"
    head, tail = [w[0] for w in words[:4]], [w[0] for w in words[4:]]
    calc = [sp("<|python_start|>"), *tok.encode("7*3"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("21"), sp("<|output_end|>")]
    return head + calc + forced + tail + [sp("<|assistant_end|>")]


def scripted_model(tok: Tokenizer) -> GPT:
    torch.manual_seed(3)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, 256))
    model.init_weights()
    chain = [tok.encode_special("<|assistant_start|>")] + script_chain(tok)
    with torch.no_grad():
        emb = F.rms_norm(model.transformer.wte.weight, (model.config.n_embd,))
        table = torch.zeros_like(model.lm_head.weight)
        for prev, nxt in zip(chain, chain[1:]):
            table[nxt] += emb[prev]
        model.lm_head.weight.copy_(table * (20.0 / model.config.n_embd))
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for name, model, meta in [
        ("a", random_model(tok, 0), {"stage": "sft"}),
        ("b", random_model(tok, 1), {"stage": "rl"}),
        ("scripted", scripted_model(tok), {"stage": "sft"}),
    ]:
        folders[name] = save_checkpoint(root / name, model, tok, meta=meta)
    return folders


class Server:
    """An inference app under uvicorn on a background thread."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    @property
    def manager(self):
        return self.app.state.manager

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server at {self.url} did not become ready: {self.manager.load_error}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(**settings) -> Server:
    settings.setdefault("log_level", "WARNING")
    return Server(Settings(**settings))


@pytest.fixture(scope="session")
def server(checkpoints):
    s = start_server(model_dir=checkpoints["a"], slots=24, max_waiting=64)
    s.wait_ready()
    yield s
    s.stop()


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels left out: the ones read here have none)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
