"""Grammar-constrained decoding over our tokenizer's vocabulary, with llguidance.

Why llguidance (over xgrammar and outlines-core): it is on PyPI as one self-contained wheel (no
torch or transformers dependency), builds its token trie straight from a tiktoken `Encoding`
(`llguidance.tiktoken`), computes a mask in tens of microseconds per row (an Earley parser over a
lazily built lexer, no precompilation of the whole grammar), takes JSON schemas and Lark grammars
that name our special tokens (`<|python_start|>`), and reports a schema it cannot compile with a
readable message.

A *spec* is a plain JSON string (it rides in `SamplingParams.grammar` to the model process):
`{"grammar": <llguidance grammar>, "budget": <tokens or null>}`. `compile_spec` makes one from
"json_object", a JSON schema (a dict), or `tool_call_grammar`'s output; `Constraint(spec,
tokenizer)` is one sample's matcher, driven by the engine: `mask(logits_row)` before each draw,
`advance(token)` after it, `finished()` once the grammar can take no more.

JSON is written compactly in json.dumps's default style (`", "` and `": "`, no other
whitespace), so no sample spends its tokens on whitespace. Special tokens are never allowed inside
JSON; `<|assistant_end|>` is allowed once the value is complete (the engine stops the row on it),
and a grammar that can take nothing more finishes the row by itself.

The budget: a model (a random-weight one above all) can wander in a string or an array for longer
than `max_tokens` allows, and a cut-off JSON document is worth nothing. So a Constraint whose spec
has a budget measures, as the budget runs down, how many tokens the *closing path* from its state
takes (walked on a copy of the matcher), and once only about that many are left (1.5x + SLACK),
the mask narrows, among what the grammar allows, to the tokens that close fastest: the end token,
then a closing quote inside a string, then `}` or `]`, then an opening quote, then `,` (allowed
only where more is required), then `0`; where none of those is allowed, the next forced token (a
key), else the shortest allowed tokens (`true`, the rest of a UTF-8 character). A sample whose
closing path is longer than its whole budget (a prompt that leaves almost no room) can still be
cut (finish_reason "length").
"""

from __future__ import annotations

import functools
import json
import weakref
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from nanochat.tokenizer import Tokenizer

JSON_STYLE: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
END_TOKEN = "<|assistant_end|>"
RECHECK = 8  # tokens between two measures of the closing path while it is far off
# Tokens in hand beyond the measured path: one sampled token can lengthen the path (a `,` in an
# array opens one more item), so the hand grows with the path.
SLACK = 4

