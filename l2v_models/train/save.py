"""Write a trained adapter as a PEFT LoRA folder in the layout of the McGill-NLP/LLM2Vec-* repos.

    DIR/adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, base model
    DIR/adapter_model.safetensors    base_model.model.layers.N.<module>.lora_A.weight [r, K]
                                     base_model.model.layers.N.<module>.lora_B.weight [N, r]
    DIR/llm2vec_config.json          the encoder settings (pooling_mode, max_length, ...)
    DIR/config.json, tokenizer*      MNTP only: the -mntp layout, so DIR can be the base model
                                     of the next stage (LLM2Vec.from_pretrained(DIR, peft=...))

Keys are those PEFT writes for an adapter on a bare *Model (llm2vec applies its adapters to
LlamaBiModel etc.), so PEFT's PeftModel.from_pretrained(AutoModel..., DIR), llm2vec and l2v's
checkpoint.read_lora_adapter all read them. Files are written to a temporary folder first and
moved in one by one, so a reader never sees a half-written weight file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLM2VEC_CONFIG = "llm2vec_config.json"


def adapter_config(adapters, base_model_name_or_path: str, lora_dropout: float) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (fields PEFT reads back)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": adapters.r,
        "lora_alpha": adapters.alpha,
        "lora_dropout": lora_dropout,
        "target_modules": sorted(adapters.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(output, adapters, *, base_model_name_or_path: str, lora_dropout: float = 0.0,
                 llm2vec_config: dict | None = None, mntp_layout=None) -> Path:  # fmt: skip
    """Write the adapter folder `output` (created; existing adapter files replaced).

    adapters: train.lora.LoraAdapters. mntp_layout: (Loaded, model argument) to also write
    the base's config.json and tokenizer files."""
    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=".save-"))
    try:
        save_file(adapters.peft_state_dict(), str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})  # fmt: skip
        config = adapter_config(adapters, base_model_name_or_path, lora_dropout)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if llm2vec_config is not None:
            (tmp / LLM2VEC_CONFIG).write_text(json.dumps(llm2vec_config, indent=2) + "\n")
        if mntp_layout is not None:
            _write_base_files(tmp, *mntp_layout)
        for f in sorted(tmp.iterdir()):
            os.replace(f, output / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _write_base_files(directory: Path, loaded, model_arg: str) -> None:
    """config.json (the base's own file when it is a directory, else transformers' config of
    the GGUF) and the tokenizer files."""
    base = Path(model_arg).expanduser()
    if base.is_dir() and (base / "config.json").is_file():
        shutil.copy(base / "config.json", directory / "config.json")
    else:
        loaded.hf_config.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
