"""`l2v train mntp | simcse | supervised`: the parser (argparse only at import) and the command.

    l2v train mntp --data wiki.txt --output out/mntp --steps 200 --batch-tokens 4096
    l2v train simcse --peft out/mntp --data sentences.txt --output out/simcse --max-length 32
    l2v train supervised --peft out/mntp --data triples.jsonl --output out/supervised

Options left out take llm2vec's published settings for the stage (l2v_models.train.trainer).
"""

from __future__ import annotations

import argparse

SUMMARY_FILE = "train_summary.json"  # written next to the adapter at the end of a run
STAGE_HELP = {
    "mntp": "masked next-token prediction: the first LLM2Vec stage (plain text or JSONL "
            "{\"text\"})",
    "simcse": "unsupervised SimCSE on top of an MNTP adapter (--peft): each sentence is its own "
              "positive under dropout (plain text or JSONL {\"text\"})",
    "supervised": "contrastive (query, positive, hard negative) training on top of an MNTP "
                  "adapter (--peft): JSONL {\"query\", \"positive\", \"negative\"?, "
                  "\"instruction\"?}",
}  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    train = subparsers.add_parser(
        "train", help="train an LLM2Vec adapter (mntp, simcse, supervised)",
        description="Train an LLM2Vec LoRA adapter with llm2vec's recipe on packed batches. "
        "The output folder is a PEFT adapter (adapter_config.json, adapter_model.safetensors, "
        "llm2vec_config.json) that l2v, PEFT and llm2vec load.",
    )  # fmt: skip
    stages = train.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True
    for stage, text in STAGE_HELP.items():
        p = stages.add_parser(stage, help=text, description=text)
        _add_options(p, stage)
        p.set_defaults(func=cmd_train, train_stage=stage)
    return train


