"""`l2v eval`: score a model on real human-labelled data, next to reference encoders.

    l2v eval                                        # the default model (smollm2-llm2vec) vs
                                                    # untrained SmolLM2, TF-IDF and MiniLM
    l2v eval --peft ADAPTER                         # your adapter on untrained SmolLM2, vs the
                                                    # same references, one table
    l2v eval --tasks lee --references none --output lee.json
    l2v eval --list                                 # the tasks, their data and licences
    l2v eval --mteb STS16 SciFact                   # MTEB tasks whose data is on this machine,
                                                    # with LLM2Vec's instructions

Imports argparse only; everything heavy is imported inside the command.
"""

from __future__ import annotations

import argparse
import sys

REFERENCES = ("tfidf", "minilm", "untrained")
DEFAULT_REFERENCES = "tfidf,minilm,untrained"
DEFAULT_TASKS = "lee,wordnet,simlex,wordsim,polarity"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score a model on human-labelled data, with reference rows",
        description="Score an LLM2Vec model on real human-labelled data (the Lee news "
        "similarity judgements, WordNet definition->example retrieval over held-out synsets, "
        "SimLex-999, WordSim-353, Pang & Lee sentence polarity) next to reference encoders "
        "(TF-IDF, all-MiniLM-L6-v2, the untrained SmolLM2 the default model was trained "
        "from). Prints a table of metrics with 95 percent bootstrap intervals and the "
        "model-minus-reference differences; "
        "--output writes JSON.",
    )
    from l2v_models.model_options import add_model_options

    add_model_options(p, prompts=False, truncate_dim=False)
    p.add_argument("--name", default=None, help="the model's name in the table")
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"comma-separated tasks, or all (default: {DEFAULT_TASKS})",
    )
    p.add_argument(
        "--references",
        default=DEFAULT_REFERENCES,
        help="comma-separated reference rows from tfidf, minilm, untrained (the "
        "embedded SmolLM2 without adapters), or none (default: all three; untrained is "
        "dropped when it is the model)",
    )
    p.add_argument("--output", "-o", metavar="FILE.json", help="write the rows as JSON")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="quick run: only the first N items of each task (Lee: documents)",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="give the l2v models each task's llm2vec-style instruction",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the intervals (default: 1000)",
    )
    p.add_argument(
        "--bootstrap-unit",
        default="task",
        choices=("task", "item"),
        help="what the intervals resample: task = each task's own unit (Lee: its 50 documents, "
        "since each is in 49 pairs; others: pairs or queries), item = pairs or queries "
        "everywhere (narrower on Lee) (default: task)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the reference rows (MiniLM and the default model are cached "
        "under l2v's cache dir)",
    )
    p.add_argument("--list", action="store_true", help="list the tasks, their data and licences")
    p.add_argument(
        "--mteb",
        nargs="+",
        metavar="TASK",
        help="run these MTEB tasks instead (the mteb package; data already in the local Hugging "
        "Face cache, nothing is downloaded; tasks without local data are named), each text with "
        "the instruction LLM2Vec's paper gave it; --output writes the scores as JSON",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_eval)
    return p


