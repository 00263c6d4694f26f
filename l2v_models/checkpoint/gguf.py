"""GGUF checkpoints: tensors dequantized one at a time, config and tokenizer via transformers.

The file is indexed by a minimal reader of the GGUF layout (header, metadata, tensor infos):
gguf.GGUFReader would first materialize every metadata array (a 262K-entry vocab), which takes
seconds. Tensors are dequantized by the `gguf` package (`gguf.quants.dequantize`: Q4_0/Q4_1,
Q5_0, Q8_0, the K-quants, ...) and renamed to Hugging Face names by the family's spec
(l2v_models.architectures), undoing what llama.cpp's converter changed: Llama's permuted q/k
rows, Gemma's norm weights stored as 1 + w. transformers reads the config and tokenizer
(`gguf_file=`); the result is cached, and a tokenizer that disagrees with the file's own
metadata (a BOS token added or dropped) is refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch

from l2v_models.architectures import GGUF_TOP, spec_for_gguf
from l2v_models.checkpoint.hub import cache_dir
from l2v_models.checkpoint.sources import CheckpointError, _reason, _Source
from l2v_models.config import ModelConfig

logger = logging.getLogger(__name__)


class _GGUFSource(_Source):
    """Dequantizes GGUF tensors one at a time (gguf.quants.dequantize) under HF names.

    The file is indexed by a minimal reader of the GGUF layout (header, metadata, tensor infos):
    gguf.GGUFReader would first materialize every metadata array (the 49K-entry vocab and
    merges), which takes seconds. llama.cpp stores Llama's q/k rows permuted for its interleaved
    RoPE; they are permuted back here."""

    def __init__(self, path: Path, config: ModelConfig):
        import mmap

        self.config = config
        self.where = str(path)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError(f"{path} is empty: download or copy the GGUF file again")
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        arch, tensors = _read_gguf_index(self.buffer, path)
        try:
            self.spec = spec_for_gguf(arch)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        self.index: dict[str, tuple[int, tuple[int, ...], int, int]] = {}
        for gguf_name, info in tensors.items():
            name = self._hf_name(gguf_name)
            if name is None:
                raise ValueError(f"{path}: unexpected GGUF tensor {gguf_name!r}")
            if name != "lm_head.weight":
                self.index[name] = info

    def _hf_name(self, name: str) -> str | None:
        if name in GGUF_TOP:
            return GGUF_TOP[name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in self.spec.gguf_layer_keys:
            return f"layers.{m.group(1)}.{self.spec.gguf_layer_keys[m.group(2)]}"
        return None

    def keys(self):
        return self.index.keys()

    def get(self, name):
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

        qtype, dims, offset, n_bytes = self.index[name]
        qtype = GGMLQuantizationType(qtype)
        shape = tuple(reversed(dims))  # GGUF lists dims fastest first
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block_size * type_size
        raw = np.frombuffer(self.buffer, dtype=np.uint8, count=n_bytes, offset=offset)
        values = dequantize(raw.reshape(-1, row_bytes), qtype)
        if np.shares_memory(values, raw):  # F32 tensors come back as views of the read-only map
            values = values.copy()
        w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        if self.spec.gguf_norm_plus_one and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w); HF and l2v keep w
        if self.spec.gguf_permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
            # llama.cpp rows are (head, pair index i, j in {0,1}); HF rows are (head, j, i).
            half = self.config.head_dim // 2
            w = w.reshape(heads, half, 2, -1).transpose(1, 2).reshape(shape)
        return w


def _read_gguf_index(
    buf, path, meta_out: dict | None = None
) -> tuple[str, dict[str, tuple[int, tuple[int, ...], int, int]]]:
    """_parse_gguf_index; CheckpointError naming the file when its header is cut short."""
    import struct

    try:
        return _parse_gguf_index(buf, path, meta_out)
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: the GGUF header is truncated or corrupt ({_reason(e)}); download or copy "
            "the file again"
        ) from None


def _parse_gguf_index(
    buf, path, meta_out: dict | None = None
) -> tuple[str, dict[str, tuple[int, tuple[int, ...], int, int]]]:
    """(architecture, {tensor name: (ggml type, dims, absolute byte offset, byte count)}) from a
    little-endian GGUF v2/v3 file: header, metadata key/values (skipped, except the architecture
    and alignment), tensor infos, then the aligned data section. meta_out, when given, receives
    every scalar and string metadata value (arrays are skipped)."""
    import struct

    from gguf import GGML_QUANT_SIZES

    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
              12: "d"}  # fmt: skip

    def value(vtype: int):
        nonlocal pos
        if vtype in scalar:
            return take(scalar[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:  # array: element type, count, elements (strings skipped one by one)
            etype, count = take("I"), take("Q")
            if etype in scalar:
                pos += count * struct.calcsize(scalar[etype])
            else:
                for _ in range(count):
                    value(etype)
            return None
        raise CheckpointError(
            f"{path}: corrupt GGUF metadata (value type {vtype}); download or copy it again"
        )

    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file "
            "or a Hugging Face model directory"
        )
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2, 3)")
    meta = {}
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key in ("general.architecture", "general.alignment"):
            meta[key] = v
        if meta_out is not None and v is not None:
            meta_out[key] = v
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, take("I"), dims, take("Q")))
    alignment = int(meta.get("general.alignment") or 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, qtype, dims, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has an unknown GGML type {qtype}; the file is corrupt or "
                "newer than the installed gguf package (pip install -U gguf)"
            )
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = math.prod(dims) // block_size * type_size
        if data_start + offset + n_bytes > len(buf):
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + offset + n_bytes}"
                f" but the file has {len(buf)} bytes; download or copy it again"
            )
        tensors[name] = (qtype, dims, data_start + offset, n_bytes)
    return str(meta.get("general.architecture")), tensors


# transformers reads a GGUF's config and tokenizer (l2v reads and dequantizes the weights itself).
# For the embedded SmolLM2 (tokenizer.ggml.model gpt2, pre smollm, add_bos_token false, eos/pad
# <|im_end|>), transformers 4.x up to 5.5 builds a tokenizer that prepends <|im_start|> as BOS to
# every text, which changes every embedding; 5.6-5.17 tokenize right but name <|im_start|> as eos
# (fixed up below from the GGUF's ids). Measured on 4.44.2, 4.45.2, 4.5x, 5.0-5.23.
GGUF_MIN_TRANSFORMERS = (5, 6)


def gguf_support_error(what: str = "a GGUF model") -> str | None:
    """Why the installed transformers cannot read a GGUF's tokenizer faithfully, or None."""
    import transformers

    from l2v_models.hf_compat import transformers_version

    if transformers_version() >= GGUF_MIN_TRANSFORMERS:
        return None
    return (
        f"{what} needs transformers >= {'.'.join(map(str, GGUF_MIN_TRANSFORMERS))} to read its "
        f"tokenizer (installed: {transformers.__version__}, whose GGUF conversion prepends a BOS "
        "token the model does not use). Upgrade (pip install -U transformers gguf), or pass a "
        "Hugging Face model directory: those work with transformers >= 4.44"
    )


