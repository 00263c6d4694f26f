"""Tiny random Hugging Face checkpoints and PEFT adapters for tests (the hub is unreachable).

    base = make_tiny_checkpoint(tmp_path, "llama")            # dir: config.json, weights, tokenizer
    lora = make_lora_adapter(tmp_path, base, rank=4, alpha=8)  # dir: adapter_config.json + weights

Checkpoints are saved the way the hub stores base models (a `*ForCausalLM` via save_pretrained,
keys `model.layers.N...` plus `lm_head.weight`). Every weight is random and non-trivial: matrices
~ N(0, 1/fan_in) so attention is neither uniform nor one-hot, norm weights 1 + noise, biases noise
(transformers initializes norms to 1 and biases to 0, which would hide mapping mistakes).
Adapters are saved with PEFT's save_pretrained in the llm2vec layout: the adapter is on the
*Model* (`base_model.model.layers.N...`), with random non-zero lora_A and lora_B (PEFT starts B
at zero). The tokenizer is a small WordPiece (words + characters, so any ASCII text encodes) with
Llama's conventions: <s> prepended, </s> as eos, no pad token.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch

from l2v_models.hf_compat import dtype_kwargs

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
# Gemma-2/3 tiny configs: a window that matters at test lengths, a soft-cap that bends random
# scores, a softmax scale that is not 1/sqrt(head_dim), local and global layers.
TINY_WINDOW = 8
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_VOCAB = 256
# A llama3-style scaling whose three frequency bands (kept, interpolated, divided) are all
# populated at head_dim 16: wavelengths run from 6.3 to ~2e4, the band edges are 16 and 64.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_config(arch: str = "llama", *, gqa: bool = True, rope_scaling=None, **overrides):
    """A transformers config for a tiny model: hidden 96, 6 heads of 16 (GQA 6/2, or MHA),
    MLP 160, 2 layers, vocab 256 (Qwen3: 6 heads of 24, so heads * head_dim = 144 != hidden).
    `overrides` are passed to the config class."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2 if gqa else 6,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    if arch == "llama":
        cls = LlamaConfig
    elif arch == "mistral":
        cls = MistralConfig
        kwargs["sliding_window"] = None
    elif arch == "qwen2":
        cls = Qwen2Config
    elif arch == "qwen3":
        cls = Qwen3Config
        kwargs.update(head_dim=24)
    elif arch == "gemma":
        cls = GemmaConfig
        kwargs.update(head_dim=16, hidden_activation="gelu_pytorch_tanh")
    elif arch in ("gemma2", "gemma3"):
        kwargs.update(
            head_dim=16, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
            sliding_window=TINY_WINDOW, num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )  # fmt: skip
        if arch == "gemma2":
            cls = Gemma2Config
            kwargs.update(attn_logit_softcapping=3.0, final_logit_softcapping=None)
        else:
            cls = Gemma3TextConfig
            full = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
            if rope_scaling is not None:
                full = {**dict(rope_scaling), "rope_theta": 1e6}
            kwargs.pop("rope_scaling", None)
            kwargs.pop("rope_theta", None)
            kwargs["rope_parameters"] = {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    kwargs.update(overrides)
    return cls(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            values = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            values = 0.5 * torch.randn(p.shape, generator=gen)
        elif p.dim() == 2 and "embed" not in name:
            values = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        else:
            values = torch.randn(p.shape, generator=gen)
        p.copy_(values.to(p.dtype))
    return model


def make_tiny_tokenizer():
    """A PreTrainedTokenizerFast: WordPiece over a few words and every printable ASCII character
    (so any ASCII text encodes), whitespace + punctuation pre-tokenization, <s> prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = (
        "the a of and to in is was for on that with as by at from it an be this are or which "
        "query passage document retrieve represent text cat dog sat mat"
    ).split()
    chars = [c for c in string.printable if not c.isspace()]
    tokens = list(dict.fromkeys(specials + words + chars + ["##" + c for c in chars]))
    assert len(tokens) <= TINY_VOCAB
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.WordPiece()
    # Llama's model inputs: transformers 4.4x's generic default adds token_type_ids, which
    # llm2vec would pass on to the model (LlamaModel.forward does not take them).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def save_tiny_tokenizer(directory: Path) -> None:
    make_tiny_tokenizer().save_pretrained(directory)
    # transformers 5 writes its own class name; the generic one loads in 4.4x and 5.x alike.
    path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2))


def _fresh_dir(tmp_path, name: str) -> Path:
    """tmp_path/name, or name-2, name-3, ... when taken: two factories never share a dir."""
    out, n = Path(tmp_path) / name, 1
    while out.exists():
        n += 1
        out = Path(tmp_path) / f"{name}-{n}"
    return out


def _set_config_fields(directory: Path, **fields) -> None:
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg, indent=2))


def make_tiny_checkpoint(
    tmp_path,
    arch: str = "llama",
    *,
    gqa: bool = True,
    rope_scaling=None,
    sharded: bool = False,
    dtype: torch.dtype = torch.float32,
    name_or_path: str | None = None,
    causal_lm: bool = True,
    bin_format: bool = False,
    seed: int = 0,
    subdir: str | None = None,
    **overrides,
) -> Path:
    """Save a tiny random HF model + tokenizer under tmp_path and return the directory.

    sharded: several safetensors shards with model.safetensors.index.json.
    name_or_path: written to config.json as `_name_or_path` (what llm2vec's chat templates key on).
    causal_lm: save a *ForCausalLM (keys `model.` + lm_head, like hub base models); False saves
    the bare *Model (keys without prefix).
    bin_format: write pytorch_model.bin (torch.save) instead of safetensors.
    subdir: the directory name under tmp_path (default tiny-<arch>, made unique when taken).
    overrides: passed to the config (e.g. num_hidden_layers=3, sliding_window=64).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(arch, gqa=gqa, rope_scaling=rope_scaling, **overrides)
    out = _fresh_dir(tmp_path, subdir or f"tiny-{arch}{'' if gqa else '-mha'}")
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = randomize_(cls.from_config(config).to(dtype), seed)
    if bin_format:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, max_shard_size="100KB" if sharded else "50GB")
    save_tiny_tokenizer(out)
    if name_or_path is not None:
        _set_config_fields(out, _name_or_path=name_or_path)
    return out


def make_lora_adapter(
    tmp_path,
    base_dir,
    *,
    rank: int = 4,
    alpha: float = 8,
    target_modules=ALL_TARGETS,
    rslora: bool = False,
    llm2vec_config: dict | None = None,
    mntp: bool = False,
    base_name: str | None = None,
    on_causal_lm: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    safetensors: bool = True,
    seed: int = 1,
    subdir: str | None = None,
) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B for the checkpoint in base_dir.

    The adapter sits on the bare *Model like llm2vec's (keys `base_model.model.layers.N...`);
    on_causal_lm=True puts it on the *ForCausalLM instead (`base_model.model.model.layers...`).
    mntp: write the LLM2Vec `-mntp` layout, i.e. also the base's config.json and tokenizer.
    base_name: adapter_config.json's base_model_name_or_path (default: str(base_dir)).
    llm2vec_config: written as llm2vec_config.json when given.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    base_dir = Path(base_dir)
    out = _fresh_dir(tmp_path, subdir or f"lora-{'mntp-' if mntp else ''}r{rank}")
    cls = AutoModelForCausalLM if on_causal_lm else AutoModel
    model = cls.from_pretrained(base_dir, **dtype_kwargs(torch.float32))
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    peft_model.save_pretrained(out, safe_serialization=safetensors)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name if base_name is not None else str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if mntp:
        shutil.copy(base_dir / "config.json", out / "config.json")
        for f in base_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out / f.name)
    if llm2vec_config is not None:
        (out / "llm2vec_config.json").write_text(json.dumps(llm2vec_config, indent=2))
    return out
