"""chat_cli: talk to a chat model in the terminal, from a checkpoint folder or through the inference API.

    python -m nanochat.chat_cli --init-from runs/sft                 # load the checkpoint here
    python -m nanochat.chat_cli --url http://localhost:8000          # the OpenAI-compatible API
    python -m nanochat.chat_cli --init-from runs/sft -p "Why is the sky blue?"   # one answer, then exit

Type a message and press enter; `clear` starts a new conversation, `quit` (or end of input) leaves.
Sampling defaults are the original's terminal chat: temperature 0.6, top_k 50. With `--url`, the
token comes from `--token` or NANOCHAT_API_TOKEN (the server's INFERENCE_API_TOKEN).

With a checkpoint, the conversation is kept as tokens, the model's own output (calculator calls and
their forced results included) appended as generated, so each turn sees exactly what was sampled.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import httpx

EXIT_WORDS = {"quit", "exit"}
# How a calculator call and its result show in the terminal, the same from a checkpoint or the API.
TOOL_MARKS = {"<|python_start|>": "[calc: ", "<|python_end|>": "]", "<|output_start|>": "[= ", "<|output_end|>": "]"}


class LocalChat:
    """A conversation with a checkpoint loaded in this process."""

    def __init__(self, folder: str, device: str | None, temperature: float, top_k: int | None, max_tokens: int):
        from nanochat.checkpoint import load_checkpoint
        from nanochat.common import autodetect_device
        from nanochat.engine import Engine

        ckpt = load_checkpoint(folder, device=autodetect_device(device))
        if ckpt.tokenizer is None:
            raise ValueError(f"checkpoint {folder} has no tokenizer/ folder; chat needs one")
        ckpt.model.eval()
        self.engine, self.tokenizer = Engine(ckpt.model, ckpt.tokenizer), ckpt.tokenizer
        self.max_len = ckpt.config.sequence_len
        self.temperature, self.top_k, self.max_tokens = temperature, top_k, max_tokens
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.tokenizer.bos_token_id]

    def reply(self, message: str) -> Iterator[str]:
        special = self.tokenizer.encode_special
        turn = [
            special("<|user_start|>"),
            *self.tokenizer.encode(message),
            special("<|user_end|>"),
            special("<|assistant_start|>"),
        ]
        prompt = self.tokens + turn
        room = self.max_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"the conversation has {len(prompt)} tokens, the model's context is {self.max_len}; "
                "type `clear` to start again"
            )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[int] = []
        stops = self.engine.stop_tokens
        marks = {special(name): text for name, text in TOOL_MARKS.items()}
        for column, _ in self.engine.generate(
            prompt, max_tokens=min(self.max_tokens, room), temperature=self.temperature, top_k=self.top_k
        ):
            token = column[0]
            if token is None:
                break
            generated.append(token)
            if token in marks:
                yield decoder.decode(b"", final=True) + marks[token]
            elif token not in stops:
                yield decoder.decode(self.tokenizer.decode_bytes([token]))
        yield decoder.decode(b"", final=True)
        if not generated or generated[-1] not in stops:
            generated.append(special("<|assistant_end|>"))
        self.tokens = prompt + generated


class RemoteChat:
    """A conversation held here as messages, each turn streamed from the inference API."""

    def __init__(
        self, url: str, token: str | None, model: str | None, temperature: float, top_k: int | None, max_tokens: int
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(10.0, read=300.0))
        self.model = model
        self.sampling = {
            "temperature": temperature,
            "top_k": top_k if top_k is not None else -1,
            "max_tokens": max_tokens,
        }
        self.clear()

    def clear(self) -> None:
        self.messages: list[dict] = []

    def reply(self, message: str) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": message}]
        body = {"messages": messages, "stream": True, **self.sampling}
        if self.model:
            body["model"] = self.model
        parts: list[dict[str, str]] = []
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ValueError(f"the server answered {response.status_code}: {_error_message(response)}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: ") :]).get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content"):
                        _add_part(parts, "text", delta["content"])
                        yield delta["content"]
                    if delta.get("nanochat_tool"):
                        tool = delta["nanochat_tool"]
                        _add_part(parts, tool["type"], tool["text"])
                        start, end = (
                            ("<|python_start|>", "<|python_end|>")
                            if tool["type"] == "python"
                            else ("<|output_start|>", "<|output_end|>")
                        )
                        yield TOOL_MARKS[start] + tool["text"] + TOOL_MARKS[end]
        # The tool parts go back as `nanochat_parts` (as the web UI sends them), so the next turn's
        # prompt holds the call and its result.
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        self.messages = messages + [{"role": "assistant", "content": text, "nanochat_parts": parts}]


def _add_part(parts: list[dict[str, str]], kind: str, text: str) -> None:
    if parts and parts[-1]["type"] == kind == "text":
        parts[-1]["text"] += text
    else:
        parts.append({"type": kind, "text": text})


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", response.json())
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        return response.text[:500]


def converse(chat: LocalChat | RemoteChat, lines: TextIO, out: TextIO, interactive: bool) -> None:
    """Read user lines until `quit` or end of input, writing each streamed reply to `out`."""
    while True:
        if interactive:
            out.write("\nUser: ")
            out.flush()
        line = lines.readline()
        if not line:
            return
        message = line.strip()
        if message.lower() in EXIT_WORDS:
            return
        if message.lower() == "clear":
            chat.clear()
            out.write("(a new conversation)\n")
            continue
        if not message:
            continue
        say(chat, message, out)


def say(chat: LocalChat | RemoteChat, message: str, out: TextIO) -> bool:
    """Stream one reply; an error is written in its place (the conversation goes on) and returns False."""
    out.write("Assistant: ")
    ok = True
    try:
        for piece in chat.reply(message):
            out.write(piece)
            out.flush()
    except (ValueError, httpx.HTTPError) as e:
        out.write(f"\n[error] {e}")
        ok = False
    out.write("\n")
    out.flush()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.chat_cli", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--init-from", help="a checkpoint folder (sft or rl) to load here")
    where.add_argument("--url", help="the inference API's base address, e.g. http://localhost:8000")
    parser.add_argument("--token", default=os.environ.get("NANOCHAT_API_TOKEN"), help="bearer token for --url")
    parser.add_argument("--model", help="with --url: the model name to ask for (default: what the server serves)")
    parser.add_argument("--device", help="with --init-from: cpu or cuda (default: cuda when present)")
    parser.add_argument("-p", "--prompt", help="answer this one message and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 for no top-k")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        parser.error("--temperature and --top-k must be >= 0, --max-tokens >= 1")
    top_k = args.top_k or None
    try:
        if args.init_from:
            chat: LocalChat | RemoteChat = LocalChat(
                args.init_from, args.device, args.temperature, top_k, args.max_tokens
            )
        else:
            chat = RemoteChat(args.url, args.token, args.model, args.temperature, top_k, args.max_tokens)
    except (OSError, ValueError) as e:
        print(f"chat_cli: {e}", file=sys.stderr)
        return 1
    if args.prompt is not None:
        return 0 if say(chat, args.prompt, sys.stdout) else 1
    else:
        converse(chat, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
