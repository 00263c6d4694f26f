"""The end-to-end benchmark's report: speedups, targets, the markdown, writing and merging
results (bench/e2e.py measures; bench/plots.py draws; both read this module, neither the other's
internals)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import common

OURS = "l2v"
OURS_GRAPHS = "l2v_graphs"
# Our embeddings vs the baseline's, bf16 on GPU (docs/architecture.md "Numerics and tolerances").
COS_TARGET = 0.999
TARGETS = {  # issue text: H100, Mistral-7B shape
    "passages_speedup": 2.0,
    "passages_mfu": 0.70,
    "b1_latency_over_floor": 1.25,
}
IMPL_NOTES = {
    OURS: "l2v LLM2Vec encoder: packed token-budget batches, no padding",
    OURS_GRAPHS: "the l2v encoder with cuda_graphs=True: batches of up to 2048 tokens padded to "
    "a bucket and replayed from CUDA graphs (forward + pooling), every bucket the timed calls "
    "use captured beforehand",
    "hf_bs{n}": "transformers *Model, bidirectional SDPA, llm2vec-style sorted left-padded batches "
    "of {n}, embed-mask mean pooling",
    "hf_bs{n}_compile": "the same under torch.compile(dynamic=True)",
}



def add_speedups(result: dict) -> None:
    """Per (model, workload): ours_speedup on every baseline row, speedup_vs_ref on ours."""
    ref_impl = result["config"]["reference"]
    for r in result["rows"]:
        mine = next(
            (
                x
                for x in result["rows"]
                if x["model"] == r["model"] and x["workload"] == r["workload"] and x["impl"] == OURS
            ),
            None,
        )
        if mine and r["impl"] != OURS:
            r["ours_speedup"] = mine["tokens_per_s"] / r["tokens_per_s"]
            if r["impl"] == ref_impl:
                mine["speedup_vs_ref"] = r["ours_speedup"]


def targets(result: dict) -> list[dict]:
    """The issue's targets (H100, Mistral-7B shape), where this run measured them."""
    model = "mistral-7b"
    if model not in result["models"]:
        return []
    ref = result["config"]["reference"]
    rows = {(r["workload"], r["impl"]): r for r in result["rows"] if r["model"] == model}
    lat = {(r["impl"], r["batch"]): r for r in result["latency"] if r["model"] == model}
    out = []
    mine = rows.get(("passages", OURS))
    if mine and mine.get("speedup_vs_ref") is not None:
        out.append(
            {
                "target": f"{model} passages: tokens/s >= {TARGETS['passages_speedup']}x {ref}",
                "measured": f"{mine['speedup_vs_ref']:.2f}x",
                "reached": mine["speedup_vs_ref"] >= TARGETS["passages_speedup"],
            }
        )
    if mine:
        out.append(
            {
                "target": f"{model} passages: MFU >= {TARGETS['passages_mfu']:.0%}",
                "measured": f"{mine['MFU']:.1%}",
                "reached": mine["MFU"] >= TARGETS["passages_mfu"],
            }
        )
    for impl, how in ((OURS, ""), (OURS_GRAPHS, " with cuda_graphs=True")):
        b1 = lat.get((impl, 1))
        if not b1 or b1.get("p50_ms") is None:
            continue
        ratio = b1["p50_ms"] / b1["floor_ms"]
        out.append(
            {
                "target": f"{model} batch-1 query p50{how} <= "
                f"{TARGETS['b1_latency_over_floor']}x weight-read floor",
                "measured": f"{b1['p50_ms']:.2f} ms = {ratio:.2f}x floor {b1['floor_ms']:.2f} ms",
                "reached": ratio <= TARGETS["b1_latency_over_floor"],
            }
        )
    for r in result["rows"]:
        if r["impl"] == OURS and r.get("cos_min") is not None:
            other = r.get("cos_other_texts")
            out.append(
                {
                    "target": f"{r['model']} {r['workload']}: cosine to {ref} >= {COS_TARGET}",
                    "measured": f"min {r['cos_min']:.6f}"
                    + (f" (other texts {other:.3f})" if other is not None else ""),
                    "reached": r["cos_min"] >= COS_TARGET and bool(r.get("finite")),
                }
            )
    return out


