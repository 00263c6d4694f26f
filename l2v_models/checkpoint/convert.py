"""Hugging Face weights -> l2v's fused state dict, and back.

`hf_key_map(config)` maps every Hugging Face *Model* weight name onto our names by the family's
spec (l2v_models.architectures): q/k/v rows fuse into wqkv (and bqkv), gate/up into w_gate_up.
`convert_weights` streams tensors from a source to the target device and dtype, merging LoRA
adapters in fp32 (l2v_kernels.gemm.lora_merge_) with one rounding; host memory peaks at about one
tensor. `to_hf_state_dict` is the inverse (views where possible): what `save` writes and what the
tests compare with transformers.
"""

from __future__ import annotations

import logging

import torch

from l2v_models.checkpoint.lora import LoraAdapter, _lora_merge_fn
from l2v_models.checkpoint.sources import _DictSource, _Source
from l2v_models.config import ModelConfig
from l2v_models.model import Transformer, layer_shapes, resolve_backend

logger = logging.getLogger(__name__)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


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


def convert_weights(
    config: ModelConfig,
    source: _Source,
    *,
    adapters: list[LoraAdapter] = (),
    dtype: torch.dtype,
    device: torch.device,
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
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    backend = resolve_backend(backend, device, config)
    state = convert_weights(
        config, _DictSource(state_dict), adapters=adapters, dtype=dtype, device=device
    )
    return Transformer.from_state_dict(config, state, backend)


def resolve_device(device) -> torch.device:
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


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
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

