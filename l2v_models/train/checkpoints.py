"""Resumable checkpoints: OUTPUT/checkpoints/step-N = the adapter (usable as is) + the config +
trainer_state.pt (step, LoRA matrices, optimizer, data position, world size).

    save_checkpoint(trainer, directory, batcher)            # rank 0 writes, once
    state = read_checkpoint(directory)                      # rank 0 reads; broadcast to the others
    notes = restore_checkpoint(trainer, state, batcher)     # what changes, if anything

Nothing random needs saving: every draw is derived from (seed, step, ...) (seeding), so a run
resumed on the same number of processes continues bit for bit. On another number of processes
the run continues from the same data position and schedule, but each step's batch is
world x the per-process batch, so it changes size; restore_checkpoint says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

CHECKPOINT_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"


def config_record(trainer) -> dict:
    """What must match for a resume to continue the same run."""
    record = asdict(trainer.config)
    record["lora_targets"] = list(record["lora_targets"])
    record["model"] = trainer.model_arg
    return record


def state_dict(trainer, batcher=None) -> dict:
    return {
        "step": trainer.step,
        "lora": trainer.adapters.peft_state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "data": json.dumps(batcher.state()) if batcher is not None else None,
        "world_size": trainer.dist.world,
    }


def save_checkpoint(trainer, directory, batcher=None) -> Path:
    """Write the checkpoint (the adapter first, the state last, each file replaced atomically:
    a directory without trainer_state.pt is incomplete and never resumed from)."""
    directory = Path(directory)
    trainer.save(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config_record(trainer), indent=2) + "\n")
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state_dict(trainer, batcher), tmp)
    tmp.replace(directory / CHECKPOINT_FILE)
    return directory


def read_checkpoint(directory) -> dict:
    """{"directory", "config", "state"} of a checkpoint folder."""
    directory = Path(directory)
    return {
        "directory": str(directory),
        "config": json.loads((directory / CONFIG_FILE).read_text()),
        "state": torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True),
    }


def restore_checkpoint(trainer, checkpoint: dict, batcher=None) -> list[str]:
    """Load a read_checkpoint() into the trainer (same settings required: ValueError naming
    the differences). Returns notes on what differs from the uninterrupted run (another world
    size), empty when it continues bit for bit."""
    directory = checkpoint["directory"]
    saved, mine = checkpoint["config"], config_record(trainer)
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        raise ValueError(
            f"cannot resume from {directory}: the run's settings differ in "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {mine.get(k)!r})" for k in diff)
            + "; resume with the same options, or start a new --output"
        )
    state = checkpoint["state"]
    trainer.adapters.load_peft_state_dict(state["lora"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.step = int(state["step"])
    if batcher is not None and state["data"] is not None:
        batcher.restore(json.loads(state["data"]))
    was, now = int(state.get("world_size", 1)), trainer.dist.world
    if was == now:
        return []
    c = trainer.config
    per = " and ".join(x for x in (f"{c.batch_size} examples" if c.batch_size else "",
                                   f"{c.batch_tokens} tokens" if c.batch_tokens else "") if x)
    return [f"{directory} was written by a run on {was} process(es); resuming on {now}: each "
            f"step now takes {now} x ({per}) instead of {was} x, so the steps from "
            f"{trainer.step + 1} on see other batches than the uninterrupted run (the data "
            "continues where it stopped, the learning-rate schedule too; dropout is drawn per "
            "process). Resume on the same number of processes to continue it bit for bit."]


def latest_checkpoint(output) -> Path | None:
    """The newest output/checkpoints/step-N with a complete trainer state, or None."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / CHECKPOINT_FILE).is_file())
    return done[-1] if done else None