def _split(value: str, allowed, what: str) -> list[str]:
    from l2v_models.errors import UsageError

    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"] and what == "reference":
        return []
    if names == ["all"] and what == "task":
        return list(allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise UsageError(
            f"unknown {what} {','.join(unknown) or repr(value)}; choose from "
            f"{', '.join(allowed)}" + (" or none" if what == "reference" else " or all")
        )
    return list(dict.fromkeys(names))


def cmd_eval(args) -> int:
    from pathlib import Path

    from l2v_models.checkpoint import BASE_MODEL
    from l2v_models.errors import UsageError
    from l2v_models.eval import encoders as enc
    from l2v_models.eval import runner
    from l2v_models.eval.tasks import TASKS, get_task
    from l2v_models.eval.wordnet import DataMissing
    from l2v_models.model_options import check_model_available, model_kwargs

    if args.mteb:
        return cmd_mteb(args)
    if args.list:
        for name, cls in TASKS.items():
            print(f"{name}: {cls.description}\n    data: {cls.source}\n    licence: {cls.licence}")
        return 0
    task_names = _split(args.tasks, tuple(TASKS), "task")
    ref_names = _split(args.references, REFERENCES, "reference")
    for name, value in (("--limit", args.limit), ("--bootstrap", args.bootstrap)):
        if value is not None and value < (3 if name == "--limit" else 1):
            raise UsageError(f"{name} must be a positive integer (--limit at least 3), got {value}")
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.exists():
        raise UsageError(f"output directory {output.parent} does not exist")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    tasks = []
    for name in task_names:  # data first: a missing install fails before any model loads
        try:
            tasks.append(get_task(name).load(limit=args.limit))
        except DataMissing as e:
            raise UsageError(f"task {name}: {e}") from None
    kwargs = model_kwargs(args)
    # The reference "untrained" row shares the device options, not the model's own settings.
    common = {k: kwargs.pop(k) for k in ("torch_dtype", "device_map", "backend") if k in kwargs}
    common["batch_tokens"] = kwargs.pop("max_tokens_per_batch", None)
    model = enc.L2VEncoder(args.name or _model_name(args), args.model, args.peft, **kwargs,
                           **common)  # fmt: skip
    check_model_available(args.model)
    encoders = [model]
    for name in ref_names:
        if name == "tfidf":
            encoders.append(enc.TfidfEncoder())
        elif name == "minilm":
            encoders.append(enc.MiniLMEncoder(device=args.device))
        elif name == "untrained" and not model.is_untrained():
            encoders.append(enc.L2VEncoder("untrained SmolLM2", BASE_MODEL, **common))
    if len({e.name for e in encoders}) != len(encoders):
        raise UsageError(f"--name {args.name!r} collides with a reference row's name")
    cache = None if args.no_cache else enc.l2v_cache_dir() / "eval"
    try:
        report = runner.evaluate(
            encoders,
            tasks,
            instructions=args.instructions,
            n_resamples=args.bootstrap,
            bootstrap_unit=args.bootstrap_unit,
            cache=cache,
            log=log,
        )
    except DataMissing as e:
        raise UsageError(str(e)) from None
    print(runner.format_table(report))
    if output is not None:
        runner.write_json(report, output)
        if log:
            log(f"[eval] wrote {len(report.rows)} rows to {output}")
    return 0


def _model_name(args) -> str:
    from l2v_models.checkpoint import BASE_MODEL, DEFAULT_MODEL, model_label

    if args.peft:
        return f"peft:{args.peft.rstrip('/').split('/')[-1]}"
    label = model_label(args.model)
    if label.lower() == DEFAULT_MODEL:
        return f"{DEFAULT_MODEL} (default)"
    if label.lower() == BASE_MODEL:
        return "untrained SmolLM2"
    return label.rstrip("/").split("/")[-1]


def cmd_mteb(args) -> int:
    """`l2v eval --mteb TASK...`: data first (before the model loads), then the present tasks;
    a user error at the end names the tasks whose data is missing."""
    import json
    from pathlib import Path

    from l2v_models.errors import UsageError
    from l2v_models.model_options import check_model_available, model_kwargs

    try:
        from l2v_models.eval import mteb_run
    except ImportError as e:
        raise UsageError(f"--mteb needs the mteb package ({e}): pip install mteb (l2v's [eval] "
                         "extra)") from None  # fmt: skip
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.exists():
        raise UsageError(f"output directory {output.parent} does not exist")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = list(dict.fromkeys(args.mteb))
    try:
        tasks, missing = mteb_run.load_local_tasks(names, log=log)
    except mteb_run.UnknownTask as e:
        raise UsageError(str(e)) from None
    for name, why in missing.items():
        print(f"l2v: MTEB task {name} not run: {why}", file=sys.stderr)
    if not tasks:
        raise UsageError(
            f"no MTEB task could run: the data of {', '.join(missing)} is not on this machine; "
            + mteb_run.download_hint(list(missing))
        )
    check_model_available(args.model)
    from l2v_models.eval.mteb_model import L2VMtebEncoder

    encoder = L2VMtebEncoder(args.model, peft=args.peft, name=args.name, **model_kwargs(args))
    rows = mteb_run.run_tasks(encoder, tasks, log=log)
    print(mteb_run.format_rows(rows, encoder.mteb_model_meta.name))
    if output is not None:
        output.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
        if log:
            log(f"[mteb] wrote {len(rows)} rows to {output}")
    if missing:
        raise UsageError(
            f"{len(missing)} of {len(names)} MTEB tasks not run, their data is not on this "
            f"machine: {', '.join(missing)}; " + mteb_run.download_hint(list(missing))
        )
    return 0
