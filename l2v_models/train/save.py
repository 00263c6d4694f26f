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


# Files of an adapter folder that describe the encoder rather than the LoRA weights.
ENCODER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                 LLM2VEC_CONFIG)  # fmt: skip


def remove_adapter_files(output) -> list[str]:
    """Delete the files save_adapter / stack_adapters write from the folder `output` (the LoRA
    weights and config, and the encoder files of the -mntp layout), so a new adapter written
    there has no stale file beside it (an MNTP run's tokenizer next to a SimCSE adapter would
    make the folder look like an -mntp model). Other files stay. Returns the names removed."""
    output = Path(output)
    removed = []
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *ENCODER_FILES):
        if (output / name).is_file():
            (output / name).unlink()
            removed.append(name)
    return removed


def stack_adapters(sources, output, *, dtype=None) -> Path:
    """Write one LoRA adapter whose merge equals merging `sources` one after the other.

    A merged LoRA adds scale * B @ A to its weight, so a chain of adapters (e.g. SimCSE trained
    on top of MNTP, then a supervised stage on top of both) adds the sum of their deltas; that
    sum is one LoRA of rank sum(r_i): A = [A_1; A_2; ...] (rows), B = [s_1 B_1, s_2 B_2, ...]
    (columns), alpha = r (scale 1). Exact up to the rounding of `dtype` (default: the sources'
    own). Every source must adapt the same modules. The encoder files (config.json, tokenizer,
    llm2vec_config.json) are copied from the last source that has each; adapter_config.json
    keeps the first source's base_model_name_or_path. One source = a copy (e.g. to float16)."""
    import torch
    from safetensors.torch import save_file

    from l2v_models.checkpoint.lora import read_lora_adapter
    from l2v_models.checkpoint.sources import _load_json

    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("stack_adapters needs at least one adapter folder")
    adapters = [read_lora_adapter(s) for s in sources]
    modules = set(adapters[0].deltas)
    for a in adapters[1:]:
        if set(a.deltas) != modules:
            raise ValueError(f"{a.path} adapts other modules than {adapters[0].path}; "
                             "only adapters of the same modules stack")  # fmt: skip
    state, ranks = {}, set()
    for name in sorted(modules):
        A = torch.cat([a.deltas[name][0].float() for a in adapters], dim=0)
        B = torch.cat([a.deltas[name][1].float() * a.deltas[name][2] for a in adapters], dim=1)
        prefix = "base_model.model." + name.removesuffix(".weight")
        out_dtype = dtype or adapters[0].deltas[name][0].dtype
        state[f"{prefix}.lora_A.weight"] = A.to(out_dtype).contiguous()
        state[f"{prefix}.lora_B.weight"] = B.to(out_dtype).contiguous()
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"the stacked ranks differ between modules ({sorted(ranks)}: a "
                         "rank_pattern in a source); only adapters of one rank stack")  # fmt: skip
    (rank,) = ranks
    config = _load_json(sources[0] / ADAPTER_CONFIG, ADAPTER_CONFIG)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=sorted({n.split(".")[-2] for n in modules}))  # fmt: skip
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=".stack-"))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name in ENCODER_FILES:
            have = [s / name for s in sources if (s / name).is_file()]
            if have:
                shutil.copy(have[-1], tmp / name)
        for f in sorted(tmp.iterdir()):
            os.replace(f, output / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
