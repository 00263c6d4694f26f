"""Models the benchmarks build: random Hugging Face weights of a shape, the transformers baseline
made bidirectional, and l2v's encoder over the same weights (bench/e2e.py, bench/serve.py and
bench/train.py share them)."""

from __future__ import annotations

import torch


def random_state_dict(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random weights in Hugging Face *ForCausalLM checkpoint names ("model.layers.0...."),
    made on the device. Linear and embedding weights ~ N(0, initializer_range) like a fresh HF
    model; norm weights 1 + N(0, 0.1) so that a missing norm weight shows up in the check."""
    g = torch.Generator(device=device).manual_seed(seed)
    std = float(cfg.get("initializer_range", 0.02))
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def weight(*shape):
        return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(h, generator=g, device=device)).to(dtype)

    sd = {"model.embed_tokens.weight": weight(cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd[p + "self_attn.q_proj.weight"] = weight(q, h)
        sd[p + "self_attn.k_proj.weight"] = weight(kv, h)
        sd[p + "self_attn.v_proj.weight"] = weight(kv, h)
        sd[p + "self_attn.o_proj.weight"] = weight(h, q)
        sd[p + "mlp.gate_proj.weight"] = weight(i, h)
        sd[p + "mlp.up_proj.weight"] = weight(i, h)
        sd[p + "mlp.down_proj.weight"] = weight(h, i)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    return sd


def hf_config_object(cfg: dict):
    """The transformers config object for a config.json dict (LlamaConfig, MistralConfig...)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model(cfg["model_type"], **fields)


def build_hf(cfg: dict, state: dict, dtype: torch.dtype, device: torch.device):
    """The baseline: transformers' Llama/MistralModel, bidirectional SDPA, our random weights."""
    from l2v_models.hf_compat import build_hf_model

    prefix = "model."
    hf_names = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return build_hf_model(
        hf_config_object(cfg), hf_names, dtype=dtype, device=device, attn_implementation="sdpa"
    )


def build_ours(cfg: dict, state: dict, dtype, device, backend: str, max_tokens: int | None):
    """Our encoder around a Transformer filled with the same weights (fused copies of them)."""
    from l2v_models.checkpoint import from_hf_state_dict
    from l2v_models.config import ModelConfig
    from l2v_models.encoder import LLM2Vec

    model = from_hf_state_dict(
        ModelConfig.from_hf_config(cfg), state, dtype=dtype, device=device, backend=backend
    )
    return LLM2Vec.from_model(model, max_tokens_per_batch=max_tokens)
