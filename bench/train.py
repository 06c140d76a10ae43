"""Training benchmarks: Muon+AdamW throughput against AdamW only, and loss parity with the original.

    uv run python bench/train.py [--steps 12]                 # CPU tokens/s, depth 4, vocab 4,096
    uv run python bench/train.py --compile [--steps 12]       # torch.compile against eager, fwd+bwd
    uv run python bench/train.py --parity [--steps 300]       # bits per byte after 300 steps
    uv run python bench/train.py --stage base [--nproc 1 2] [--depth 4]   # the real base_train stage
    (either with --threads N to fix torch's thread count)

Throughput: a depth-4 model (vocab 4,096) trains with AdamW on every parameter, and with the
real set-up (Muon for the block matrices, AdamW for embedding and lm_head), at B=8, T=256 and
at B=32, T=512, on random tokens, fp32. After a warm-up step each, the two set-ups take turns
step by step (`--steps` timed steps each; which one goes first alternates), because this
machine's speed drifts by tens of percent over minutes and rounds of several steps folded that
drift into the ratio. tok/s is B*T over a set-up's median step time. Two ratios are printed:
the median of the paired steps' ratios, and one from the parts of a step: forward+backward is the
same work under both set-ups, so its median over all steps of both is shared, and each set-up
adds its own median optimizer step. Single steps here vary by up to 40% from one to the next
(other load on the host), which the paired ratio still carries; the parts ratio does not. The
table also gives the CPU's bf16 flags and the Newton-Schulz dtype chosen from them.

Each row also gives a ceiling for the parts ratio, measured in the same run: Muon+AdamW's
optimizer step as if it were nothing but Newton-Schulz's multiply-adds (counted by torch's
FlopCounterMode on a real step: at depth 4, 7.38 G in fp32, 10.07 G in bf16, where the MLP
matrices keep the plain form) at the fastest rate a batched matmul of its
shapes reaches on this CPU (best of ten single products), against the measured forward+backward
and AdamW step. No implementation of the same iteration can beat it; with fp32 Newton-Schulz
(a CPU without bf16 instructions) it sits near 0.9 at B=8, T=256, so the target there is at the
hardware's limit rather than an implementation's.

Compile (`--compile`): the same depth-4 model at B=8, T=256 (fp32 on CPU), eager and under
`torch.compile(dynamic=False)` (what `--compile on` runs): the first compiled call's time, less one
compiled step, is the compile time, reported apart; then the two take turns for `--steps` timed
forward+backward passes each, and the table gives each one's median, tokens/s and their ratio.
`--compile auto` on CPU assumes a 20% saving and 60 s of compiling (train_loop.TrainingForward);
this row says what this machine gives.

Parity: the bench corpus of bench/tokenizer.py as one string, 4,096 ranks trained on it with
rustbpe (no specials), encoded with tiktoken's encode_ordinary (no BOS); the first 95% of the ids
train, the last 5% validate. Step i's batch is train ids [i*B*(T+1), (i+1)*B*(T+1)) viewed as
(B, T+1): inputs the first T columns, targets the last T. Depth 4, B=8, T=256, fp32, spec LRs,
Muon momentum 0.95, no clipping, LR constant then linear to 0 over the last 20% of steps, seed
1337. Validation: the first 16 windows of B*(T+1) validation ids, each viewed
as (B, T+1) like a training batch (the value over only the first 16 rows is printed too); bits per byte = summed nats /
(ln 2 * summed byte lengths of the targets). The original reaches 2.022 (2.012-2.019 on other
seeds); we must land within 1% of 2.022.

Stage (`--stage base`): the real `nanochat.stages.base_train` under `torchrun --nproc_per_node N`
for each N of `--nproc`, on the tiny data of make_data and a 4,096-vocab tokenizer (made once in
a temp folder), B=8, T=256 per process, `--steps` steps (default 30); tokens/s and MFU are the
medians of the stage's own `progress` events after the first 5 steps. MFU needs a peak: on CUDA
the stage uses the H100's 989 TFLOP/s; on a CPU this bench measures one process's fp32 matmul
peak (1,024^3 matmuls, on as many threads as torchrun gives each process) and passes it to the stage as
NANOCHAT_PEAK_FLOPS, so CPU MFU is relative to what this CPU's matmul reaches.

Results go to bench/results/train.json (throughput), bench/results/train_parity.json and
bench/results/train_stage_base.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import torch
from nanochat import optim
from nanochat.common import cpu_flags
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import AdamW, newton_schulz_dtype
from nanochat.stages.train_loop import H100_BF16_FLOPS, PEAK_FLOPS_ENV
from nanochat.tokenizer import SPLIT_PATTERN
from torch.utils.flop_counter import FlopCounterMode

import rustbpe

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer import load_corpus  # noqa: E402  (bench/tokenizer.py: the shared bench corpus)

RESULTS = Path(__file__).parent / "results"
DEPTH, VOCAB = 4, 4096
SHAPES = [(8, 256), (32, 512)]
PARITY_TARGET = 2.022


def build(seq_len: int, seed: int = 1337) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(DEPTH, VOCAB, seq_len))
    model.init_weights()
    return model


def adamw_only(model: GPT) -> list[torch.optim.Optimizer]:
    """The baseline: AdamW on every parameter (block matrices at Muon's LR, AdamW-scaled)."""
    scale = (model.config.n_embd / 768) ** -0.5
    return [
        AdamW(
            [
                {"params": [model.lm_head.weight], "lr": 0.004 * scale},
                {"params": [model.transformer.wte.weight], "lr": 0.2 * scale},
                {"params": list(model.transformer.h.parameters()), "lr": 0.02 * scale},
            ]
        )
    ]


def train_step(model: GPT, optimizers: list, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One training step; (whole step, optimizer step) in seconds."""
    t0 = time.perf_counter()
    model(x, y).backward()
    t1 = time.perf_counter()
    optim.step(optimizers)
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, t2 - t1


def step_multiply_adds(model: GPT, optimizers: list, x: torch.Tensor, y: torch.Tensor) -> float:
    """Multiply-adds of one optimizer step, counted by torch's FlopCounterMode on a real step.

    Only matrix products count there, so for Muon+AdamW this is Newton-Schulz's work."""
    model(x, y).backward()
    with FlopCounterMode(display=False) as counter:
        optim.step(optimizers)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_bmm_rate(muon: optim.Muon, repeats: int = 10) -> float:
    """Multiply-adds/s: the fastest batched matmul of Muon's stacked shapes (as Newton-Schulz runs them)."""
    best = 0.0
    for group in muon.param_groups:
        n, (rows, cols) = len(group["params"]), group["params"][0].shape
        rows, cols = min(rows, cols), max(rows, cols)
        X = torch.randn(n, rows, cols, dtype=muon.ns_dtype)
        A = torch.randn(n, rows, rows, dtype=muon.ns_dtype)
        for left, right in ((X, X.mT), (A, X)):
            torch.bmm(left, right)  # warm-up
            seconds = best_seconds(lambda left=left, right=right: torch.bmm(left, right), repeats)
            best = max(best, n * rows * rows * cols / seconds)
    return best


def throughput(steps: int) -> dict:
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"})
    ns_dtype = newton_schulz_dtype("cpu")
    print(
        f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"flags {' '.join(flags) or '(none)'}; Newton-Schulz in {str(ns_dtype).removeprefix('torch.')}"
    )
    rows = []
    for B, T in SHAPES:
        setups = {}
        for name in ("adamw", "muon+adamw"):
            model = build(T)
            opts = adamw_only(model) if name == "adamw" else model.setup_optimizers()
            setups[name] = (model, opts)
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        x, y = data[:, :-1], data[:, 1:]
        for model, opts in setups.values():
            train_step(model, opts, x, y)  # warm-up: allocations, optimizer state
        step_s: dict[str, list[float]] = {name: [] for name in setups}
        opt_s: dict[str, list[float]] = {name: [] for name in setups}
        ratios = []
        for i in range(steps):
            order = list(setups) if i % 2 == 0 else list(reversed(setups))
            for name in order:
                whole, opt = train_step(*setups[name], x, y)
                step_s[name].append(whole)
                opt_s[name].append(opt)
            ratios.append(step_s["adamw"][-1] / step_s["muon+adamw"][-1])
        med = {name: statistics.median(v) for name, v in step_s.items()}
        opt = {name: statistics.median(v) for name, v in opt_s.items()}
        fwd_bwd = statistics.median([w - o for name in setups for w, o in zip(step_s[name], opt_s[name])])
        muon_model, muon_opts = setups["muon+adamw"]
        ns_macs = step_multiply_adds(muon_model, muon_opts, x, y)
        bmm_rate = best_bmm_rate(next(o for o in muon_opts if isinstance(o, optim.Muon)))
        # The best any implementation of these multiply-adds could do: Newton-Schulz at the
        # fastest rate its matmuls reach here, nothing else in the step (no embedding AdamW, no
        # momentum): an upper bound for the parts ratio.
        ceiling = (fwd_bwd + opt["adamw"]) / (fwd_bwd + ns_macs / bmm_rate)
        rows.append(
            {
                "B": B,
                "T": T,
                "adamw_tok_s": B * T / med["adamw"],
                "muon_adamw_tok_s": B * T / med["muon+adamw"],
                "ratio": statistics.median(ratios),
                "parts_ratio": (fwd_bwd + opt["adamw"]) / (fwd_bwd + opt["muon+adamw"]),
                "fwd_bwd_ms": 1e3 * fwd_bwd,
                "adamw_opt_ms": 1e3 * opt["adamw"],
                "muon_adamw_opt_ms": 1e3 * opt["muon+adamw"],
                "newton_schulz_gmac": ns_macs / 1e9,
                "best_bmm_gmac_s": bmm_rate / 1e9,
                "ceiling_ratio": ceiling,
                "parts_of_ceiling": (fwd_bwd + opt["adamw"]) / (fwd_bwd + opt["muon+adamw"]) / ceiling,
                "target": 0.9 if (B, T) == (8, 256) else 0.95,
                "step_seconds": step_s,
                "pair_ratios": ratios,
            }
        )
    print(
        f"\n{'B':>3} {'T':>4} | {'AdamW only tok/s':>16} | {'Muon+AdamW tok/s':>16} | ratio: paired / parts"
        f" | target | ms: fwd+bwd, optimizer AdamW / Muon+AdamW"
    )
    print("-" * 121)
    for r in rows:
        print(
            f"{r['B']:>3} {r['T']:>4} | {r['adamw_tok_s']:>16,.0f} | {r['muon_adamw_tok_s']:>16,.0f} | "
            f"{r['ratio']:>12.3f} / {r['parts_ratio']:.3f} | >= {r['target']:<4} | "
            f"{r['fwd_bwd_ms']:.0f}, {r['adamw_opt_ms']:.1f} / {r['muon_adamw_opt_ms']:.1f}"
        )
        print(f"{'':>10} pair ratios: {' '.join(f'{q:.3f}' for q in r['pair_ratios'])}")
        print(
            f"{'':>10} ceiling {r['ceiling_ratio']:.3f} (Newton-Schulz {r['newton_schulz_gmac']:.2f} G multiply-adds"
            f" at the best batched matmul here, {r['best_bmm_gmac_s']:.1f} G/s = "
            f"{r['newton_schulz_gmac'] / r['best_bmm_gmac_s'] * 1e3:.0f} ms); parts ratio / ceiling "
            f"{r['parts_of_ceiling']:.3f}"
        )
    return {
        "cpu_flags": flags,
        "ns_dtype": str(ns_dtype),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rows": rows,
    }


def fwd_bwd(model, params: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward+backward of `model` (eager or compiled) in seconds; `params`' grads cleared after."""
    t0 = time.perf_counter()
    model(x, y).backward()
    seconds = time.perf_counter() - t0
    params.zero_grad(set_to_none=True)
    return seconds


def compile_speed(steps: int, B: int = 8, T: int = 256) -> dict:
    eager = build(T)
    compiled_model = build(T)
    compiled = torch.compile(compiled_model, dynamic=False)
    data = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]
    runs = {"eager": (eager, eager), "compiled": (compiled, compiled_model)}
    first = fwd_bwd(*runs["compiled"], x, y)
    fwd_bwd(*runs["eager"], x, y)  # warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(steps):
        for name in ["eager", "compiled"] if i % 2 == 0 else ["compiled", "eager"]:
            times[name].append(fwd_bwd(*runs[name], x, y))
    med = {name: statistics.median(v) for name, v in times.items()}
    row = {
        "B": B,
        "T": T,
        "compile_seconds": first - med["compiled"],
        "eager_ms": 1e3 * med["eager"],
        "compiled_ms": 1e3 * med["compiled"],
        "eager_tok_s": B * T / med["eager"],
        "compiled_tok_s": B * T / med["compiled"],
        "speedup": med["eager"] / med["compiled"],
        "times": times,
    }
    print(
        f"compile: {row['compile_seconds']:.1f} s; fwd+bwd B{B} x T{T}: eager {row['eager_ms']:.0f} ms "
        f"({row['eager_tok_s']:,.0f} tok/s), compiled {row['compiled_ms']:.0f} ms ({row['compiled_tok_s']:,.0f} tok/s): "
        f"{row['speedup']:.3f}x"
    )
    return {
        "cpu_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"}),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rows": [row],
    }


