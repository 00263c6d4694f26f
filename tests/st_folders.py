"""Tiny sentence-transformers model folders for tests (the hub is unreachable).

    folder = make_st_folder(tmp_path, "llama", pooling="mean", config={"is_causal": False})
    folder = make_st_folder(tmp_path, "gemma3", dense=[(96, 128), (128, 96)], normalize=True,
                            prompts={"query": "task: search result | query: "})

A folder holds a tiny random decoder (tests/tiny.py) at its root (the Transformer module's path
""), `modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`, one `N_Dense/` folder
per Dense layer (config.json + model.safetensors with random `linear.weight` / `linear.bias`),
an optional Normalize, and `config_sentence_transformers.json` with the prompts. The tokenizer
gets a pad token (sentence-transformers pads batches) and, with eos=True, appends its EOS to
every text (as Qwen3-Embedding's does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny import make_tiny_checkpoint

ST_MODULES = "sentence_transformers.models"


def _set_tokenizer(directory: Path, *, eos: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.pad_token = tok.eos_token
    if eos:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.eos_token_id)]
        )
    tok.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make_st_folder(
    tmp_path,
    arch: str = "llama",
    *,
    eos: bool = False,
    config: dict | None = None,
    seed: int = 0,
    pooling: str = "mean",
    **modules,
) -> Path:
    """Save a tiny sentence-transformers folder and return it (see the module docstring).

    config: fields written into the decoder's config.json (e.g. {"is_causal": False}).
    modules: add_st_modules' keywords (pooling, include_prompt, dense, normalize, prompts...);
    the others go to the tiny config (tests/tiny.tiny_config)."""
    st_keys = ("include_prompt", "dense", "dense_bias", "dense_activation", "normalize",
               "prompts", "default_prompt_name", "max_seq_length")  # fmt: skip
    overrides = {k: v for k, v in modules.items() if k not in st_keys}
    st = {k: v for k, v in modules.items() if k in st_keys}
    out = make_tiny_checkpoint(tmp_path, arch, seed=seed, causal_lm=False,
                               subdir=f"st-{arch}-{pooling}", **overrides)  # fmt: skip
    _set_tokenizer(out, eos=eos)
    add_st_modules(out, pooling=pooling, config=config, seed=seed, **st)
    return out


def add_st_modules(
    out: Path,
    *,
    pooling: str = "mean",
    include_prompt: bool = True,
    dense: list[tuple[int, int]] | tuple = (),
    dense_bias: bool = False,
    dense_activation: str | None = "torch.nn.modules.linear.Identity",
    normalize: bool = False,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    max_seq_length: int | None = 64,
    config: dict | None = None,
    seed: int = 0,
) -> Path:
    """Make the Hugging Face model folder `out` (config.json, weights, tokenizer) a
    sentence-transformers folder: modules.json, the Transformer's settings, Pooling, Dense
    layers with random weights, Normalize, prompts; `config` fields go into config.json."""
    out = Path(out)
    if config:
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(config)
        path.write_text(json.dumps(cfg, indent=2))
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULES}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST_MODULES}.Pooling"},
    ]
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, f"pooling_mode_{_legacy(pooling)}": True,
        "include_prompt": include_prompt,
    }))  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 7)
    for i, (n_in, n_out) in enumerate(dense):
        from safetensors.torch import save_file

        d = out / f"{i + 2}_Dense"
        d.mkdir()
        cfg = {"in_features": n_in, "out_features": n_out, "bias": dense_bias}
        if dense_activation is not None:
            cfg["activation_function"] = dense_activation
        (d / "config.json").write_text(json.dumps(cfg))
        state = {"linear.weight": torch.randn(n_out, n_in, generator=gen) / n_in**0.5}
        if dense_bias:
            state["linear.bias"] = 0.1 * torch.randn(n_out, generator=gen)
        save_file(state, str(d / "model.safetensors"))
        modules.append({"idx": i + 2, "name": str(i + 2), "path": d.name,
                        "type": f"{ST_MODULES}.Dense"})  # fmt: skip
    if normalize:
        n = len(modules)
        (out / f"{n}_Normalize").mkdir()
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize",
                        "type": f"{ST_MODULES}.Normalize"})  # fmt: skip
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": dict(prompts or {}), "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }))  # fmt: skip
    return out


def gemma3_270m_st_folder(out: Path) -> Path:
    """The packaged Gemma-3 270M (Q4_K_M GGUF, dequantized) written out as an EmbeddingGemma-
    shaped sentence-transformers folder: bidirectional (use_bidirectional_attention), mean
    pooling, two Dense layers (640 -> 2048 -> 640, random), Normalize, EmbeddingGemma's named
    prompts. l2v writes the Hugging Face weights (LLM2Vec.save); no hub is needed."""
    from l2v_models.encoder import LLM2Vec

    enc = LLM2Vec.from_pretrained("gemma3-270m", device_map="cpu", torch_dtype=torch.float32)
    enc.save(out, save_config=False)
    del enc
    return add_st_modules(
        out, pooling="mean", dense=[(640, 2048), (2048, 640)], normalize=True,
        prompts={"query": "task: search result | query: ", "document": "title: none | text: "},
        max_seq_length=256, config={"use_bidirectional_attention": True},
    )  # fmt: skip


def _legacy(pooling: str) -> str:
    return {"mean": "mean_tokens", "max": "max_tokens", "cls": "cls_token",
            "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}[pooling]  # fmt: skip


def st_encode(folder, texts, **kwargs):
    """sentence-transformers' own embeddings of texts (fp32, CPU) as a float64 tensor."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    out = model.encode(texts, convert_to_tensor=True, **kwargs)
    return out.double()
