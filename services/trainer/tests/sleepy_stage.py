"""A test-only stand-in stage for supervision tests: emits real stage events through
`nanochat.stages.cli.run_stage` (options parsed as make_data's), sleeps between progress events
and leaves a grandchild `sleep` in its process group, so tests can check that cancel and the
reaper leave no process of a job behind.

Under a multi-process torchrun it first all-reduces over gloo (a real rendezvous). Environment:
SLEEPY_STEPS (default 600, 0.2 s each), SLEEPY_FAIL ("1": fail after 2 steps with an error),
SLEEPY_IGNORE_TERM ("1": ignore SIGTERM, as a stage stuck in a collective would not exit on it).
"""

import os
import signal
import subprocess
import time

from nanochat.stages.cli import run_stage


def body(options, emitter):
    if os.environ.get("SLEEPY_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        total = torch.ones(1)
        dist.all_reduce(total)
        assert int(total.item()) == world
    subprocess.Popen(["sleep", "300"])
    steps = int(os.environ.get("SLEEPY_STEPS", "600"))
    for step in range(1, steps + 1):
        emitter.progress(step=step, total=steps, loss=1.0 / step, lr=0.01, tok_per_s=100.0)
        if os.environ.get("SLEEPY_FAIL") == "1" and step == 2:
            raise RuntimeError("sleepy stage was told to fail")
        time.sleep(0.2)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return [], {"world_size": world}


if __name__ == "__main__":
    run_stage("make_data", body)