def parity(steps: int) -> dict:
    B, T = 8, 256
    text = load_corpus()
    t0 = time.perf_counter()
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter([text]), VOCAB, pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name="bench4096", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens={})
    ids = torch.tensor(enc.encode_ordinary(text), dtype=torch.long)
    print(
        f"tokenizer: {len(ranks):,} ranks in {time.perf_counter() - t0:.1f}s; {len(ids):,} ids from {len(text):,} chars"
    )
    token_bytes = torch.tensor([len(enc.decode_single_token_bytes(i)) for i in range(VOCAB)])
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    need = steps * B * (T + 1)
    if need > len(train_ids):
        raise SystemExit(f"{steps} steps need {need:,} train ids, the corpus gives {len(train_ids):,}")

    model = build(T, seed=1337)
    optimizers = model.setup_optimizers()
    warmdown = round(0.2 * steps)
    t0 = time.perf_counter()
    for i in range(steps):
        lrm = 1.0 if i < steps - warmdown else (steps - i) / warmdown
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        batch = train_ids[i * B * (T + 1) : (i + 1) * B * (T + 1)].view(B, T + 1)
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optim.step(optimizers)
        model.zero_grad(set_to_none=True)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d} | loss {loss.item():.4f} | lrm {lrm:.3f} | {time.perf_counter() - t0:.0f}s", flush=True)

    model.eval()
    # 16 windows like the training batches: val ids [j*B*(T+1), (j+1)*B*(T+1)) as (B, T+1).
    nats_sum, bytes_sum, nats_first, bytes_first = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for j in range(16):
            window = val_ids[j * B * (T + 1) : (j + 1) * B * (T + 1)].view(B, T + 1)
            nats = model(window[:, :-1], window[:, 1:], loss_reduction="none")
            nbytes = token_bytes[window[:, 1:]]
            nats_sum, bytes_sum = nats_sum + nats.sum().item(), bytes_sum + int(nbytes.sum())
            if j < 2:  # the other reading of "16 windows": the first 16 rows of T+1 ids
                nats_first, bytes_first = nats_first + nats.sum().item(), bytes_first + int(nbytes.sum())
    bpb = nats_sum / (math.log(2) * bytes_sum)
    bpb_16_rows = nats_first / (math.log(2) * bytes_first)
    print(f"val bpb over the first 16 rows of T+1 ids only: {bpb_16_rows:.4f}")
    off = (bpb - PARITY_TARGET) / PARITY_TARGET
    print(f"\nparity: depth {DEPTH}, vocab {VOCAB}, B={B}, T={T}, {steps} steps, NS {optimizers[1].ns_dtype}")
    print(
        f"{'':>10} | {'val bpb':>8}\n{'-' * 22}\n{'original':>10} | {PARITY_TARGET:>8.3f}\n{'ours':>10} | {bpb:>8.3f}"
    )
    print(f"difference {off:+.2%} (must be within 1%)")
    return {
        "steps": steps,
        "bpb": bpb,
        "bpb_first_16_rows": bpb_16_rows,
        "original": PARITY_TARGET,
        "relative_difference": off,
        "ns_dtype": str(optimizers[1].ns_dtype),
        "train_seconds": time.perf_counter() - t0,
    }


