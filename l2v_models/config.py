"""Model configuration: a Hugging Face config.json -> the few numbers the l2v model needs.

`ModelConfig.from_hf_config` accepts a config dict (config.json as written by transformers 4.x or
5.x) or a transformers config object. The family is looked up in the architecture registry
(l2v_models.architectures) by `model_type`; its spec supplies the layer variant. Anything the l2v
model would compute differently from Hugging Face (unknown families, RoPE scalings, biases where
the family has none, other activations, ...) is refused with an error naming the feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from l2v_models.architectures import REGISTRY, ArchSpec, spec_for_model_type

SUPPORTED_ARCHS = tuple(REGISTRY)
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Hugging Face activation names l2v's gated MLP computes, by their kernel name.
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ModelConfig:
    """What the l2v Transformer needs to know about a checkpoint (any registered family)."""

    arch: str  # the family: a key of l2v_models.architectures.REGISTRY
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else {"rope_type": "llama3", factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings} or {"rope_type": "linear", factor}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias (o_proj does not)
    # Mistral / Qwen2 / Qwen3 sliding window: l2v attends over whole texts (as llm2vec's
    # bidirectional models do within it), so texts longer than this are refused.
    sliding_window: int | None = None
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1.0 for Gemma
    embed_scale: float | None = None  # embeddings times this, rounded to the dtype (Gemma)
    sandwich_norms: bool = False  # Gemma-2/3: norms after attention and after the MLP too
    qk_norm: bool = False  # Gemma-3, Qwen3: per-head RMSNorm of q and k before RoPE
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma-2: scores -> softcap * tanh(scores / softcap)
    # Gemma-2/3 local layers: the configured sliding window W (see ops.attention_window: a
    # bidirectional query sees |i - j| <= W // 2, as transformers' bidirectional Gemma-3).
    local_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full" or "local"; () = all full
    local_rope_theta: float | None = None  # Gemma-3: RoPE base of the local layers
    causal: bool = False  # causal attention (llm2vec's Qwen2 encodes causally)
    # Bidirectional local layers: a query sees keys with |i - j| <= this (None: W // 2, the rule
    # of transformers' Gemma-3 with use_bidirectional_attention; W where a config's
    # `is_causal: false` makes transformers build a bidirectional sliding-window mask).
    local_reach: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def spec(self) -> ArchSpec:
        return REGISTRY[self.arch]

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def layer_is_local(self, i: int) -> bool:
        return bool(self.layer_types) and self.layer_types[i] == "local"

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelConfig:
        """Build from a config.json dict or a transformers PretrainedConfig (4.4x or 5.x).

        Raises ValueError naming the unsupported architecture or feature.
        """
        d = _as_dict(cfg)
        arch = d.get("model_type")
        spec = spec_for_model_type(arch)

        def need(key: str):
            if d.get(key) is None:
                raise ValueError(f"{arch} config is missing {key!r}")
            return d[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if spec.family == "qwen3":  # transformers' Qwen3 never derives it from hidden / heads
            head_dim = int(need("head_dim"))
        else:
            head_dim = int(d.get("head_dim") or hidden // heads)
        if heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}"
            )
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        if d.get("mlp_bias"):
            raise ValueError(f"unsupported config feature mlp_bias=True ({arch})")
        if not spec.qkv_bias and d.get("attention_bias"):
            raise ValueError(f"unsupported config feature attention_bias=True ({arch})")
        if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise ValueError(
                f"unsupported config feature partial_rotary_factor={d['partial_rotary_factor']}"
            )
        fields = dict(
            arch=spec.family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
            qkv_bias=spec.qkv_bias,
            hidden_act=_activation(d, spec),
            norm_offset=spec.norm_offset,
            embed_scale=math.sqrt(hidden) if spec.embed_scale else None,
            sandwich_norms=spec.sandwich_norms,
            qk_norm=spec.qk_norm,
        )
        if spec.family in ("gemma2", "gemma3"):
            fields.update(_gemma_local_layers(d, spec.family))
        else:
            fields["rope_theta"], fields["rope_scaling"] = _rope(d)
            fields["sliding_window"] = _whole_text_window(d, spec.family)
        return cls(**fields)

    def inv_freq(self, device: torch.device | str | None = None, *, local: bool = False):
        """RoPE inverse frequencies, fp32 [head_dim/2], computed exactly as transformers does
        (`_compute_default_rope_parameters`, `_compute_llama3_parameters`, linear scaling).
        local=True: those of the local layers (Gemma-3's own base, no scaling)."""
        dim = self.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        theta = self.local_rope_theta if local and self.local_rope_theta else self.rope_theta
        inv_freq = 1.0 / (theta ** (exponent / dim))
        s = None if local else self.rope_scaling
        if s is None:
            return inv_freq
        if s["rope_type"] == "linear":
            return inv_freq / s["factor"]
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


def _activation(d: dict[str, Any], spec: ArchSpec) -> str:
    """The gated MLP's activation, as the family's Hugging Face MLP picks it."""
    if spec.act == "gelu_tanh":
        # Gemma's MLPs use `hidden_activation` (gelu_pytorch_tanh when unset); an old `hidden_act`
        # "gelu" is ignored by transformers for them.
        name = d.get("hidden_activation") or "gelu_pytorch_tanh"
        key = "hidden_activation"
    else:
        name = d.get("hidden_act", "silu")
        key = "hidden_act"
    if _ACTIVATIONS.get(name) != spec.act:
        raise ValueError(
            f"unsupported {key}={name!r} for {spec.family}: l2v implements {spec.act!r}"
        )
    return spec.act


def _whole_text_window(d: dict[str, Any], family: str) -> int | None:
    """The sliding window W texts must fit in (None: no window). A text of at most W tokens
    sees all of itself in a windowed layer too, so l2v's whole-text attention is exact there."""
    sliding = None
    if family == "mistral":
        sliding = d.get("sliding_window")
    elif family == "qwen2" and d.get("use_sliding_window"):
        sliding = d.get("sliding_window")
    elif family == "qwen3":
        return _qwen3_window(d)
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and sliding is None:
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))} without a window")
    return int(sliding) if sliding is not None else None


