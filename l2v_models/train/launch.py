"""`l2v train STAGE --nproc-per-node N ...`: torchrun's launcher (torch.distributed.launcher) run
from the command, one process per device on this machine, each running
`python -m l2v_models.train STAGE ...` with the same options.

Across machines use torchrun itself (its rendezvous options), the same module:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m l2v_models.train supervised --data triples.jsonl --output out/sup ...

When a process dies (killed, out of memory), torchrun stops the others; the launcher then says
which rank failed and how, and where the run can resume, in one line.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from l2v_models.errors import UsageError


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the workers must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch(stage_argv: list[str], nproc: int, *, output, threads: int | None = None) -> int:
    """Run `python -m l2v_models.train *stage_argv` on `nproc` local processes; returns the exit
    code (0, 2 after a user error the workers printed, 1 after a failed process)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {nproc}")
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        # N processes on one CPU: share the cores instead of each taking all of them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"l2v-train-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "l2v_models.train", *stage_argv)
    except ChildFailedError as e:
        return report_failure(e.failures, output)
    return 0


def report_failure(failures: dict, output) -> int:
    """One line on stderr naming the process that failed first; the exit code."""
    from l2v_models.train.checkpoints import latest_checkpoint

    codes = {f.exitcode for f in failures.values()}
    if codes == {2}:  # a user error: rank 0 printed it
        return 2
    rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    how = (f"was killed by {first.signal_name()}" if first.exitcode < 0
           else f"exited with code {first.exitcode}")  # fmt: skip
    newest = latest_checkpoint(Path(output)) if output is not None else None
    resume = (f"rerun the same command with --resume to continue from {newest}"
              if newest is not None else "no checkpoint was written (--save-every N)")
    print(f"l2v: error: training process rank {rank} (pid {first.pid}) {how}; the other "
          f"processes were stopped; {resume}", file=sys.stderr)  # fmt: skip
    return 1
