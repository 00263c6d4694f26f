"""`l2v train mntp | simcse | supervised`: the parser (argparse only at import) and the command.

    l2v train mntp --data wiki.txt --output out/mntp --steps 200 --batch-tokens 4096
    l2v train simcse --peft out/mntp --data sentences.txt --output out/simcse --max-length 32
    l2v train supervised --peft out/mntp --data triples.jsonl --output out/supervised
    l2v train simcse --nproc-per-node 4 ...                  # data parallel on this machine
    torchrun --nproc-per-node 8 -m l2v_models.train simcse ...   # the same, torchrun directly

Options left out take llm2vec's published settings for the stage (l2v_models.train.trainer).
With several processes every one runs this command: rank 0 checks the output folder, prints
and writes files, and its verdicts are shared so that every process stops on the same error.
"""

from __future__ import annotations

import argparse

from l2v_models.errors import UsageError

STAGE_HELP = {
    "mntp": "masked next-token prediction: the first LLM2Vec stage (plain text, JSONL or "
            "Parquet {\"text\"})",
    "simcse": "unsupervised SimCSE on top of an MNTP adapter (--peft): each sentence is its own "
              "positive under dropout (plain text, JSONL or Parquet {\"text\"})",
    "supervised": "contrastive (query, positive, hard negatives) training on top of an MNTP "
                  "adapter (--peft): JSONL or Parquet {\"query\", \"positive\", "
                  "\"negatives\"? (a list; or one \"negative\"), \"instruction\"?}",
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
        # The stage's option names, for re-serializing them to launched processes.
        dests = tuple(vars(p.parse_args(["--data", "-", "--output", "-"])))
        p.set_defaults(func=cmd_train, train_stage=stage, train_parser=p, train_dests=dests)
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
                   help="training files: .txt (one passage per line), .jsonl or .parquet")
    p.add_argument("--data-weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per --data file: each example is drawn from file i with "
                   "probability W_i / sum(W), every file in its own shuffled order (default: "
                   "the files are one pool, each example once per epoch)")  # fmt: skip
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the adapter folder")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    size = p.add_argument_group("batch size (default: llm2vec's, 32 / 128 / 64 examples; per "
                                "process: N processes train on N x this per step)")
    size.add_argument("--batch-size", type=int, default=None, metavar="N",
                      help="examples per step")  # fmt: skip
    size.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                      help="real tokens per step (all texts of the step; with --batch-size "
                      "both limits apply)")  # fmt: skip
    size.add_argument("--grad-cache-chunk", type=int, default=None, metavar="N",
                      help="run the forward and backward N examples at a time: contrastive "
                      "stages by GradCache (the loss and gradients of the whole batch, memory "
                      "of N examples), MNTP by accumulation")  # fmt: skip
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
        loss = p.add_argument_group("contrastive loss")
        scale = loss.add_mutually_exclusive_group()
        scale.add_argument("--scale", type=float, default=None,
                           help="similarity scale of the loss (default 20 SimCSE, 50 "
                           "supervised)")  # fmt: skip
        scale.add_argument("--temperature", type=float, default=None,
                           help="softmax temperature, 1 / --scale (default 0.05 SimCSE, 0.02 "
                           "supervised)")  # fmt: skip
        loss.add_argument("--symmetric", action="store_true",
                          help="add the document-to-query loss (each positive against every "
                          "query) and average the two directions")  # fmt: skip
        loss.add_argument("--keep-false-negatives", action="store_true",
                          help="keep in-batch candidates whose text equals the target's (by "
                          "default they leave the softmax: a duplicate is not a negative)")
        loss.add_argument("--false-negative-margin", type=float, default=None, metavar="M",
                          help="also drop candidates whose cosine similarity is above the "
                          "target's minus M (likely unlabelled positives)")  # fmt: skip
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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any; "
                   "with several processes each takes cuda:LOCAL_RANK)")  # fmt: skip
    par = p.add_argument_group("data parallel (torchrun)")
    par.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                     help="train on N processes of this machine (one per GPU), launched by "
                     "torchrun's launcher; across machines run torchrun -m l2v_models.train "
                     "yourself")  # fmt: skip
    par.add_argument("--fsdp", action="store_true",
                     help="shard the frozen base model over the processes (FSDP2) for bases "
                     "that do not fit one GPU; the LoRA matrices stay replicated (DDP)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: torch's, one per core); on a machine busy with "
                   "other work, 1 is often several times faster")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    """Run one stage: check the data, load the model, train, save; one-line errors. With
    --nproc-per-node N, launch N processes running this command instead."""
    from l2v_models.train.distributed import init_from_environment, launched_by_torchrun, shutdown

    if args.nproc_per_node is not None and not launched_by_torchrun():
        from l2v_models.train.launch import launch

        return launch(worker_argv(args), args.nproc_per_node, output=args.output,
                      threads=args.threads)  # fmt: skip
    try:
        d, device = init_from_environment(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        return _train(args, d, device)
    except UsageError:
        if d.active and not d.main:
            raise SystemExit(2) from None  # rank 0 prints it: one line, not one per process
        raise
    finally:
        shutdown()


def worker_argv(args) -> list[str]:
    """The stage's command line back from the parsed options (without --nproc-per-node): what
    every launched process runs after `python -m l2v_models.train`."""
    argv = [args.train_stage]
    for dest in args.train_dests:
        value = getattr(args, dest)
        if dest == "nproc_per_node" or value == args.train_parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")  # every option's long name is its dest so spelled
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _train(args, d, device) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from l2v_models.model_options import check_model_available
    from l2v_models.train.data import (
        DataError,
        DataIndex,
        evaluation_filter,
        refuse_evaluation_files,
    )
    from l2v_models.train.distributed import agree, broadcast_object
    from l2v_models.train.outputs import (
        LOG_FILE,
        SUMMARY_FILE,
        Replacement,
        check_output,
        truncate_log,
    )
    from l2v_models.train.trainer import (
        BosTokenError,
        TrainConfig,
        Trainer,
        load_for_training,
    )

    stage = args.train_stage
    output = Path(args.output)
    say = print if d.main else (lambda *a, **k: None)
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
        temperature=getattr(args, "temperature", None),
        symmetric=getattr(args, "symmetric", False),
        mask_false_negatives=not getattr(args, "keep_false_negatives", False),
        false_negative_margin=getattr(args, "false_negative_margin", None),
        grad_cache_chunk=args.grad_cache_chunk, fsdp=args.fsdp,
        mask_prob=getattr(args, "mask_prob", None), mask_policy=getattr(args, "mask_policy", None),
        mask_token=getattr(args, "mask_token", None),
    )  # fmt: skip
    problem, index = None, None
    try:
        config.resolved()  # option errors before the (slow) load
        if args.fsdp and not d.active:
            raise UsageError("--fsdp shards the model over several processes: run with "
                             "--nproc-per-node N (or under torchrun)")  # fmt: skip
        kind = "triplet" if stage == "supervised" else "text"
        refuse_evaluation_files(args.data)
        if args.data_weights is not None:
            from l2v_models.train.mixing import check_weights

            check_weights(args.data_weights, args.data)
        exclude = evaluation_filter() if args.exclude_eval else None
        index = DataIndex.scan(args.data, kind, exclude)  # data errors before the load, too
        checkpoint = None
        if d.main:  # the output folder is rank 0's (it may be on rank 0's machine only)
            checkpoint = check_output(output, resume=args.resume, overwrite=args.overwrite)
        check_model_available(args.model)
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
    except (DataError, UsageError, ValueError) as e:
        problem = str(e)
    problem = agree(problem, d)  # every process stops on the first one's problem
    if problem is not None:
        raise UsageError(problem)
    if index.excluded:
        say(f"--exclude-eval: dropped {index.excluded} examples with evaluation texts")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    first, *more = args.peft or [None]
    load_device = "cpu" if args.fsdp else (str(device) if device is not None else args.device)
    dtype = args.dtype
    if dtype is None and args.fsdp and device is not None and device.type == "cuda":
        dtype = "bfloat16"  # loaded on the CPU, trained on the GPU: the GPU's default dtype
    try:
        loaded = load_for_training(args.model, first, extra_peft=more, dtype=dtype,
                                   device=load_device, bos_token=args.bos_token)  # fmt: skip
    except BosTokenError as e:
        raise UsageError(str(e)) from None
    trainer = Trainer(loaded, config, model_arg=args.model, dist=d, device=device)
    batcher = trainer.batches(args.data, index=index, weights=args.data_weights)
    replacement = Replacement(output) if args.overwrite and d.main else None
    if args.resume:
        from l2v_models.train.checkpoints import read_checkpoint

        saved = broadcast_object(read_checkpoint(checkpoint) if d.main else None, d)
        for note in trainer.load_checkpoint(batcher=batcher, checkpoint=saved):
            say(f"l2v: note: {note}")
        if d.main:
            truncate_log(output / LOG_FILE, trainer.step)
        say(f"resuming from {saved['directory']} (step {trainer.step})")
    if replacement is not None:  # only now: a failed load leaves the earlier run as it was
        replacement.begin()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        history = trainer.fit(batcher, output=output, progress=not args.quiet)
    except BaseException as e:
        note = replacement.rollback() if replacement is not None else None
        if note is not None:
            print(f"l2v: note: {note}", file=sys.stderr)
        if isinstance(e, DataError):
            raise UsageError(str(e)) from None
        raise
    if replacement is not None and replacement.moved:
        replacement.commit()
        say(f"--overwrite: removed the earlier run from {output} ({len(replacement.moved)} "
            f"files: {' '.join(replacement.moved)})")
    train_s = time.perf_counter() - t1
    tokens = sum(h["tokens"] for h in history)
    last = history[-1]["loss"] if history else float("nan")
    summary = {"stage": stage, "steps": trainer.step, "final_loss": last, "tokens": tokens,
               "train_seconds": round(train_s, 2), "load_seconds": round(load_s, 2),
               "tokens_per_s": round(tokens / max(train_s, 1e-9), 1), "processes": d.world}
    if d.main:
        (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    say(f"trained {stage} for {trainer.step} steps ({tokens} tokens, "
        f"{summary['tokens_per_s']} tokens/s), final loss {last:.4f} -> {output}")
    return 0


def _is_mntp_folder(path) -> bool:
    """An LLM2Vec -mntp folder (what `l2v train mntp` writes): an adapter with config.json."""
    from pathlib import Path

    path = Path(path).expanduser()
    return (path / "adapter_config.json").is_file() and (path / "config.json").is_file()
