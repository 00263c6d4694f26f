"""Hugging Face transformers models made bidirectional, the way llm2vec's LlamaBiModel is.

Used by the tests (the reference our model must match) and by the end-to-end benchmark
baseline. llm2vec subclasses LlamaModel / MistralModel / Qwen2Model to (1) set `is_causal = False`
on every attention module and (2) build the attention mask from the padding mask alone. Here the
same is done to a stock model without subclassing, so it works across transformers versions:

- every attention module gets `is_causal = False` (SDPA without a mask, flash-attention);
- forward is wrapped so a 2D padding mask [B, L] becomes a 4D additive mask [B, 1, L, L]: 0 for
  real keys, the dtype's minimum for padded keys, the same for every query row. A 4D mask is
  passed through unchanged by transformers 5.x (masking_utils: "already prepared") and by 4.4x
  (`_update_causal_mask`), so no causal mask is ever built. Always passing a mask also keeps
  4.4x's SDPA path from choosing is_causal=True.

Positions are left as transformers makes them (0..L-1 over the padded row), as in llm2vec; with
left padding the real tokens then start at a later position, which RoPE (relative) turns into
the same result up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] padding mask (1 = real token) -> additive [B, 1, L, L]: 0 or finfo(dtype).min."""
    B, L = attention_mask.shape
    blocked = attention_mask[:, None, None, :].eq(0).expand(B, 1, L, L)
    mask = torch.zeros((B, 1, L, L), dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)


def hf_bidirectional(model):
    """Make a transformers Llama/Mistral/Qwen2 *Model* (or *ForCausalLM) bidirectional, in place.

    After this, model(input_ids, attention_mask=[B, L] padding mask) lets every token attend to
    every non-pad token of its row. Works with attn_implementation "sdpa" and "eager".
    Returns the model.
    """
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
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

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if attention_mask.dim() == 2:
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
    attn_implementation: str = "sdpa",
):
    """A bidirectional transformers *Model* (LlamaModel etc., no lm_head) from a config and
    optionally a state dict in *Model* names (e.g. l2v_models.loading.to_hf_state_dict(model));
    without one the weights are transformers' random init."""
    from transformers import AutoModel

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


@torch.no_grad()
def hf_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, hidden] of a bidirectional HF model on a padded batch."""
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
