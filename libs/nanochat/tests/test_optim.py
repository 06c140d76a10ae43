"""AdamW, Muon and global-norm clipping of nanochat.optim, alone and across 2 gloo processes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dist_optim_run
import pytest
import torch
from nanochat import optim
from nanochat.checkpoint import load_checkpoint, load_optimizer_state
from nanochat.optim import AdamW, Muon, newton_schulz_dtype, zeropower_via_newtonschulz5
from safetensors.torch import load_file


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_newton_schulz_flattens_the_singular_values(shape):
    torch.manual_seed(0)
    # A known spectrum from 0.1 to 3 between random orthogonal bases.
    n = min(shape)
    U = torch.linalg.qr(torch.randn(shape[0], n))[0]
    V = torch.linalg.qr(torch.randn(shape[1], n))[0]
    G = U @ torch.diag(torch.linspace(0.1, 3.0, n)) @ V.T
    X = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    # The quintic is tuned for speed, not exactness: singular values land roughly in (0.5, 1.3).
    assert s.min() > 0.4 and s.max() < 1.3
    # Same singular vectors as G: X is close to G's polar factor U V^T.
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ V.T).flatten(), dim=0) > 0.95


def test_newton_schulz_batched_equals_one_by_one():
    torch.manual_seed(0)
    G = torch.randn(5, 48, 16)
    batched = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    single = torch.stack([zeropower_via_newtonschulz5(g, dtype=torch.float32) for g in G])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def plain_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The spec's iteration written out plainly, for one matrix in fp64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).float()


@pytest.mark.parametrize("shape", [(3, 64, 256), (3, 256, 64), (64, 128), (3, 64, 64)])
def test_newton_schulz_equals_the_plain_iteration(shape):
    # Wide and tall fp32 matrices take the Gram form, square ones the plain one: both equal the
    # iteration as written, on random and on nearly low-rank (gradient-like) matrices.
    torch.manual_seed(0)
    for G in (
        torch.randn(shape),
        torch.randn(*shape[:-1], 4) @ torch.randn(*shape[:-2], 4, shape[-1]) + 1e-3 * torch.randn(shape),
    ):
        got = zeropower_via_newtonschulz5(G, dtype=torch.float32)
        want = torch.stack([plain_newton_schulz(g) for g in G.reshape(-1, *G.shape[-2:])]).reshape(G.shape)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    singular = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(shape), dtype=torch.float32))
    assert 0.7 < singular.median() < 1.2 and singular.max() < 1.3


def test_newton_schulz_dtype_choice(monkeypatch):
    monkeypatch.setenv("NANOCHAT_NS_DTYPE", "fp32")
    assert newton_schulz_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_NS_DTYPE", "bf16")
    assert newton_schulz_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_NS_DTYPE", "fp8")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        newton_schulz_dtype("cpu")
    monkeypatch.delenv("NANOCHAT_NS_DTYPE")
    assert newton_schulz_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2", "avx512f"}, torch.float32),  # no bf16 instructions: bf16 would be emulated, slowly
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16),
        (set(), torch.float32),  # no /proc/cpuinfo
    ],
)
def test_newton_schulz_dtype_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.delenv("NANOCHAT_NS_DTYPE", raising=False)
    monkeypatch.setattr("nanochat.common.cpu_flags", lambda: flags)
    assert newton_schulz_dtype("cpu") == expected
    model_muon = Muon([torch.nn.Parameter(torch.randn(4, 4))])
    assert model_muon.ns_dtype == expected


def test_setup_optimizers_uses_the_spec_rates():
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.from_depth(4, 512, 64))
    adamw, muon = model.setup_optimizers()
    scale = (model.config.n_embd / 768) ** -0.5  # n_embd 256
    lm_head, wte = adamw.param_groups
    assert lm_head["params"] == [model.lm_head.weight] and lm_head["lr"] == pytest.approx(0.004 * scale)
    assert wte["params"] == [model.transformer.wte.weight] and wte["lr"] == pytest.approx(0.2 * scale)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    block = {id(p) for p in model.transformer.h.parameters()}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == block
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["nesterov"] for g in muon.param_groups)
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours_p = [torch.randn(8, 4, requires_grad=True), torch.randn(16, requires_grad=True)]
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = AdamW([{"params": ours_p[:1], "lr": 0.01}, {"params": ours_p[1:], "lr": 0.2}], weight_decay=0.1)
    ref = torch.optim.AdamW(
        [{"params": ref_p[:1], "lr": 0.01}, {"params": ref_p[1:], "lr": 0.2}],
        betas=(0.8, 0.95),
        eps=1e-10,
        weight_decay=0.1,
    )
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours_p]
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_muon_step_is_nesterov_momentum_then_orthogonalised_update():
    torch.manual_seed(0)
    params = [torch.randn(32, 8, requires_grad=True) for _ in range(3)] + [torch.randn(8, 8, requires_grad=True)]
    start = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_dtype=torch.float32)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 1]  # grouped by shape
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.9 * bufs[i] + 0.1 * g
            nesterov = 0.1 * g + 0.9 * bufs[i]
            scale = max(1.0, start[i].shape[0] / start[i].shape[1]) ** 0.5
            start[i] = start[i] - 0.05 * scale * zeropower_via_newtonschulz5(nesterov, dtype=torch.float32)
    for p, expected in zip(params, start):
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_bad_optimizer_input_is_a_clear_error():
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.zeros(3, requires_grad=True)])
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="gradient"):
        Muon([p]).step()
    with pytest.raises(ValueError, match="grad_clip"):
        optim.step([AdamW([p])], grad_clip=0.0)


def test_clipping_by_global_norm_equals_torch_clip_grad_norm():
    model_a = dist_optim_run.build_model(world=1)
    model_b = dist_optim_run.build_model(world=1)
    opt_a = model_a.setup_optimizers(ns_dtype=torch.float32)
    opt_b = model_b.setup_optimizers(ns_dtype=torch.float32)
    x, y = dist_optim_run.batches()[0]
    model_a(x, y).backward()
    model_b(x, y).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.3)
    for opt in opt_b:
        opt.step()
    norm = optim.step(opt_a, grad_clip=0.3)
    assert norm == pytest.approx(float(expected_norm), rel=1e-5)
    assert norm > 0.3  # the clip did trigger
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_accumulation(tmp_path: Path):
    script = Path(__file__).with_name("dist_optim_run.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    # Own session, so a timeout kills torchrun's workers too, not just the launcher.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-5000:]
    dist_weights = load_file(str(tmp_path / "weights.safetensors"))
    dist_norms = json.loads((tmp_path / "norms.json").read_text())

    model, _, norms = dist_optim_run.train(rank=0, world=1, accumulate=2)
    assert all(n > dist_optim_run.GRAD_CLIP for n in norms), norms  # clipping on and triggered
    assert dist_norms == pytest.approx(norms, rel=1e-5)
    start = dist_optim_run.build_model(world=1).state_dict()
    for name, tensor in model.state_dict().items():
        assert not torch.equal(tensor, start[name]), f"{name} never moved"
        diff = (dist_weights[name] - tensor).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"

    # The checkpoint both ranks saved together: one verified folder, one optimizer shard per rank.
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "optim").iterdir()) == [
        "rank0.json",
        "rank0.safetensors",
        "rank1.json",
        "rank1.safetensors",
    ]
    vocab = dist_optim_run.VOCAB  # padding rows are not saved
    for name, tensor in ckpt.model.state_dict().items():
        torch.testing.assert_close(tensor[:vocab], dist_weights[name][:vocab], atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="same world size"):
        load_optimizer_state(tmp_path / "ckpt", model.setup_optimizers())
