"""Checkpoint sources: a model's tensors by Hugging Face name, one CPU tensor at a time.

Safetensors files are memory-mapped and read tensor by tensor; `.bin` files are read with
`torch.load(weights_only=True)` only (l2v never unpickles code: a pickle payload is refused with
advice to convert to safetensors). Every read error is a CheckpointError naming the file and
saying what to do. GGUF files have their own source (l2v_models.checkpoint.gguf).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A model file l2v cannot read (truncated, corrupt, unsafe, not the expected format). The
    message names the file and says what to do; the CLI prints it as one line."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _reason(e: BaseException) -> str:
    """An exception's message for embedding in ours: ANSI escapes removed, first line only."""
    text = _ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file when it is not one."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "the file is damaged or truncated: download it again or fix it"
        ) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: {what} is not UTF-8 text (byte {e.start}); the file is damaged: download "
            "it again"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: {what} must hold a JSON object, got a {type(data).__name__}; download the "
            "file again or fix it"
        )
    return data


def _safe_open(path: Path):
    """safetensors' lazy (mmapped) reader of one file; CheckpointError naming a bad file."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (no public base class), OSError
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_reason(e)}); it is probably truncated "
            "or corrupt (an interrupted download or copy): download or copy it again"
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one (small) safetensors file; CheckpointError naming a bad file."""
    handle = _safe_open(path)
    try:
        return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read its tensors ({_reason(e)}); the file is corrupt: download or "
            "copy it again"
        ) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict of tensors only (weights_only=True: l2v never unpickles code).

    CheckpointError naming the file when it holds anything else (a pickle payload: refused, with
    advice to convert to safetensors) or is truncated / corrupt."""
    import pickle

    try:
        try:  # mmap keeps host memory at the page cache, not a second copy
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mmapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: not ours
        # torch's weights-only unpickler names the Python object it refused ("GLOBAL x.y");
        # any other unpickling error is a damaged file.
        found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(e)))
        if found is None:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (its pickle stream is invalid); it "
                "is probably truncated or corrupt: download or copy it again (or use safetensors "
                "weights)"
            ) from None
        raise CheckpointError(
            f"{path}: refused: this .bin file holds Python objects other than tensors (it "
            f"references {found.group(1)}), and unpickling them could run code, so l2v loads "
            "tensors only. Use the model's "
            "safetensors weights instead, or convert this file to safetensors where you trust "
            "it (transformers: save_pretrained(dir, safe_serialization=True))"
        ) from None
    except Exception as e:  # truncated zip, unexpected EOF, garbage
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_reason(e)}); it is probably "
            "truncated or corrupt: download or copy it again (or use safetensors weights)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (names -> tensors), got a {type(state).__name__}; "
            "save the weights with model.save_pretrained(dir)"
        )
    return state


def _canonical(key: str) -> str | None:
    """Checkpoint key -> HF *Model* name, or None for keys l2v ignores (lm_head, rope buffers)."""
    if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
        return None
    return key[len("model.") :] if key.startswith("model.") else key


class _Source:
    """A checkpoint's tensors by canonical HF name; get() returns one CPU tensor at a time."""

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class _DictSource(_Source):
    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.tensors = {}
        for k, v in state_dict.items():
            if (c := _canonical(k)) is not None:
                self.tensors[c] = v

    def keys(self):
        return self.tensors.keys()

    def get(self, name):
        return self.tensors[name]


class _SafetensorsSource(_Source):
    def __init__(self, files: list[Path]):
        self.where = str(files[0].parent) if files else "checkpoint"
        self.index: dict[str, tuple[Any, str, Path]] = {}
        for f in files:
            handle = _safe_open(f)  # mmap; reads on get
            for key in handle.keys():
                if (c := _canonical(key)) is not None:
                    self.index[c] = (handle, key, f)

    def keys(self):
        return self.index.keys()

    def get(self, name):
        handle, key, path = self.index[name]
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot read tensor {key!r} ({_reason(e)}); the file is corrupt: "
                "download or copy it again"
            ) from None


class _BinSource(_Source):
    def __init__(self, files: list[Path]):
        self.where = str(files[0].parent) if files else "checkpoint"
        self.index: dict[str, tuple[dict, str]] = {}
        for f in files:
            shard = _load_bin(f)
            for key in shard:
                if (c := _canonical(key)) is not None:
                    self.index[c] = (shard, key)

    def keys(self):
        return self.index.keys()

    def get(self, name):
        shard, key = self.index[name]
        return shard[key]


def _checkpoint_files(directory: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) for a HF model dir, preferring safetensors."""
    for fmt, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            weight_map = _load_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(
                    f'{index} has no "weight_map" object; download the index file again'
                )
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
            return fmt, files
        if (directory / single).is_file():
            return fmt, [directory / single]
    raise FileNotFoundError(
        f"no weights found in {directory}: expected model.safetensors, "
        "model.safetensors.index.json + shards, pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _open_checkpoint(directory: Path) -> _Source:
    fmt, files = _checkpoint_files(directory)
    return _SafetensorsSource(files) if fmt == "safetensors" else _BinSource(files)

