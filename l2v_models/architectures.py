"""One spec per model family: everything l2v knows about an architecture, in one place.

A spec says how a Hugging Face config maps onto ModelConfig (l2v_models.config), which layer
variant the model runs (norms, activation, embedding scale, soft-capping, q/k norms, local
attention), the Hugging Face and GGUF weight names of a layer, and llm2vec's quirks for the
family. The model (l2v_models.model), the checkpoint loader (l2v_models.checkpoint), the GGUF
reader and the test reference (hf_compat) all read it from here.

Adding a family: one ArchSpec below (plus any kernel it newly needs); tests/test_architectures.py
enumerates REGISTRY, so a family missing any part fails there. docs/architecture.md has the
walk-through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Our per-layer weight names (l2v_models.model.Layer), with the fused parts they hold.
#   attn_norm       input norm                       wqkv / bqkv   q, k, v rows (+ bias)
#   q_norm, k_norm  per-head norms (Gemma-3, Qwen3)  wo            attention output projection
#   post_attn_norm  norm of the attention output     mlp_norm      norm before the MLP
#   w_gate_up       gate, up rows                    w_down        MLP down projection
#   post_mlp_norm   norm of the MLP output (Gemma-2/3)

_ATTN = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("wqkv", "q"),
    "self_attn.k_proj.weight": ("wqkv", "k"),
    "self_attn.v_proj.weight": ("wqkv", "v"),
    "self_attn.o_proj.weight": ("wo", None),
}
_MLP = {
    "mlp.gate_proj.weight": ("w_gate_up", "gate"),
    "mlp.up_proj.weight": ("w_gate_up", "up"),
    "mlp.down_proj.weight": ("w_down", None),
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": ("bqkv", "q"),
    "self_attn.k_proj.bias": ("bqkv", "k"),
    "self_attn.v_proj.bias": ("bqkv", "v"),
}
# Llama-style: one norm before attention, one (HF "post_attention_layernorm") before the MLP.
_PRE_NORM = {"post_attention_layernorm.weight": ("mlp_norm", None)}
# Gemma-2/3 "sandwich": norms before and after both attention and MLP.
_SANDWICH = {
    "post_attention_layernorm.weight": ("post_attn_norm", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm", None),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", None),
}
_QK_NORM = {
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
}

# llama.cpp's names for the HF layer keys (GGUF "blk.N.<name>").
_GGUF_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_PRE_NORM = {"ffn_norm.weight": "post_attention_layernorm.weight"}
_GGUF_BIAS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_GGUF_SANDWICH = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_QK_NORM = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GGUF_TOP = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class ArchSpec:
    """What l2v knows about one family. Flags describe the layer the model runs."""

    family: str  # our name, also ModelConfig.arch
    model_types: tuple[str, ...]  # Hugging Face config model_type values read as this family
    layer_keys: dict[str, tuple[str, str | None]]  # HF layer key -> (our weight, fused part)
    gguf_layer_keys: dict[str, str] = field(default_factory=dict)  # GGUF blk key -> HF key
    gguf_archs: tuple[str, ...] = ()  # GGUF general.architecture values
    # llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE (undone on load).
    gguf_permute_qk: bool = False
    # llama.cpp stores Gemma norm weights as 1 + w (undone on load: HF keeps w).
    gguf_norm_plus_one: bool = False
    act: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  # RMSNorm weight is (norm_offset + w): 1.0 for Gemma
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the model dtype (Gemma)
    qkv_bias: bool = False
    sandwich_norms: bool = False  # Gemma-2/3: post-attention and post-MLP norms
    # Gemma-3, Qwen3: per-head RMSNorm of q and k (over head_dim, weight norm_offset + w) before
    # RoPE
    qk_norm: bool = False
    # llm2vec 0.2.3 encodes this family causally: its Qwen2BiModel never removes the causal mask
    # (its outputs equal the causal Qwen2's), so adapters trained with llm2vec learned causal
    # attention. l2v follows llm2vec unless told otherwise (LLM2Vec attention="bidirectional").
    llm2vec_causal: bool = False
    # llm2vec supports the family (its tokenization rules apply; a `-mntp` adapter may exist).
    llm2vec_family: bool = True
    # What llm2vec appends to a text in eos_token pooling mode. llm2vec picks it by the config
    # class (isinstance: tokenization.config_family), so a family llm2vec lacks gets none.
    llm2vec_eos_suffix: str = ""

    @property
    def weights(self) -> tuple[str, ...]:
        """Our per-layer weight names this family has, in a stable order."""
        return tuple(dict.fromkeys(ours for ours, _ in self.layer_keys.values()))


REGISTRY: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec(
            "llama", ("llama",), {**_ATTN, **_PRE_NORM, **_MLP},
            {**_GGUF_COMMON, **_GGUF_PRE_NORM}, gguf_archs=("llama",), gguf_permute_qk=True,
            llm2vec_eos_suffix=" </s>",
        ),
        ArchSpec(
            "mistral", ("mistral",), {**_ATTN, **_PRE_NORM, **_MLP},
            {**_GGUF_COMMON, **_GGUF_PRE_NORM}, llm2vec_eos_suffix=" </s>",
        ),
        ArchSpec(
            "qwen2", ("qwen2",), {**_ATTN, **_QKV_BIAS, **_PRE_NORM, **_MLP},
            {**_GGUF_COMMON, **_GGUF_BIAS, **_GGUF_PRE_NORM}, gguf_archs=("qwen2",),
            qkv_bias=True, llm2vec_causal=True, llm2vec_eos_suffix="<|endoftext|>",
        ),
        ArchSpec(
            "gemma", ("gemma",), {**_ATTN, **_PRE_NORM, **_MLP},
            {**_GGUF_COMMON, **_GGUF_PRE_NORM}, gguf_archs=("gemma",), gguf_norm_plus_one=True,
            act="gelu_tanh", norm_offset=1.0, embed_scale=True, llm2vec_eos_suffix="<eos>",
        ),
        ArchSpec(
            "gemma2", ("gemma2",), {**_ATTN, **_SANDWICH, **_MLP},
            {**_GGUF_COMMON, **_GGUF_SANDWICH}, gguf_archs=("gemma2",), gguf_norm_plus_one=True,
            act="gelu_tanh", norm_offset=1.0, embed_scale=True, sandwich_norms=True,
            llm2vec_family=False,
        ),
        ArchSpec(
            "gemma3", ("gemma3_text", "gemma3"), {**_ATTN, **_QK_NORM, **_SANDWICH, **_MLP},
            {**_GGUF_COMMON, **_GGUF_QK_NORM, **_GGUF_SANDWICH}, gguf_archs=("gemma3",),
            gguf_norm_plus_one=True, act="gelu_tanh", norm_offset=1.0, embed_scale=True,
            sandwich_norms=True, qk_norm=True, llm2vec_family=False,
        ),
        # Qwen3 (dense): Llama's layer plus per-head q/k RMSNorm (weight w, no offset) before
        # RoPE, no qkv bias, an explicit head_dim (num_heads * head_dim may differ from hidden).
        # llm2vec 0.2.3 has no Qwen3 (nor has the transformers 4.43-4.44 it pins), so there is no
        # llm2vec behaviour to reproduce: no eos_token suffix, and attention="llm2vec" is
        # bidirectional, the LLM2Vec recipe itself (llm2vec_causal only reproduces what its
        # Qwen2BiModel did to Qwen2 adapters).
        ArchSpec(
            "qwen3", ("qwen3",), {**_ATTN, **_QK_NORM, **_PRE_NORM, **_MLP},
            {**_GGUF_COMMON, **_GGUF_QK_NORM, **_GGUF_PRE_NORM}, gguf_archs=("qwen3",),
            qk_norm=True, llm2vec_family=False,
        ),
    )
}  # fmt: skip

SUPPORTED_MODEL_TYPES = tuple(t for spec in REGISTRY.values() for t in spec.model_types)


def spec_for_model_type(model_type: str | None) -> ArchSpec:
    """The spec reading this Hugging Face model_type; ValueError naming the supported ones."""
    for spec in REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"unsupported architecture model_type={model_type!r}; l2v supports "
        + ", ".join(SUPPORTED_MODEL_TYPES)
    )


def spec_for_gguf(arch: str) -> ArchSpec:
    """The spec reading a GGUF file whose general.architecture is `arch`."""
    for spec in REGISTRY.values():
        if arch in spec.gguf_archs:
            return spec
    supported = sorted(a for spec in REGISTRY.values() for a in spec.gguf_archs)
    raise ValueError(f"GGUF architecture {arch!r} is not supported ({', '.join(supported)})")
