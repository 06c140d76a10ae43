"""Automatic prefix caching over the scheduler's KV-cache slots.

A slot's positions are cut into blocks of `block_size` tokens. Each full block is named by a
hash of its tokens chained with the previous block's hash, so block i's name stands for the
whole prefix of (i + 1) * block_size tokens, and a name always sits at block i. The index maps
a name to the slots whose cache holds that block; a slot keeps the chain of names it holds from
position 0. A prompt's blocks are registered once it is prefilled (a running row never rewrites
them), the rest of a row's tokens when it leaves the batch: a finished request's cache stays
where it was until its slot is taken again.

Admission (`claim`) names the prompt's full blocks (one token is always left to prefill, for its
logits) and walks them while the index holds them. The head slot is the free slot holding the
longest run of them in place, so the next turn of a conversation lands on its previous turn's
slot and copies nothing; otherwise the least recently released free slot (never used ones
first). Blocks the chosen slot lacks are copied from whichever slot holds them (same positions:
rotary angles are baked into the keys). Taking a slot drops its other names from the index: that
is the eviction, least recently released first. Memory is the slot cache itself, so it stays
bounded and admission stays exact (n free slots for a request of n samples).
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Claim:
    slot: int
    cached: int  # prompt tokens already in the slot once `copies` are done
    copies: list[tuple[int, int, int]]  # (source slot, start, stop) positions to copy into `slot`


class PrefixCache:
    def __init__(self, slots: int, block_size: int = BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.index: dict[bytes, set[int]] = {}
        self.chains: list[list[bytes]] = [[] for _ in range(slots)]
        self._clock = itertools.count(1)
        self.released_at = [0] * slots  # 0: never used
        self.queries = self.hits = 0  # prompt tokens looked up / found

    def names(self, tokens: Sequence[int], blocks: int, known: list[bytes] = ()) -> list[bytes]:
        """The chained names of the first `blocks` full blocks of `tokens` (reusing `known` ones)."""
        bs = self.block_size
        out = list(known[:blocks])
        for i in range(len(out), min(blocks, len(tokens) // bs)):
            h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
            h.update(array("q", tokens[i * bs : (i + 1) * bs]).tobytes())
            out.append(h.digest())
        return out

    def order(self, free: Sequence[int]) -> list[int]:
        """Free slots, the one to evict first first: never used, then least recently released."""
        return sorted(free, key=lambda s: (self.released_at[s], s))

    def claim(self, prompt: Sequence[int], free: Sequence[int]) -> Claim:
        """Choose the head slot for `prompt` among `free` (in `order`) and take it."""
        names = self.names(prompt, (len(prompt) - 1) // self.block_size)
        held: list[set[int]] = []
        for name in names:
            holders = self.index.get(name)
            if not holders:
                break
            held.append(holders)
        slot, in_place = free[0], 0
        for candidate in held[0] if held else ():
            if candidate in free:
                run = next((i for i, holders in enumerate(held) if candidate not in holders), len(held))
                if run > in_place:
                    slot, in_place = candidate, run
        self.take(slot, keep=in_place)
        bs = self.block_size
        copies: list[tuple[int, int, int]] = []
        for i in range(in_place, len(held)):
            source = min(held[i])
            if copies and copies[-1][0] == source:
                copies[-1] = (source, copies[-1][1], (i + 1) * bs)  # one copy for a run of blocks
            else:
                copies.append((source, i * bs, (i + 1) * bs))
        self._add(slot, names[in_place : len(held)])
        self.queries += len(prompt)
        self.hits += len(held) * bs
        return Claim(slot, len(held) * bs, copies)

    def take(self, slot: int, keep: int = 0) -> None:
        """The slot is being reused: its blocks from `keep` on will be overwritten."""
        chain = self.chains[slot]
        for name in chain[keep:]:
            holders = self.index[name]
            holders.discard(slot)
            if not holders:
                del self.index[name]
        del chain[keep:]

    def register(self, slot: int, tokens: Sequence[int]) -> None:
        """`tokens` are in the slot's cache from position 0: name its full blocks."""
        chain = self.chains[slot]
        self._add(slot, self.names(tokens, len(tokens) // self.block_size, chain)[len(chain) :])

    def clear(self) -> None:
        """Forget every block (the counters stay)."""
        self.index.clear()
        for chain in self.chains:
            chain.clear()

    def release(self, slot: int) -> None:
        self.released_at[slot] = next(self._clock)

    def _add(self, slot: int, names: list[bytes]) -> None:
        for name in names:
            self.index.setdefault(name, set()).add(slot)
        self.chains[slot].extend(names)
