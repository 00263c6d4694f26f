"""PNG plots for the benchmark reports, the merged end-to-end report and SUMMARY.md.

    python -m bench.plots OUT_DIR [--steps OUT_DIR/steps.tsv] [--failed 0|1]

For every report in OUT_DIR:
- e2e (bench/e2e.py; the per-model parts e2e_<model>.json that bench/gpu_check.sh writes are
  merged into e2e.json / e2e.md first): `e2e_throughput.png` (real tokens/s per workload, ours vs
  each baseline) and `e2e_latency_b1.png` (latency CDF at batch 1, with the weight-read floor);
- attention (bench/bench_attention.py): `attention_tflops.png`, TFLOP/s by sequence length;
- every kernel report <name>.json: `<name>.png`, throughput of each implementation per shape.
Then SUMMARY.md: the stamp, the steps of the GPU check, the test result, the targets and every
table, with the plots embedded; ready to paste into the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import common  # noqa: E402

OURS = "l2v"
_METRIC_KEYS = {"group", "impl", "ms", "TFLOP/s", "GB/s", "ours_speedup", "error"}
_SEQ_KEYS = ("seqlen", "max_seqlen", "seq_len", "L", "S", "N", "len")
_BATCH_KEYS = ("B", "batch", "T", "tokens", "total_tokens", "n_seqs")
OURS_COLOR = "#d62728"  # ours is always red; baselines take the other tab10 colors
_BASELINE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                    "#bcbd22", "#17becf"]  # fmt: skip
_LINESTYLES = ["-", "--", ":", "-."]


def _color(impl: str) -> str:
    """A fixed color per implementation name, the same in every plot of a run."""
    if impl == OURS:
        return OURS_COLOR
    return _BASELINE_COLORS[sum(map(ord, impl)) % len(_BASELINE_COLORS)]


def _stamp_line(st: dict) -> str:
    return (
        f"{st.get('device')} · torch {st.get('torch')} · triton {st.get('triton')} · "
        f"CUDA {st.get('cuda')} · {st.get('commit')} · {st.get('date')}"
    )


def _impl_order(impls) -> list[str]:
    impls = list(dict.fromkeys(impls))
    return sorted(impls, key=lambda i: (i != OURS, i))


def _finish(fig, stamp: dict, path: Path) -> Path:
    fig.text(0.5, 0.005, _stamp_line(stamp), ha="center", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def plot_e2e(result: dict, out_dir, prefix: str = "e2e") -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    if result.get("rows"):
        paths.append(plot_throughput(result, out_dir / f"{prefix}_throughput.png"))
    if any(r["batch"] == 1 for r in result.get("latency", [])):
        paths.append(plot_latency_cdf(result, out_dir / f"{prefix}_latency_b1.png"))
    return paths


def plot_throughput(result: dict, path: Path) -> Path:
    """Real tokens/s by workload, one panel per model, one bar per implementation."""
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        workloads = list(dict.fromkeys(r["workload"] for r in mine))
        impls = _impl_order(r["impl"] for r in mine)
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            placed = [
                (x + (k - (len(impls) - 1) / 2) * width, r)
                for x, w in enumerate(workloads)
                for r in mine
                if r["workload"] == w and r["impl"] == impl
            ]
            xs = [x for x, _ in placed]
            ys = [r["tokens_per_s"] for _, r in placed]
            ax.bar(xs, ys, width, label=impl, color=_color(impl))
            for x, r in placed:
                if r.get("speedup_vs_ref"):  # only our rows carry it
                    ax.annotate(
                        f"{r['speedup_vs_ref']:.2f}x",
                        (x, r["tokens_per_s"]),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(model)
        ax.set_ylabel("real tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"End to end, {result['config']['dtype']}: tokens/s (label: speedup vs "
        f"{result['config']['reference']})",
        fontsize=10,
    )
    return _finish(fig, result["stamp"], path)


def plot_latency_cdf(result: dict, path: Path) -> Path:
    """CDF of batch-1 query latency per implementation, with the weight-read floor."""
    lat = [r for r in result["latency"] if r["batch"] == 1 and r.get("samples_ms")]
    models = list(dict.fromkeys(r["model"] for r in lat))
    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in lat if r["model"] == model]
        for impl in _impl_order(r["impl"] for r in mine):
            r = next(r for r in mine if r["impl"] == impl)
            xs = sorted(r["samples_ms"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(
                [xs[0], *xs],
                [0.0, *ys],
                where="post",
                label=f"{impl} (p50 {r['p50_ms']:.2f} ms)",
                color=_color(impl),
            )
        floor = mine[0]["floor_ms"]
        ax.axvline(floor, ls="--", color="0.3", lw=1)
        ax.text(floor, 0.5, " weight-read floor", rotation=90, va="center", ha="right",
                fontsize=7, transform=ax.get_xaxis_transform())  # fmt: skip
        ax.set_ylim(0, 1.02)
        ax.set_xscale("log")
        ax.set_xlabel("latency per call, ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(model)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Batch-1 query latency CDF", fontsize=10)
    return _finish(fig, result["stamp"], path)


# --------------------------------------------------------------------------------------------
# Kernel reports
# --------------------------------------------------------------------------------------------


def _metric(rows: list[dict]) -> str:
    for key in ("TFLOP/s", "GB/s"):
        if sum(1 for r in rows if r.get(key)) >= len(rows) / 2:
            return key
    return "ms"


def plot_kernel_report(report: dict, path: Path, title: str) -> Path | None:
    """Horizontal bars: each shape (group), each implementation's throughput."""
    rows = [r for r in report.get("rows", []) if r.get("ms")]
    if not rows:
        return None
    metric = _metric(rows)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    impls = _impl_order(r["impl"] for r in rows)
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.32 * len(groups) * max(1, len(impls) / 2)))
    for k, impl in enumerate(impls):
        ys, vals = [], []
        for y, g in enumerate(groups):
            r = next((r for r in rows if r["group"] == g and r["impl"] == impl), None)
            if r and r.get(metric):
                ys.append(y + (k - (len(impls) - 1) / 2) * height)
                vals.append(r[metric])
        ax.barh(ys, vals, height, label=impl, color=_color(impl))
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric + (" (lower is better)" if metric == "ms" else ""))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _finish(fig, report.get("stamp", {}), path)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seq_key(rows: list[dict]) -> str | None:
    """The parameter holding the sequence length: the first candidate numeric in most rows."""
    best, count = None, 0
    for key in _SEQ_KEYS:
        n = sum(1 for r in rows if _is_number(r.get(key)))
        if n > count:
            best, count = key, n
    return best


