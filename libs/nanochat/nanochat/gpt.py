"""The nanochat GPT: the model of NANOCHAT_SPEC "Model", with a per-row KV cache for inference.

Architecture: token embedding (untied from lm_head) -> rmsnorm -> n_layer blocks of
`x + attn(norm(x))`, `x + mlp(norm(x))` -> rmsnorm -> lm_head -> logits soft-capped at 15.
No biases, no learnable norm parameters. Attention has rotary embeddings (base 10,000, half
split), QK-norm and grouped-query heads; the MLP is 4x wide with relu(x)^2.

Build a model the cheap way (no allocation twice):

    config = GPTConfig.from_depth(depth=4, vocab_size=tok.vocab_size, sequence_len=256)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()

Precision: parameters are fp32 (the embedding bf16 on CUDA); run forward passes under
`nanochat.common.autocast(device)`, which is bf16 autocast on CUDA and plain fp32 on CPU.

`model(idx, targets)` returns the mean loss (targets -1 are ignored); `loss_reduction="none"`
gives the per-token loss shaped (B, T) (0 where ignored), for bits-per-byte; `model(idx)` gives
fp32 logits (B, T, vocab_size). The embedding and lm_head rows are padded up to a multiple of
lcm(64, world size) so the sharded AdamW can split them evenly; the padded logits are sliced off
before the loss and before they are returned.

KV cache (for the engine): a paged cache, a pool of fixed-size blocks that rows (the batch's
slots) read through block tables, so rows may sit at different positions (continuous batching
builds on it) and share blocks (prefix caching: `nanochat.kv_blocks` keeps the tables, reference
counts and names; the model only reads and writes through them).

    cache = KVCache.for_model(model, rows=8, max_len=1024)   # num_blocks=, block_size= (16)
    blocks = BlockManager(cache.tables, cache.num_blocks, cache.block_size)
    blocks.allocate(0, 4)                               # row 0 may now hold 64 positions
    logits = model(idx, kv_cache=cache, rows=[0])       # idx (len(rows), T): T new tokens per row
    logits = model(idx, kv_cache=cache, rows=r, num_new=n)  # row b keeps only its first n[b] tokens
    logits = model(idx, kv_cache=cache, rows=r, num_new=n, last_only=True)  # (B, 1, V): each row's last real token
    decode, chunk = model.forward_packed([(idx, r, None), (idx2, r2, n2)], cache)  # (B_i, V) per part, one pass

Row b's new tokens take positions `cache.lengths[b] ... cache.lengths[b] + T - 1` (their rotary
angles too) and attend to the row's cached prefix plus, causally, to each other; afterwards the
row's length advances by `num_new[b]` (default T). The caller gives a row blocks for its real
tokens first; `num_new` lets rows of unequal prompt length share one padded prefill call (the
padding is written past a row's length and never attended to; its logits are garbage, ignore
them). Attention reads each row's keys from a contiguous copy per row (`k_rows`, (n_layer, rows,
n_kv_head, max_len, head_dim)), because gathering blocks every step is slower on a CPU (see
`KVCache`); each block a forward fills is copied from there into the pool block the row's table
names (`flush`), the pool being what rows share. A row that starts from blocks it did not write
(a prefix hit) is `stage`d from them once (less what the row's last occupant left there, see
`engine.DecodeBatch.stage`), a fork is `copy_row`. The pool holds k and v as
(n_layer, num_blocks, block_size, n_kv_head, head_dim), both in the compute dtype (bf16 on CUDA,
fp32 on CPU); tables and lengths live on the CPU.

`forward_packed` runs several such cached calls (parts, on distinct rows) as one pass: the
engine's decode rows (one token each) beside a prompt's prefill chunk. Their tokens go through
the embedding, the norms and every linear layer together, packed one after another, and only
attention runs part by part. A small model's decode step is bound by reading its weights, not by
arithmetic, so a chunk fed with the decode rows costs a fraction of a forward pass of its own.

Check: `python -m nanochat.gpt` prints the depth-20 speedrun model's parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import world_size
from nanochat.optim import AdamW, Muon

ROTARY_BASE = 10_000
SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65_536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int = 2048) -> GPTConfig:
        """The spec's shape rule: n_embd = 64 * depth, heads of ~128 dims, n_kv_head = n_head."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        n_embd = depth * 64
        n_head = math.ceil(n_embd / 128)
        if n_embd % n_head:
            raise ValueError(
                f"depth {depth} gives n_embd {n_embd} and n_head ceil({n_embd}/128) = {n_head}, which "
                f"does not divide n_embd: the head-dim rule serves every even depth and an odd depth "
                f"d only when d+1 is a power of two (3, 7, 15, 31, ...)"
            )
        config = cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for a configuration the model cannot be built from."""
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Inverse of `to_dict`; unknown or missing keys are a clear error."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) != fields:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a GPT config needs exactly the keys {sorted(fields)}, got {got}")
        config = cls(**d)
        config.validate()
        return config


def padded_vocab_size(vocab_size: int, world: int = 1) -> int:
    """vocab_size rounded up to a multiple of lcm(64, world) (rows the sharded AdamW can split)."""
    multiple = math.lcm(64, world)
    return -(-vocab_size // multiple) * multiple


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the half-split rule; cos/sin are (B or 1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values in a pool of fixed-size blocks that rows reach through block tables, and the
    contiguous copy of each row that attention reads."""

    def __init__(
        self,
        n_layer: int,
        rows: int,
        num_blocks: int,
        block_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if rows < 1 or max_len < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs rows, max_len and block_size >= 1, got {rows}, {max_len}, {block_size}")
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)
        if num_blocks < self.max_blocks + 1:
            raise ValueError(
                f"{num_blocks} blocks cannot hold one sequence of {max_len} positions (needs {self.max_blocks} "
                f"blocks of {block_size} and the null block)"
            )
        self._max_len = max_len
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Each row's keys and values again, contiguous, which attention reads: gathering a batch's
        # blocks in every layer of every step made a decode step 15-25% slower at 16-64 rows on a
        # 2-core CPU (memory-bound copies), while these views cost nothing to read. New tokens go
        # here, full blocks on to the pool (`flush`); a row starting from blocks it did not write (a
        # prefix hit) is staged from them once.
        row_shape = (n_layer, rows, n_kv_head, max_len, head_dim)
        self.k_rows = torch.zeros(row_shape, device=device, dtype=dtype)
        self.v_rows = torch.zeros(row_shape, device=device, dtype=dtype)
        # Tables and lengths stay on the CPU, where the scheduler edits them; each step sends its
        # indices to the device once. The last column is always the null block (kv_blocks.NULL_BLOCK).
        self.tables = torch.zeros((rows, self.max_blocks + 1), dtype=torch.long)
        self.lengths = torch.zeros(rows, dtype=torch.long)

    @classmethod
    def for_model(
        cls,
        model: GPT,
        rows: int,
        max_len: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache shaped for `model`; max_len defaults to its sequence_len, num_blocks to enough for
        every row at max_len (plus the null block), dtype to bf16 on CUDA."""
        c = model.config
        device = model.lm_head.weight.device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        max_len = c.sequence_len if max_len is None else max_len
        if max_len > model.rotary_len:
            raise ValueError(f"max_len {max_len} exceeds the model's rotary table ({model.rotary_len} positions)")
        if num_blocks is None:
            num_blocks = rows * -(-max_len // block_size) + 1
        return cls(c.n_layer, rows, num_blocks, block_size, c.n_kv_head, max_len, c.head_dim, device, dtype)

    @property
    def rows(self) -> int:
        return self.tables.shape[0]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def stage(self, row: int, start: int, stop: int) -> None:
        """Fill the row's contiguous keys and values for positions [start, stop) from its blocks
        (start a multiple of the block size)."""
        if stop <= start:
            return
        blocks = self.tables[row, start // self.block_size : -(-stop // self.block_size)].to(self.k.device)
        for pool, rows in ((self.k, self.k_rows), (self.v, self.v_rows)):
            gathered = pool[:, blocks].flatten(1, 2)[:, : stop - start]  # (n_layer, stop - start, H, D)
            rows[:, row, :, start:stop] = gathered.transpose(1, 2)

    def flush(self, rows: torch.Tensor, before: torch.Tensor) -> None:
        """Copy the blocks the rows filled since they held `before` positions from their contiguous
        copies into the pool: only full blocks are ever shared, so only they are written there,
        once each rather than a token at a time."""
        bs = self.block_size
        filled = [
            (row, j)
            for row, first, last in zip(rows.tolist(), (before // bs).tolist(), (self.lengths[rows] // bs).tolist())
            for j in range(first, last)
        ]
        if not filled:
            return
        which, index = torch.tensor(filled).unbind(1)
        blocks = self.tables[which, index].to(self.k.device)
        which = which.to(self.k.device)[:, None]
        positions = (index[:, None] * bs + torch.arange(bs)).to(self.k.device)
        for pool, copies in ((self.k, self.k_rows), (self.v, self.v_rows)):
            # Advanced indices around a sliced head dim put (blocks, bs) first: (n, bs, n_layer, H, D).
            pool[:, blocks] = copies[:, which, :, positions].permute(2, 0, 1, 3, 4)

    def copy_row(self, src: int, dst: int, positions: int) -> None:
        """Copy row src's contiguous keys and values for positions [0, positions) into row dst."""
        self.k_rows[:, dst, :, :positions] = self.k_rows[:, src, :, :positions]
        self.v_rows[:, dst, :, :positions] = self.v_rows[:, src, :, :positions]


@dataclass
class _CacheStep:
    """What every layer needs for one cached forward: where to write, what to read, the mask."""

    cache: KVCache
    rows: torch.Tensor  # (B,) the cache row of each batch row (CPU)
    rows_dev: torch.Tensor  # the same on the device
    block: slice | None  # the same rows when they are one ascending run: reads are views, not gathers
    pos: torch.Tensor  # (B, T) absolute position of each new token (device)
    span: int  # keys 0..span-1 are read
    mask: torch.Tensor  # (B, 1, T, span) True where a query may attend a key (device)
    counts: torch.Tensor  # (B,) how far each row's length advances after the forward (CPU)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T): the part's rows and new tokens per row."""
        return tuple(self.pos.shape)


def _attend_cache(step: _CacheStep, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new keys and values (B, T, H, D) into the rows' contiguous copies (the pool gets
    them as blocks fill: `KVCache.flush`); each row's keys and values (B, H, span, D)."""
    cache = step.cache
    for rows, new in ((cache.k_rows, k), (cache.v_rows, v)):
        # Advanced indices (rows, pos) around a sliced head dim put (B, T) first: (B, T, H, D).
        rows[layer][step.rows_dev[:, None], :, step.pos] = new.to(rows.dtype)
    ck, cv = cache.k_rows[layer], cache.v_rows[layer]
    if step.block is not None:
        return ck[step.block, :, : step.span], cv[step.block, :, : step.span]
    return ck[step.rows_dev, :, : step.span], cv[step.rows_dev, :, : step.span]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: list[_CacheStep] | None
    ) -> torch.Tensor:
        """x (B, T, C); with a cache, (1, N, C): the parts of `steps` packed one after another."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)
        gqa = self.n_head != self.n_kv_head
        if steps is None:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
            )
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        parts, start = [], 0
        for step in steps:
            b, t = step.shape
            part = slice(start, start + b * t)
            start += b * t
            keys, values = _attend_cache(
                step, self.layer_idx, k[0, part].view(b, t, *k.shape[2:]), v[0, part].view(b, t, *v.shape[2:])
            )
            qi = q[0, part].view(b, t, *q.shape[2:]).transpose(1, 2)  # (b, H, t, D)
            y = F.scaled_dot_product_attention(
                qi, keys.to(qi.dtype), values.to(qi.dtype), attn_mask=step.mask, enable_gqa=gqa
            )
            parts.append(y.transpose(1, 2).reshape(1, b * t, C))
        return self.c_proj(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: list[_CacheStep] | None
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, steps)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, pad_vocab_world: int | None = None):
        """pad_vocab_world: the world size the vocab rows are padded for (default: the running one)."""
        super().__init__()
        config.validate()
        self.config = config
        world = world_size() if pad_vocab_world is None else pad_vocab_world
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, world)
        # Built under torch.device("meta") (to load weights into): random init on meta imports
        # torch's Python decompositions (about 5 s, once per process), and nothing needs it there.
        on_meta = torch.empty(0).is_meta
        wte = torch.empty(self.padded_vocab_size, config.n_embd) if on_meta else None
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(self.padded_vocab_size, config.n_embd, _weight=wte),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        # Ten times the training length, so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        if on_meta:  # placeholders, filled by on_device_ready(); arithmetic on meta is as slow
            shape = (self.rotary_len, config.head_dim // 2)
            cos, sin = torch.empty(shape), torch.empty(shape)
        else:
            cos, sin = self._rotary_table(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_table(self, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.config.head_dim
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()  # (length, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The spec's init; call after `to_empty(device=...)` when the model was built on meta."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        # Padding rows are never looked up; zero them so a saved and reloaded model is identical.
        nn.init.zeros_(self.transformer.wte.weight[self.config.vocab_size :])
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.on_device_ready()

    @torch.no_grad()
    def on_device_ready(self) -> None:
        """Fill the rotary tables and set the embedding dtype; after init_weights or loading weights."""
        device = self.lm_head.weight.device
        self.cos, self.sin = self._rotary_table(self.rotary_len, device)  # replaced: they may be meta
        if device.type == "cuda":
            # The spec keeps the embedding in bf16 on CUDA: it feeds bf16 autocast anyway.
            self.transformer.wte.to(dtype=torch.bfloat16)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 * non-embedding params + the attention term."""
        c = self.config
        nparams_embedding = self.transformer.wte.weight.numel()
        return 6 * (self.num_params() - nparams_embedding) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def setup_optimizers(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype | None = None,
    ) -> list[torch.optim.Optimizer]:
        """[AdamW for lm_head and embedding, Muon for the block matrices], as the spec sets them.

        The AdamW rates are scaled by (n_embd/768)^-0.5; every group remembers its `initial_lr`
        for the schedules, which multiply it.
        """
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = AdamW(
            [
                {"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
                {"params": [self.transformer.wte.weight], "lr": embedding_lr * scale},
            ],
            weight_decay=weight_decay,
        )
        muon = Muon(self.transformer.h.parameters(), lr=matrix_lr, momentum=0.95, ns_dtype=ns_dtype)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        rows: Sequence[int] | torch.Tensor | None = None,
        num_new: int | Sequence[int] | torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Loss (with targets) or fp32 logits (B, T, vocab_size); see the module docstring.

        last_only=True returns logits (B, 1, vocab_size) for each row's last real token only:
        position num_new[b] - 1 with a cache (T - 1 without one, or for a row with num_new 0),
        which spares the lm_head matmul over every other position of a prefill.
        """
        if last_only and targets is not None:
            raise ValueError("last_only gives logits for sampling; it cannot be combined with targets")
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be an integer tensor (B, T), got {idx.dtype} of shape {tuple(idx.shape)}")
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx has no tokens (T = 0)")
        if kv_cache is not None:
            if targets is not None:
                raise ValueError("a forward with a kv_cache gives logits; it cannot take targets")
            step = self._cache_step(kv_cache, B, T, rows, num_new)
            if last_only:
                return self._packed([idx], [step], kv_cache, last_only=True)[0].unsqueeze(1)
            return self._packed([idx], [step], kv_cache, last_only=False)[0].view(B, T, -1)
        if rows is not None or num_new is not None:
            raise ValueError("rows and num_new only apply with a kv_cache")
        if T > self.rotary_len:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, None)
        x = norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self._logits(x)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss if loss_reduction == "mean" else loss.view(B, T)

    def forward_packed(
        self,
        parts: Sequence[tuple[torch.Tensor, Sequence[int] | torch.Tensor, int | Sequence[int] | torch.Tensor | None]],
        kv_cache: KVCache,
    ) -> list[torch.Tensor]:
        """Several cached calls in one pass (module docstring): part i is (idx (B_i, T_i), rows,
        num_new) as `forward` takes them, on rows no other part names. Each part's logits
        (B_i, vocab_size) after each row's last real token, as `forward(..., last_only=True)`
        gives them."""
        if not parts:
            raise ValueError("forward_packed needs at least one part")
        idxs, steps = [], []
        for idx, rows, num_new in parts:
            if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64) or idx.shape[1] == 0:
                raise ValueError(f"each part's idx must be an integer tensor (B, T >= 1), got {tuple(idx.shape)}")
            if rows is None:
                raise ValueError("each part of a packed forward names its cache rows")
            idxs.append(idx)
            steps.append(self._cache_step(kv_cache, idx.shape[0], idx.shape[1], rows, num_new))
        named = torch.cat([step.rows for step in steps])
        if named.unique().numel() != named.numel():
            raise ValueError(f"the parts of a packed forward must name distinct cache rows, got {named.tolist()}")
        return self._packed(idxs, steps, kv_cache, last_only=True)

    def _packed(
        self, idxs: list[torch.Tensor], steps: list[_CacheStep], cache: KVCache, last_only: bool
    ) -> list[torch.Tensor]:
        """The parts' tokens as one (1, N) sequence through the model; per part, the logits after
        each row's last real token (last_only), or at every position, (B_i * T_i, vocab)."""
        idx = idxs[0].reshape(1, -1) if len(idxs) == 1 else torch.cat([i.reshape(-1) for i in idxs])[None]
        pos = steps[0].pos.reshape(-1) if len(steps) == 1 else torch.cat([s.pos.reshape(-1) for s in steps])
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, steps)
        x = norm(x)[0]  # (N, C)
        sizes = [step.shape[0] * step.shape[1] for step in steps]
        if last_only:
            starts, picks = 0, []
            for step in steps:
                b, t = step.shape
                last = torch.where(step.counts > 0, step.counts - 1, t - 1)
                picks.append(starts + torch.arange(b) * t + last)
                starts += b * t
            x = x[torch.cat(picks).to(x.device)]
            sizes = [step.shape[0] for step in steps]
        logits = list(self._logits(x).split(sizes))
        for step in steps:
            before = cache.lengths[step.rows]
            cache.lengths[step.rows] = before + step.counts
            cache.flush(step.rows, before)
        return logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def _cache_step(
        self,
        cache: KVCache,
        B: int,
        T: int,
        rows: Sequence[int] | torch.Tensor | None,
        num_new: int | Sequence[int] | torch.Tensor | None,
    ) -> _CacheStep:
        if rows is None:
            if B != cache.rows:
                raise ValueError(f"idx has {B} rows but the cache {cache.rows}; pass rows=")
            row_idx, block = torch.arange(B), slice(0, B)
        else:
            row_idx = torch.as_tensor(rows, dtype=torch.long, device="cpu").reshape(-1)
            if row_idx.numel() != B or row_idx.unique().numel() != B:
                raise ValueError(f"rows must name {B} distinct cache rows, got {row_idx.tolist()}")
            if int(row_idx.min()) < 0 or int(row_idx.max()) >= cache.rows:
                raise IndexError(f"cache rows {row_idx.tolist()} out of range for a cache of {cache.rows} rows")
            # A scheduler fills the lowest free slots first, so running rows are often one run.
            first = int(row_idx[0])
            block = slice(first, first + B) if bool((row_idx == torch.arange(first, first + B)).all()) else None
        lengths = cache.lengths[row_idx]
        end = int((lengths + T).max())
        if end > cache.max_len:
            raise ValueError(
                f"{T} new tokens would run row lengths {lengths.tolist()} past the cache's max_len {cache.max_len}"
            )
        if end > self.rotary_len:
            raise ValueError(f"position {end - 1} is past the model's rotary table ({self.rotary_len} positions)")
        counts = torch.full((B,), T, dtype=torch.long)
        if num_new is not None:
            counts = torch.as_tensor(num_new, dtype=torch.long, device="cpu").expand(B).clone()
            if bool((counts < 0).any()) or bool((counts > T).any()):
                raise ValueError(f"num_new must lie in [0, {T}], got {counts.tolist()}")
        pos = lengths[:, None] + torch.arange(T)[None, :]
        mask = (torch.arange(end)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
        device = cache.k.device
        return _CacheStep(
            cache=cache,
            rows=row_idx,
            rows_dev=row_idx.to(device, non_blocking=True),
            block=block,
            pos=pos.to(device, non_blocking=True),
            span=end,
            mask=mask.to(device, non_blocking=True),
            counts=counts,
        )


if __name__ == "__main__":
    cfg = GPTConfig.from_depth(20, vocab_size=65_536, sequence_len=2048)
    with torch.device("meta"):
        m = GPT(cfg)
    print(f"depth 20: {cfg}\nparameters: {m.num_params():,}  FLOPs/token: {m.estimate_flops():,}")
