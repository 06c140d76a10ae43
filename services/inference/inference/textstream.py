"""Turn one sample's generated tokens into what a client sees: text deltas and tool parts.

`SampleDecoder.feed(token)` returns the parts that token completes, as (kind, text) pairs:
kind "text" for the model's own words, "python" for a calculator expression (between
`<|python_start|>` and `<|python_end|>`) and "python_output" for the result the engine forced
(between `<|output_start|>` and `<|output_end|>`). Text is decoded from bytes incrementally, so a
multi-byte UTF-8 character split over tokens is never cut across deltas. Stop strings are found
across token boundaries: text that could still be the start of a stop string is held back until
it is known not to be; on a match, the text before it is released and `stopped` turns True.
"""

from __future__ import annotations

import codecs
import weakref

from nanochat.tokenizer import Tokenizer

Part = tuple[str, str]

# Each token's bytes, per tokenizer, filled as tokens come: every stream shares one table instead
# of asking the tokenizer once per token per stream.
_TOKEN_BYTES: weakref.WeakKeyDictionary[Tokenizer, dict[int, bytes]] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """One token's bytes (a special token's are its name's), from the shared table."""
    table = _TOKEN_BYTES.setdefault(tokenizer, {})
    raw = table.get(token)
    if raw is None:
        raw = table[token] = tokenizer.decode_bytes([token])
    return raw


class SampleDecoder:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.token_bytes = _TOKEN_BYTES.setdefault(tokenizer, {})
        self.stop = list(stop or [])
        special = tokenizer.encode_special
        self.opens = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.closes = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.first_special = tokenizer.num_ranks
        self.mode = "text"
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tool_bytes = bytearray()
        self.held = ""  # decoded text not yet released (a possible stop-string prefix)
        self.stopped = False

    def feed(self, token: int) -> list[Part]:
        if self.stopped:
            return []
        if token in self.opens:
            parts = self._flush_text()
            self.mode, self.tool_bytes = self.opens[token], bytearray()
            return parts
        if token in self.closes:
            if self.mode != self.closes[token]:
                return []
            text = self.tool_bytes.decode("utf-8", errors="replace")
            self.mode = "text"
            return [(self.closes[token], text)]
        if token >= self.first_special:
            return []  # other special tokens are structure, not text
        raw = self.token_bytes.get(token)
        if raw is None:
            raw = token_bytes(self.tokenizer, token)
        if self.mode != "text":
            self.tool_bytes += raw
            return []
        self.held += self.utf8.decode(raw)
        return self._release()

    def finish(self) -> list[Part]:
        """Whatever is still held back once the sample has ended."""
        if self.stopped:
            return []
        parts = self._flush_text()
        if self.mode != "text" and self.tool_bytes:
            parts.append((self.mode, self.tool_bytes.decode("utf-8", errors="replace")))
            self.tool_bytes = bytearray()
        return parts

    def _flush_text(self) -> list[Part]:
        self.held += self.utf8.decode(b"", final=True)
        text, self.held = self.held, ""
        return [("text", text)] if text else []

    def _release(self) -> list[Part]:
        if not self.stop:
            text, self.held = self.held, ""
            return [("text", text)] if text else []
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            text = self.held[: min(hits)]
            self.held, self.stopped = "", True
            return [("text", text)] if text else []
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        text = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return [("text", text)] if text else []
