"""Corpus benchmark: rows/s of `l2v encode-corpus` (l2v_models.corpus.encode_corpus) on Ray Data.

    python -m bench.corpus                          # CPU: default model, 1 vs 2 CPU workers
    python -m bench.corpus --smoke                  # tiny random model, a few rows (CI smoke)
    python -m bench.corpus --device cuda --rows 50000   # GPU: Ray per GPU vs plain encode

CPU mode runs the same corpus with 1 and then 2 workers (1 CPU and 1 torch thread each) in one
Ray session and reports, per run, rows/s over the whole run (Ray's actor start and the model
loads included) and in steady state (from the first output block to the last), plus the 2-vs-1
scaling ratio of each.

GPU mode first runs plain `LLM2Vec.encode` in this process on one GPU (warmed up on the first
texts, then timed on all), then `encode_corpus` with one 1-GPU worker per GPU, and reports
rows/s per GPU of each and Ray's overhead per GPU: 1 - (steady rows/s per GPU) / (plain rows/s).
Goal: < 5% on passages.

Texts are real: sentences or ~90-word passages of the Lee corpus in the gensim wheel, repeated
(with distinct ids) up to --rows, written to --files JSONL files. Reports: corpus.json +
corpus.md under --out (else $L2V_BENCH_OUT, else bench/results/), every row stamped.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from bench.common import write_report


def lee_texts(kind: str, n: int) -> list[str]:
    """n texts from the Lee background corpus: "sentences" (6-14 words) or "passages" (windows
    of 90 words, stride 45, over each story), repeated cyclically when n is larger."""
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    stories = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    pool: list[str] = []
    if kind == "sentences":
        for story in stories:
            pool += [s for s in re.split(r"(?<=[.!?])\s+", story) if 6 <= len(s.split()) <= 14]
    elif kind == "passages":
        for story in stories:
            words = story.split()
            for start in range(0, max(1, len(words) - 45), 45):
                pool.append(" ".join(words[start : start + 90]))
    else:
        raise SystemExit(f"unknown text kind {kind!r}: use sentences or passages")
    return [pool[i % len(pool)] for i in range(n)]


def write_corpus(directory: Path, texts: list[str], files: int) -> list[str]:
    """texts split over `files` JSONL files with ids doc-<i>; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(texts) // files)
    for f in range(files):
        path = directory / f"part-{f:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for i in range(f * per, min(len(texts), (f + 1) * per)):
                out.write(json.dumps({"id": f"doc-{i}", "text": texts[i]}) + "\n")
        paths.append(str(path))
    return paths


def ray_row(label: str, result, workers: int, gpus: int = 0) -> dict:
    row = {
        "run": label,
        "workers": workers,
        "rows": result.embedded_rows,
        "seconds": result.embed_seconds,
        "rows_per_s": result.rows_per_s,
        "first_output_s": result.first_output_seconds,
        "steady_rows_per_s": result.steady_rows_per_s,
    }
    if gpus:
        row["steady_rows_per_s_per_gpu"] = result.steady_rows_per_s / gpus
        row["rows_per_s_per_gpu"] = result.rows_per_s / gpus
    return row


def run_cpu(args, paths: list[str], work: Path) -> tuple[list[dict], str]:
    from l2v_models.corpus import encode_corpus

    rows = []
    for workers in (1, 2):
        result = encode_corpus(
            paths,
            str(work / f"out-{workers}"),
            args.model,
            num_workers=workers,
            cpus_per_worker=1,
            batch_texts=args.batch_texts,
            progress=False,
        )
        rows.append(ray_row(f"ray, {workers} CPU worker(s)", result, workers))
    one, two = rows
    for key in ("rows_per_s", "steady_rows_per_s"):
        ratio = two[key] / one[key] if one[key] else None
        two[f"{key}_vs_1_worker"] = ratio
    notes = (
        f"{len(paths)} JSONL files, {one['rows']} {args.texts}, model "
        f"{args.model or 'SmolLM2-135M-Instruct (default)'} fp32, batch_texts {args.batch_texts}"
        ", 1 CPU and 1 torch thread per worker. rows_per_s includes Ray's actor start and the "
        "model load; steady_rows_per_s runs from the first output block to the last."
    )
    return rows, notes


