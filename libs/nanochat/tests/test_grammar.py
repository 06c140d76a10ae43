"""nanochat.grammar: specs compile or fail with llguidance's message, and a Constraint driven with
random logits (the worst model there is) always yields a complete, valid document within budget."""

import json

import pytest
import torch
from nanochat.grammar import Constraint, GrammarError, compile_spec, tool_call_grammar
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXT = 'The quick brown fox {"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "n": null} 7*3=21. '

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=400)


def drive(spec: str, tok: Tokenizer, seed: int, max_tokens: int, extra_vocab: int = 5) -> tuple[list[int], str]:
    """Sample like the engine does: mask, draw from random logits, advance, until finished or an end token."""
    constraint = Constraint(spec, tok)
    gen = torch.Generator().manual_seed(seed)
    end = tok.encode_special("<|assistant_end|>")
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        logits = torch.randn(tok.vocab_size + extra_vocab, generator=gen) * 3
        constraint.mask(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if token == end:
            return tokens, "stop"
        tokens.append(token)
        constraint.advance(token)
        if constraint.finished():
            assert constraint.error is None
            return tokens, "stop"
    return tokens, "length"


def test_schema_samples_are_valid_and_close_within_budget(tok):
    spec = compile_spec(PERSON, tok, budget=80)
    for seed in range(20):
        tokens, reason = drive(spec, tok, seed, 80)
        assert reason == "stop", tok.decode(tokens)
        value = json.loads(tok.decode(tokens))
        assert set(value) == {"name", "age", "tags", "ok"}
        assert isinstance(value["age"], int) and isinstance(value["ok"], bool)


def test_json_object_samples_are_objects(tok):
    spec = compile_spec("json_object", tok, budget=64)
    for seed in range(20):
        tokens, reason = drive(spec, tok, seed, 64)
        assert reason == "stop", tok.decode(tokens)
        assert isinstance(json.loads(tok.decode(tokens)), dict)


def test_no_special_token_but_the_end_inside_json(tok):
    constraint = Constraint(compile_spec("json_object", tok), tok)
    specials = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    for text in ["", '{"a', '{"a": 1']:
        fresh = Constraint(compile_spec("json_object", tok), tok)
        for t in tok.encode(text):
            fresh.advance(t)
        logits = torch.zeros(tok.vocab_size)
        fresh.mask(logits)
        assert all(logits[s] == float("-inf") for s in specials), text
    for t in tok.encode('{"a": 1}'):
        constraint.advance(t)
    assert constraint.finished() and constraint.error is None


def test_tool_call_grammar_forces_the_special_tokens_and_the_name(tok):
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    spec = compile_spec(tool_call_grammar([("get_weather", params), ("get_time", {"type": "object"})]), tok, 60)
    sp = tok.encode_special
    for seed in range(10):
        tokens, reason = drive(spec, tok, seed, 60)
        assert reason == "stop"
        assert tokens[0] == sp("<|python_start|>") and tokens[-1] == sp("<|python_end|>")
        call = json.loads(tok.decode(tokens[1:-1]))
        assert call["name"] in ("get_weather", "get_time") and set(call) == {"name", "arguments"}
        if call["name"] == "get_weather":
            assert isinstance(call["arguments"]["city"], str)


def test_parallel_tool_call_grammar_gives_one_or_more_valid_calls(tok):
    no_arguments = {"type": "object", "properties": {}, "additionalProperties": False}
    spec = compile_spec(tool_call_grammar([("get_time", no_arguments)], parallel=True), tok, 120)
    ps, pe = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    counts = set()
    for seed in range(12):
        tokens, reason = drive(spec, tok, seed, 120)
        assert reason == "stop" and tokens[0] == ps and tokens[-1] == pe
        calls = tok.decode(tokens).split("<|python_end|>")[:-1]
        for call in calls:
            assert json.loads(call.removeprefix("<|python_start|>"))["name"] == "get_time"
        counts.add(len(calls))
    assert 1 in counts and max(counts) > 1  # the end token and another call both stay open after a call
    # A budget with room for one call only never opens a second one it would have to cut off.
    tight = compile_spec(tool_call_grammar([("get_time", no_arguments)], parallel=True), tok, 55)
    for seed in range(12):
        tokens, reason = drive(tight, tok, seed, 55)
        assert reason == "stop" and tok.decode(tokens).count("<|python_end|>") == 1


@pytest.mark.parametrize(
    ("schema", "needle"),
    [({"type": "strin"}, "strin"), ({"$ref": "#/nowhere"}, "nowhere"), ("neither", "Expected token")],
)
def test_uncompilable_schema_is_a_grammar_error_naming_the_problem(tok, schema, needle):
    with pytest.raises(GrammarError, match=needle):
        compile_spec(schema, tok)


def test_a_bad_spec_string_is_refused(tok):
    with pytest.raises(GrammarError):
        Constraint("{}", tok)
