"""--compile: the auto rule worked by hand, and a compiled model trains to the eager model's loss."""

import pytest
import torch
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.train_loop import CPU_COMPILE_GAIN, CPU_COMPILE_SECONDS, TrainingForward

CPU = torch.device("cpu")


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(1, 64, 16))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_the_constants_are_the_documented_ones():
    assert (CPU_COMPILE_GAIN, CPU_COMPILE_SECONDS) == (0.2, 60.0)


@pytest.mark.parametrize(
    "step_seconds, remaining, compiled",
    [
        (1.0, 301, True),  # saves 0.2 * 1.0 * 301 = 60.2 s > 60 s of compiling
        (1.0, 299, False),  # 59.8 s < 60 s: no win
        (0.05, 5000, False),  # 0.2 * 0.05 * 5000 = 50 s
        (0.5, 1000, True),  # 100 s
    ],
)
def test_auto_on_cpu_compiles_only_when_the_rest_of_the_run_wins_it_back(step_seconds, remaining, compiled):
    forward = TrainingForward(small_model(), "auto", CPU)
    forward.after_step(100.0, 10**6)  # the first step's time (warm-up included) decides nothing
    assert not forward.compiled
    forward.after_step(step_seconds, remaining)
    assert forward.compiled is compiled
    forward.after_step(100.0, 10**6)  # decided once, after the second step only
    assert forward.compiled is compiled


def test_off_never_compiles_and_on_compiles_from_the_start():
    off = TrainingForward(small_model(), "off", CPU)
    off.after_step(100.0, 10**6)
    off.after_step(100.0, 10**6)
    assert not off.compiled
    assert TrainingForward(small_model(), "on", CPU).compiled


@pytest.mark.slow
def test_a_compiled_step_gives_the_eager_loss_and_gradients():
    eager, compiled = small_model(1), small_model(1)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    loss_eager = TrainingForward(eager, "off", CPU)(x, y)
    loss_compiled = TrainingForward(compiled, "on", CPU)(x, y)
    loss_eager.backward()
    loss_compiled.backward()
    assert float(loss_compiled.detach()) == pytest.approx(float(loss_eager.detach()), rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