def cpu_matmul_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of fp32 matmul on `threads` threads: the best of a few 1,024^3 products."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = best_seconds(lambda: a @ b, repeats)
    torch.set_num_threads(saved)
    return 2 * size**3 / best


def stage_base(nprocs: list[int], depth: int, steps: int) -> dict:
    """tokens/s and MFU of the real base_train stage under torchrun, per process count."""
    import os
    import subprocess
    import tempfile

    from nanochat.stages.events import parse_events

    root = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    data, tok = root / "data", root / "tok"
    for args in (
        ["make_data", "--data-dir", str(data)],
        ["tok_train", "--data-dir", str(data), "--out", str(tok), "--vocab-size", "4096", "--max-chars", "20000000"],
    ):
        subprocess.run([sys.executable, "-m", f"nanochat.stages.{args[0]}", *args[1:]], check=True, capture_output=True)
    rows = []
    for n in nprocs:
        env = dict(os.environ)
        peak = H100_BF16_FLOPS
        if not torch.cuda.is_available():
            # torchrun gives each of several processes one thread but leaves a lone process all
            # of torch's; the peak is measured on the same number of threads the stage runs on.
            threads = 1 if n > 1 else torch.get_num_threads()
            peak = cpu_matmul_peak(threads)
            env["OMP_NUM_THREADS"] = str(threads)
            env[PEAK_FLOPS_ENV] = str(peak)
        batch, seq = (32, 1024) if torch.cuda.is_available() else (8, 256)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            "-m",
            "nanochat.stages.base_train",
            "--init-from",
            str(tok),
            "--data-dir",
            str(data),
            "--out",
            str(root / f"base-{n}"),
            "--depth",
            str(depth),
            "--max-seq-len",
            str(seq),
            "--device-batch-size",
            str(batch),
            "--total-batch-size",
            str(batch * seq * n),
            "--num-iterations",
            str(steps),
            "--eval-every",
            "-1",
            "--eval-tokens",
            str(batch * seq * n),
            "--core-metric-every",
            "-1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"base_train with {n} processes failed: {proc.stderr[-2000:]}")
        progress = [e for e in parse_events(proc.stdout.splitlines()) if e.type == "progress"][5:]
        mfu = [e.mfu for e in progress if e.mfu is not None]
        rows.append(
            {
                "nproc": n,
                "depth": depth,
                "batch": batch,
                "seq_len": seq,
                "steps": steps,
                "peak_flops_per_process": peak,
                "tok_per_s": statistics.median(e.tok_per_s for e in progress),
                "mfu": statistics.median(mfu) if mfu else None,
            }
        )
        print(f"nproc {n}: {rows[-1]['tok_per_s']:,.0f} tok/s  MFU {rows[-1]['mfu'] or float('nan'):.3%}")
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {"device": device, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parity", action="store_true", help="run the loss-parity check instead")
    parser.add_argument("--compile", action="store_true", help="time torch.compile against eager instead")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per set-up (12), parity steps (300) or stage steps (30)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 avoids spin-waiting on a busy machine",
    )
    parser.add_argument("--stage", choices=["base"], help="benchmark the real stage under torchrun instead")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts for --stage")
    parser.add_argument("--depth", type=int, default=4, help="model depth for --stage (12 on a GPU)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.stage:
        result, out = stage_base(args.nproc, args.depth, args.steps or 30), RESULTS / "train_stage_base.json"
    elif args.compile:
        result, out = compile_speed(args.steps or 12), RESULTS / "train_compile.json"
    elif args.parity:
        result, out = parity(args.steps or 300), RESULTS / "train_parity.json"
    else:
        result, out = throughput(args.steps or 12), RESULTS / "train.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
