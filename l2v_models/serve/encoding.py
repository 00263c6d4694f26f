"""Response bodies from float32 rows, without a Python float per element.

    body = embeddings_body(rows, "int8", model="l2v", usage={...})    # OpenAI /v1/embeddings
    body = json_rows(rows)                                              # TEI /embed: [[...], ...]

Output types (OpenAI's `encoding_format`, extended as vLLM's and Cohere's APIs are), each an
exact rule on the float32 row x (after "dimensions" and normalization):

- "float": the float32 values as JSON numbers (the shortest decimal that reads back as the same
  float32 with orjson; Python's repr of the value otherwise; both parse to the same float32).
- "base64": the row's bytes as little-endian float32, base64 (what the openai client decodes).
- "float16": each value rounded to the nearest IEEE float16 (ties to even; |x| above 65504 is
  refused, never sent as infinity), as JSON numbers.
- "int8": round(127 * x) (ties to even), clipped to [-127, 127], as JSON integers; needs unit
  rows ("normalize": true), so |x| <= 1 and the clip never bites.
- "uint8": round(127.5 * (x + 1)) (ties to even), clipped to [0, 255]; unit rows only.
- "ubinary": the sign bits (1 where x > 0), 8 per byte, the first feature in the most
  significant bit, the last byte padded with 0 bits: ceil(D / 8) integers in 0..255 (numpy's
  packbits; sentence-transformers' "ubinary").
- "binary": the same bytes minus 128, integers in -128..127 (sentence-transformers' "binary").

Serialization: orjson (the serve extra) writes numpy arrays straight from their buffers; without
it the standard json module is used (one Python object per element: slower, same values).
Base64 is encoded straight from the row's buffer.
"""

from __future__ import annotations

import base64
import json

import numpy as np

try:  # the serve extra's fast JSON encoder
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None

FORMATS = ("float", "base64", "float16", "int8", "uint8", "binary", "ubinary")
UNIT_ROW_FORMATS = ("int8", "uint8")  # defined on unit rows only
FLOAT16_MAX = 65504.0


class EncodingError(ValueError):
    """Rows that the requested output type cannot represent (the message says which)."""


def quantize(rows: np.ndarray, fmt: str) -> np.ndarray:
    """float32 rows [N, D] -> the array of output type `fmt` (see the module docstring):
    float32 for float/base64, float16, int8, uint8, or the packed bytes [N, ceil(D/8)]."""
    rows = np.asarray(rows, dtype=np.float32)
    if fmt in ("float", "base64"):
        return rows
    if fmt == "float16":
        big = np.abs(rows) > FLOAT16_MAX
        if big.any():
            i = int(np.flatnonzero(big.any(axis=1))[0])
            raise EncodingError(
                f"row {i} has values beyond float16's range (|x| > {FLOAT16_MAX:g}); ask for "
                '"float" or send "normalize": true'
            )
        return rows.astype(np.float16)
    if fmt == "int8":
        return np.clip(np.rint(rows * 127.0), -127, 127).astype(np.int8)
    if fmt == "uint8":
        return np.clip(np.rint((rows + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if fmt in ("binary", "ubinary"):
        packed = np.packbits(rows > 0, axis=1)  # big-endian bit order, zero-padded
        return (packed.astype(np.int16) - 128).astype(np.int8) if fmt == "binary" else packed
    raise ValueError(f"unknown output type {fmt!r}; one of {FORMATS}")


def dumps(obj) -> bytes:
    """JSON bytes of obj (dicts, lists, str, numbers, numpy arrays)."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot serialize {type(x).__name__}")


def embeddings_body(rows: np.ndarray, fmt: str, *, model: str, usage: dict) -> bytes:
    """OpenAI's /v1/embeddings response for rows float32 [N, D] in output type `fmt`."""
    values = quantize(rows, fmt)
    if fmt == "base64":
        little = values.astype("<f4", copy=False)
        emb = [base64.b64encode(memoryview(np.ascontiguousarray(r))).decode("ascii")
               for r in little]  # fmt: skip
    else:
        emb = list(values)  # numpy rows: orjson writes each from its buffer
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(emb)]
    return dumps({"object": "list", "data": data, "model": model, "usage": usage})


def json_rows(rows: np.ndarray) -> bytes:
    """[[...], ...]: float32 rows as JSON numbers (TEI's /embed)."""
    return dumps(np.ascontiguousarray(rows, dtype=np.float32))