def run_gpu(args, texts: list[str], paths: list[str], work: Path) -> tuple[list[dict], str]:
    import ray
    import torch

    from l2v_models.corpus import encode_corpus
    from l2v_models.encoder import LLM2Vec

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("--device cuda: no CUDA device visible")
    encoder = LLM2Vec.from_pretrained(args.model, device_map="cuda")
    encoder.encode(texts[: min(len(texts), 2048)], show_progress_bar=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    encoder.encode(texts, show_progress_bar=False)
    torch.cuda.synchronize()
    plain_s = time.perf_counter() - t0
    plain = len(texts) / plain_s
    rows = [
        {
            "run": "plain LLM2Vec.encode, 1 GPU",
            "workers": 1,
            "rows": len(texts),
            "seconds": plain_s,
            "rows_per_s": plain,
            "rows_per_s_per_gpu": plain,
        }
    ]
    del encoder
    torch.cuda.empty_cache()
    ray.shutdown()
    ray.init(address="local", include_dashboard=False, num_gpus=gpus)
    result = encode_corpus(
        paths,
        str(work / "out-gpu"),
        args.model,
        num_workers=gpus,
        gpus_per_worker=1,
        batch_texts=args.batch_texts,
        progress=False,
    )
    row = ray_row(f"ray, {gpus} GPU worker(s)", result, gpus, gpus=gpus)
    row["overhead_per_gpu"] = 1 - row["steady_rows_per_s_per_gpu"] / plain
    rows.append(row)
    notes = (
        f"{len(texts)} {args.texts} in {len(paths)} JSONL files, model "
        f"{args.model or 'SmolLM2-135M-Instruct (default)'} (bf16), batch_texts "
        f"{args.batch_texts}. overhead_per_gpu = 1 - steady Ray rows/s per GPU / plain encode "
        "rows/s (goal < 5%)."
    )
    return rows, notes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rows", type=int, default=None, help="texts (default: cpu 400, cuda 50000)")
    p.add_argument(
        "--texts",
        default=None,
        choices=("sentences", "passages"),
        help="default: sentences on cpu, passages on cuda",
    )
    p.add_argument("--files", type=int, default=4, help="input files (default 4)")
    p.add_argument("--batch-texts", type=int, default=None, help="rows per Ray batch")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model and few rows: checks the pipeline, not performance",
    )
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--name", default="corpus", help="report name (default corpus)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if args.smoke and gpu:
        raise SystemExit("--smoke runs on the CPU")
    args.texts = args.texts or ("passages" if gpu else "sentences")
    args.rows = args.rows or (24 if args.smoke else 50000 if gpu else 400)
    args.batch_texts = args.batch_texts or (4 if args.smoke else 256 if gpu else 32)

    import ray

    with tempfile.TemporaryDirectory(prefix="l2v-corpus-bench-") as tmp:
        work = Path(tmp)
        if args.smoke:
            from tests.tiny import make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint(work, "llama"))
        texts = lee_texts(args.texts, args.rows)
        paths = write_corpus(work / "in", texts, args.files)
        if gpu:
            rows, notes = run_gpu(args, texts, paths, work)
        else:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=200 * 2**20,
                configure_logging=False,
            )
            try:
                rows, notes = run_cpu(args, paths, work)
            finally:
                ray.shutdown()
        ray.shutdown()
    if args.smoke:
        notes = (
            "SMOKE RUN (tiny random model): checks the pipeline; the timings mean nothing. " + notes
        )
        args.model = "tiny random model"
    report = write_report(
        args.name, rows, args.out, title="Corpus embedding on Ray Data", notes=notes
    )
    print(report.read_text())
    return {"rows": rows, "notes": notes, "report": str(report), "config": vars(args)}


if __name__ == "__main__":
    main()
