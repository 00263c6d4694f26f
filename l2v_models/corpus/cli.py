"""`l2v encode-corpus`: embed JSONL / Parquet files into Parquet on Ray Data.

    l2v encode-corpus data/*.jsonl --output emb/                           # local Ray instance
    l2v encode-corpus 's3://bucket/part-*.parquet' -o s3://bucket/emb --ray-address auto

Imported while the `l2v` parser is built: argparse only here; Ray, pyarrow and torch are imported
inside the command. Errors end in one `l2v: error: ...` line (set L2V_DEBUG=1 for tracebacks).
"""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode-corpus",
        help="embed JSONL/Parquet files into Parquet on Ray (many GPUs, resumable)",
        description="Embed every row of JSONL or Parquet files with an LLM2Vec model on Ray Data "
        "(one model per worker; a worker per GPU by default). Writes OUTPUT/<stem>.parquet per "
        "input file (columns id, embedding) and OUTPUT/_SUCCESS.json last. Rerunning the same "
        "command skips complete outputs of unchanged inputs and redoes the rest (also the "
        "outputs of inputs whose content changed).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="JSONL (.jsonl/.ndjson) or Parquet (.parquet/.pq) files or globs; local "
        "paths or pyarrow URIs (s3://...)",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--id-field", default="id", metavar="NAME", help="id field (default: id)")
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="text field (default: text)"
    )
    ins = p.add_mutually_exclusive_group()
    ins.add_argument(
        "--instruction-field",
        default=None,
        metavar="NAME",
        help="per-row instruction field (a missing or null value: no instruction)",
    )
    ins.add_argument(
        "--instruction", "--prompt", dest="instruction", default=None, metavar="TEXT",
        help="one instruction (prompt) for every row",
    )  # fmt: skip
    p.add_argument("--prompt-name", default=None, metavar="NAME",
                   help="one of the model's named prompts, for every row without an instruction "
                   "(sentence-transformers models)")  # fmt: skip
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="model workers (default: one per GPU of the cluster; 1 without GPUs)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per worker, 0 to 1 (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        metavar="C",
        help="CPUs per worker (default: 1 with GPUs; else the cluster's CPUs shared "
        "by the workers)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join a running Ray cluster: 'auto' (this machine's) or HOST:6379 "
        "(default: start a local Ray instance)",
    )
    p.add_argument(
        "--batch-texts",
        type=int,
        default=1024,
        metavar="N",
        help="rows per Ray batch (default: 1024)",
    )
    from l2v_models.model_options import add_model_options

    add_model_options(p, prompts=False,
                      device_help="cpu or cuda (default: the worker's GPU, else cpu)",
                      model_note="; every worker must be able to read it")  # fmt: skip
    p.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_encode_corpus)
    return p


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep in name[:1]


def _check_model_paths(args, usage_error) -> None:
    """A local model or adapter path that does not exist fails here, not in every worker."""
    for option, value in (("--model", args.model), ("--peft", args.peft)):
        if (
            value is not None
            and _looks_local(value)
            and not os.path.exists(os.path.expanduser(value))
        ):
            raise usage_error(f"{option} {value}: no such file or directory")


def cmd_encode_corpus(args) -> int:
    from l2v_models.errors import UsageError
    from l2v_models.model_options import check_model_available, model_kwargs

    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError:
        raise UsageError(
            "l2v encode-corpus needs Ray Data and pyarrow: pip install 'l2v[ray]'"
        ) from None
    from ray.data.exceptions import UserCodeException

    from l2v_models.corpus.inputs import CorpusInputError, Fields
    from l2v_models.corpus.runner import REDONE, describe_ray_error, encode_corpus

    _check_model_paths(args, UsageError)
    check_model_available(args.model)
    loading = model_kwargs(args)
    for key in ("prompt_name", "truncate_dim"):  # embedding options, recorded for resume
        if getattr(args, key) is not None:
            loading[key] = getattr(args, key)
    fields = Fields(id=args.id_field, text=args.text_field, instruction=args.instruction_field)
    try:
        result = encode_corpus(
            args.inputs,
            args.output,
            args.model,
            peft=args.peft,
            fields=fields,
            instruction=args.instruction,
            normalize=args.normalize,
            num_workers=args.num_workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            batch_texts=args.batch_texts,
            ray_address=args.ray_address,
            progress=not args.quiet,
            **loading,
        )
    except CorpusInputError as e:
        raise UsageError(str(e)) from e
    except (ray.exceptions.RayError, UserCodeException) as e:
        raise UsageError(
            f"a Ray worker failed: {describe_ray_error(e)} (complete outputs are kept: rerun "
            "to resume)"
        ) from e
    skipped = f", {result.skipped_files} complete files skipped" if result.skipped_files else ""
    redone = [f"{e['output']} {e['status']}" for e in result.files if e["status"] in REDONE]
    if redone:  # why a file that had an output was embedded again
        more = f" and {len(redone) - 3} more redone" if len(redone) > 3 else ""
        skipped += ", " + ", ".join(redone[:3]) + more
    print(
        f"encoded {result.embedded_rows} rows in {result.embedded_files} files "
        f"({result.rows_per_s:.1f} rows/s, {result.embed_seconds:.1f}s{skipped}) -> "
        f"{args.output}: {result.rows} rows in {len(result.files)} files, dimension "
        f"{result.dimension}, verified one row per input row; manifest {result.manifest}"
    )
    return 0
