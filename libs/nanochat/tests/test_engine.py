"""The engine on small fp32 models: cached greedy equals a no-cache reference, seeds, the tool.

Models are depth 2 with a ~300-id vocabulary; the generic ones get noise on every weight (a
fresh model's zero lm_head would give every prompt the same output), the tool test overfits one
to two conversations that call the calculator.
"""

import pytest
import torch
from nanochat import engine as engine_module
from nanochat.calculator import calculate
from nanochat.engine import Engine, SamplingParams, sample_token
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is 7*3? It is 21. Numbers like 1,234 and "
    "0.5 add up; 6/2 is 3.0 and 10//4 is 2. A tiny corpus for a tiny tokenizer, repeated. "
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a shared CPU far faster than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=320)


def perturbed_model(vocab_size: int, seed: int = 0, sequence_len: int = 128) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size, sequence_len))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def engine(tok: Tokenizer) -> Engine:
    return Engine(perturbed_model(tok.vocab_size), tok)


@torch.no_grad()
def reference_greedy(eng: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """Re-run the whole sequence without a cache every step and take the argmax."""
    seq = list(prompt)
    for _ in range(max_tokens):
        token = int(eng.model(torch.tensor([seq]))[0, -1].argmax())
        if token in eng.stop_tokens:
            break
        seq.append(token)
    return seq


def prompts_of(tok: Tokenizer) -> list[list[int]]:
    bos = tok.bos_token_id
    return [
        [bos],
        [bos] + tok.encode("What is 7*3?"),
        [bos] + tok.encode("The quick brown fox jumps over the lazy dog. " * 2),
        [bos] + tok.encode("Numbers like 1,234"),
    ]


@pytest.mark.parametrize("chunk", [engine_module.PREFILL_CHUNK, 4])
def test_greedy_matches_no_cache_reference(engine, tok, monkeypatch, chunk):
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", chunk)  # 4: prompts prefilled in pieces
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) == len(prompts)
    sequences, masks = engine.generate_batch(prompts, max_tokens=24, temperature=0.0)
    for prompt, seq, mask in zip(prompts, sequences, masks):
        assert seq == reference_greedy(engine, prompt, 24)
        assert mask == [0] * len(prompt) + [1] * (len(seq) - len(prompt))
    continuations = {tuple(seq[len(p) :]) for p, seq in zip(prompts, sequences)}
    assert len(continuations) == len(prompts)


def test_rows_join_and_leave_between_steps(engine, tok):
    prompts = prompts_of(tok)
    batch = engine.new_batch(capacity=2, max_len=96)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    (first,) = batch.add([prompts[1]], greedy)
    for _ in range(4):
        batch.step()
    (second,) = batch.add([prompts[2]], SamplingParams(temperature=0.0, max_tokens=30))
    while first.finish_reason is None:
        batch.step()
    # The freed slot still holds the first row's keys; a new row there must not see them.
    assert batch.free_slots() == [first.slot]
    (third,) = batch.add([prompts[3]], greedy)
    assert third.slot == first.slot
    while batch.rows:
        batch.step()
    for row, prompt, n in [(first, prompts[1], 10), (second, prompts[2], 30), (third, prompts[3], 10)]:
        assert row.prompt + row.tokens == reference_greedy(engine, prompt, n)
        assert row.finish_reason in ("stop", "length")


def test_cancel_frees_the_slot(engine, tok):
    batch = engine.new_batch(capacity=1, max_len=64)
    (row,) = batch.add([prompts_of(tok)[1]], SamplingParams(max_tokens=50, seed=0))
    batch.step()
    batch.cancel(row)
    assert row.finish_reason == "cancelled" and batch.rows == {} and batch.step() == []
    assert batch.add([prompts_of(tok)[2]], SamplingParams(seed=1))[0].slot == 0


def test_same_seed_same_sample(engine, tok):
    prompt = prompts_of(tok)[1]
    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) > 1  # forked rows sample independently
    # The same request gives the same sample next to other rows in a shared batch.
    batch = engine.new_batch(capacity=4, max_len=64)
    batch.add([prompts_of(tok)[2]], SamplingParams(temperature=1.0, max_tokens=20, seed=99))
    rows = batch.add([prompt], SamplingParams(temperature=1.0, max_tokens=20, seed=7), num_samples=3)
    while batch.rows:
        batch.step()
    assert [r.prompt + r.tokens for r in rows] == a