def _gguf_token_metadata(gguf: Path) -> dict:
    """The GGUF's scalar metadata (tokenizer.ggml.add_bos_token, *_token_id, ...)."""
    import mmap

    meta: dict = {}
    with open(gguf, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(f"{gguf} is empty: download or copy the GGUF file again")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _read_gguf_index(buf, gguf, meta_out=meta)
    return meta


def _check_gguf_tokenizer(tokenizer, meta: dict, gguf: Path) -> None:
    """Check transformers' GGUF tokenizer against the file's own metadata: refuse one that adds
    (or drops) a BOS token against tokenizer.ggml.add_bos_token; set eos/pad tokens from the
    file's ids where transformers named others (they decide no token, only llm2vec's pad)."""
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and bos_id is not None:
        ids = tokenizer("a")["input_ids"]
        if bool(ids and ids[0] == bos_id) != bool(add_bos):
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__} reads the tokenizer of {gguf} "
                f"unfaithfully (BOS token {'not ' if add_bos else ''}prepended, but the file says "
                f"add_bos_token={bool(add_bos)}); use transformers >= "
                f"{'.'.join(map(str, GGUF_MIN_TRANSFORMERS))} or a Hugging Face model directory"
            )
    for attr, key in (("eos_token", "eos"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and getattr(tokenizer, f"{attr}_id", None) != token_id:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))


def _gguf_config_and_tokenizer(gguf: Path):
    """transformers' config and tokenizer for a GGUF file (AutoConfig / AutoTokenizer with
    gguf_file=, as transformers reads GGUF). Converting them takes seconds (the whole vocab is
    parsed and a fast tokenizer built), so the result is saved with save_pretrained in the cache
    dir, keyed by the file, its size and mtime and the transformers version, and reloaded from
    there next time."""
    import hashlib
    import shutil
    import tempfile

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    meta = _gguf_token_metadata(gguf)  # reads the header first: a damaged file is named here
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    cached = cache_dir() / "gguf" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        try:
            hf_config = AutoConfig.from_pretrained(cached)
            tokenizer = AutoTokenizer.from_pretrained(cached)
            _check_gguf_tokenizer(tokenizer, meta, gguf)
            return hf_config, tokenizer
        except RuntimeError:
            raise
        except Exception as e:  # a damaged cache entry: rebuild it
            logger.debug("l2v: ignoring the cached GGUF config/tokenizer in %s (%s)", cached, e)
    try:
        hf_config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise CheckpointError(
            f"{gguf}: transformers cannot read its config or tokenizer ({_reason(e)}); the file "
            "is damaged or of an unsupported kind: download it again, or pass a Hugging Face "
            "model directory"
        ) from None
    _check_gguf_tokenizer(tokenizer, meta, gguf)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees all or nothing
    except OSError as e:  # read-only home, full disk: caching is only an optimization
        logger.debug("l2v: could not cache the GGUF config/tokenizer in %s (%s)", cached, e)
    return hf_config, tokenizer

