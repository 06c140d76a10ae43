"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, a block table per slot, prefix caching.

The cache (`gpt.KVCache`) holds keys and values in `num_blocks` blocks of `block_size` positions;
a slot's (a batch row's) block table names the blocks that hold its positions, so a sequence takes
only the blocks its tokens fill, and one block can sit in several tables at once. Block 0 is the null
block, never handed out: the unused tail of every table points at it.

Automatic prefix caching (on unless `caching=False`): a full block is named by a hash of its
tokens chained with the name of the block before it, so a name stands for the whole prefix up to
the block's end (and the rotary angles baked into its keys: a name always sits at the same
position). `match` walks a prompt's full blocks while the index knows them and `share` puts those
blocks into the new sequence's table by reference count, with no copy; a sequence's blocks are
named as they fill (`register`). A block whose count drops to 0 is free but keeps its contents
and name, so a later request can still find it; `allocate` takes free blocks least recently freed
first (a block that holds nothing findable goes first of all), dropping their names: that is the
LRU eviction. Memory is the pool, fixed up front; `free` counts every block allocate may take.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

BLOCK_SIZE = 16
NULL_BLOCK = 0


class PoolExhausted(Exception):
    """More blocks were asked for than the pool has free."""


class BlockManager:
    """Reference counts, names and the LRU free list of a block pool, and each slot's block table."""

    def __init__(self, tables: torch.Tensor, num_blocks: int, block_size: int, caching: bool = True):
        """tables: the cache's (slots, max_blocks + 1) table tensor, which this manager keeps in step."""
        if block_size < 1 or num_blocks < 2:
            raise ValueError(f"a block pool needs block_size >= 1 and num_blocks >= 2, got {block_size}, {num_blocks}")
        self.block_size, self.num_blocks, self.caching = block_size, num_blocks, caching
        self.table_tensor = tables
        slots = tables.shape[0]
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.chains: list[list[bytes]] = [[] for _ in range(slots)]  # names of each table's leading full blocks
        self.ref = [0] * num_blocks
        self.name: list[bytes | None] = [None] * num_blocks
        self.by_name: dict[bytes, int] = {}
        # Free blocks, the next to be taken first: never used ones, then the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.capacity - len(self._free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def names(self, tokens: Sequence[int], count: int, known: Sequence[bytes] = ()) -> list[bytes]:
        """The chained names of the first `count` full blocks of `tokens` (reusing the `known` ones)."""
        bs = self.block_size
        out = list(known[:count])
        for i in range(len(out), min(count, len(tokens) // bs)):
            h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
            h.update(array("q", tokens[i * bs : (i + 1) * bs]).tobytes())
            out.append(h.digest())
        return out

    def match(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks of `tokens`' prefix and their names; at least one token is left to compute,
        for its logits."""
        if not self.caching:
            return [], []
        names = self.names(tokens, (len(tokens) - 1) // self.block_size)
        blocks = []
        for name in names:
            block = self.by_name.get(name)
            if block is None:
                break
            blocks.append(block)
        return blocks, names[: len(blocks)]

    def share(self, slot: int, blocks: list[int], names: list[bytes]) -> None:
        """Start the empty table of `slot` with `blocks` (matched, named `names`), by reference."""
        if self.tables[slot]:
            raise ValueError(f"slot {slot} still holds blocks")
        self._check_room(slot, len(blocks))
        for block in blocks:
            if self.ref[block] == 0:
                del self._free[block]
            self.ref[block] += 1
        self._extend(slot, blocks)
        self.chains[slot] = list(names)

    def allocate(self, slot: int, count: int) -> None:
        """Append `count` fresh blocks to the table of `slot`; PoolExhausted when fewer are free."""
        self._check_room(slot, count)
        if count > len(self._free):
            raise PoolExhausted(f"{count} blocks asked for, {len(self._free)} free of {self.capacity}")
        fresh = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            name = self.name[block]
            if name is not None:  # evicted: its contents are about to be overwritten
                del self.by_name[name]
                self.name[block] = None
            self.ref[block] = 1
            fresh.append(block)
        self._extend(slot, fresh)

    def fork(self, src: int, dst: int, positions: int) -> None:
        """Give the empty slot `dst` the first `positions` of `src`: its full blocks by reference, a
        fresh block of its own for the partial last one (one free needed), which it will fill."""
        full = positions // self.block_size
        self.share(dst, self.tables[src][:full], self.chains[src][:full])
        if positions % self.block_size:
            self.allocate(dst, 1)

    def register(self, slot: int, tokens: Sequence[int]) -> None:
        """`tokens` are what the slot's cache holds from position 0: name its full blocks, so later
        prompts find them (a block whose name another block already has stays unnamed)."""
        if not self.caching:
            return
        chain, table = self.chains[slot], self.tables[slot]
        full = min(len(tokens) // self.block_size, len(table))
        if full <= len(chain):
            return
        names = self.names(tokens, full, chain)
        for i in range(len(chain), full):
            block, name = table[i], names[i]
            if self.name[block] is None and name not in self.by_name:
                self.name[block] = name
                self.by_name[name] = block
        self.chains[slot] = names

    def release(self, slot: int) -> None:
        """Drop the table of `slot`: each block's count goes down, and a block no one holds is free.

        The tail is freed first, so it is evicted before the head that other prompts share."""
        for block in reversed(self.tables[slot]):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self._free[block] = None
                if self.name[block] is None:
                    self._free.move_to_end(block, last=False)
        self.tables[slot] = []
        self.chains[slot] = []
        self.table_tensor[slot] = NULL_BLOCK

    def forget(self) -> None:
        """Drop every name (a failed forward may have left any block half written)."""
        self.by_name.clear()
        self.name = [None] * self.num_blocks
        self.chains = [[] for _ in self.chains]

    def _check_room(self, slot: int, count: int) -> None:
        if len(self.tables[slot]) + count >= self.table_tensor.shape[1]:  # the last column stays the null block
            raise ValueError(f"slot {slot} would hold more than {self.table_tensor.shape[1] - 1} blocks")

    def _extend(self, slot: int, blocks: list[int]) -> None:
        table = self.tables[slot]
        if blocks:
            self.table_tensor[slot, len(table) : len(table) + len(blocks)] = torch.tensor(blocks)
        table.extend(blocks)
