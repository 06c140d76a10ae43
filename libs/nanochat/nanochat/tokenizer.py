"""The nanochat tokenizer: BPE ranks trained by `rustbpe`, encoding by tiktoken, and the chat format.

Two vocabulary counts are kept apart (NANOCHAT_SPEC "Tokenizer"): `rustbpe` trains *mergeable
ranks* (the 256 single bytes included); this tokenizer's `vocab_size` is the total, with the 9
special tokens appended after the ranks. `Tokenizer.train_from_iterator(texts, 65_536)` therefore
trains 65,527 ranks.

On disk (`save`/`load`) a tokenizer is a folder with two text files, no pickle:
- `ranks.tiktoken`: one `base64(token_bytes) rank` line per mergeable rank, as tiktoken's own files;
- `tokenizer.json`: `{"format": 1, "pattern": ..., "special_tokens": {name: id}}`.

Chat rendering (`render_conversation`) returns token ids and a loss mask (1 = train on the token):
`<|bos|>`, then alternating user/assistant turns; only the assistant's own text and python code
(and its `<|assistant_end|>`) carry mask 1, tool output is forced by the engine and carries 0.

Function tools (docs/tools.md) reuse the calculator's tokens: a conversation may carry `tools`
(`{"name", "description", "parameters"}` each), listed as JSON lines ahead of the first user
message; a call is a `python` part holding `{"name": ..., "arguments": {...}}` and a `role: "tool"`
message is the call's result, a `python_output` part of the same assistant turn, which goes on
after it (so the model learns to call with mask 1 and never trains on what a tool said).

Quick check: `python -m nanochat.tokenizer` trains a small tokenizer on this file and round-trips it.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import tiktoken

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

RANKS_FILE = "ranks.tiktoken"
CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class ConversationError(ValueError):
    """A conversation that cannot be rendered: empty, roles out of order, unknown part type."""


class Tokenizer:
    """Encode/decode text with trained BPE ranks plus the 9 nanochat special tokens."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        n = len(mergeable_ranks)
        if n < 256:
            raise ValueError(f"a byte-level BPE needs at least the 256 byte ranks, got {n} ranks")
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly the ids 0..n-1, each used once")
        specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=specials
        )
        self.pattern = pattern
        self.num_ranks = n
        self.bos_token_id = specials["<|bos|>"]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = SPLIT_PATTERN,
        buffer_size: int = 8192,
    ) -> Tokenizer:
        """Train with rustbpe; `vocab_size` is the total, the 9 specials included.

        A text too small to supply that many merges gives a smaller vocabulary (training stops
        when no pair is left); `vocab_size` always reports the real size.
        """
        import rustbpe

        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(
                f"vocab_size {vocab_size} leaves {num_ranks} mergeable ranks after the "
                f"{len(SPECIAL_TOKENS)} special tokens; at least 256 (one per byte) are needed, "
                f"so vocab_size must be >= {256 + len(SPECIAL_TOKENS)}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), num_ranks, buffer_size=buffer_size, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, folder: str | os.PathLike) -> None:
        """Write `ranks.tiktoken` and `tokenizer.json` into `folder` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        by_rank = sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank]
        config = {
            "format": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": {name: self.num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)},
        }
        _write_atomic(folder / RANKS_FILE, "".join(lines))
        _write_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Tokenizer:
        """Read a folder written by `save`; a malformed file raises ValueError naming it."""
        folder = Path(folder)
        ranks_path, config_path = folder / RANKS_FILE, folder / CONFIG_FILE
        for path in (ranks_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no {path.name}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported format {config.get('format')!r}")
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(ranks_path.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            try:
                token_b64, rank = line.split(" ")
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{ranks_path}:{lineno}: expected 'base64 rank' ({e})") from e
        tokenizer = cls(ranks, config["pattern"])
        expected = {name: tokenizer.num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        if config.get("special_tokens") != expected:
            raise ValueError(f"{config_path}: special tokens do not match the nanochat set and order")
        return tokenizer

    # ---- encoding -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Total number of token ids: mergeable ranks + special tokens."""
        return self.num_ranks + len(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        """The id of a special token such as `<|assistant_end|>`."""
        try:
            return self.encoding._special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode text as ordinary text (special-token strings in it are NOT treated as specials).

        A list of strings is encoded in parallel and gives a list of id lists. `prepend`/`append`
        add one token (an id or a special token's name) around each encoded text.
        """
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.encoding.encode_ordinary(text) + tail
        if isinstance(text, list):
            batch = self.encoding.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + ids + tail for ids in batch]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Decode ids to raw bytes (lets a streamer hold back an incomplete UTF-8 character)."""
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        """Each id's true byte length (specials count 0): the denominator of bits-per-byte."""
        lengths = [len(self.encoding.decode_single_token_bytes(i)) for i in range(self.num_ranks)]
        return lengths + [0] * len(SPECIAL_TOKENS)

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    # ---- chat format --------------------------------------------------------------------------

    def render_conversation(
        self, conversation: dict[str, Any] | list[dict[str, Any]], max_tokens: int | None = 2048
    ) -> tuple[list[int], list[int]]:
        """Render a whole conversation to (ids, mask); mask 1 marks the tokens to train on."""
        messages = _normalise_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.encoding._special_tokens
        add(self.bos_token_id, 0)
        tools = conversation.get("tools") if isinstance(conversation, dict) else None
        if tools:
            messages[0] = {**messages[0], "content": render_tools(tools) + messages[0]["content"]}
        for message in messages:
            if message["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encoding.encode_ordinary(message["content"]), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            for part in _assistant_parts(message["content"]):
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encoding.encode_ordinary(text), 1)
                elif kind == "python":
                    add(sp["<|python_start|>"], 1)
                    add(self.encoding.encode_ordinary(text), 1)
                    add(sp["<|python_end|>"], 1)
                else:  # python_output: forced by the tool at inference time, never trained on
                    add(sp["<|output_start|>"], 0)
                    add(self.encoding.encode_ordinary(text), 0)
                    add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict[str, Any] | list[dict[str, Any]]) -> list[int]:
        """Ids that prime the model to answer: the conversation without its last assistant turn,
        then `<|assistant_start|>`. Not truncated: the caller checks the context length."""
        raw = conversation.get("messages") if isinstance(conversation, dict) else conversation
        # After a tool's result the assistant's turn is still open: the model goes on from there.
        open_turn = isinstance(raw, list) and bool(raw) and isinstance(raw[-1], dict) and raw[-1].get("role") == "tool"
        messages = _normalise_messages(conversation)
        if messages[-1]["role"] == "assistant" and not open_turn:
            messages = messages[:-1]
        if not messages:
            raise ConversationError("nothing to complete: the conversation has no user message")
        tools = conversation.get("tools") if isinstance(conversation, dict) else None
        ids, _ = self.render_conversation({"messages": messages, "tools": tools}, max_tokens=None)
        if open_turn:
            return ids[:-1]  # without the turn's <|assistant_end|>
        return ids + [self.encode_special("<|assistant_start|>")]


TOOLS_HEADER = 'Tools you can call, one JSON line each; call one as {"name": ..., "arguments": {...}}:\n'


def render_tools(tools: list[dict[str, Any]]) -> str:
    """The text that lists function tools ahead of the first user message."""
    lines = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ConversationError(f"tool {i} must be an object with a string 'name'")
        spec = {
            "name": tool["name"],
            "description": tool.get("description") or "",
            "parameters": tool.get("parameters"),
        }
        lines.append(json.dumps(spec, ensure_ascii=False) + "\n")
    return TOOLS_HEADER + "".join(lines) + "\n"


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as the model writes it between <|python_start|> and <|python_end|>."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def parse_tool_call(text: str, names: Collection[str]) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) when a python block's text is a call of one of the functions `names`
    (`{"name": ..., "arguments": {...}}`), else None (a calculator expression, say)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return None
    if not isinstance(value, dict) or not isinstance(value.get("arguments"), dict):
        return None
    if not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    return value["name"], value["arguments"]


def _normalise_messages(conversation: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate roles and merge a leading system message into the first user message."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation needs a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ConversationError(f"message {i} has unknown role {m['role']!r}")
    messages = _fold_tool_results([dict(m) for m in messages])
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message")
        system, user = messages[0]["content"], messages[1]["content"]
        if not isinstance(system, str) or not isinstance(user, str):
            raise ConversationError("system and user content must be strings")
        messages = [{"role": "user", "content": system + "\n\n" + user}] + messages[2:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(
                f"message {i} is {m['role']!r} but {expected!r} was expected: after an optional "
                "system message, turns must alternate user, assistant, user, ..."
            )
        if m["role"] == "user" and not isinstance(m["content"], str):
            raise ConversationError(f"message {i}: user content must be a string")
    return messages


def _fold_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each `tool` message becomes a python_output part of the assistant turn before it, and an
    assistant message after a tool result continues that same turn."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        after_tool = i > 0 and messages[i - 1]["role"] == "tool"
        if m["role"] == "tool":
            if not out or out[-1]["role"] != "assistant":
                raise ConversationError(f"message {i}: a tool message must follow an assistant message")
            if not isinstance(m["content"], str):
                raise ConversationError(f"message {i}: tool content must be a string")
            parts = _assistant_parts(out[-1]["content"]) + [{"type": "python_output", "text": m["content"]}]
            out[-1] = {"role": "assistant", "content": parts}
        elif m["role"] == "assistant" and after_tool:
            out[-1] = {"role": "assistant", "content": out[-1]["content"] + _assistant_parts(m["content"])}
        else:
            out.append(m)
    return out


def _assistant_parts(content: str | list[dict[str, Any]]) -> list[dict[str, str]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ConversationError("assistant content must be a string or a list of parts")
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise ConversationError(f"assistant part {part!r} needs a string 'text'")
        if part.get("type") not in ("text", "python", "python_output"):
            raise ConversationError(
                f"unknown assistant part type {part.get('type')!r}; expected 'text', 'python' or 'python_output'"
            )
    return content


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


if __name__ == "__main__":
    lines = Path(__file__).read_text(encoding="utf-8").splitlines(keepends=True)
    tok = Tokenizer.train_from_iterator(lines, vocab_size=256 + 9 + 200)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        again = Tokenizer.load(d)
    sample = "Hello world! 12345 <|bos|>"
    print(f"vocab_size={again.vocab_size} ranks={again.num_ranks} {sample!r} -> {again.encode(sample)}")
    assert again.decode(again.encode(sample)) == sample
