"""Serving benchmark: our continuous-batching server vs a one-request-at-a-time baseline and the
engine's own ceiling.

    uv run python bench/serve.py                      # depth 4, concurrency 1 4 16 64
    uv run python bench/serve.py --depth 12
    uv run python bench/serve.py --depth 20 --device cuda --vocab 65536

Builds a random-weight model (perturbed, so prompts give different outputs) with a tokenizer
trained on this repository's own text, saves it as a checkpoint folder, then starts both servers
as processes of their own and replays the same chat workload at each concurrency: fixed prompts,
temperature 1 and top_k 50 with a seed per request (the same tokens on both servers: a sample
depends on its seed, not on the batch), up to `--max-tokens` output tokens. The baseline is the
seed's design: the plain `Engine` streaming inside the HTTP event loop, one request at a time.
The ceiling is no server at all: `Engine.generate` over c rows at once in this process, on the
model process's thread count, the same prompts and token budget. At concurrency c, c clients
send requests back to back, max(c, `--min-requests`) in a round (c=1: 8 one after the other).
Baseline, ours and the ceiling take turns, level by level, for `--rounds` rounds (one at c=64)
and each row is the median round, so the machine's drifting speed weighs on all alike (an idle
server uses no CPU). Meanwhile a pinger GETs /health every 20 ms. Printed per server and
concurrency: output tok/s (all tokens / wall time; tokens as each server's usage counts them, as
one delta may carry several), TTFT p50/p99 (request sent -> first content delta), latency
between content deltas p50/p99, /health p99, errors (429s apart), then ours / baseline and ours
/ ceiling. Then two scenarios on fresh servers: the prefix cache (the next turn of a 1,500-token
conversation, TTFT on the server that answered the turn before vs one with prefix caching off)
and chunked prefill (16 streams decode, a 2,000-token prompt arrives: the streams' latency between
deltas, p99 while it is prefilled over p50 before it) and grammar-constrained decoding (16
streams, all free or all under a response_format json_schema: ms per output token and ITL p50,
constrained / free). Results, with the load average, go to
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

ROOT = Path(__file__).resolve().parent.parent
# Sampled, as clients do: a greedy random model falls into loops that often end at once on a stop token.
SAMPLING = {"temperature": 1.0, "top_k": 50}
PROMPTS = [
    "Explain what a hash map is.",
    "Write a haiku about the sea.",
    "What is 7*3?",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet.",
    "How do I reverse a list in Python?",
    "Tell me a joke about computers.",
]


def build_checkpoint(folder: Path, depth: int, vocab: int, sequence_len: int) -> Path:
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    texts = [p.read_text(errors="ignore") for p in sorted(ROOT.glob("libs/**/*.py")) + sorted(ROOT.glob("*.md"))]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, tok.vocab_size, sequence_len))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(folder, model, tok, meta={"stage": "sft"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the baseline server: the plain engine in the event loop, one request at a time -----------


def baseline_app(folder: str, device: str) -> FastAPI:
    from nanochat.checkpoint import load_checkpoint
    from nanochat.engine import Engine

    ckpt = load_checkpoint(folder, device=device)
    engine = Engine(ckpt.model, ckpt.tokenizer)
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = engine.tokenizer.render_for_completion({"messages": body["messages"]})

        async def events():
            async with lock:
                yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
                utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
                generated = 0
                for tokens, _ in engine.generate(prompt, max_tokens=body["max_tokens"], seed=body["seed"], **SAMPLING):
                    token = tokens[0]
                    if token is None or token in engine.stop_tokens:
                        continue
                    generated += 1
                    text = utf8.decode(engine.tokenizer.decode_bytes([token]))
                    if not text:
                        continue
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': text}}]})}\n\n"
                yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': generated}})}\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def start_server(kind: str, folder: Path, port: int, device: str, slots: int, **env_extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    if kind == "ours":
        env.update(
            INFERENCE_MODEL_DIR=str(folder),
            INFERENCE_PORT=str(port),
            INFERENCE_SLOTS=str(slots),
            INFERENCE_MAX_WAITING="16",
            INFERENCE_LOG_LEVEL="WARNING",
            INFERENCE_DEVICE=device,
            **env_extra,
        )
        cmd = [sys.executable, "-m", "inference"]
    else:
        cmd = [sys.executable, __file__, "--baseline-server", str(folder), "--port", str(port), "--device", device]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


async def wait_up(url: str, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url + path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url}{path} did not answer 200 within {timeout} s")


# ---- the ceiling: our Engine's batched decode, no server ----------------------------------------


class Ceiling:
    """The model process's own loop without any server: `Engine.generate` over N rows at once,
    sampled as the clients ask, the same prompts and token budget, on as many torch threads as the
    model process."""

    def __init__(self, folder: Path, device: str):
        from nanochat.checkpoint import load_checkpoint
        from nanochat.engine import Engine

        ckpt = load_checkpoint(folder, device=device)
        self.engine = Engine(ckpt.model, ckpt.tokenizer)
        self.prompts = [
            ckpt.tokenizer.render_for_completion({"messages": [{"role": "user", "content": p}]}) for p in PROMPTS
        ]
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # the model process's default

    def run(self, rows: int, requests: int, max_tokens: int) -> dict:
        tokens, start = 0, time.perf_counter()
        for _ in range(max(1, requests // rows)):
            prompts = [self.prompts[i % len(self.prompts)] for i in range(rows)]
            for column, _ in self.engine.generate(prompts, max_tokens=max_tokens, seed=0, **SAMPLING):
                tokens += sum(1 for t in column if t is not None and t not in self.engine.stop_tokens)
        wall = time.perf_counter() - start
        return {
            "concurrency": rows,
            "requests": requests,
            "output_tokens": tokens,
            "wall_s": wall,
            "tok_per_s": tokens / wall,
        }


# ---- the client ---------------------------------------------------------------------------------


async def one_request(
    http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int = 0, extra: dict | None = None
) -> dict:
    body = {
        "model": "nanochat",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        **SAMPLING,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    stamps, status, error, tokens = [], None, None, None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "stamps": [], "start": start, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    break
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = repr(e)
    # Ours may put several tokens in one delta when the client falls behind: both report usage.
    tokens = len(stamps) if tokens is None else tokens
    return {"status": status, "stamps": stamps, "start": start, "error": error, "tokens": tokens}


async def ping_health(http: httpx.AsyncClient, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        try:
            await http.get(f"{url}/health")
            out.append(time.perf_counter() - t)
        except httpx.HTTPError:
            out.append(float("inf"))
        await asyncio.sleep(0.02)


def health_cell(seconds: float) -> str:
    """A failed /health ping (no answer within its 60 s timeout) counts as infinitely slow."""
    return f"{'timeout':>10s}" if seconds == float("inf") else f"{seconds * 1000:8.1f}ms"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int, extra: dict | None = None) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http,
        httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as health_http,
    ):
        stop, health = asyncio.Event(), []
        pinger = asyncio.create_task(ping_health(health_http, url, stop, health))
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(http, url, PROMPTS[i % len(PROMPTS)], max_tokens, i, extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        stop.set()
        await pinger
    ok = [r for r in results if r["status"] == 200 and not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["stamps"][0] - r["start"] for r in ok if r["stamps"]]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(itl, 0.5),
        "itl_p99": pct(itl, 0.99),
        "health_p99": pct(health, 0.99),
        "health_max": max(health, default=float("nan")),
        "errors": sum(1 for r in results if r not in ok and r["status"] != 429),
        "rejected_429": sum(1 for r in results if r["status"] == 429),
    }


async def bench_servers(folder: Path, args) -> list[dict]:
    """Start both servers, then measure them in turns: level by level, round by round.

    This machine's speed drifts by tens of percent over minutes; measuring the baseline first and
    ours minutes later would fold that drift into the ratio. Alternating the two servers within
    each round puts both under the same drift, and each row reports the median round."""
    servers = {
        kind: (start_server(kind, folder, port, args.device, args.slots), f"http://127.0.0.1:{port}")
        for kind, port in (("baseline", free_port()), ("ours", free_port()))
    }
    try:
        for kind, (_, url) in servers.items():
            # The baseline loads its model before it listens; ours listens first and loads beside.
            await wait_up(url, "/ready" if kind == "ours" else "/health")
            async with httpx.AsyncClient(timeout=600) as http:  # warm-up: first-call allocations, lazy inits
                await one_request(http, url, PROMPTS[0], 8)
        ceiling = Ceiling(folder, args.device)
        ceiling.run(1, 1, 8)  # warm-up
        rows = []
        for c in args.concurrency:
            kinds = [k for k in servers if k == "ours" or c <= args.baseline_max_concurrency] + ["ceiling"]
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for _ in range(args.rounds if c < 64 else 1):
                for kind in kinds:
                    requests = max(c, args.min_requests)
                    if kind == "ceiling":
                        runs[kind].append(ceiling.run(c, requests, args.max_tokens))
                    else:
                        runs[kind].append(await run_level(servers[kind][1], c, requests, args.max_tokens))
            for kind in kinds:
                row = sorted(runs[kind], key=lambda r: r["tok_per_s"])[len(runs[kind]) // 2]  # the median round
                row["server"], row["rounds_tok_per_s"] = kind, [r["tok_per_s"] for r in runs[kind]]
                rows.append(row)
                print(
                    f"  {kind:8s} c={c:<3d} {row['tok_per_s']:8.1f} tok/s  ttft p50 {row.get('ttft_p50', nan):.3f}s  "
                    f"(rounds: {', '.join(f'{t:.0f}' for t in row['rounds_tok_per_s'])})",
                    flush=True,
                )
        return rows
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:  # the baseline does not stop in the middle of a generation
                proc.kill()
                proc.wait()


# ---- scenarios: prefix caching and chunked prefill ----------------------------------------------


def conversation(tokenizer, tokens: int, variant: int) -> list[dict]:
    """A chat history of about `tokens` tokens, ending with a user message; `variant` changes its start."""
    text = (ROOT / "README.md").read_text(errors="ignore").split()
    messages, words = [], 0
    while len(tokenizer.render_for_completion({"messages": messages or [{"role": "user", "content": ""}]})) < tokens:
        role = "user" if len(messages) % 2 == 0 else "assistant"
        chunk = " ".join(text[(words % len(text)) : (words % len(text)) + 60])
        messages.append({"role": role, "content": f"({variant}) {chunk}" if not messages else chunk})
        words += 60
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": "Go on."})
    return messages


async def first_token_s(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, str]:
    """Seconds from sending a streamed chat request to its first token, and the whole reply."""
    start, first, text = time.perf_counter(), None, []
    async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if not event.get("choices"):
                continue
            delta = event["choices"][0]
            if first is None and (delta["delta"].get("content") or delta.get("finish_reason")):
                first = time.perf_counter() - start
            text.append(delta["delta"].get("content") or "")
    return first, "".join(text)


async def prefix_scenario(warm: str, cold: str, tokenizer, history_tokens: int, repeats: int = 3) -> dict:
    """The next turn of a conversation of `history_tokens` tokens: its TTFT on a server that just
    answered the turn before (prefix cached) and on one with prefix caching off."""
    out = {"warm": [], "cold": []}
    async with httpx.AsyncClient(timeout=600) as http:
        for variant in range(repeats):
            history = conversation(tokenizer, history_tokens, variant)
            params = {"max_tokens": 32, **SAMPLING, "seed": variant}
            _, reply = await first_token_s(http, warm, {"messages": history, **params})
            turn = history + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            for kind, url in (("warm", warm), ("cold", cold)):
                out[kind].append((await first_token_s(http, url, {"messages": turn, **params, "max_tokens": 4}))[0])
    warm_s, cold_s = pct(out["warm"], 0.5), pct(out["cold"], 0.5)
    return {
        "history_tokens": history_tokens,
        "ttft_warm_p50": warm_s,
        "ttft_cold_p50": cold_s,
        "ratio": warm_s / cold_s,
    }


async def chunked_scenario(url: str, tokenizer, streams: int, prompt_tokens: int) -> dict:
    """`streams` streams decode; a prompt of `prompt_tokens` tokens arrives: the streams' latency
    between deltas, p50 before it arrives and p99 while it is prefilled."""
    text = " ".join((ROOT / "README.md").read_text(errors="ignore").split())
    ids = tokenizer.encode(text)
    while len(ids) < prompt_tokens:
        ids = ids + ids
    long_prompt = tokenizer.decode(ids[: prompt_tokens - 1])
    stamps: list[list[float]] = [[] for _ in range(streams)]
    window: list[float] = []
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def stream(i: int) -> None:
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": 400}
            body.update(SAMPLING, seed=i, stream=True)
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line:
                        stamps[i].append(time.perf_counter())

        async def long_request() -> None:
            await asyncio.sleep(2.0)  # the streams are decoding by then
            window.append(time.perf_counter())
            body = {"prompt": long_prompt, "max_tokens": 1, "temperature": 0}
            r = await http.post(f"{url}/v1/completions", json=body)
            window.append(time.perf_counter())
            window.append(r.json()["usage"]["prompt_tokens"])

        await asyncio.gather(long_request(), *(stream(i) for i in range(streams)))
    start, end, prompt_len = window
    before = [b - a for st in stamps for a, b in zip(st, st[1:]) if b < start]
    during = [b - a for st in stamps for a, b in zip(st, st[1:]) if b > start and a < end]
    p50, p99 = pct(before, 0.5), pct(during, 0.99)
    return {
        "streams": streams,
        "prompt_tokens": prompt_len,
        "prefill_s": end - start,
        "itl_p50_before": p50,
        "itl_p99_during": p99,
        "ratio": p99 / p50,
    }


# One long string and an integer: a random model fills the string until the grammar's closing path
# needs the rest of the budget, so constrained and free rows generate about as many tokens.
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
            "required": ["answer", "score"],
            "additionalProperties": False,
        },
    },
}


async def grammar_scenario(url: str, streams: int, max_tokens: int, rounds: int) -> dict:
    """`streams` clients back to back, every row grammar-constrained (response_format
    json_schema) or every row free with as many tokens, in alternating rounds: ms per output token
    (wall time / output tokens) and ITL p50 of each, the median round, and constrained / free."""
    runs: dict[str, list[dict]] = {"json": [], "free": []}
    requests = 4 * streams  # four waves: the last, uneven one weighs less on the wall time
    for _ in range(rounds):
        constrained = await run_level(url, streams, requests, max_tokens, {"response_format": ANSWER_FORMAT})
        runs["json"].append(constrained)
        # A constrained row ends when its document closes, a little before max_tokens: free rows get
        # as many tokens, so both spread the same prefill and request overhead over the same tokens.
        runs["free"].append(await run_level(url, streams, requests, round(constrained["output_tokens"] / requests)))
    out: dict = {"streams": streams, "max_tokens": max_tokens, "rounds": rounds}
    for kind, levels in runs.items():
        median = sorted(levels, key=lambda r: r["tok_per_s"])[len(levels) // 2]
        out[kind] = {
            "ms_per_token": 1000 / median["tok_per_s"],
            "itl_p50_ms": median["itl_p50"] * 1000,
            "tokens": median["output_tokens"],
            "errors": median["errors"],
            "rounds_tok_per_s": [r["tok_per_s"] for r in levels],
        }
    out["ratio"] = out["json"]["ms_per_token"] / out["free"]["ms_per_token"]
    out["itl_ratio"] = out["json"]["itl_p50_ms"] / out["free"]["itl_p50_ms"]
    return out


async def run_scenarios(folder: Path, args) -> dict:
    from nanochat.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(folder / "tokenizer")
    ports = {"warm": free_port(), "cold": free_port()}
    procs = {
        "warm": start_server("ours", folder, ports["warm"], args.device, args.slots),
        "cold": start_server("ours", folder, ports["cold"], args.device, args.slots, INFERENCE_PREFIX_CACHING="false"),
    }
    urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    try:
        for url in urls.values():
            await wait_up(url, "/ready")
        if args.grammar_only:
            return {"grammar": await run_grammar(urls["warm"], args)}
        prefix = await prefix_scenario(urls["warm"], urls["cold"], tokenizer, 1500)
        print(
            f"prefix cache: next turn of a {prefix['history_tokens']}-token conversation, TTFT p50 "
            f"{prefix['ttft_warm_p50']:.3f}s cached vs {prefix['ttft_cold_p50']:.3f}s cold = {prefix['ratio']:.2f}x",
            flush=True,
        )
        procs["cold"].terminate()  # idle, but the chunked scenario has the machine to itself
        chunked = await chunked_scenario(urls["warm"], tokenizer, 16, 2000)
        print(
            f"chunked prefill: a {chunked['prompt_tokens']}-token prompt ({chunked['prefill_s']:.2f} s) beside "
            f"{chunked['streams']} streams: their ITL p50 before {chunked['itl_p50_before'] * 1000:.1f} ms, "
            f"p99 during {chunked['itl_p99_during'] * 1000:.1f} ms = {chunked['ratio']:.2f}x",
            flush=True,
        )
        return {"prefix": prefix, "chunked": chunked, "grammar": await run_grammar(urls["warm"], args)}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(15)


async def run_grammar(url: str, args) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:  # warm-up: llguidance's view of the vocabulary
        await one_request(http, url, PROMPTS[0], 8, extra={"response_format": ANSWER_FORMAT})
    grammar = await grammar_scenario(url, 16, args.max_tokens, args.rounds)
    free, constrained = grammar["free"], grammar["json"]
    print(
        f"grammar: 16 streams, {constrained['tokens']} constrained vs {free['tokens']} free tokens a round, "
        f"{constrained['ms_per_token']:.2f} vs {free['ms_per_token']:.2f} ms per output token = {grammar['ratio']:.2f}x "
        f"(ITL p50 {constrained['itl_p50_ms']:.1f} vs {free['itl_p50_ms']:.1f} ms = {grammar['itl_ratio']:.2f}x)",
        flush=True,
    )
    return grammar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocab incl. the 9 specials")
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per level below 64 (the median is reported)")
    parser.add_argument(
        "--min-requests", type=int, default=8, help="requests per round at least (c=1: that many one after the other)"
    )
    parser.add_argument(
        "--baseline-max-concurrency",
        type=int,
        default=1 << 30,
        help="skip the baseline above this concurrency (it serves one request at a time, "
        "so its tok/s stays flat while a level of c requests takes c times as long)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="keep the model here and reuse it on the next run (with the same shape options)"
    )
    parser.add_argument("--no-levels", action="store_true", help="skip the concurrency levels")
    parser.add_argument(
        "--no-scenarios", action="store_true", help="skip the prefix-cache, chunked-prefill, grammar runs"
    )
    parser.add_argument("--grammar-only", action="store_true", help="of the scenarios, run only the grammar one")
    parser.add_argument("--baseline-server", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        import uvicorn

        uvicorn.run(
            baseline_app(args.baseline_server, args.device), host="127.0.0.1", port=args.port, log_level="warning"
        )
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or Path(tmp) / "model"
        if not (folder / "manifest.json").exists():
            build_checkpoint(folder, args.depth, args.vocab, args.sequence_len)
        rows = [] if args.no_levels else asyncio.run(bench_servers(folder, args))
        scenarios = None if args.no_scenarios else asyncio.run(run_scenarios(folder, args))

    print(
        f"\ndepth {args.depth}, vocab {args.vocab} (incl. 9 specials), random weights, temperature 1 top_k 50, up to "
        f"{args.max_tokens} output tokens, {args.slots} slots, device {args.device}, {platform.processor() or platform.machine()}"
    )
    header = (
        f"{'server':8s} {'conc':>4s} {'reqs':>4s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
        f"{'ITL p50':>8s} {'ITL p99':>8s} {'health p99':>10s} {'errors':>6s} {'429':>4s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["server"] == "ceiling":
            print(f"{r['server']:8s} {r['concurrency']:4d} {r['requests']:4d} {r['tok_per_s']:8.1f}")
            continue
        print(
            f"{r['server']:8s} {r['concurrency']:4d} {r['requests']:4d} {r['tok_per_s']:8.1f} "
            f"{r['ttft_p50']:8.3f}s {r['ttft_p99']:8.3f}s {r['itl_p50'] * 1000:6.1f}ms {r['itl_p99'] * 1000:6.1f}ms "
            f"{health_cell(r['health_p99'])} {r['errors']:6d} {r['rejected_429']:4d}"
        )
    by = {(r["server"], r["concurrency"]): r["tok_per_s"] for r in rows}
    for c in args.concurrency if rows else ():
        ours = by.get(("ours", c))
        ratios = [f"ours / {k} {ours / by[(k, c)]:.2f}x" for k in ("baseline", "ceiling") if ours and by.get((k, c))]
        print(f"concurrency {c:3d}: {', '.join(ratios)}")
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k not in ("baseline_server", "port")},
                "torch": torch.__version__,
                "load_average": os.getloadavg(),
                "rows": rows,
                "scenarios": scenarios,
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
