"""Checkpoints: where models come from, how their weights become l2v's, and load_model.

One module per job:
    sources   safetensors / .bin tensors by Hugging Face name (CheckpointError on bad files)
    gguf      GGUF tensors (dequantized), config and tokenizer
    lora      PEFT LoRA adapters, merged in fp32
    hub       local dirs, the hub, packaged models (smollm2, gemma3-270m) and encoders
              (smollm2-llm2vec), the cache dir
    convert   the Hugging Face key map (from the family's spec), conversion and its inverse
    load      load_model
"""

from l2v_models.checkpoint.convert import (
    convert_weights,
    from_hf_state_dict,
    hf_key_map,
    hf_shapes,
    resolve_device,
    resolve_dtype,
    to_hf_state_dict,
)
from l2v_models.checkpoint.gguf import GGUF_MIN_TRANSFORMERS, gguf_support_error
from l2v_models.checkpoint.hub import (
    BASE_MODEL,
    DEFAULT_MODEL,
    PACKAGED_ENCODERS,
    PACKAGED_MODELS,
    cache_dir,
    default_encoder_dirs,
    default_model_path,
    gemma3_model_path,
    model_label,
)
from l2v_models.checkpoint.load import ATTENTION_MODES, Loaded, attention_is_causal, load_model
from l2v_models.checkpoint.lora import LORA_TARGETS, LoraAdapter, read_lora_adapter
from l2v_models.checkpoint.sources import CheckpointError

__all__ = [
    "ATTENTION_MODES", "BASE_MODEL", "CheckpointError", "DEFAULT_MODEL", "GGUF_MIN_TRANSFORMERS",
    "LORA_TARGETS", "Loaded", "LoraAdapter", "PACKAGED_ENCODERS", "PACKAGED_MODELS",
    "attention_is_causal", "cache_dir", "convert_weights", "default_encoder_dirs",
    "default_model_path", "from_hf_state_dict", "gemma3_model_path", "gguf_support_error",
    "hf_key_map", "hf_shapes", "load_model", "model_label", "read_lora_adapter",
    "resolve_device", "resolve_dtype", "to_hf_state_dict",
]  # fmt: skip
