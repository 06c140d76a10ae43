"""chat_rl's pieces against the original, every expected value worked out by hand: training rows
(padding under mask 0, no stop token), the per-pass loss normalisation, sampling in chunks of
device_batch_size rows, and pass@1..pass@k at temperature 1.0."""

import contextlib

import pytest
import torch
from nanochat.engine import row_seed
from nanochat.stages.chat_rl import (
    EVAL_TEMPERATURE,
    evaluate_pass_at_k,
    pass_at_k_counts,
    pass_at_k_metrics,
    pass_loss,
    policy_gradient_backward,
    sample_rows,
    training_rows,
)
from nanochat.stages.options import ChatRlOptions

PAD = 9


def test_rows_pad_under_mask_0_and_never_add_a_stop_token():
    # Prompt [1, 2]. Row 0 ran 3 sampled tokens; row 1 stopped after one (the engine leaves the
    # stop token, <|assistant_end|> or <|bos|> alike, out of its sequence), so it is padded to
    # width 5 with PAD under mask 0; row 2 had a calculator call whose output 30, 31 was forced.
    sequences = [[1, 2, 5, 6, 7], [1, 2, 8], [1, 2, 5, 30, 31]]
    masks = [[0, 0, 1, 1, 1], [0, 0, 1], [0, 0, 1, 0, 0]]
    inputs, targets = training_rows(sequences, masks, PAD)
    assert inputs.tolist() == [[1, 2, 5, 6], [1, 2, 8, PAD], [1, 2, 5, 30]]
    assert targets.tolist() == [[-1, 5, 6, 7], [-1, 8, -1, -1], [-1, 5, -1, -1]]


def test_pass_loss_divides_by_its_own_valid_tokens_and_the_divisor():
    # sum(nll * adv) = 0.5 * (1 + 2) + (-1) * 3 = -1.5; 3 valid targets; divisor 2: -1.5 / 6.
    nll = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[5, 6, -1], [7, -1, -1]])
    assert float(pass_loss(nll, targets, torch.tensor([0.5, -1.0]), 2)) == pytest.approx(-0.25)
    # A pass with nothing to train counts its tokens as 1 rather than dividing by 0.
    assert float(pass_loss(torch.zeros(1, 2), torch.tensor([[-1, -1]]), torch.tensor([1.0]), 3)) == 0.0


