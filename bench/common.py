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


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> float:
    """Median time of fn() in milliseconds."""
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
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
    columns = columns or [c for c in rows[0] if c not in STAMP_KEYS]
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