def _qwen3_window(d: dict[str, Any]) -> int | None:
    """Qwen3, as transformers' Qwen3Config reads it: without use_sliding_window every layer is
    full (sliding_window and max_window_layers are ignored; an explicit layer_types must then be
    all full_attention). With it, the layers listed as sliding_attention in layer_types (or, when
    absent, those from max_window_layers on) attend within sliding_window: W when any layer
    does."""
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is not None and (
        len(types) != n or any(t not in ("full_attention", "sliding_attention") for t in types)
    ):
        raise ValueError(f"unsupported layer_types {types!r} for qwen3 ({n} layers)")
    if not d.get("use_sliding_window"):
        if types is not None and "sliding_attention" in types:
            raise ValueError(
                "unsupported qwen3 config: layer_types has sliding_attention layers but "
                "use_sliding_window is false, so no window is configured for them"
            )
        return None
    window = d.get("sliding_window")
    if window is None:
        raise ValueError("qwen3 config has use_sliding_window=true but no sliding_window")
    if types is None:
        first = d.get("max_window_layers")
        sliding = (28 if first is None else int(first)) < n  # 28: Qwen3Config's default
    else:
        sliding = "sliding_attention" in types
    return int(window) if sliding else None


def _gemma_local_layers(d: dict[str, Any], family: str) -> dict[str, Any]:
    """Gemma-2/3: local/global layer pattern, window, softmax scale, soft-capping, RoPE bases."""
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:  # configs older than layer_types
        if family == "gemma2":  # even layers local
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        else:  # every `sliding_window_pattern`-th layer global
            pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
            types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(n)
            ]
    if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise ValueError(f"unsupported layer_types {types!r} for {family}")
    window = d.get("sliding_window")
    if window is None and "sliding_attention" in types:
        raise ValueError(f"{family} config has local layers but no sliding_window")
    scalar = d.get("query_pre_attn_scalar")
    softcap = d.get("attn_logit_softcapping") if family == "gemma2" else None
    out: dict[str, Any] = dict(
        local_window=int(window) if window is not None else None,
        layer_types=tuple("local" if t == "sliding_attention" else "full" for t in types),
        attn_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=float(softcap) if softcap else None,
    )
    params = d.get("rope_parameters")
    if family == "gemma3" and isinstance(params, dict) and "full_attention" in params:
        # transformers 5: one RoPE parameter set per layer type
        full = {"rope_parameters": params["full_attention"]}
        out["rope_theta"], out["rope_scaling"] = _rope(full)
        local_theta, local_scaling = _rope({"rope_parameters": params.get("sliding_attention")})
        if local_scaling is not None:
            raise ValueError("unsupported config feature: RoPE scaling on Gemma-3 local layers")
        out["local_rope_theta"] = local_theta
        return out
    out["rope_theta"], out["rope_scaling"] = _rope(d)
    if family == "gemma3":  # transformers 4.5x: rope_local_base_freq
        out["local_rope_theta"] = float(d.get("rope_local_base_freq") or 10000.0)
    return out


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from either spelling:
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
    if rope_type == "linear":
        if scaling.get("factor") is None:
            raise ValueError("linear RoPE scaling is missing 'factor'")
        return float(theta), {"rope_type": "linear", "factor": float(scaling["factor"])}
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if "original_max_position_embeddings" in missing and d.get("max_position_embeddings"):
        # transformers 5 falls back to max_position_embeddings here, as do we.
        scaling["original_max_position_embeddings"] = d["max_position_embeddings"]
        missing.remove("original_max_position_embeddings")
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {missing}")
    return float(theta), {"rope_type": "llama3", **{k: float(scaling[k]) for k in _LLAMA3_KEYS}}