def plot_attention(report: dict, path: Path) -> Path | None:
    """Attention TFLOP/s by sequence length: one line per implementation and head shape.

    Rows without a numeric length (mixed-length batches) are left out of the plot."""
    seq = _seq_key([r for r in report.get("rows", []) if r.get("TFLOP/s")])
    rows = [r for r in report.get("rows", []) if r.get("TFLOP/s") and _is_number(r.get(seq))]
    if not rows:
        return None
    skip = _METRIC_KEYS | set(common.STAMP_KEYS) | set(_BATCH_KEYS) | {seq, "max_len"}
    params = [k for k in rows[0] if k not in skip and _is_number(rows[0][k])]
    varying = [k for k in params if len({r.get(k) for r in rows}) > 1]  # e.g. Hq, Hkv, D
    series: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        shape = tuple(r.get(k) for k in varying)
        series.setdefault((r["impl"] != OURS, r["impl"], shape), []).append((r[seq], r["TFLOP/s"]))
    shapes = sorted({key[2] for key in series}, key=str)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted(series, key=str):  # ours first
        _, impl, shape = key
        pts = sorted(series[key])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ms=3,
            label=impl + "".join(f" {k}={v}" for k, v in zip(varying, shape, strict=True)),
            color=_color(impl),  # color = implementation, line style = head shape
            ls=_LINESTYLES[shapes.index(shape) % len(_LINESTYLES)],
            lw=2 if impl == OURS else 1,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"sequence length ({seq})")
    ax.set_ylabel("TFLOP/s (real tokens)")
    ax.set_title("Non-causal attention forward", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    return _finish(fig, report.get("stamp", {}), path)


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fresh(path: Path, since: float | None) -> bool:
    """Written by this run (reports of an earlier run may lie in the same folder)."""
    return since is None or path.stat().st_mtime >= since


def collect_e2e(out_dir: Path, since: float | None = None) -> dict | None:
    """The merged end-to-end result: e2e.json, refreshed from e2e_<model>.json parts if any."""
    from bench import e2e_report

    parts = []
    for p in sorted(out_dir.glob("e2e_*.json")):
        data = _load(p) if _fresh(p, since) else None
        if data and data.get("kind") == "l2v-e2e" and not data["config"].get("smoke"):
            parts.append(data)
    if parts:
        merged = e2e_report.merge_results(parts)
        e2e_report.write_result(merged, out_dir, "e2e")
    path = out_dir / "e2e.json"
    data = _load(path) if path.exists() and _fresh(path, since) else None
    return data if data and data.get("kind") == "l2v-e2e" else None


def kernel_reports(out_dir: Path, since: float | None = None) -> dict[str, dict]:
    reports = {}
    for p in sorted(out_dir.glob("*.json")):
        if p.stem.startswith("e2e") or not _fresh(p, since):
            continue
        data = _load(p)
        rows = (data or {}).get("rows")
        if isinstance(rows, list) and rows and "group" in rows[0] and "impl" in rows[0]:
            reports[p.stem] = data
    return reports


def _steps_table(steps_path: Path | None) -> str:
    if not steps_path or not steps_path.exists():
        return ""
    lines = [ln.split("\t") for ln in steps_path.read_text().splitlines()[1:] if ln.strip()]
    rows = [
        {"step": f[0], "status": f[3] if len(f) > 3 else "", "seconds": f[2] if len(f) > 2 else ""}
        for f in lines
    ]
    return common.markdown_table(rows, ["step", "status", "seconds"])


def _pytest_summary(lines: list[str]) -> str:
    return next(
        (
            ln
            for ln in reversed(lines)
            if " in " in ln
            and any(w in ln for w in ("passed", "failed", "error", "skipped", "no tests"))
        ),
        "(no pytest summary: cut by its time limit?)",
    )


def _tests_section(out_dir: Path) -> list[str]:
    """One block per pytest output of bench/gpu_check.sh (pytest_<step>.txt, in step order;
    pytest_gpu.txt of older runs too): its summary line and its FAILED / ERROR lines."""
    order = {"pytest_model": 0, "pytest_tests": 1, "pytest_tests-compile": 2}
    logs = sorted(out_dir.glob("pytest_*.txt"), key=lambda p: (order.get(p.stem, 9), p.stem))
    md = []
    for log in logs:
        text = log.read_text(errors="replace").splitlines()
        interesting = [ln for ln in text if ln.startswith(("FAILED", "ERROR"))][:30]
        step = log.stem.removeprefix("pytest_")
        md += [f"## GPU tests: {step}", "", "`" + _pytest_summary(text).strip("= ") + "`", ""]
        if interesting:
            md += ["```", *interesting, "```", ""]
    return md


def summarize(
    out_dir, steps: Path | None = None, failed: int | None = None, since: float | None = None
) -> Path:
    """Plots for every report in out_dir, the merged e2e report, and SUMMARY.md.

    since: a Unix time; reports written before it (an earlier run's) are left out.
    """
    from bench import e2e_report

    out_dir = Path(out_dir)
    st = common.stamp()
    md = [f"# l2v GPU check: {st['device']}", "", _stamp_line(st), ""]
    if failed is not None:
        md += [
            f"Result: {'FAILED (build or GPU tests)' if failed else 'build and GPU tests passed'}",
            "",
        ]
    table = _steps_table(steps)
    if table:
        md += ["## Steps", "", table]
    md += _tests_section(out_dir)

    result = collect_e2e(out_dir, since)
    if result:
        for p in plot_e2e(result, out_dir, "e2e"):
            md.append(f"![{p.stem}]({p.name})")
        md += [""]
        body = e2e_report.render_markdown(result).split("\n", 1)[1]  # its own title dropped
        md += ["## End to end", body.replace("\n## ", "\n### ")]

    for name, report in kernel_reports(out_dir, since).items():
        md += [f"## Kernels: {name}", ""]
        if name.startswith("attention"):
            p = plot_attention(report, out_dir / "attention_tflops.png")
            if p:
                md.append(f"![attention TFLOP/s]({p.name})")
        p = plot_kernel_report(report, out_dir / f"{name}.png", name)
        if p:
            md += [f"![{name}]({p.name})", ""]
        rows = report["rows"]
        cols = ["group", "impl", "ms", "TFLOP/s", "GB/s", "ours_speedup", "error"]
        cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
        md.append(common.markdown_table(rows, cols))
    path = out_dir / "SUMMARY.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description="Plots and SUMMARY.md for a benchmark results folder")
    ap.add_argument(
        "out_dir",
        nargs="?",
        default=None,
        help="results folder (default $L2V_BENCH_OUT or bench/results)",
    )
    ap.add_argument("--steps", default=None, help="steps.tsv written by bench/gpu_check.sh")
    ap.add_argument("--failed", type=int, default=None, help="gpu_check.sh's verdict (0 or 1)")
    ap.add_argument(
        "--since", type=float, default=None, help="ignore reports older than this Unix time"
    )
    args = ap.parse_args(argv)
    out = common.out_dir(args.out_dir)
    path = summarize(out, Path(args.steps) if args.steps else None, args.failed, args.since)
    print(f"[plots] wrote {path}")
    return path


if __name__ == "__main__":
    main()
