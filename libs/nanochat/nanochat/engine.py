"""Generation with the KV cache: sampling, stop tokens, the calculator tool, streaming.

Two layers. `DecodeBatch` is the building block a continuous-batching scheduler drives: it owns
a paged `KVCache` of `capacity` slots over a pool of blocks and its `BlockManager` (`kv_blocks`);
`add` prefills prompts into free slots (once per prompt, then forks the cached prefix for
`num_samples`: full blocks shared, the partial last one copied), `step` feeds the tokens chosen last step through the
model in one call and chooses one more token for every running row, and rows leave when they finish (or on
`cancel`), so new rows can join between any two steps. Every row keeps its own state (`Row`):
its sampling settings, its own `torch.Generator` (the same seed gives the same sample whatever
else is in the batch), its generated tokens and masks, and the calculator state machine.

`Engine.generate` streams one column of (token, mask) per step for a prompt or a list of prompts
(x num_samples); `Engine.generate_batch` collects the same into full sequences and masks.

    engine = Engine(model, tokenizer)
    for tokens, masks in engine.generate(prompt_ids, num_samples=2, max_tokens=64, seed=1):
        ...  # tokens[i] / masks[i]: row i's token this step, None once row i has finished
    sequences, masks = engine.generate_batch(prompt_ids, temperature=0.0)

Rules (NANOCHAT_SPEC "Chat format"): a row stops after `<|assistant_end|>` or `<|bos|>` (the
stop token is streamed but not kept in `generate_batch`'s sequences), after `max_tokens`
generated tokens, or when its cache slot is full. Tokens between `<|python_start|>` and
`<|python_end|>` are decoded as a calculator expression; on `<|python_end|>` the row is made to
emit `<|output_start|>`, the tokens of str(result) and `<|output_end|>` before sampling again.
Those forced tokens carry mask 0 (sampled ones 1); a failed evaluation forces nothing.
Function tools (docs/tools.md): for a row whose params name `tools`, a block that is a call
`{"name": ..., "arguments": {...}}` of one of them is the client's to run, not the calculator's:
the row ends there ("stop"), or with `parallel_tool_calls` it may write another call right away
(if the next token it samples is `<|python_start|>`; any other token ends the turn, and the row
emits `<|assistant_end|>` in its place, mask 0; a block after a call that is no call ends it too).
Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k, then top-p
(smallest set of the most likely tokens whose mass reaches p), batched over the rows that share
their settings, each row drawing from its own generator. Before that, and only for rows whose
params ask (others pay nothing): frequency/presence penalties, logit_bias and a grammar's mask
(`nanochat.grammar.Constraint`, imported only when a row has a grammar; it advances on each
sampled token and a complete grammar ends the row as "stop"). Rows that ask for logprobs get,
in their `StepToken`, the chosen token's log-probability and the top alternatives, computed
from the model's logits before any of this; `prompt_logprobs` adds the prompt's, from one full
forward of the prompt on the row's first step. Forward passes run under bf16 autocast on CUDA
and in fp32 on CPU.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanochat.calculator import calculate
from nanochat.common import autocast
from nanochat.gpt import GPT, KVCache
from nanochat.kv_blocks import BLOCK_SIZE, BlockManager
from nanochat.tokenizer import Tokenizer, parse_tool_call

# Prompts are prefilled this many tokens at a time, which bounds the activations and attention
# mask of one call (prefill asks only for the last position's logits).
PREFILL_CHUNK = 256
_SEED_MIX = 0x9E3779B97F4A7C15


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; seed None draws a fresh random seed.

    logprobs: None, or report each chosen token's log-probability with this many (0-20) most
    likely alternatives; prompt_logprobs: the same for the prompt's tokens too (one full forward of
    the prompt). Log-probabilities are log_softmax of the model's own logits, before temperature,
    top-k/top-p, penalties, bias and grammar. frequency_penalty / presence_penalty (-2..2) are
    OpenAI's: logit[t] -= count[t] * frequency + (count[t] > 0) * presence, count over the tokens
    this row generated so far; logit_bias adds a value in [-100, 100] to a token's logit (a
    mapping or (id, value) pairs, kept as sorted pairs: the params stay plain, picklable data).
    grammar: a `nanochat.grammar` spec; the row then samples only what the grammar allows and
    stops when it is complete. tools: names of functions whose calls end the row's turn, and
    parallel_tool_calls: whether one call may follow another (module docstring).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int = 256
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    tools: tuple[str, ...] = ()
    parallel_tool_calls: bool = False

    def __post_init__(self) -> None:
        self._check_basics()
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many alternatives to report)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        bias = tuple(sorted((int(t), float(v)) for t, v in pairs))
        if any(t < 0 or not -100 <= v <= 100 for t, v in bias):
            raise ValueError("logit_bias maps token ids >= 0 to values in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be None or a grammar spec string, got {type(self.grammar).__name__}")
        if isinstance(self.tools, str) or not all(isinstance(name, str) for name in self.tools):
            raise ValueError(f"tools must be a sequence of function names, got {self.tools!r}")
        object.__setattr__(self, "tools", tuple(self.tools))

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling changes this row's logits (penalties, bias, grammar) before drawing."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias or self.grammar is not None)

    def _check_basics(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")


@dataclass
class Row:
    """One sequence being generated: its slot, settings, output so far and tool state."""

    slot: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated, forced included, stop token not
    masks: list[int] = field(default_factory=list)  # 1 sampled, 0 forced
    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    called: bool = False  # a block was a call of one of params.tools: a later block that is none ends the turn
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    logits: torch.Tensor | None = None  # (vocab,) next-token logits; None until the last token is fed
    num_generated: int = 0  # tokens chosen so far, the stop token included
    # Made on first use, only for rows whose params need them:
    counts: torch.Tensor | None = None  # (vocab,) how often each token was generated: the penalties
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) on the device
    constraint: Any = None  # the row's nanochat.grammar.Constraint

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# A token's log-probability and its most likely alternatives as (id, log-probability) pairs.
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class StepToken:
    """What one row produced in one step; the log-probabilities only for rows that asked for them
    (prompt_logprobs: one (logprob, top) per prompt token, None for the first, on the row's first step)."""

    row: Row
    token: int
    mask: int
    finished: bool
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: tuple[tuple[float | None, TopLogprobs], ...] | None = None


def row_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed` (distinct per sample, reproducible)."""
    return (seed * _SEED_MIX + index) % (1 << 63)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (vocab,) logits vector under `params`."""
    return sample_rows(logits[None], params, [generator])[0]


def sample_rows(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]) -> list[int]:
    """One token id per row of (rows, vocab) logits that share `params`, row i drawing from generators[i].

    The filtering runs on the whole batch at once; each row draws one uniform number from its own
    generator and inverts its distribution's CDF with it, so a row's sample depends on its seed
    and logits only, never on the rows beside it."""
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    ids = None
    if params.top_k is not None or params.top_p is not None:
        logits, ids = torch.topk(logits, min(params.top_k or vocab, vocab), dim=-1)  # sorted, most likely first
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None:
        # Keep a token while the mass before it is below p: the first token always stays.
        probs = probs * ((torch.cumsum(probs, dim=-1) - probs) < params.top_p)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])
    picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[-1] - 1)
    if ids is not None:
        picks = ids.gather(1, picks)
    return picks.squeeze(1).tolist()


def token_logprobs(logits: torch.Tensor | None, asked: list[tuple[int, int]]) -> list[tuple[float, TopLogprobs]]:
    """For row i of (rows, vocab) logits and asked[i] = (token, k): the token's log-probability
    under log_softmax and the k most likely (id, log-probability) pairs. One transfer to the host."""
    if logits is None or not asked:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor([token for token, _ in asked], dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None]).squeeze(1).tolist()
    k = max(k for _, k in asked)
    if k == 0:
        return [(c, ()) for c in chosen]
    values, top_ids = (t.tolist() for t in torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1))
    return [(c, tuple(zip(top_ids[i][:ki], values[i][:ki]))) for i, (c, (_, ki)) in enumerate(zip(chosen, asked))]


def check_params(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """`params`, or a clear error when they name a token a model of `vocab_size` ids does not have
    (caught at submit: inside a decode step the bad index would fail every row of the batch)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    if params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
        raise ValueError(f"logit_bias names token {params.logit_bias[-1][0]}; token ids lie in [0, {vocab_size})")
    return params


def check_prompt(prompt: Sequence[int], vocab_size: int, max_len: int) -> list[int]:
    """The prompt as a list of ids; a clear error when a model of `vocab_size` ids cannot generate
    from it in a cache of `max_len` positions (usable where only the model's shape is known)."""
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise ValueError(f"a prompt must be a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
        raise ValueError("a prompt needs at least one token (e.g. <|bos|>)")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= max_len:
        raise ValueError(f"a prompt of {len(ids)} tokens leaves no room in a cache of {max_len} positions")
    return ids


class DecodeBatch:
    """Rows generating together in one paged KV cache; rows join and leave between steps."""

    def __init__(
        self,
        engine: Engine,
        capacity: int,
        max_len: int | None = None,
        num_blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = False,
    ):
        """num_blocks: the pool's size (default: every slot at max_len, plus the null block);
        prefix_caching: name full blocks as they fill so later prompts can share them."""
        self.engine = engine
        self.cache = KVCache.for_model(engine.model, capacity, max_len, num_blocks, block_size)
        self.blocks = BlockManager(self.cache.tables, self.cache.num_blocks, block_size, caching=prefix_caching)
        self.rows: dict[int, Row] = {}  # slot -> running row
        # Per slot, the names of the full blocks its contiguous copy still holds from its last row:
        # the next turn of a conversation mostly lands where the turn before ran.
        self.staged: list[list[bytes]] = [[] for _ in range(capacity)]

    @property
    def capacity(self) -> int:
        return self.cache.rows

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def free_slots(self) -> list[int]:
        return [s for s in range(self.capacity) if s not in self.rows]

    @torch.no_grad()
    def add(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], num_samples: int = 1
    ) -> list[Row]:
        """Prefill each prompt once and fork it into num_samples rows (prompt-major order).

        Sample i of a prompt whose params carry seed s samples with `row_seed(s, i)`.
        """
        if not prompts:
            raise ValueError("no prompts to add")
        prompts = [self.engine.check_prompt(p, self.max_len) for p in prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        params = [check_params(p, self.engine.model.config.vocab_size) for p in params]
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        free = self.free_slots()
        needed = len(prompts) * num_samples
        if needed > len(free):
            raise ValueError(f"{needed} rows requested but only {len(free)} of {self.capacity} cache slots are free")
        blocks = sum(self.blocks.blocks_for(len(p)) + num_samples - 1 for p in prompts)
        if blocks > self.blocks.free:
            raise ValueError(f"{blocks} cache blocks needed but only {self.blocks.free} are free")
        slots = [free[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
        heads = [s[0] for s in slots]
        for head, prompt in zip(heads, prompts):
            self.blocks.allocate(head, self.blocks.blocks_for(len(prompt)))
            self.staged[head] = []
        last_logits = self._prefill(prompts, heads)
        device = self.engine.device
        rows = []
        for prompt, p, group, logits in zip(prompts, params, slots, last_logits):
            self.fork(group[0], group[1:])
            seed = secrets.randbits(62) if p.seed is None else p.seed
            for i, slot in enumerate(group):
                generator = torch.Generator(device=device)
                generator.manual_seed(row_seed(seed, i))
                # One list per prompt, shared by its samples: `_prompt_logprobs` scores it once.
                row = Row(slot=slot, prompt=prompt, params=p, generator=generator, logits=logits)
                self.rows[slot] = row
                rows.append(row)
        return rows

    def fork(self, src: int, dst: Sequence[int]) -> None:
        """Give the empty slots dst what slot src's cache holds: its full blocks shared, its partial
        last block copied (one free block each)."""
        n = int(self.cache.lengths[src])
        for slot in dst:
            self.blocks.fork(src, slot, n)  # the partial block reaches the pool once the slot fills it
            self.cache.copy_row(src, slot, n)
            self.staged[slot] = []
            self.cache.lengths[slot] = n

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
        """Run the prompts through the model chunk by chunk; each prompt's last-position logits."""
        last: list[torch.Tensor | None] = [None] * len(prompts)
        longest = max(len(p) for p in prompts)
        for start in range(0, longest, PREFILL_CHUNK):
            live = [i for i, p in enumerate(prompts) if len(p) > start]
            chunks = [prompts[i][start : start + PREFILL_CHUNK] for i in live]
            logits = self.prefill_chunk(chunks, [slots[i] for i in live])
            for j, i in enumerate(live):
                if start + len(chunks[j]) == len(prompts[i]):
                    last[i] = logits[j]
        return last

    def prefill_chunk(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Feed one chunk of tokens per slot (the slots hold blocks for them) in one padded call;
        the logits (len(slots), vocab) after each chunk's last token."""
        return self.engine.forward_packed([self._chunk_part(chunks, slots)], self.cache)[0]

    def _chunk_part(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> tuple:
        """The chunks as one part of a packed forward: shorter chunks padded, num_new keeping the
        padding out of each row's length."""
        width = max(len(c) for c in chunks)
        idx = torch.zeros((len(chunks), width), dtype=torch.long)
        for j, c in enumerate(chunks):
            idx[j, : len(c)] = torch.tensor(c)
        return idx.to(self.engine.device), list(slots), [len(c) for c in chunks]

    def needing_blocks(self) -> list[Row]:
        """The running rows whose next step feeds a token past their last block: each needs one more."""
        lengths, bs, tables = self.cache.lengths.tolist(), self.blocks.block_size, self.blocks.tables
        return [row for s, row in self.rows.items() if row.logits is None and lengths[s] == len(tables[s]) * bs]

    def cancel(self, row: Row) -> None:
        """Stop a running row now and free its slot."""
        if self.rows.get(row.slot) is row:
            row.finish_reason = "cancelled"
            self._release(row)

    def preempt(self, row: Row) -> None:
        """Take a running row out of the batch with its blocks freed (what they hold stays findable);
        it keeps its state, to go on once its prompt and tokens are prefilled again."""
        self._release(row)

    def _release(self, row: Row) -> None:
        del self.rows[row.slot]
        row.logits = None
        self.release_slot(row.slot, row.prompt + row.tokens)

    def release_slot(self, slot: int, tokens: Sequence[int]) -> None:
        """Free the slot's blocks at once; `tokens` (from position 0) name what its full blocks hold,
        so they stay findable until evicted."""
        held = int(self.cache.lengths[slot])
        self.blocks.register(slot, tokens[:held])
        self.staged[slot] = self.blocks.chains[slot]
        self.blocks.release(slot)
        self.cache.lengths[slot] = 0

    def stage(self, slot: int, names: Sequence[bytes]) -> None:
        """The empty slot's table now starts with the blocks named `names` (a prefix hit, maybe none):
        copy them into its contiguous copy, less the leading ones its last row left there."""
        kept, keep = self.staged[slot], 0
        while keep < min(len(kept), len(names)) and kept[keep] == names[keep]:
            keep += 1
        self.cache.stage(slot, keep * self.blocks.block_size, len(names) * self.blocks.block_size)
        self.staged[slot] = []

    def forget(self) -> None:
        """Forget every block name and what the slots' copies hold (a failed forward may have left
        any of them half written)."""
        self.blocks.forget()
        self.staged = [[] for _ in self.staged]

    @torch.no_grad()
    def step(self) -> list[StepToken]:
        """Feed every running row's last chosen token through the model at once, then choose the next.

        Rows fresh from `add` already hold their prompt's logits, so their first token comes
        without a forward pass; rows that finish leave the batch and free their slot at once.
        """
        self.feed()
        return self.sample()

    @torch.no_grad()
    def feed(self, chunks: Sequence[Sequence[int]] = (), slots: Sequence[int] = ()) -> torch.Tensor | None:
        """The first half of `step`: every running row's last chosen token through the model, and
        in the same forward pass one chunk of prompt tokens for each of `slots` (prompts being
        prefilled beside the decoding rows; the slots hold blocks for them): `GPT.forward_packed`.
        The logits (len(slots), vocab) after each chunk's last token, None without chunks."""
        if len(chunks) != len(slots):
            raise ValueError(f"got {len(chunks)} chunks for {len(slots)} slots")
        feed = [self.rows[s] for s in sorted(self.rows) if self.rows[s].logits is None]
        for row in self.needing_blocks():
            self.blocks.allocate(row.slot, 1)  # PoolExhausted: the caller makes room first
        parts = []
        if feed:
            idx = torch.tensor([[row.tokens[-1]] for row in feed], dtype=torch.long, device=self.engine.device)
            parts.append((idx, [row.slot for row in feed], None))
        if chunks:
            parts.append(self._chunk_part(chunks, slots))
        if not parts:
            return None
        logits = self.engine.forward_packed(parts, self.cache)
        for j, row in enumerate(feed):
            row.logits = logits[0][j]
        return logits[-1] if chunks else None

    @torch.no_grad()
    def sample(self) -> list[StepToken]:
        """The second half of `step`: choose the next token of every running row, each holding its
        logits (from `feed`, or fresh from a prefill)."""
        running = [self.rows[s] for s in sorted(self.rows)]
        if any(row.logits is None for row in running):
            raise RuntimeError("a running row has no logits: feed the batch before sampling")
        # Before sampling touches anything: log-probabilities are of the model's own logits.
        wanted = [row for row in running if row.params.logprobs is not None]
        raw = torch.stack([row.logits for row in wanted]) if wanted else None
        prompts = self._prompt_logprobs(wanted)
        picks = self._sample(running)
        chosen = [(row, *self._choose(row, picks.get(row.slot))) for row in running]
        scored = token_logprobs(
            raw, [(t, row.params.logprobs) for row, t, _ in chosen if row.params.logprobs is not None]
        )
        scores = dict(zip((row.slot for row in wanted), scored))
        out = []
        for row, token, mask in chosen:
            row.logits = None
            logprob, top = scores.get(row.slot, (None, None))
            out.append(StepToken(row, token, mask, row.finished, logprob, top, prompts.get(row.slot)))
            if row.finished:
                self._release(row)
        return out

    def _prompt_logprobs(self, wanted: list[Row]) -> dict[int, tuple]:
        """The prompt's log-probabilities for each row starting now that asked, by slot.

        The cache's prefill only makes the last position's logits (and skips what the prefix cache
        holds), so these come from one full forward of the prompt without the cache, once per
        prompt however many samples it has."""
        out, done = {}, {}
        for row in wanted:
            if row.num_generated == 0 and row.params.prompt_logprobs:
                key = (id(row.prompt), row.params.logprobs)
                if key not in done:
                    done[key] = self.engine.prompt_logprobs(row.prompt, row.params.logprobs)
                out[row.slot] = done[key]
        return out

    def _sample(self, running: list[Row]) -> dict[int, int]:
        """Each row's sampled token by slot: one batched draw per distinct SamplingParams, not one per row."""
        groups: dict[tuple, list[Row]] = {}
        for row in running:
            if not row.forced:
                p = row.params
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
        picks = {}
        for rows in groups.values():
            logits = torch.stack([row.logits for row in rows])
            for j, row in enumerate(rows):
                if row.params.adjusts_logits:
                    self._adjust(row, logits[j])
            self._mask(logits, rows)
            tokens = sample_rows(logits, rows[0].params, [row.generator for row in rows])
            picks.update(zip((row.slot for row in rows), tokens))
        return picks

    def _adjust(self, row: Row, logits: torch.Tensor) -> None:
        """Penalties and logit_bias on the row's (vocab,) logits, in place (a copy: fresh rows of
        one prompt share their logits tensor)."""
        p = row.params
        if p.frequency_penalty or p.presence_penalty:
            if row.counts is None:  # at the row's first draw, before it generated anything
                row.counts = torch.zeros_like(logits)
            logits -= row.counts * p.frequency_penalty + (row.counts > 0) * p.presence_penalty
        if p.logit_bias:
            if row.bias is None:
                ids, values = zip(*p.logit_bias)
                row.bias = (
                    torch.tensor(ids, dtype=torch.long, device=logits.device),
                    torch.tensor(values, dtype=logits.dtype, device=logits.device),
                )
            logits.index_add_(0, *row.bias)

    def _mask(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """The grammar rows' masks on their lines of `logits` (one line per row), all in one go."""
        at = [j for j, row in enumerate(rows) if row.params.grammar is not None]
        if not at:
            return
        from nanochat.grammar import Constraint  # only rows with a grammar need llguidance

        for j in at:
            if rows[j].constraint is None:
                rows[j].constraint = Constraint(rows[j].params.grammar, self.engine.tokenizer)
        lines = logits[at]
        Constraint.mask_rows([rows[j].constraint for j in at], lines)
        logits[at] = lines

    def _choose(self, row: Row, pick: int | None) -> tuple[int, int]:
        """The row's next token and mask, with the stop / length / calculator bookkeeping."""
        engine = self.engine
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = pick, 1
        # Right after a call (parallel_tool_calls; one call alone ended the row) only another call may come.
        if row.called and row.tokens[-1] == engine.python_end and token != engine.python_start:
            token, mask = engine.assistant_end, 0  # the turn ends: the client runs the calls
        row.num_generated += 1
        if token in engine.stop_tokens:
            row.finish_reason = "stop"
            return token, mask
        row.tokens.append(token)
        row.masks.append(mask)
        if row.counts is not None:
            row.counts[token] += 1
        if token == engine.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == engine.python_end and row.in_python:
            row.in_python = False
            text = engine.tokenizer.decode(row.python_tokens)
            if row.params.tools and parse_tool_call(text, row.params.tools) is not None:
                row.called = True
                if not row.params.parallel_tool_calls:
                    row.finish_reason = "stop"
            elif row.called:  # the calls' results are the client's to give: nothing may follow them
                row.finish_reason = "stop"
            else:
                result = calculate(text)
                if result is not None:
                    row.forced.extend([engine.output_start, *engine.tokenizer.encode(result), engine.output_end])
        elif row.in_python:
            row.python_tokens.append(token)
        # Choosing another token needs this one fed first, into one more cache position.
        if not row.finished and (
            row.num_generated >= row.params.max_tokens or len(row.prompt) + len(row.tokens) > self.max_len
        ):
            row.finish_reason = "length"
        # Forced (calculator) tokens are not the grammar's: only what the row sampled advances it.
        if row.constraint is not None and mask:
            row.constraint.advance(token)
            if row.constraint.finished():
                row.finish_reason = "stop"
        return token, mask


class Engine:
    """A model and its tokenizer, ready to generate."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.assistant_end = special("<|assistant_end|>")
        self.stop_tokens = frozenset({self.assistant_end, special("<|bos|>")})
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        slots: list[int],
        num_new: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (len(slots), T, vocab) for idx fed into those cache slots; (len(slots), 1, vocab)
        for each row's last real token with last_only."""
        with autocast(self.device):
            return self.model(idx, kv_cache=cache, rows=slots, num_new=num_new, last_only=last_only)

    def forward_packed(self, parts: list[tuple], cache: KVCache) -> list[torch.Tensor]:
        """`GPT.forward_packed` under the device's autocast: per part, its rows' next-token logits."""
        with autocast(self.device):
            return self.model.forward_packed(parts, cache)

    def compile(self) -> None:
        """torch.compile each block's MLP in place, for any number of rows (dynamic shapes).

        For CUDA, where a decode step of a small model is launch-bound: the MLP's elementwise ops
        fuse into its matmuls' epilogues. Only the MLPs: attention reads the cache through
        data-dependent shapes (each step's span), which would recompile or break the graph every
        step. Parameter names and values are untouched (checkpoints load as before), and the
        outputs are the eager ones."""
        for block in self.model.transformer.h:
            block.mlp.compile(dynamic=True)

    @torch.no_grad()
    def prompt_logprobs(self, prompt: Sequence[int], k: int) -> tuple[tuple[float | None, TopLogprobs], ...]:
        """Each prompt token's log-probability given the tokens before it and the k most likely
        alternatives there; the first token has none (None, ()). One forward over the whole prompt
        without a cache: its fp32 logits take len(prompt) x vocab x 4 bytes."""
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        with autocast(self.device):
            logits = self.model(idx)[0, :-1]
        scored = token_logprobs(logits, [(token, k) for token in prompt[1:]])
        return ((None, ()), *scored)

    def check_prompt(self, prompt: Sequence[int], max_len: int) -> list[int]:
        """The prompt as a list of ids; a clear error when it cannot be generated from."""
        return check_prompt(prompt, self.model.config.vocab_size, max_len)

    def new_batch(self, capacity: int, max_len: int | None = None, **options) -> DecodeBatch:
        """An empty batch of `capacity` slots of max_len positions (default: the model's sequence_len);
        `options` are DecodeBatch's (num_blocks, block_size, prefix_caching)."""
        return DecodeBatch(self, capacity, max_len, **options)

    def generate(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[tuple[list, list]]:
        """Stream (tokens, masks) columns, one entry per row; None for rows already finished.

        `prompts` is one prompt (a list of ids) or a list of prompts; rows are prompt-major,
        num_samples per prompt. With several prompts, prompt j's samples use seed `seed + j`.
        """
        batch, rows = self._start(prompts, num_samples, max_tokens, temperature, top_k, top_p, seed)
        position = {id(row): i for i, row in enumerate(rows)}
        while batch.rows:
            tokens: list[int | None] = [None] * len(rows)
            masks: list[int | None] = [None] * len(rows)
            for t in batch.step():
                i = position[id(t.row)]
                tokens[i], masks[i] = t.token, t.mask
            yield tokens, masks

    def generate_batch(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Whole sequences (prompt + generated, stop token left out) and masks (0 over the prompt)."""
        batch, rows = self._start(prompts, num_samples, max_tokens, temperature, top_k, top_p, seed)
        while batch.rows:
            batch.step()
        return ([row.prompt + row.tokens for row in rows], [[0] * len(row.prompt) + row.masks for row in rows])

    def _start(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        num_samples: int,
        max_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
    ) -> tuple[DecodeBatch, list[Row]]:
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a list of token ids or a non-empty list of such lists")
        if seed is None:
            seed = secrets.randbits(62)
        params = [SamplingParams(temperature, top_k, top_p, max_tokens, seed + j) for j in range(len(prompts))]
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        longest = max((len(p) for p in prompts if isinstance(p, Sequence)), default=0)
        max_len = min(longest + max_tokens, self.model.rotary_len)
        batch = self.new_batch(len(prompts) * num_samples, max(max_len, 1))
        return batch, batch.add(prompts, params, num_samples)
