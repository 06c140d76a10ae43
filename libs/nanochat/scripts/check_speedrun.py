"""Check a finished tiny speedrun against what it must show (the last step of speedrun_tiny.sh).

    python libs/nanochat/scripts/check_speedrun.py runs/speedrun-tiny

Reads the run folder speedrun_tiny.sh wrote: base/meta.json (validation bpb at step 0 and at the
end), the human log (each stage's `took Ns` line and chat_eval's `identity: c/n` lines, in the
order mid, sft, rl) and prints one row per target. Targets: base bpb at most 0.65x its step-0
value; SFT answers at least 80% of at least 100 held-out identity questions with the model's
name, and mid fewer; every stage in under 15 minutes together. Exits 1 when one is missed, so
a run whose numbers do not show that training works does not pass for one that does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

BPB_RATIO = 0.65
IDENTITY_MIN, IDENTITY_ITEMS = 0.80, 100
BUDGET_S = 15 * 60


def stage_times(log: str) -> list[tuple[str, int]]:
    return [(m[1], int(m[2])) for m in re.finditer(r"^\s+(\w+) took (\d+)s$", log, re.M)]


def identity_scores(log: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"identity: (\d+)/(\d+) =", log)]


def check(run: Path) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) per target."""
    log = (run / "log.txt").read_text()
    metrics = json.loads((run / "base" / "meta.json").read_text())["metrics"]
    step0, final = metrics["val_bpb_step0"], metrics["val_bpb"]
    rows = [
        (
            "base val bpb, end / step 0",
            f"{final:.3f} / {step0:.3f} = {final / step0:.3f}x",
            f"<= {BPB_RATIO}x",
            final <= BPB_RATIO * step0,
        )
    ]
    scores = identity_scores(log)
    if len(scores) < 2:
        rows.append(("identity accuracy", f"{len(scores)} chat_eval results in the log", "mid and sft", False))
    else:
        (mid_c, mid_n), (sft_c, sft_n) = scores[0], scores[1]
        rows.append(
            (
                "sft identity accuracy",
                f"{sft_c}/{sft_n} = {sft_c / sft_n:.2f}",
                f">= {IDENTITY_MIN:.2f} of >= {IDENTITY_ITEMS}",
                sft_n >= IDENTITY_ITEMS and sft_c / sft_n >= IDENTITY_MIN,
            )
        )
        rows.append(
            (
                "mid identity accuracy",
                f"{mid_c}/{mid_n} = {mid_c / mid_n:.2f}",
                "below sft",
                mid_c / mid_n < sft_c / sft_n,
            )
        )
    times = stage_times(log)
    total = sum(t for _, t in times)
    rows.append(
        (
            "wall time of every stage",
            f"{total} s ({len(times)} stages)",
            f"< {BUDGET_S} s",
            total < BUDGET_S and len(times) == 13,
        )
    )
    return rows


def main() -> int:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/speedrun-tiny")
    rows = check(run)
    width = max(len(r[0]) for r in rows)
    for what, measured, target, met in rows:
        print(f"{what:<{width}}  {measured:<28} {target:<22} {'ok' if met else 'MISSED'}")
    print("\n".join(f"  {name:<11} {t:>4} s" for name, t in stage_times((run / "log.txt").read_text())))
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