def test_prefill_once_then_fork(engine, tok):
    prompt = prompts_of(tok)[2]
    batch = engine.new_batch(capacity=3, max_len=64)
    rows = batch.add([prompt], SamplingParams(temperature=0.0, max_tokens=12), num_samples=3)
    assert batch.cache.lengths.tolist() == [len(prompt)] * 3
    while batch.rows:
        batch.step()
    expected = reference_greedy(engine, prompt, 12)
    assert all(r.prompt + r.tokens == expected for r in rows)


def test_stream_columns_match_generate_batch(engine, tok):
    prompts = prompts_of(tok)[:3]
    sequences, masks = engine.generate_batch(prompts, max_tokens=16, temperature=0.8, top_k=20, seed=3)
    streamed = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for tokens, column_masks in engine.generate(prompts, max_tokens=16, temperature=0.8, top_k=20, seed=3):
        assert len(tokens) == len(prompts)
        for i, (t, m) in enumerate(zip(tokens, column_masks)):
            if finished[i]:
                assert t is None and m is None
                continue
            if t in engine.stop_tokens:
                finished[i] = True
            else:
                streamed[i].append((t, m))
            finished[i] = finished[i] or len(streamed[i]) == 16
    for prompt, seq, mask, got in zip(prompts, sequences, masks, streamed):
        assert seq[len(prompt) :] == [t for t, _ in got]
        assert mask[len(prompt) :] == [m for _, m in got]


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_rows_stop_at_either_stop_token(tok, stop):
    """Once the model picks a stop token a row ends: the stream shows the token once, then None;
    generate_batch's sequences leave it out."""
    eng = Engine(perturbed_model(tok.vocab_size), tok)
    stop_id = tok.encode_special(stop)
    calls = {"n": 0}
    real_forward = eng.forward_packed  # every decode step's forward pass

    def forward(*args, **kwargs):
        parts = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # a few free tokens, then the stop token is every row's argmax
            for logits in parts:
                logits[..., stop_id] = 1e4
        return parts

    eng.forward_packed = forward
    prompts = prompts_of(tok)[:3]
    columns = [tokens for tokens, _ in eng.generate(prompts, max_tokens=20, temperature=0.0)]
    *free, last = columns
    assert free and last == [stop_id] * len(prompts), columns
    assert all(t is not None and t not in eng.stop_tokens for column in free for t in column)
    calls["n"] = 0
    sequences, _ = eng.generate_batch(prompts, max_tokens=20, temperature=0.0)
    for i, (prompt, seq) in enumerate(zip(prompts, sequences)):
        assert seq[len(prompt) :] == [column[i] for column in free]


def test_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=0.0), g) == 1
    assert {sample_token(logits, SamplingParams(top_k=1), g) for _ in range(20)} == {1}
    assert {sample_token(logits, SamplingParams(top_k=2), g) for _ in range(200)} == {1, 2}
    # Mass of tokens 1, 2, 4 is ~0.9; p=0.5 keeps 1 and 2 only (the mass before 2 is < 0.5).
    assert {sample_token(logits, SamplingParams(top_p=0.5), g) for _ in range(200)} == {1, 2}
    assert {sample_token(logits, SamplingParams(top_p=1e-6), g) for _ in range(20)} == {1}


def test_length_limits(engine, tok):
    prompt = prompts_of(tok)[2]
    batch = engine.new_batch(capacity=1, max_len=len(prompt) + 3)
    (row,) = batch.add([prompt], SamplingParams(temperature=0.0, max_tokens=100))
    while batch.rows:
        batch.step()
    # Three free positions: three tokens are fed, the fourth is chosen from the last logits.
    assert row.finish_reason == "length" and len(row.tokens) == 4
    seqs, _ = engine.generate_batch(prompt, max_tokens=5, temperature=0.0)
    assert len(seqs[0]) <= len(prompt) + 5