# Building llguidance's view of a vocabulary takes ~1 s for a 65k vocabulary: once per tokenizer.
_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message is llguidance's own."""


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ours, with `<|assistant_end|>` as its end token (cached)."""
    ll = _LL_TOKENIZERS.get(tokenizer)
    if ll is None:
        ll = lltokenizer_from_encoding(
            tokenizer.encoding, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.encode_special(END_TOKEN)
        )
        _LL_TOKENIZERS[tokenizer] = ll
    return ll


def json_grammar(schema_or_kind: str | dict[str, Any]) -> str:
    """llguidance's grammar for "json_object" (any JSON object) or a JSON schema."""
    if schema_or_kind == "json_object":
        schema: Any = {"type": "object"}
    elif isinstance(schema_or_kind, dict):
        schema = schema_or_kind
    else:
        raise GrammarError(f"expected 'json_object' or a JSON schema object, got {schema_or_kind!r}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from None


def tool_call_grammar(functions: list[tuple[str, dict[str, Any]]], parallel: bool = False) -> str:
    """A grammar for one call `<|python_start|>{"name": ..., "arguments": {...}}<|python_end|>`
    to one of `functions` ((name, parameters schema) pairs), its arguments valid for that function;
    with `parallel`, one or more such calls back to back (then the end token, or the next call)."""
    if not functions:
        raise GrammarError("a tool call grammar needs at least one function")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": JSON_STYLE}
    repeat = "+" if parallel else ""
    lark = f"start: (<|python_start|> call <|python_end|>){repeat}\ncall: %json {json.dumps(schema)}\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


def compile_spec(
    schema_or_kind: str | dict[str, Any],
    tokenizer: Tokenizer | None = None,
    budget: int | None = None,
) -> str:
    """A spec for `Constraint`: "json_object", a JSON schema, or a grammar from `tool_call_grammar`
    (a string that is neither "json_object" is taken as an llguidance grammar).

    Raises GrammarError with llguidance's message when the grammar does not compile (checked
    against `tokenizer`'s vocabulary when given). `budget`: the most tokens the sample may
    generate, which turns on the closing path (module docstring)."""
    if isinstance(schema_or_kind, dict) or schema_or_kind == "json_object":
        grammar = json_grammar(schema_or_kind)
    elif isinstance(schema_or_kind, str):
        grammar = schema_or_kind
    else:
        raise GrammarError(f"expected 'json_object', a JSON schema or a grammar, got {type(schema_or_kind).__name__}")
    ll = ll_tokenizer(tokenizer) if tokenizer is not None else None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
    if is_error:
        raise GrammarError(messages[0])
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise GrammarError(f"budget must be None or an integer >= 1, got {budget!r}")
    return json.dumps({"grammar": grammar, "budget": budget})


class Constraint:
    """One sample's position in its grammar: which tokens may come next, and whether it is done."""

    def __init__(self, spec: str, tokenizer: Tokenizer):
        try:
            parsed = json.loads(spec)
            grammar, budget = parsed["grammar"], parsed["budget"]
        except (ValueError, KeyError, TypeError) as e:
            raise GrammarError(f"not a grammar spec from nanochat.grammar.compile_spec: {e}") from None
        self.vocab = tokenizer.vocab_size
        self.matcher = _fresh_matcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.budget = budget
        self.consumed = 0
        self.closing = False
        self.estimate: int | None = None  # tokens the closing path took when last measured
        self.estimated_at = 0
        self.estimated_in_string = False
        self.closer = _closer(tokenizer)

    def mask(self, logits_row: torch.Tensor) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place."""
        Constraint.mask_rows([self], logits_row[None])

    @staticmethod
    def mask_rows(constraints: list[Constraint], logits: torch.Tensor) -> None:
        """`mask` for several rows at once, in place: `logits` is (len(constraints), vocab or more),
        all of one vocabulary. llguidance computes every row's mask in one call that drops the GIL,
        and the logits take them in one masked_fill, instead of a round of each per row."""
        vocab = constraints[0].vocab
        words = np.zeros((len(constraints), (vocab + 31) // 32), dtype=np.uint32)
        _executor().unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)], words.ctypes.data, words[0].nbytes, len(constraints)
        )
        allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
        for i, c in enumerate(constraints):
            allowed[i] = c._narrowed(allowed[i])
        blocked = torch.from_numpy(~allowed).to(logits.device, non_blocking=True)
        logits[:, :vocab].masked_fill_(blocked, float("-inf"))
        logits[:, vocab:] = float("-inf")  # the model's padding ids

    def _narrowed(self, allowed: np.ndarray) -> np.ndarray:
        if self._must_close(allowed):
            return self.closer.narrow(allowed, self.matcher)
        return self._room_to_go_on(allowed)

    def _room_to_go_on(self, allowed: np.ndarray) -> np.ndarray:
        """Where the sample could end now but may also go on (between parallel tool calls), going
        on is allowed only while the budget leaves room for the closing path after it: the budget
        rule alone sees only the end token's path, and a call opened just before the budget ran
        out would be cut off."""
        end = self.closer.end
        if self.budget is None or not allowed[end]:
            return allowed
        others = np.flatnonzero(allowed)
        others = others[others != end]
        if not 0 < others.size <= 4:  # a few structural tokens only: a mask-wide look-ahead costs too much
            return allowed
        walk = self.matcher.deep_copy()
        walk.consume_token(int(others[0]))
        remaining = self.budget - self.consumed - 1
        if remaining < self._hand(self.closer.cost(walk, limit=remaining + 1)):
            return self.closer._only(allowed, [end])
        return allowed

    def _must_close(self, allowed: np.ndarray) -> bool:
        """Whether what is left of the budget is only just enough for the closing path. Measured
        every RECHECK tokens, and at every token once the budget is within RECHECK of the measure,
        except while the sample stays inside one string (the path out of it stays the same)."""
        if self.closing or self.budget is None:
            return self.closing
        remaining = self.budget - self.consumed
        in_string = self.closer.in_string(allowed)
        near = self.estimate is not None and remaining <= self._hand(self.estimate) + RECHECK
        same_string = in_string and self.estimated_in_string and self.consumed - self.estimated_at < RECHECK
        if self.estimate is None or (near and not same_string) or self.consumed - self.estimated_at >= RECHECK:
            self.estimate = self.closer.cost(self.matcher, limit=remaining + 1)
            self.estimated_at, self.estimated_in_string = self.consumed, in_string
        self.closing = remaining <= self._hand(self.estimate)
        return self.closing

    @staticmethod
    def _hand(estimate: int) -> int:
        return estimate + SLACK + estimate // 2

    def advance(self, token: int) -> None:
        """Take the token the row chose (a token the mask did not allow puts the matcher in error,
        which `finished` reports)."""
        self.consumed += 1
        self.matcher.consume_token(token)

    def finished(self) -> bool:
        """True once the grammar can take no further token (or the matcher is in error)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class _Closer:
    """The fastest way out of a document: which allowed tokens close it soonest, and how many
    tokens that takes from a matcher's state."""

    def __init__(self, tokenizer: Tokenizer):
        # Every single byte is a rank of a byte-level BPE, so these ids always exist.
        byte = tokenizer.encoding._mergeable_ranks
        self.vocab = tokenizer.vocab_size
        self.end = tokenizer.encode_special(END_TOKEN)
        self.quote, self.letter = byte[b'"'], byte[b"a"]
        ids = [[self.end], [byte[b"}"], byte[b"]"]], [self.quote], [byte[b","]], [byte[b"0"]]]
        self.outside = [np.array(t) for t in ids]
        self.inside = self.outside[:1] + [np.array([self.quote])]
        lengths = np.array(tokenizer.token_bytes())
        # The shortest tokens first: a longer one may end inside a UTF-8 character, where no quote can follow.
        self.lengths = np.where(lengths > 0, lengths, 1 << 30)

    def in_string(self, allowed: np.ndarray) -> bool:
        return bool(allowed[self.quote] and allowed[self.letter])

    def narrow(self, allowed: np.ndarray, matcher: llguidance.LLMatcher) -> np.ndarray:
        """Of the allowed tokens, the first tier that has any (module docstring), else the next
        forced token (a key's), else the shortest."""
        for tier in self.inside if self.in_string(allowed) else self.outside:
            picked = tier[allowed[tier]]
            if picked.size:
                return self._only(allowed, picked)
        forced = matcher.compute_ff_tokens()
        if forced:
            return self._only(allowed, [forced[0]])
        lengths = np.where(allowed, self.lengths, 1 << 31)
        shortest = allowed & (lengths == lengths.min())
        return shortest if shortest.any() else allowed

    @staticmethod
    def _only(allowed: np.ndarray, ids) -> np.ndarray:
        narrowed = np.zeros_like(allowed)
        narrowed[ids] = True
        return narrowed

    def cost(self, matcher: llguidance.LLMatcher, limit: int) -> int:
        """Tokens the closing path takes from `matcher`'s state (at most `limit`), walked on a copy:
        the tiers by single-token checks, forced runs at once, a full mask only where neither helps."""
        walk = matcher.deep_copy()
        words = np.zeros((self.vocab + 31) // 32, dtype=np.uint32)
        n = 0
        while n < limit:
            if walk.is_stopped() or walk.is_error():
                return n
            if walk.validate_tokens([self.end]):
                return n + 1
            token = self._tier_token(walk)
            forced = [token] if token is not None else walk.compute_ff_tokens()
            if not forced:
                allowed = _allowed(walk, words, self.vocab)
                forced = [int(np.flatnonzero(self.narrow(allowed, walk))[0])]
            walk.consume_tokens(forced)
            n += len(forced)
        return limit

    def _tier_token(self, m: llguidance.LLMatcher) -> int | None:
        in_string = m.validate_tokens([self.quote]) and m.validate_tokens([self.letter])
        for tier in self.inside if in_string else self.outside:
            for token in tier.tolist():
                if m.validate_tokens([token]):
                    return token
        return None


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


_CLOSERS: weakref.WeakKeyDictionary[Tokenizer, _Closer] = weakref.WeakKeyDictionary()


def _closer(tokenizer: Tokenizer) -> _Closer:
    closer = _CLOSERS.get(tokenizer)
    if closer is None:
        closer = _CLOSERS[tokenizer] = _Closer(tokenizer)
    return closer


# A request's samples, and the next requests with the same schema, start from a copy of one
# matcher: a copy is ~1 us where building one is ~0.3 ms, and it shares what the first one's
# lexer has learnt.
_TEMPLATES: weakref.WeakKeyDictionary[Tokenizer, OrderedDict[str, llguidance.LLMatcher]] = weakref.WeakKeyDictionary()
MAX_TEMPLATES = 64


def _fresh_matcher(tokenizer: Tokenizer, grammar: str) -> llguidance.LLMatcher:
    templates = _TEMPLATES.setdefault(tokenizer, OrderedDict())
    template = templates.get(grammar)
    if template is None:
        template = templates[grammar] = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar)
        if len(templates) > MAX_TEMPLATES:
            templates.popitem(last=False)
    templates.move_to_end(grammar)
    return template.deep_copy()


def _allowed(matcher: llguidance.LLMatcher, words: np.ndarray, vocab: int) -> np.ndarray:
    """The matcher's next-token mask as `vocab` bools (llguidance's bitmask: bit i of word w is
    token 32w+i), computed into `words`."""
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