def render_markdown(result: dict) -> str:
    st, cfg, ceil = result["stamp"], result["config"], result["ceilings"]
    ref = cfg["reference"]
    lines = [
        f"# End to end: l2v vs llm2vec-style transformers{' (smoke)' if cfg['smoke'] else ''}",
        "",
        f"{st['device']} · torch {st['torch']} · triton {st['triton']} · CUDA {st['cuda']} · "
        f"commit {st['commit']} · {st['date']}",
        "",
        f"{cfg['dtype']}, random weights, seed {cfg['seed']}. Ceilings measured in this run: "
        f"matmul {ceil['matmul']} {ceil['matmul_tflops']:.4g} TFLOP/s, copy "
        f"{ceil['copy_GBps']:.4g} GB/s (read + write). MFU = useful FLOPs (real tokens) / time / "
        "that matmul rate (each model's process measures its own: see Setup).",
        "",
    ]
    tp_cols = [
        "model",
        "workload",
        "impl",
        "texts",
        "tokens",
        "padded_tokens",
        "seconds",
        "tokens_per_s",
        "texts_per_s",
        "ours_speedup",
        "MFU",
        "peak_mem_GB",
    ]
    rows = [
        {**r, "impl": r["impl"] + (" (ref)" if r["impl"] == ref else "")} for r in result["rows"]
    ]
    lines += [
        "## Throughput",
        "",
        "ours_speedup: our tokens/s over that row's (same texts, same real tokens).",
        "",
        common.markdown_table(rows, tp_cols),
    ]
    agree = [
        {
            "model": r["model"],
            "workload": r["workload"],
            "impl": r["impl"],
            "cos_min": f"{r['cos_min']:.6f}",
            "cos_mean": f"{r['cos_mean']:.6f}",
            "cos_other_texts": f"{r['cos_other_texts']:.3f}"
            if r.get("cos_other_texts") is not None
            else "",
            "finite": r.get("finite"),
        }
        for r in result["rows"]
        if r.get("cos_min") is not None
    ]
    if agree:
        lines += [
            f"## Embeddings vs {ref} (same token ids)",
            "",
            f"Cosine per text, target >= {COS_TARGET}; cos_other_texts = mean cosine between "
            "different texts of the baseline: how far apart unrelated embeddings are.",
            "",
            common.markdown_table(agree),
        ]
    lat_cols = ["model", "impl", "batch", "calls", "p50_ms", "p99_ms", "floor_ms", "p50_over_floor"]
    lat = [
        {**r, "p50_over_floor": r["p50_ms"] / r["floor_ms"]} if r.get("p50_ms") is not None else r
        for r in result["latency"]
    ]
    if any(r.get("error") for r in lat):
        lat_cols.append("error")
    lines += [
        "## Latency (query workload)",
        "",
        "floor = weight bytes / measured copy bandwidth: the time to read every weight once.",
        "",
        common.markdown_table(lat, lat_cols),
    ]
    tg = targets(result)
    if tg:
        lines += [
            "## Targets",
            "",
            common.markdown_table(
                [{**t, "reached": "yes" if t["reached"] else "NO"} for t in tg],
                ["target", "measured", "reached"],
            ),
        ]
    lines += ["## Setup", ""]
    for impl in sorted(
        {r["impl"] for r in result["rows"]} | {r["impl"] for r in result["latency"]}
    ):
        lines.append(f"- `{impl}`: {describe(impl)}")
    lines += [
        "- workloads (token ids, seeded): queries = BOS + 16-token instruction + 10-40 "
        "tokens (the query is pooled); passages = log-normal lengths, median ~120, max 512; "
        "long = 400-512 tokens",
    ]
    for m, info in result["models"].items():
        lines.append(
            f"- {m}: {info.get('layers')} layers, hidden {info.get('hidden')}, weights "
            f"{info.get('weight_bytes', 0) / 1e9:.2f} GB, backend {info.get('backend')}, "
            f"built in {info.get('build_s', 0):.1f} s; matmul "
            f"{info.get('ceilings', {}).get('matmul_tflops', 0):.4g} TFLOP/s, copy "
            f"{info.get('ceilings', {}).get('copy_GBps', 0):.4g} GB/s"
            + (f"; CUDA graphs: {info['cuda_graphs']}" if info.get("cuda_graphs") else "")
            + "".join(
                f"; {b} graph capture {c['buckets']} buckets in {c['seconds']:.1f} s"
                for b, c in info.get("graph_capture", {}).items()
            )
        )
    if result["skipped"] or result["errors"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- skipped {s}" for s in result["skipped"]]
        lines += [f"- error {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def describe(impl: str) -> str:
    if impl in (OURS, OURS_GRAPHS):
        return IMPL_NOTES[impl]
    base = impl.removeprefix("hf_bs")
    if base.endswith("_compile"):
        return IMPL_NOTES["hf_bs{n}_compile"]
    return IMPL_NOTES["hf_bs{n}"].format(n=base)


def write_result(result: dict, out: str | None, name: str) -> Path:
    """<name>.json (rows stamped) and <name>.md in the output folder; returns the JSON path."""
    add_speedups(result)
    d = common.out_dir(out)
    st = result["stamp"]
    data = {
        **result,
        "rows": [{**st, **r} for r in result["rows"]],
        "latency": [{**st, **r} for r in result["latency"]],
    }
    path = d / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file
    (d / f"{name}.md").write_text(render_markdown(result))
    return path


def merge_results(results: list[dict]) -> dict:
    """One report from several (gpu_check.sh runs one process per model)."""
    merged = {**results[0], "rows": [], "latency": [], "models": {}, "errors": [], "skipped": []}
    for r in results:
        for key in ("rows", "latency", "errors", "skipped"):
            merged[key] += r.get(key, [])
        merged["models"].update(r.get("models", {}))
    strip = set(common.STAMP_KEYS)
    for key in ("rows", "latency"):
        merged[key] = [{k: v for k, v in row.items() if k not in strip} for row in merged[key]]
    return merged