def test_bad_input_is_a_clear_error(engine, tok):
    prompt = prompts_of(tok)[1]
    with pytest.raises(ValueError, match="non-empty list"):
        engine.generate_batch([], max_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate_batch([[]], max_tokens=4)
    with pytest.raises(ValueError, match="integers in"):
        engine.generate_batch([tok.vocab_size + 5], max_tokens=4)
    with pytest.raises(ValueError, match="sequence of token ids"):
        engine.generate_batch(["hello"], max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate_batch(prompt, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate_batch(prompt, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate_batch(prompt, top_k=0)
    with pytest.raises(ValueError, match="num_samples"):
        engine.generate_batch(prompt, num_samples=0)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate_batch(prompt, max_tokens=0)
    batch = engine.new_batch(capacity=2, max_len=16)
    with pytest.raises(ValueError, match="slots are free"):
        batch.add([prompt], SamplingParams(), num_samples=3)
    with pytest.raises(ValueError, match="no prompts"):
        batch.add([], SamplingParams())
    with pytest.raises(ValueError, match="no room"):
        batch.add([[tok.bos_token_id] * 16], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer has"):
        Engine(perturbed_model(64), tok)


def tool_conversation(question: str, expr: str, output: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": [
                    {"type": "python", "text": expr},
                    {"type": "python_output", "text": output},
                    {"type": "text", "text": answer},
                ],
            },
        ]
    }


@pytest.fixture(scope="module")
def tool_engine(tok: Tokenizer) -> Engine:
    """A model overfit to two tool calls whose trained outputs are deliberately wrong ("99", "oops")."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, 64))
    model.init_weights()
    conversations = [
        tool_conversation("What is 7*3?", "7*3", "99", "It is 21."),
        tool_conversation("What is 6/0?", "6/0", "oops", "No answer."),
    ]
    rows = [tok.render_conversation(c)[0] for c in conversations]
    width = max(len(r) for r in rows)
    data = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
    inputs, targets = data[:, :-1].clamp(min=0), data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return Engine(model.eval(), tok)


def test_calculator_result_is_forced_and_masked(tool_engine, tok):
    prompt = tok.render_for_completion(tool_conversation("What is 7*3?", "", "", "")["messages"][:1])
    sequences, masks = tool_engine.generate_batch(prompt, max_tokens=30, temperature=0.0)
    out, mask = sequences[0][len(prompt) :], masks[0][len(prompt) :]
    sp = tok.encode_special
    code = [sp("<|python_start|>")] + tok.encode("7*3") + [sp("<|python_end|>")]
    forced = [sp("<|output_start|>")] + tok.encode("21") + [sp("<|output_end|>")]
    assert out[: len(code)] == code and mask[: len(code)] == [1] * len(code)
    assert out[len(code) : len(code) + len(forced)] == forced
    assert mask[len(code) : len(code) + len(forced)] == [0] * len(forced)
    # After the block the tiny overfit model may write anything (it was trained on "99", not "21"):
    # another call, or an output block of its own. Replaying the tool rules over what it wrote, the
    # tokens forced after each complete call are exactly the calculator's block with mask 0, and
    # every other token, a sampled <|output_start|> included, is sampled: mask 1.
    expected, expr, in_python, i = [], [], False, 0
    while i < len(out):
        token = out[i]
        expected.append(1)
        if token == sp("<|python_start|>"):
            in_python, expr = True, []
        elif token == sp("<|python_end|>") and in_python:
            in_python = False
            result = calculate(tok.decode(expr))
            if result is not None:
                block = ([sp("<|output_start|>")] + tok.encode(result) + [sp("<|output_end|>")])[: len(out) - i - 1]
                assert out[i + 1 : i + 1 + len(block)] == block, tok.decode(out)
                expected += [0] * len(block)
                i += len(block)
        elif in_python:
            expr.append(token)
        i += 1
    assert mask == expected, (tok.decode(out), mask)
    assert tok.decode(out).startswith("<|python_start|>7*3<|python_end|><|output_start|>21<|output_end|>")


def test_failed_calculation_forces_nothing(tool_engine, tok):
    prompt = tok.render_for_completion(tool_conversation("What is 6/0?", "", "", "")["messages"][:1])
    sequences, masks = tool_engine.generate_batch(prompt, max_tokens=30, temperature=0.0)
    out, mask = sequences[0][len(prompt) :], masks[0][len(prompt) :]
    # The model writes its own (trained, wrong) output block, all sampled: mask 1 throughout.
    assert tok.decode(out).startswith("<|python_start|>6/0<|python_end|><|output_start|>oops")
    assert mask == [1] * len(out)


@pytest.mark.slow
def test_compiled_mlps_give_the_eager_greedy_output():
    tok = Tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, tok.vocab_size, sequence_len=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = Engine(model.eval(), tok)
    prompts = [[tok.bos_token_id, *tok.encode(t)] for t in ("The quick", "lazy dog", "fox")]
    eager, _ = engine.generate_batch(prompts, max_tokens=12, temperature=0.0)
    names = sorted(name for name, _ in model.named_parameters())
    engine.compile()
    assert all(block.mlp._compiled_call_impl is not None for block in model.transformer.h)
    compiled, _ = engine.generate_batch(prompts, max_tokens=12, temperature=0.0)
    assert compiled == eager
    assert sorted(name for name, _ in model.named_parameters()) == names
