"""l2v_models: the LLM2Vec encoder, the engine, the model (every registered family), checkpoints.

Importing this package is cheap and needs neither triton nor transformers: names are imported
from their modules on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM2Vec": "encoder",
    "Embedder": "embedder",
    "Engine": "engine",
    "TokenizedTexts": "packing",
    "PackedBatch": "packing",
    "ModelConfig": "config",
    "Transformer": "model",
    "Loaded": "checkpoint",
    "load_model": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"l2v_models.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'l2v_models' has no attribute {name!r}")
