"""l2v train: LLM2Vec's recipe (MNTP, SimCSE, supervised contrastive) on l2v's model.

    from l2v_models.train import TrainConfig, Trainer, load_for_training

Modules: lora (unmerged LoRA on the fused weights + the LoraOps table), objectives (training
forward, MNTP masking and loss, contrastive losses), data (files -> validated index -> seeded
stream -> token-budget batches), parquet (Parquet files), mixing (files mixed by weight),
collate (a step's items -> this process's packed batches), step (one step's forward and
backward: gathered contrastive rows, GradCache), distributed (torchrun, DDP, FSDP2), seeding
(every random draw derived from the seed), checkpoints (resumable checkpoints), outputs (the
output folder's safety), loading (models for training), trainer (the Trainer API), save (PEFT
adapter folders), launch (`--nproc-per-node`), cli (`l2v train mntp|simcse|supervised`;
`python -m l2v_models.train` under torchrun). Names are imported on first use, so importing
this package (as the CLI does to build its parser) costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "load_for_training": "trainer",
    "latest_checkpoint": "trainer",
    "LoraAdapters": "lora",
    "LoraOps": "lora",
    "Example": "data",
    "DataError": "data",
    "DataIndex": "data",
    "save_adapter": "save",
    "StepBatch": "collate",
    "Dist": "distributed",
    "init_from_environment": "distributed",
    "MixedStream": "mixing",
    "RankLost": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"l2v_models.train.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'l2v_models.train' has no attribute {name!r}")