class CountingModel(torch.nn.Module):
    """-logp = w on every trained target (0 where the target is -1); records each pass's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_reduction: str) -> torch.Tensor:
        assert loss_reduction == "none" and x.shape == y.shape
        self.rows.append(len(x))
        return self.w * (y >= 0).float()


def _backward(batch_size: int, questions: int) -> tuple[float, float, list[int]]:
    # Row 0: 1 trained target, advantage +1. Row 1: 3 trained targets, advantage -0.5.
    targets = torch.tensor([[4, -1, -1], [4, 4, 4]])
    model = CountingModel()
    loss = policy_gradient_backward(
        model,
        torch.zeros_like(targets),
        targets,
        torch.tensor([1.0, -0.5]),
        batch_size,
        questions,
        torch.device("cpu"),
        contextlib.nullcontext(),
    )
    return loss, float(model.w.grad), model.rows


def test_each_pass_is_normalised_by_its_own_tokens_then_by_the_passes():
    # Two passes of one row: (1 * 1) / (1 token * 2 passes) + (-0.5 * 3) / (3 tokens * 2 passes)
    # = 0.5 - 0.25 = 0.25 (one count over all rows would give (1 - 1.5) / 4 = -0.125).
    loss, grad, rows = _backward(batch_size=1, questions=1)
    assert (loss, grad, rows) == (pytest.approx(0.25), pytest.approx(0.25), [1, 1])
    # One pass of both rows: (1 - 1.5) / 4 tokens = -0.125.
    loss, grad, rows = _backward(batch_size=2, questions=1)
    assert (loss, grad, rows) == (pytest.approx(-0.125), pytest.approx(-0.125), [2])
    # Two questions per rank halve each question's share: 0.25 / 2.
    loss, grad, _ = _backward(batch_size=1, questions=2)
    assert (loss, grad) == (pytest.approx(0.125), pytest.approx(0.125))


class FakeTokenizer:
    def render_for_completion(self, conversation: dict) -> list[int]:
        return [1, conversation["id"]]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class FakeEngine:
    """Sample j of prompt [1, q] is the one token 100 * q + j; records each generate_batch call."""

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.calls: list[dict] = []
        self.made: dict[int, int] = {}

    def generate_batch(
        self, prompt: list[int], num_samples: int, max_tokens: int, temperature: float, top_k: int | None, seed: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        self.calls.append(
            {
                "prompt": prompt,
                "rows": num_samples,
                "seed": seed,
                "temperature": temperature,
                "top_k": top_k,
                "max_tokens": max_tokens,
            }
        )
        first = self.made.get(prompt[1], 0)
        self.made[prompt[1]] = first + num_samples
        return (
            [prompt + [100 * prompt[1] + j] for j in range(first, first + num_samples)],
            [[0, 0, 1] for _ in range(num_samples)],
        )


def test_sampling_runs_at_most_device_batch_size_rows_per_engine_batch():
    engine = FakeEngine()
    sequences, masks = sample_rows(
        engine, [1, 3], count=10, batch_size=4, max_tokens=7, temperature=0.5, top_k=50, seed=11
    )
    assert [c["rows"] for c in engine.calls] == [4, 4, 2]
    assert [s[-1] for s in sequences] == [300 + j for j in range(10)] and len(masks) == 10
    # Each engine batch has its own seed (one seed for all would repeat the first batch's samples).
    assert [c["seed"] for c in engine.calls] == [row_seed(11, 0), row_seed(11, 1), row_seed(11, 2)]
    assert len({c["seed"] for c in engine.calls}) == 3
    assert all((c["temperature"], c["top_k"], c["max_tokens"]) == (0.5, 50, 7) for c in engine.calls)


def test_pass_at_k_counts_questions_right_within_their_first_k_samples():
    outcomes = [[False, True, False], [False, False, False], [True, False, False], [False, False, True]]
    # pass@1: question 2; pass@2: questions 0 and 2; pass@3: 0, 2 and 3.
    assert pass_at_k_counts(outcomes, 3) == [1, 2, 3]
    metrics = pass_at_k_metrics([1, 2, 3], 4)
    assert [metrics[f"gsm8k/pass@{k}"] for k in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert [metrics[f"gsm8k/pass@{k}/items"] for k in (1, 2, 3)] == [4, 4, 4]
    # 2 of 4: p~ = (2 + 2) / (4 + 4) = 0.5, half-width 1.96 * sqrt(0.25 / 8) = 0.346482.
    assert metrics["gsm8k/pass@2/ci95"] == pytest.approx(0.346482, abs=1e-6)


class FakeTest:
    """Question q is right on the samples listed in RIGHT[q] (sample j answers 100 * q + j)."""

    RIGHT = {0: {2}, 1: {0}, 2: set(), 3: {1}, 4: {0}}

    def __len__(self) -> int:
        return len(self.RIGHT)

    def __getitem__(self, q: int) -> dict:
        return {"id": q}

    def evaluate(self, conversation: dict, response: str) -> bool:
        q = conversation["id"]
        return int(response) - 100 * q in self.RIGHT[q]


def test_pass_at_k_samples_at_temperature_1_over_the_first_eval_examples():
    options = ChatRlOptions(
        eval_examples=4, eval_samples=3, device_batch_size=2, max_new_tokens=5, top_k=50, temperature=0.3, seed=1
    )
    engine = FakeEngine()
    metrics = evaluate_pass_at_k(engine, FakeTest(), options, rank=0, world=1)
    # Questions 0..3 (question 4 is past eval_examples): pass@1 right only on question 1; pass@2
    # adds question 3; pass@3 adds question 0; question 2 never.
    assert [metrics[f"gsm8k/pass@{k}"] for k in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert metrics["gsm8k/pass@1/items"] == 4 and "gsm8k/pass@4" not in metrics
    # 3 samples in batches of at most 2 rows, at 1.0 whatever --temperature trains with.
    assert [c["rows"] for c in engine.calls] == [2, 1] * 4 and EVAL_TEMPERATURE == 1.0
    assert all(c["temperature"] == 1.0 and c["top_k"] == 50 and c["max_tokens"] == 5 for c in engine.calls)
    # Rank 1 of 2 takes questions 1 and 3: right at their samples 0 and 1.
    metrics = evaluate_pass_at_k(FakeEngine(), FakeTest(), options, rank=1, world=2)
    assert [metrics[f"gsm8k/pass@{k}"] for k in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert metrics["gsm8k/pass@1/items"] == 2


def test_pass_at_k_defaults_are_the_originals():
    options = ChatRlOptions()
    assert (options.eval_examples, options.eval_samples, options.eval_every) == (400, 8, 60)
    assert (options.examples_per_step, options.num_samples, options.device_batch_size) == (16, 16, 8)
