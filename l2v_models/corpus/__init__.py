"""Corpus-scale embedding on Ray Data (`l2v encode-corpus`).

    from l2v_models.corpus import encode_corpus, embed_dataset, CorpusEmbedder

Importing this package is cheap (no Ray, no torch): names are imported from their modules on
first use. See l2v_models.corpus.runner for the contract.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CorpusEmbedder": "runner",
    "CorpusResult": "runner",
    "CorpusRunError": "runner",
    "embed_dataset": "runner",
    "encode_corpus": "runner",
    "verify_outputs": "runner",
    "CorpusInputError": "inputs",
    "Fields": "inputs",
    "scan_inputs": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"l2v_models.corpus.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'l2v_models.corpus' has no attribute {name!r}")
