"""Benchmark harness shared by bench/bench_<op>.py and bench/e2e.py.

- `stamp()`: device, versions, commit and date; every result row carries it.
- `median_ms(fn)`: triton.testing.do_bench median on CUDA (warm-up included), a perf_counter
  median on CPU (smoke runs only: CPU timings are never reported as performance).
- `write_report(name, rows, out_dir)`: `<name>.json` + `<name>.md` under the output folder
  (argument, else $L2V_BENCH_OUT, else bench/results/).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def out_dir(path: str | os.PathLike | None = None) -> Path:
    p = Path(path or os.environ.get("L2V_BENCH_OUT") or REPO / "bench" / "results")
    p.mkdir(parents=True, exist_ok=True)
    return p


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("L2V_COMMIT", "unknown")


def stamp() -> dict:
    """Where and when a result was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("L2V_COMMIT") or git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def on_gpu() -> bool:
    return torch.cuda.is_available()


def median_ms(
    fn, *, warmup_ms: float | None = None, rep_ms: float | None = None, cpu_reps: int = 3
) -> float:
    """Median time of fn() in milliseconds.

    warmup_ms / rep_ms default to $L2V_BENCH_WARMUP_MS / $L2V_BENCH_REP_MS, else 25 / 100
    (bench/gpu_check.sh --quick lowers them to fit its time budget).
    """
    if warmup_ms is None:
        warmup_ms = float(os.environ.get("L2V_BENCH_WARMUP_MS") or 25)
    if rep_ms is None:
        rep_ms = float(os.environ.get("L2V_BENCH_REP_MS") or 100)
    if on_gpu():
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    # Default: every key of any row (an "error" column appears when some row has one).
    every_key = dict.fromkeys(k for r in rows for k in r)
    columns = columns or [c for c in every_key if c not in STAMP_KEYS]
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


STAMP_KEYS = ("device", "torch", "triton", "cuda", "commit", "date")


def write_report(
    name: str, rows: list[dict], path: str | os.PathLike | None = None, *,
    title: str | None = None, columns: list[str] | None = None, notes: str = "",
) -> Path:
    """Write rows (each stamped) as <name>.json and <name>.md; returns the markdown path."""
    d = out_dir(path)
    st = stamp()
    rows = [{**st, **r} for r in rows]
    (d / f"{name}.json").write_text(json.dumps({"stamp": st, "rows": rows}, indent=1))
    md = [f"# {title or name}", "",
          f"{st['device']} · torch {st['torch']} · triton {st['triton']} · CUDA {st['cuda']} · "
          f"commit {st['commit']} · {st['date']}", ""]
    if notes:
        md += [notes, ""]
    md.append(markdown_table(rows, columns))
    p = d / f"{name}.md"
    p.write_text("\n".join(md))
    return p


# --------------------------------------------------------------------------------------------
# Kernel benchmark cases: every bench/bench_<op>.py exposes `cases(smoke: bool) -> list[Case]`.
# `run_cases` times them (CLI reports) and bench/test_kernels_bench.py feeds the same cases to
# pytest-benchmark, so both paths measure the same callables.
# --------------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402


@dataclass
class Case:
    group: str  # op and shape, e.g. "attention B32 L512 Hq32 Hkv8 D128"
    impl: str  # "l2v" for ours; baseline names otherwise ("sdpa_flash", "cublas+silu", ...)
    fn: Callable[[], object]  # runs the op once on prepared inputs
    flops: float | None = None  # from real (unpadded) tokens only
    bytes: float | None = None  # minimal HBM traffic of the op
    params: dict = field(default_factory=dict)  # shape parameters, copied into the result row


def run_cases(cases: list[Case], *, ours: str = "l2v", deadline: float | None = None) -> list[dict]:
    """Time each case; add TFLOP/s, GB/s and, per group, our speedup over each baseline.

    deadline: a time.monotonic() value after which no further case is started (their rows say
    so). An interrupt (Ctrl-C, or SIGTERM under kernel_bench_main) also stops the loop and
    keeps the rows measured so far.
    """
    rows = []
    stopped = None
    for c in cases:
        if stopped is None and deadline is not None and time.monotonic() > deadline:
            stopped = "not run: time budget spent"
        if stopped:
            rows.append({"group": c.group, "impl": c.impl, **c.params, "ms": None,
                         "error": stopped})  # fmt: skip
            continue
        try:
            ms = median_ms(c.fn)
            err = None
        except KeyboardInterrupt:
            ms, err, stopped = None, "interrupted", "not run: interrupted"
        except Exception as e:  # a baseline missing on this torch: record, keep going
            ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        row = {"group": c.group, "impl": c.impl, **c.params, "ms": ms}
        if ms:
            row["TFLOP/s"] = c.flops / ms / 1e9 if c.flops else None
            row["GB/s"] = c.bytes / ms / 1e6 if c.bytes else None
        if err:
            row["error"] = err
        rows.append(row)
    for r in rows:
        mine = next((x for x in rows if x["group"] == r["group"] and x["impl"] == ours), None)
        if mine and mine.get("ms") and r.get("ms"):
            r["ours_speedup"] = r["ms"] / mine["ms"]
    return rows


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def kernel_bench_main(name: str, cases_fn, argv=None, title: str | None = None) -> list[dict]:
    """CLI shared by the kernel benchmarks:

        python -m bench.bench_<op> [--smoke] [--out DIR] [--time-budget SECONDS]

    With --time-budget, cases not started within that many seconds are listed as not run; a
    SIGTERM (e.g. from `timeout`) ends the measuring early. Either way the report is written.
    """
    import argparse
    import signal

    start = time.monotonic()
    ap = argparse.ArgumentParser(description=title or name)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (default without CUDA)")
    ap.add_argument(
        "--out", default=None, help="output folder (default $L2V_BENCH_OUT or bench/results)"
    )
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; later cases are skipped once spent")  # fmt: skip
    args = ap.parse_args(argv)
    smoke = args.smoke or not on_gpu()
    deadline = start + args.time_budget if args.time_budget else None
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        rows = run_cases(cases_fn(smoke), deadline=deadline)
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = write_report(name + ("_smoke" if smoke else ""), rows, args.out, title=title)
    print(path.read_text())
    return rows


class Lazy:
    """Inputs built on first use (and then shared by a group's cases): collecting the cases
    allocates nothing, so pytest collection and --time-budget runs stay cheap."""

    def __init__(self, make):
        self._make = make
        self.value = None

    def __call__(self):
        if self.value is None:
            self.value = self._make()
        return self.value


def compiled(fn):
    """torch.compile'd fn with static shapes, the strongest torch baseline for an elementwise or
    reduction op. Every case has its own shapes, so the recompile limit is raised (past it
    torch.compile would silently fall back to eager)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(fn, dynamic=False)


def copy_case(group: str, nbytes: int, params: dict, device) -> Case:
    """A device-to-device copy moving nbytes in total (nbytes / 2 read + nbytes / 2 written):
    the bandwidth ceiling a memory-bound kernel is compared with."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return Case(group, "d2d_copy", lambda: dst.copy_(src), bytes=2 * src.numel(), params=params)
