"""Model configuration: a Hugging Face config.json -> the few numbers the l2v model needs.

`ModelConfig.from_hf_config` accepts a config dict (config.json as written by transformers 4.x or
5.x) or a transformers config object, and refuses, with an error naming the feature, anything the
l2v model would compute differently from Hugging Face (other architectures, other RoPE scalings,
MLP/attention biases where the family has none, other activations, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
# Families llm2vec supports that l2v does not implement yet: say so instead of "unknown".
_LATER_ARCHS = {
    "gemma": "Gemma",
    "gemma2": "Gemma-2",
    "gemma3": "Gemma-3",
    "gemma3_text": "Gemma-3",
}
_SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """What the l2v Transformer needs to know about a Llama / Mistral / Qwen2 checkpoint."""

    arch: str  # "llama" | "mistral" | "qwen2" (the HF model_type)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE, else the llama3 parameters: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias (o_proj does not)
    sliding_window: int | None = None  # sequences longer than this are refused
    hidden_act: str = "silu"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelConfig:
        """Build from a config.json dict or a transformers PretrainedConfig (4.4x or 5.x).

        Raises ValueError naming the unsupported architecture or feature.
        """
        d = _as_dict(cfg)
        arch = d.get("model_type")
        if arch in _LATER_ARCHS:
            raise ValueError(
                f"{_LATER_ARCHS[arch]} models (model_type {arch!r}) are not supported by l2v yet: "
                "Gemma support comes later. Supported: " + ", ".join(SUPPORTED_ARCHS)
            )
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported architecture model_type={arch!r}; l2v supports "
                + ", ".join(SUPPORTED_ARCHS)
            )

        def need(key: str):
            if d.get(key) is None:
                raise ValueError(f"{arch} config is missing {key!r}")
            return d[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        if heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}"
            )
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act={act!r} for {arch}: l2v implements 'silu'")
        if d.get("mlp_bias"):
            raise ValueError(f"unsupported config feature mlp_bias=True ({arch})")
        if arch in ("llama", "mistral") and d.get("attention_bias"):
            raise ValueError(f"unsupported config feature attention_bias=True ({arch})")
        if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise ValueError(
                f"unsupported config feature partial_rotary_factor={d['partial_rotary_factor']}"
            )

        rope_theta, rope_scaling = _rope(d)
        max_pos = int(d.get("max_position_embeddings") or 4096)

        sliding = None
        if arch == "mistral":
            sliding = d.get("sliding_window")
        elif arch == "qwen2" and d.get("use_sliding_window"):
            sliding = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types) and sliding is None:
            raise ValueError(f"unsupported layer_types {sorted(set(layer_types))} without a window")

        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            qkv_bias=arch == "qwen2",
            sliding_window=int(sliding) if sliding is not None else None,
            hidden_act=act,
        )

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """RoPE inverse frequencies, fp32 [head_dim/2], computed exactly as transformers does
        (`_compute_default_rope_parameters`, `_compute_llama3_parameters`)."""
        dim = self.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        inv_freq = 1.0 / (self.rope_theta ** (exponent / dim))
        if self.rope_scaling is None:
            return inv_freq
        s = self.rope_scaling
        factor = s["factor"]
        low_freq_factor = s["low_freq_factor"]
        high_freq_factor = s["high_freq_factor"]
        old_context_len = s["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            "from_hf_config expects a config dict or a transformers config, "
            f"got {type(cfg).__name__}"
        )
    d = to_dict()
    # transformers 5 keeps rope parameters on the object; to_dict has them too, but be safe.
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        if key not in d and getattr(cfg, key, None) is not None:
            d[key] = getattr(cfg, key)
    return d


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None) from either spelling:
    transformers 4.4x: rope_theta + rope_scaling {"type"|"rope_type", ...};
    transformers 5.x: rope_parameters {"rope_theta", "rope_type", ...}."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"unsupported rope_parameters {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("unsupported config feature: per-layer-type rope_parameters")
    scaling = dict(params) if params else dict(d.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {rope_type!r}; l2v supports "
            + ", ".join(_SUPPORTED_ROPE_TYPES)
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"unsupported config feature partial_rotary_factor={scaling['partial_rotary_factor']}"
        )
    if rope_type == "default":
        return float(theta), None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if scaling.get(k) is None]
    if "original_max_position_embeddings" in missing and d.get("max_position_embeddings"):
        # transformers 5 falls back to max_position_embeddings here, as do we.
        scaling["original_max_position_embeddings"] = d["max_position_embeddings"]
        missing.remove("original_max_position_embeddings")
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {missing}")
    return float(theta), {k: float(scaling[k]) for k in keys}