def _add_options(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="base model: HF dir or hub id, LLM2Vec -mntp dir, .gguf file (default: "
                   "the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--peft", nargs="+", default=None, metavar="DIR",
                   help="the previous stages' adapters, merged in order before training (SimCSE "
                   "and supervised train on top of the MNTP adapter; `--peft MNTP SIMCSE` "
                   "trains a supervised stage on top of both)")  # fmt: skip
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="training files: .txt (one passage per line) or .jsonl")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the adapter folder")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    size = p.add_argument_group("batch size (default: llm2vec's, 32 / 128 / 64 examples)")
    size.add_argument("--batch-size", type=int, default=None, metavar="N",
                      help="examples per step")  # fmt: skip
    size.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                      help="real tokens per step (all texts of the step; with --batch-size "
                      "both limits apply)")  # fmt: skip
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="tokens per text (default 512 MNTP, 128 SimCSE, 512 supervised)")
    p.add_argument("--long-lines", default=None,
                   choices=("split", "truncate", "skip", "error") if stage == "mntp"
                   else ("truncate", "skip", "error"),
                   help="texts over --max-length: split into pieces (MNTP default), truncate "
                   "(default otherwise, as llm2vec), skip, or stop with an error")  # fmt: skip
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 5e-5 MNTP, 3e-5 SimCSE, 2e-4 supervised)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps, then linear decay to 0 (default 0; 300 supervised)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (0.05)")
    p.add_argument("--bos-token", default=None, metavar="TOKEN",
                   help="put this special token before every text (e.g. '<|endoftext|>' for "
                   "SmolLM2, whose tokenizer has no BOS: the first position is an attention "
                   "sink that would otherwise dominate the mean of short texts); MNTP saves the "
                   "tokenizer with it, so later stages and the encoder do the same")  # fmt: skip
    if stage == "mntp":
        p.add_argument("--mask-prob", type=float, default=None,
                       help="fraction of tokens masked (default 0.2; Mistral 0.8)")
        p.add_argument("--mask-policy", default=None, choices=("bert", "all"),
                       help="bert: 80%% mask token, 10%% random, 10%% kept (default); all: "
                       "every masked token becomes the mask token (Mistral's default)")
        p.add_argument("--mask-token", default=None,
                       help="the mask token (default: the tokenizer's, else '_', llm2vec's "
                       "'blank')")  # fmt: skip
    else:
        p.add_argument("--scale", type=float, default=None,
                       help="similarity scale of the loss (default 20 SimCSE, 50 supervised)")
        p.add_argument("--attn-dropout", type=float, default=None,
                       help="attention dropout (default 0.3 SimCSE, 0 supervised)")
    p.add_argument("--exclude-eval", action="store_true",
                   help="drop every example with a text that `l2v eval` scores (Lee documents, "
                   "held-out WordNet definitions and examples, SimLex/WordSim words)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order, masks")
    p.add_argument("--no-shuffle", action="store_true", help="read the data in file order")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a resumable checkpoint every N steps (OUTPUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUTPUT: its adapter, train_log.jsonl, "
                   "summary and checkpoints are deleted once the model has loaded (other files "
                   "stay); without it (or --resume) a non-empty OUTPUT is refused")  # fmt: skip
    p.add_argument("--base-name", default=None, metavar="NAME",
                   help="base_model_name_or_path written to adapter_config.json (default: the "
                   "first --peft when it is an -mntp folder, the model this adapter goes on, as "
                   "llm2vec's second adapters name theirs; else --model; give the hub id for "
                   "llm2vec users)")  # fmt: skip
    p.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on CUDA, "
                   "fp32 on CPU)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: torch's, one per core); on a machine busy with "
                   "other work, 1 is often several times faster")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    """Run one stage: check the data, load the model, train, save; one-line errors."""
    import json
    import time
    from pathlib import Path

    from l2v_models.errors import UsageError
    from l2v_models.model_options import check_model_available
    from l2v_models.train.data import (
        DataError,
        DataIndex,
        evaluation_filter,
        refuse_evaluation_files,
    )
    from l2v_models.train.trainer import (
        BosTokenError,
        TrainConfig,
        Trainer,
        latest_checkpoint,
        load_for_training,
    )

    stage = args.train_stage
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; pass a folder")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output and --overwrite replaces it: "
                         "pass one of them")  # fmt: skip
    base_name = args.base_name
    if base_name is None and stage != "mntp" and args.peft and _is_mntp_folder(args.peft[0]):
        # The adapter goes on that -mntp model: say so, as McGill's second adapters name their
        # -mntp model (loading it without the MNTP adapter then warns).
        base_name = str(Path(args.peft[0]).expanduser().resolve())
    config = TrainConfig(
        stage, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, batch_tokens=args.batch_tokens, max_length=args.max_length,
        long_lines=args.long_lines, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, seed=args.seed, shuffle=not args.no_shuffle,
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
        base_model_name_or_path=base_name,
        attn_dropout=getattr(args, "attn_dropout", None), scale=getattr(args, "scale", None),
        mask_prob=getattr(args, "mask_prob", None), mask_policy=getattr(args, "mask_policy", None),
        mask_token=getattr(args, "mask_token", None),
    )  # fmt: skip
    try:
        config.resolved()  # option errors before the (slow) load
        kind = "triplet" if stage == "supervised" else "text"
        refuse_evaluation_files(args.data)
        exclude = evaluation_filter() if args.exclude_eval else None
        index = DataIndex.scan(args.data, kind, exclude)  # data errors before the load, too
        if index.excluded:
            print(f"--exclude-eval: dropped {index.excluded} examples with evaluation texts")
    except DataError as e:
        raise UsageError(str(e)) from None
    checkpoint = latest_checkpoint(output) if args.resume else None
    if args.resume and checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {output / 'checkpoints'} (write them "
                         "with --save-every N)")  # fmt: skip
    if not (args.resume or args.overwrite) and output.is_dir() and any(output.iterdir()):
        # Training into it would replace its adapter and append to its log, which would then no
        # longer describe the adapter beside it.
        if (output / "checkpoints").is_dir():
            raise UsageError(f"{output} holds checkpoints of an earlier run: pass --resume to "
                             "continue it, --overwrite to replace it, or another --output")
        raise UsageError(f"--output {output} is not empty (an earlier run's adapter and log?): "
                         "pass --overwrite to replace them, or another --output")  # fmt: skip
    check_model_available(args.model)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    first, *more = args.peft or [None]
    try:
        loaded = load_for_training(args.model, first, extra_peft=more, dtype=args.dtype,
                                   device=args.device, bos_token=args.bos_token)  # fmt: skip
    except BosTokenError as e:
        raise UsageError(str(e)) from None
    trainer = Trainer(loaded, config, model_arg=args.model)
    if args.overwrite:  # only now: a failed load leaves the earlier run as it was
        removed = _remove_earlier_run(output)
        if removed:
            print(f"--overwrite: removed the earlier run from {output} ({len(removed)} files: "
                  f"{' '.join(removed)})")
    batcher = trainer.batches(args.data, index=index)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint, batcher)
        _truncate_log(output / "train_log.jsonl", trainer.step)
        print(f"resuming from {checkpoint} (step {trainer.step})")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        history = trainer.fit(batcher, output=output, progress=not args.quiet)
    except DataError as e:
        raise UsageError(str(e)) from None
    train_s = time.perf_counter() - t1
    tokens = sum(h["tokens"] for h in history)
    last = history[-1]["loss"] if history else float("nan")
    summary = {"stage": stage, "steps": trainer.step, "final_loss": last, "tokens": tokens,
               "train_seconds": round(train_s, 2), "load_seconds": round(load_s, 2),
               "tokens_per_s": round(tokens / max(train_s, 1e-9), 1)}  # fmt: skip
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"trained {stage} for {trainer.step} steps ({tokens} tokens, "
          f"{summary['tokens_per_s']} tokens/s), final loss {last:.4f} -> {output}")
    return 0


def _truncate_log(path, step: int) -> None:
    """Drop log lines past the checkpoint's step (they are trained again)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))


def _is_mntp_folder(path) -> bool:
    """An LLM2Vec -mntp folder (what `l2v train mntp` writes): an adapter with config.json."""
    from pathlib import Path

    path = Path(path).expanduser()
    return (path / "adapter_config.json").is_file() and (path / "config.json").is_file()


def _remove_earlier_run(output) -> list[str]:
    """--overwrite: delete what a training run writes into `output` (the adapter folder's
    files, the log, the summary, the checkpoints); other files stay. Returns what went."""
    import shutil
    from pathlib import Path

    from l2v_models.train.save import remove_adapter_files
    from l2v_models.train.trainer import LOG_FILE

    output = Path(output)
    if not output.is_dir():
        return []
    removed = remove_adapter_files(output)
    for name in (LOG_FILE, SUMMARY_FILE):
        if (output / name).is_file():
            (output / name).unlink()
            removed.append(name)
    if (output / "checkpoints").is_dir():
        shutil.rmtree(output / "checkpoints")
        removed.append("checkpoints/")
    return removed
