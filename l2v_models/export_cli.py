"""`l2v export`: write a model l2v runs as a sentence-transformers folder (l2v_models.export).

    l2v export --output smollm2-st                                 # the default encoder
    l2v export --model MNTP_DIR --peft SUPERVISED_DIR --output my-st \\
        --prompt query="Given a web search query, retrieve relevant passages" --normalize
    l2v export --output my-st --mteb-prompts --strict              # refuse any difference

Imported while the `l2v` parser is built: argparse only at import time.
"""

from __future__ import annotations

import argparse
import sys

from l2v_models.model_options import add_model_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to l2v's subparsers."""
    p = subparsers.add_parser(
        "export", help="write a model as a sentence-transformers folder (merged weights)",
        description="Write an LLM2Vec model l2v runs (an -mntp folder with its adapters, the "
        "default smollm2-llm2vec, a model trained with `l2v train`) as a folder that "
        "sentence-transformers and transformers load without l2v: merged safetensors weights, "
        "config.json saying how the model attends, the tokenizer, Transformer / Pooling / "
        "Normalize modules and the instructions as named prompts. Every export is measured "
        "against l2v's own embeddings; differences (llm2vec rules that the format cannot "
        "express) are printed with the measured cosines.",
    )  # fmt: skip
    add_model_options(p, prompts=False, truncate_dim=False)
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="the folder to write (must not exist or be empty; see --force)")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=INSTRUCTION",
                   help="a named prompt: the llm2vec instruction used with it (repeatable), "
                   "e.g. query='Given a web search query, retrieve relevant passages'")
    p.add_argument("--default-prompt-name", default=None, metavar="NAME",
                   help="the prompt used when none is given (default: no instruction)")
    p.add_argument("--mteb-prompts", action="store_true",
                   help="also write LLM2Vec's MTEB instructions as prompts named as MTEB looks "
                   "them up (<Task>-query, STS, Summarization)")
    p.add_argument("--normalize", action="store_true",
                   help="end in a Normalize module (unit-length embeddings)")
    p.add_argument("--check-texts", metavar="FILE",
                   help="also measure the export on these texts (one per line)")
    p.add_argument("--strict", action="store_true",
                   help="refuse (write nothing) when the folder would not give l2v's "
                   "embeddings exactly")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output folder (only an earlier export)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_export)
    return p


def _parse_prompts(values: list[str]) -> dict[str, str]:
    from l2v_models.errors import UsageError

    prompts: dict[str, str] = {}
    for value in values:
        name, sep, instruction = value.partition("=")
        if not sep or not name.strip() or not instruction.strip():
            raise UsageError(f"--prompt takes NAME=INSTRUCTION, got {value!r}")
        if name.strip() in prompts:
            raise UsageError(f"--prompt {name.strip()!r} is given twice")
        prompts[name.strip()] = instruction.strip()
    return prompts


def _read_texts(path: str) -> list[str]:
    from l2v_models.errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--check-texts {path}: cannot read it ({e})") from None
    if not texts:
        raise UsageError(f"--check-texts {path}: no texts in it")
    return texts


def cmd_export(args) -> int:
    from l2v_models.checkpoint import model_label
    from l2v_models.encoder import LLM2Vec
    from l2v_models.errors import UsageError
    from l2v_models.eval.mteb_instructions import named_prompts
    from l2v_models.export import ExportError, check_output, export_sentence_transformers
    from l2v_models.model_options import check_model_available, model_kwargs

    prompts = _parse_prompts(args.prompt)
    if args.mteb_prompts:
        for name, instruction in named_prompts().items():
            prompts.setdefault(name, instruction)
    texts = _read_texts(args.check_texts) if args.check_texts else []
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        check_output(args.output, args.force)  # before the (slow) load
        check_model_available(args.model)
        encoder = LLM2Vec.from_pretrained(args.model, args.peft, **model_kwargs(args))
        report = export_sentence_transformers(
            encoder, args.output, prompts=prompts, default_prompt_name=args.default_prompt_name,
            normalize=args.normalize, force=args.force, strict=args.strict, check_texts=texts,
            source=model_label(args.model, args.peft), log=log,
        )  # fmt: skip
    except ExportError as e:
        raise UsageError(str(e)) from None
    for line in report.lines():
        print(line)
    return 0
