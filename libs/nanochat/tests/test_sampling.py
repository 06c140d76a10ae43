"""The engine's per-row sampling extras on a small perturbed fp32 model: logprobs against a full
forward pass, penalties and logit_bias by OpenAI's formula, rows with and without them in one
batch, and the grammar hooks (driven by a test double of `nanochat.grammar.Constraint`).
"""

import sys
import types

import pytest
import torch
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.scheduler import Scheduler
from nanochat.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. What is 7*3? It is 21. Numbers like 1,234 add up. "


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len=256))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Engine(model.eval(), tok)


def prompt(engine: Engine, text: str) -> list[int]:
    return [engine.tokenizer.bos_token_id] + engine.tokenizer.encode(text)


def generate(engine: Engine, ids: list[int], *params: SamplingParams) -> list[list]:
    """One DecodeBatch holding a row per params (same prompt); each row's StepTokens."""
    batch = engine.new_batch(len(params))
    rows = batch.add([ids] * len(params), list(params))
    steps = {id(row): [] for row in rows}
    while batch.rows:
        for t in batch.step():
            steps[id(t.row)].append(t)
    return [steps[id(row)] for row in rows]


@torch.no_grad()
def full_logprobs(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position, without a cache."""
    return torch.log_softmax(engine.model(torch.tensor([tokens]))[0], dim=-1)


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(engine):
    ids = prompt(engine, "The quick brown")
    (steps,) = generate(engine, ids, SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=True))
    generated = [t.token for t in steps]
    reference = full_logprobs(engine, ids + generated)
    for i, t in enumerate(steps):
        row = reference[len(ids) - 1 + i]
        assert t.logprob == pytest.approx(float(row[t.token]), abs=1e-4)
        top_ids = [token for token, _ in t.top_logprobs]
        assert top_ids == row.topk(5).indices.tolist() and top_ids[0] == t.token  # greedy takes the top one
        assert [lp for _, lp in t.top_logprobs] == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
    echoed = steps[0].prompt_logprobs
    assert len(echoed) == len(ids) and echoed[0] == (None, ())
    for position, (logprob, top) in enumerate(echoed[1:], start=1):
        assert logprob == pytest.approx(float(reference[position - 1, ids[position]]), abs=1e-4)
        assert [token for token, _ in top] == reference[position - 1].topk(5).indices.tolist()
    assert all(t.prompt_logprobs is None for t in steps[1:])


def test_rows_that_ask_nothing_get_no_logprobs(engine):
    (steps,) = generate(engine, prompt(engine, "fox"), SamplingParams(temperature=0.0, max_tokens=4))
    assert all(t.logprob is None and t.top_logprobs is None and t.prompt_logprobs is None for t in steps)
    (zero,) = generate(engine, prompt(engine, "fox"), SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
    assert all(t.logprob is not None and t.top_logprobs == () for t in zero)


def test_logit_bias_forces_and_bans_per_row_in_one_batch(engine):
    ids = prompt(engine, "The lazy dog")
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    (solo,) = generate(engine, ids, greedy)
    forced_token = engine.tokenizer.encode(" fox")[0]
    banned = solo[0].token
    plain, forced, ban = generate(
        engine,
        ids,
        greedy,
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={forced_token: 100}),
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={banned: -100}),
    )
    assert [t.token for t in plain] == [t.token for t in solo]  # the rows beside it change nothing
    assert [t.token for t in forced] == [forced_token] * 6
    assert banned not in [t.token for t in ban]


@pytest.mark.parametrize("frequency, presence", [(2.0, 0.0), (0.0, 2.0), (1.5, -0.5)])
def test_penalties_follow_openais_formula(engine, frequency, presence):
    ids = prompt(engine, "dog dog dog")
    params = SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=frequency, presence_penalty=presence)
    plain, penalised = generate(engine, ids, SamplingParams(temperature=0.0, max_tokens=12), params)
    tokens = [t.token for t in penalised]
    # Replay: at each step the greedy pick of the raw logits minus the formula over tokens so far.
    vocab = engine.model.config.vocab_size
    with torch.no_grad():
        for i, token in enumerate(tokens):
            logits = engine.model(torch.tensor([ids + tokens[:i]]))[0, -1]
            counts = torch.bincount(torch.tensor(tokens[:i], dtype=torch.long), minlength=vocab).float()
            adjusted = logits - counts * frequency - (counts > 0).float() * presence
            assert token == int(adjusted.argmax()), f"step {i}"
    assert tokens != [t.token for t in plain]  # the penalties did something here


def test_penalised_and_plain_requests_share_a_scheduler_batch(engine):
    ids = prompt(engine, "The quick")
    greedy = SamplingParams(temperature=0.0, max_tokens=10)

    def collect(scheduler, params):
        got = []
        scheduler.submit(ids, params, lambda events: got.extend(e.token for e in events if e.token is not None))
        return got

    alone = Scheduler(engine, slots=2)
    solo = collect(alone, greedy)
    while not alone.idle():
        alone.iterate()
    together = Scheduler(engine, slots=2)
    plain = collect(together, greedy)
    biased = collect(
        together, SamplingParams(temperature=0.0, max_tokens=10, frequency_penalty=2.0, logit_bias={5: 50})
    )
    while not together.idle():
        together.iterate()
    assert plain == solo
    assert biased != solo


class ScriptedConstraint:
    """A grammar that allows exactly one token sequence, then is complete."""

    made: list["ScriptedConstraint"] = []

    def __init__(self, spec: str, tokenizer):
        self.script = [int(t) for t in spec.split(",")]
        self.position = 0
        self.masked = 0
        ScriptedConstraint.made.append(self)

    def mask(self, logits: torch.Tensor) -> None:
        self.masked += 1
        allowed = logits[self.script[self.position]].clone()
        logits.fill_(float("-inf"))
        logits[self.script[self.position]] = allowed

    @staticmethod
    def mask_rows(constraints: list["ScriptedConstraint"], logits: torch.Tensor) -> None:
        for constraint, line in zip(constraints, logits):
            constraint.mask(line)

    def advance(self, token: int) -> None:
        assert token == self.script[self.position]
        self.position += 1

    def finished(self) -> bool:
        return self.position == len(self.script)


def test_a_grammar_row_samples_what_its_constraint_allows_and_stops_when_complete(engine, monkeypatch):
    fake = types.ModuleType("nanochat.grammar")
    fake.Constraint = ScriptedConstraint
    monkeypatch.setitem(sys.modules, "nanochat.grammar", fake)
    ScriptedConstraint.made.clear()
    script = engine.tokenizer.encode(" fox jumps over")
    ids = prompt(engine, "The")
    plain, constrained = generate(
        engine,
        ids,
        SamplingParams(temperature=0.0, max_tokens=20),
        SamplingParams(temperature=1.0, max_tokens=20, seed=3, grammar=",".join(map(str, script))),
    )
    assert [t.token for t in constrained] == script
    assert constrained[-1].finished and constrained[-1].row.finish_reason == "stop"
    assert len(ScriptedConstraint.made) == 1 and ScriptedConstraint.made[0].masked == len(script)
    assert len(plain) == 20  # the unconstrained row beside it was not stopped


def test_the_scheduler_passes_on_the_token_that_completes_a_grammar(engine, monkeypatch):
    fake = types.ModuleType("nanochat.grammar")
    fake.Constraint = ScriptedConstraint
    monkeypatch.setitem(sys.modules, "nanochat.grammar", fake)
    script = engine.tokenizer.encode(" lazy dog")
    events = []
    scheduler = Scheduler(engine, slots=2)
    params = SamplingParams(temperature=0.0, max_tokens=20, grammar=",".join(map(str, script)), logprobs=1)
    scheduler.submit(prompt(engine, "The"), params, events.extend)
    while not scheduler.idle():
        scheduler.iterate()
    assert [e.token for e in events if e.token is not None] == script
    assert events[-1].finish_reason == "stop" and all(e.logprob is not None for e in events[:-1])


def scripted(engine: Engine, monkeypatch, script: list[int], **options) -> list[int]:
    """The tokens a row emits when its grammar allows only `script` (forced tokens in between)."""
    fake = types.ModuleType("nanochat.grammar")
    fake.Constraint = ScriptedConstraint
    monkeypatch.setitem(sys.modules, "nanochat.grammar", fake)
    params = SamplingParams(temperature=1.0, max_tokens=200, seed=1, grammar=",".join(map(str, script)), **options)
    (steps,) = generate(engine, prompt(engine, "The"), params)
    assert steps[-1].row.finish_reason == "stop"
    return [t.token for t in steps]


def test_a_call_of_a_listed_function_ends_the_turn_and_other_blocks_are_the_calculators(engine, monkeypatch):
    tok = engine.tokenizer
    ps, pe = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    os_, oe = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    end = tok.encode_special("<|assistant_end|>")
    call = [ps, *tok.encode('{"name": "f", "arguments": {"x": 1}}'), pe]
    other = [ps, *tok.encode('{"name": "g", "arguments": {}}'), pe]
    sum_ = [ps, *tok.encode("7*3"), pe]
    fox = tok.encode(" fox")
    # One call per turn: the row ends at the call's <|python_end|>.
    assert scripted(engine, monkeypatch, call + fox, tools=("f",)) == call
    # With parallel_tool_calls a second call may follow; then any other token ends the turn.
    assert scripted(engine, monkeypatch, call + call + fox, tools=("f",), parallel_tool_calls=True) == [
        *call,
        *call,
        end,
    ]
    # A block that calls no listed function is evaluated (or not) as without tools, and the turn goes on.
    assert scripted(engine, monkeypatch, sum_ + fox, tools=("f",)) == [*sum_, os_, *tok.encode("21"), oe, *fox]
    assert scripted(engine, monkeypatch, other + fox, tools=("f",)) == other + fox
    assert scripted(engine, monkeypatch, call + fox) == call + fox  # no tools: just a python block
    # After a call, a block that is no call (the calculator's, say) ends the turn, unevaluated:
    # what follows a call is its result, which only the client can give.
    assert scripted(engine, monkeypatch, call + sum_ + fox, tools=("f",), parallel_tool_calls=True) == call + sum_


def test_a_block_nested_past_the_json_parser_is_no_call():
    from nanochat.tokenizer import parse_tool_call

    assert parse_tool_call("[" * 5000, ("f",)) is None
    assert parse_tool_call('{"name": "f", "arguments": {}}', ("f",)) == ("f", {})


def test_tools_must_be_names(engine):
    for bad in ["f", (1,), ("f", None)]:
        with pytest.raises(ValueError, match="tools must be"):
            SamplingParams(tools=bad)
    assert SamplingParams(tools=["f", "g"]).tools == ("f", "g")


def test_prompt_scores_reach_the_caller_when_the_first_token_is_a_stop_token(engine):
    end = engine.tokenizer.encode_special("<|assistant_end|>")
    events = []
    scheduler = Scheduler(engine, slots=2)
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, prompt_logprobs=True, logit_bias={end: 100})
    ids = prompt(engine, "The quick")
    scheduler.submit(ids, params, events.extend)
    while not scheduler.idle():
        scheduler.iterate()
    (finish,) = events  # the stop token itself is not passed on
    assert finish.finish_reason == "stop" and finish.token is None
    assert len(finish.prompt_logprobs) == len(ids) and finish.prompt_logprobs[0] == (None, ())


def test_a_bias_on_a_token_the_model_lacks_is_refused_at_submit(engine):
    scheduler = Scheduler(engine, slots=2)
    vocab = engine.model.config.vocab_size
    with pytest.raises(ValueError, match="logit_bias names token"):
        scheduler.submit(prompt(engine, "fox"), SamplingParams(logit_bias={vocab: 1}), lambda events: None)
    assert scheduler.idle()


def test_a_bias_on_a_token_the_model_lacks_is_refused_by_a_decode_batch(engine):
    batch = engine.new_batch(2)
    vocab, free = engine.model.config.vocab_size, batch.blocks.free
    with pytest.raises(ValueError, match="logit_bias names token"):
        batch.add([prompt(engine, "fox")] * 2, [SamplingParams(), SamplingParams(logit_bias={vocab: 1})])
    assert not batch.rows and batch.blocks.free == free


def test_a_prompts_samples_share_one_scoring_of_its_prompt(engine, monkeypatch):
    calls = []
    score = engine.prompt_logprobs
    monkeypatch.setattr(engine, "prompt_logprobs", lambda ids, k: calls.append(ids) or score(ids, k))
    batch = engine.new_batch(3)
    params = SamplingParams(max_tokens=2, seed=1, logprobs=1, prompt_logprobs=True)
    rows = batch.add([prompt(engine, "fox")], params, num_samples=3)
    first = [t.prompt_logprobs for t in batch.step()]
    assert len(calls) == 1 and len(rows) == 3 and first[0] is not None and first.count(first[0]) == 3


def test_bad_sampling_extras_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101})
    assert SamplingParams(logit_bias={"7": 1, 2: -3}).logit_bias == ((2, -3.0), (7, 1.0))
