"""Training batches: packed token streams (pretraining, midtraining) and padded SFT batches.

Packing (NANOCHAT_SPEC "Loader"): documents are tokenized in batches with `<|bos|>` before each
one and concatenated into one stream; a step takes B*T+1 contiguous tokens, inputs = the first B*T
viewed as (B, T), targets = the last B*T. The last token of a step (only a target there) stays in
the stream as the first input of the next step, so every token is an input exactly once and
nothing is padded. Midtraining packs rendered conversations the same way, each cut at its first
2,048 tokens (`MID_MAX_TOKENS`) and trained on every token (the loss mask is ignored), both as in
the original.

SFT batches are one conversation per row, padded with `<|assistant_end|>` to the batch's longest;
targets are -1 (ignored) where the loss mask is 0 and on padding.

Every loader has `state_dict()`, a JSON-able dict (source position + buffered tokens) that a
resumable checkpoint stores; passing it back as `state=` continues with exactly the batches an
uninterrupted run would have produced.

Quick look: `python -m nanochat.dataloader DATA_DIR TOKENIZER_DIR` prints the first batch's shape.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from nanochat.dataset import iter_row_groups
from nanochat.tokenizer import Tokenizer

# The original's render cap for midtraining conversations, whatever the sequence length.
MID_MAX_TOKENS = 2048

# A source maps a position to an iterator of (token lists, position after them).
Source = Callable[[Any], Iterator[tuple[list[list[int]], Any]]]


class PackedLoader:
    """Packs a stream of token lists into (inputs, targets) of shape (B, T); one pass of the
    source unless the source itself loops (then it never stops)."""

    def __init__(
        self,
        source: Source,
        start: Any,
        batch_size: int,
        seq_len: int,
        device: str | torch.device = "cpu",
        state: dict[str, Any] | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.source = source
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.position = state["position"] if state else start
        self.buffer: list[int] = list(state["buffer"]) if state else []
        self._stream: Iterator | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "buffer": list(self.buffer)}

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while len(self.buffer) < need:
            if self._stream is None:
                self._stream = self.source(self.position)
            token_lists, position = next(self._stream)  # StopIteration ends the pass
            for ids in token_lists:
                self.buffer.extend(ids)
            self.position = position
        window = torch.tensor(self.buffer[:need], dtype=torch.long)
        del self.buffer[: need - 1]
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        inputs = window[:-1].view(self.B, self.T)
        targets = window[1:].view(self.B, self.T)
        return inputs, targets


def pretrain_loader(
    tokenizer: Tokenizer,
    data_dir: str,
    split: str,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    state: dict[str, Any] | None = None,
    loop: bool | None = None,
    num_threads: int = 4,
) -> PackedLoader:
    """FineWeb-format shards -> packed batches; the train split loops forever by default, val
    is one pass. Position = [shard, row_group] of the next row group to read."""
    loop = split == "train" if loop is None else loop
    bos = tokenizer.bos_token_id

    def source(position: Sequence[int]) -> Iterator[tuple[list[list[int]], list[int]]]:
        for docs, nxt in iter_row_groups(data_dir, split, rank, world_size, tuple(position), loop=loop):
            yield tokenizer.encode(docs, prepend=bos, num_threads=num_threads), list(nxt)

    return PackedLoader(source, [0, rank], batch_size, seq_len, device, state)


class ConversationLoader(PackedLoader):
    """Midtraining: rendered conversations (rank r takes r, r+W, ...), each cut at MID_MAX_TOKENS,
    packed like pretraining, one pass. Position = index of the next conversation."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        conversations: Sequence[dict],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        state: dict[str, Any] | None = None,
        chunk: int = 64,
    ):
        self.num_conversations = n = len(conversations)

        def source(position: int) -> Iterator[tuple[list[list[int]], int]]:
            for first in range(position, n, chunk * world_size):
                indices = range(first, min(n, first + chunk * world_size), world_size)
                rendered = [
                    tokenizer.render_conversation(conversations[i], max_tokens=MID_MAX_TOKENS)[0] for i in indices
                ]
                yield rendered, indices[-1] + world_size

        super().__init__(source, rank, batch_size, seq_len, device, state)

    def progress(self) -> float:
        """Fraction of the data pass consumed (drives the LR schedule and the last step)."""
        return min(1.0, self.position / max(1, self.num_conversations))


class SFTLoader:
    """Padded SFT batches of `batch_size` conversations; rank r takes r, r+W, ... Loops over the
    data `num_epochs` times (None: forever). Position = (epoch, index of the next conversation)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        conversations: Sequence[dict],
        batch_size: int,
        max_seq_len: int = 2048,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        num_epochs: int | None = 1,
        state: dict[str, Any] | None = None,
    ):
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot feed {world_size} ranks")
        self.tokenizer, self.conversations = tokenizer, conversations
        self.B, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.num_epochs = num_epochs
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.epoch, self.index = (state["epoch"], state["index"]) if state else (0, rank)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def __iter__(self) -> SFTLoader:
        return self

    def _next_conversation(self) -> dict:
        if self.index >= len(self.conversations):
            self.epoch, self.index = self.epoch + 1, self.rank
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        conversation = self.conversations[self.index]
        self.index += self.world_size
        return conversation

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.B):
            try:
                rows.append(
                    self.tokenizer.render_conversation(self._next_conversation(), max_tokens=self.max_seq_len + 1)
                )
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), width), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids_t = torch.tensor(ids, dtype=torch.long)
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            n = len(ids) - 1
            inputs[r, :n] = ids_t[:-1]
            targets[r, :n] = torch.where(keep, ids_t[1:], torch.tensor(-1))
        return inputs.to(self.device), targets.to(self.device)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m nanochat.dataloader DATA_DIR TOKENIZER_DIR")
    tok = Tokenizer.load(sys.argv[2])
    x, y = next(pretrain_loader(tok, sys.argv[1], "train", 4, 64))
    print(f"inputs {tuple(x.shape)} targets {tuple(y.shape)} first ids {x[0, :8].tolist()}")
