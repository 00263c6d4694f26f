"""PEFT LoRA adapters: read, checked, and merged into weights in fp32 with one rounding.

An adapter is adapter_config.json + adapter_model.safetensors (or .bin) with PEFT's key names
(`base_model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...). Scale lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)), rank and alpha patterns. DoRA, adapter biases, modules_to_save and
targets other than the seven projections are refused with an error naming the feature.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2v_models.checkpoint.sources import _load_bin, _load_json, _load_safetensors

logger = logging.getLogger(__name__)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _lora_merge_fn():
    """l2v_kernels.gemm.lora_merge_ (the extension's kernel, or its torch path); on an install
    without triton, where that module cannot be imported, the same torch path directly."""
    try:
        from l2v_kernels.gemm import lora_merge_

        return lora_merge_
    except ImportError as e:
        from l2v_kernels.torch_paths import lora_merge_torch_

        logger.debug("l2v: merging LoRA in plain torch (%s)", e)
        return lora_merge_torch_
