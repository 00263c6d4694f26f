"""Hugging Face transformers models made bidirectional: the reference l2v's model must match.

Used by the tests and by the end-to-end benchmark's baseline. llm2vec subclasses LlamaModel /
MistralModel / GemmaModel / Qwen2Model to (1) set `is_causal = False` on every attention module
and (2) build the attention mask from the padding mask alone. Here the same is done to a stock
model without subclassing, so it works across transformers versions:

- every attention module gets `is_causal = False` (SDPA without a mask, flash-attention);
- forward is wrapped so a 2D padding mask [B, L] becomes a 4D additive mask [B, 1, L, L]: 0 for
  real keys, the dtype's minimum for padded keys, the same for every query row. A 4D mask is
  passed through unchanged by transformers 5.x (masking_utils: "already prepared") and by 4.4x
  (`_update_causal_mask`), so no causal mask is ever built. Always passing a mask also keeps
  4.4x's SDPA path from choosing is_causal=True.
- Qwen3 (which llm2vec lacks) is made bidirectional the same way as Llama; the causal
  reference is the stock model.
- Gemma-2 (local and global layers): the wrapper passes transformers 5's per-layer-type mask
  dict, the local layers' mask also limited to |i - j| <= sliding_window // 2 (the rule
  transformers applies to Gemma-3 with use_bidirectional_attention=True).
- Gemma-3: transformers' own `use_bidirectional_attention=True` (what EmbeddingGemma uses; the
  config halves its window then, see build_hf_model); the padding mask is passed as is and
  transformers builds the masks.

Positions are left as transformers makes them (0..L-1 over the padded row), as in llm2vec; with
left padding the real tokens then start at a later position, which RoPE (relative) turns into
the same result up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Gemma-2's soft-capping runs only in transformers' eager attention (SDPA drops it).
_EAGER_ONLY = ("gemma2",)


def bidirectional_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """[B, L] padding mask (1 = real token) -> additive [B, 1, L, L]: 0 or finfo(dtype).min.
    window: also block keys with |i - j| >= window (positions in the padded row)."""
    B, L = attention_mask.shape
    blocked = attention_mask[:, None, None, :].eq(0).expand(B, 1, L, L)
    if window is not None:
        pos = torch.arange(L, device=attention_mask.device)
        blocked = blocked | ((pos[:, None] - pos[None, :]).abs() >= window)
    mask = torch.zeros((B, 1, L, L), dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)


def hf_bidirectional(model):
    """Make a transformers *Model* (or *ForCausalLM) of a supported family bidirectional, in
    place (SUPPORTED_MODEL_TYPES; Gemma-3 must come from build_hf_model, see the module doc).

    After this, model(input_ids, attention_mask=[B, L] padding mask) lets every token attend to
    every non-pad token of its row (within the window on Gemma-2's local layers). Works with
    attn_implementation "sdpa" and "eager". Returns the model.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"hf_bidirectional supports {SUPPORTED_MODEL_TYPES}, got {config.model_type!r}"
        )
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            "hf_bidirectional needs attn_implementation 'sdpa' or 'eager' (a 4D mask), "
            f"got {impl!r}"
        )
    if getattr(model, "_l2v_bidirectional", False):
        return model
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False

    causal_forward = model.forward
    dtype = model.get_input_embeddings().weight.dtype
    if model_type == "gemma3_text":  # transformers' own bidirectional mode (build_hf_model)
        if not config.use_bidirectional_attention:
            raise ValueError(
                "a Gemma-3 reference must be built with use_bidirectional_attention=True (its "
                "window is converted when the config is created): use build_hf_model"
            )
        model._l2v_bidirectional = True
        return model

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if attention_mask.dim() == 2 and model_type == "gemma2":
            attention_mask = {
                "full_attention": bidirectional_mask(attention_mask, dtype),
                "sliding_attention": bidirectional_mask(
                    attention_mask, dtype, config.sliding_window // 2 + 1
                ),
            }
        elif attention_mask.dim() == 2:
            attention_mask = bidirectional_mask(attention_mask, dtype)
        return causal_forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            **kwargs,
        )  # fmt: skip

    model.forward = forward
    model._l2v_bidirectional = True
    return model


def build_hf_model(
    hf_config: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    attn_implementation: str | None = None,
):
    """A bidirectional transformers *Model* (LlamaModel etc., no lm_head) from a config and
    optionally a state dict in *Model* names (e.g. l2v_models.checkpoint.to_hf_state_dict(model));
    without one the weights are transformers' random init. attn_implementation: default
    "sdpa" ("eager" for Gemma-2, whose soft-capping SDPA ignores)."""
    from transformers import AutoModel

    if attn_implementation is None:
        attn_implementation = "eager" if hf_config.model_type in _EAGER_ONLY else "sdpa"
    if hf_config.model_type == "gemma3_text" and not hf_config.use_bidirectional_attention:
        # Rebuilt, not set: the config converts its window when the flag is given at creation,
        # and the attention modules fix is_causal when they are built.
        hf_config = type(hf_config).from_dict(
            {**hf_config.to_dict(), "use_bidirectional_attention": True}
        )
    with torch.device(device):
        model = AutoModel.from_config(
            hf_config, attn_implementation=attn_implementation, **dtype_kwargs(dtype)
        )
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(
            {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=False
        )
        unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval().requires_grad_(False)
    return hf_bidirectional(model)


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers, e.g. (4, 44) or (5, 23)."""
    import transformers

    major, minor = (transformers.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def dtype_kwargs(dtype) -> dict:
    """The dtype keyword of transformers' from_pretrained / from_config: transformers 5 calls
    it `dtype` (and deprecates `torch_dtype`); 4.4x only knows `torch_dtype` and passes an
    unknown `dtype` on to the model's __init__, which raises."""
    return {"dtype" if transformers_version() >= (5, 0) else "torch_dtype": dtype}
