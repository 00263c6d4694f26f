"""l2v train: LLM2Vec's recipe (MNTP, SimCSE, supervised contrastive) on l2v's model.

    from l2v_models.train import TrainConfig, Trainer, load_for_training

Modules: lora (unmerged LoRA on the fused weights + the LoraOps table), objectives (training
forward, MNTP masking and loss, contrastive losses), data (files -> validated index -> seeded
stream -> token-budget batches), trainer (the Trainer API), save (PEFT adapter folders), cli
(`l2v train mntp|simcse|supervised`). Names are imported on first use, so importing this
package (as the CLI does to build its parser) costs nothing.
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"l2v_models.train.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'l2v_models.train' has no attribute {name!r}")
