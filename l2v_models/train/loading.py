"""Loading a model for training: the torch backend with earlier adapters merged, the LM head
for MNTP, and a BOS token for tokenizers without one.

    loaded = load_for_training("smollm2", peft="out/mntp", bos_token="<|endoftext|>")
    lm_head = read_lm_head("smollm2", loaded)     # [V, H]: tied embeddings or lm_head.weight
"""

from __future__ import annotations

from pathlib import Path

import torch

from l2v_models.train.lora import merge_adapter_


# ------------------------------------------------------------------------------ loading
def load_for_training(model=None, peft=None, *, dtype=None, device=None, extra_peft=(),
                      attention: str = "bidirectional", bos_token: str | None = None):  # fmt: skip
    """l2v_models.checkpoint.load_model on the torch backend (training needs autograd), with
    `peft` (a previous stage's adapter) merged; `extra_peft` adapters are merged after it (a
    chain longer than load_model's). model None: the untrained embedded SmolLM2 ("smollm2").
    An adapter whose shapes do not fit the base raises ValueError saying so. attention:
    "bidirectional" (LLM2Vec's recipe, every family, Qwen2 included), or load_model's "llm2vec"
    / "causal". bos_token: see prepend_special_token.
    Returns the Loaded (model in the given dtype: default bf16 on CUDA, fp32 on CPU)."""
    from l2v_models.checkpoint import load_model, read_lora_adapter

    try:
        loaded = load_model(base_arg(model), peft, dtype=dtype, device=device, backend="torch",
                            attention=attention)  # fmt: skip
        for path in extra_peft:
            merge_adapter_(loaded.model, read_lora_adapter(Path(path)))
    except ValueError as e:
        text = str(e)
        if "LoRA adapter" in text and ("lora_A is" in text or "not in this model" in text):
            raise ValueError(
                f"{text.splitlines()[0]}. The adapter was trained for another base model: "
                f"pass the --model it was trained on (its adapter_config.json names it)"
            ) from None
        raise
    if loaded.st_folder is not None:
        raise ValueError(
            f"{loaded.st_folder.root} is a sentence-transformers model, with its own text rules "
            f"({', '.join(loaded.st_folder.module_names)}); l2v train trains LLM2Vec adapters by "
            "llm2vec's rules (instruction, mean pooling, bidirectional), which an adapter on it "
            "would not be run with: train on its base model's folder instead"
        )
    loaded.model.requires_grad_(False)
    if bos_token is not None:
        prepend_special_token(loaded.tokenizer, bos_token)
    return loaded


class BosTokenError(ValueError):
    """--bos-token names a token that cannot be every text's first token (a user error)."""


def prepend_special_token(tokenizer, token: str) -> None:
    """Make a fast tokenizer put `token` (one of its special tokens) before every text, as
    Llama's tokenizer puts its BOS, and keep it when saved (MNTP writes the tokenizer into its
    -mntp folder, so the next stages and the encoder tokenize the same way).

    Why: a decoder's first position is an attention sink whose hidden state is nearly the same
    for every text; a tokenizer without a BOS (SmolLM2's) makes that position a text token, so
    mean pooling over a one-word text returns almost the same vector for every word. The
    prepended token takes the sink, and like any special token it is attended to but never
    pooled (llm2vec pools the text's own tokens). A no-op when the tokenizer already does it."""
    from tokenizers import processors

    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise BosTokenError(f"--bos-token {token!r} is not a token of this tokenizer")
    if token not in tokenizer.all_special_tokens:
        # A plain token would be pooled like the text's own tokens (only special ones are not).
        raise BosTokenError(f"--bos-token {token!r} is not a special token of this tokenizer; "
                            f"its special tokens: {' '.join(tokenizer.all_special_tokens)}")
    if tokenizer("a")["input_ids"][:1] == [token_id]:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BosTokenError("--bos-token needs a fast tokenizer (tokenizer.json)")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A $B:1", special_tokens=[(token, token_id)]
    )
    tokenizer.bos_token = token
    if tokenizer("a")["input_ids"][:1] != [token_id]:
        raise BosTokenError(f"could not make this tokenizer prepend {token!r}")


def base_arg(model) -> str:
    """The model argument with None as the embedded default (\"smollm2\")."""
    from l2v_models.checkpoint import BASE_MODEL

    return BASE_MODEL if model is None else str(model)


def read_lm_head(model_arg, loaded) -> torch.Tensor:
    """The LM head [V, H] for MNTP: the input embeddings where the config ties them (SmolLM2,
    Gemma), else `lm_head.weight` of the base checkpoint (an -mntp dir's base weights)."""
    from l2v_models.checkpoint import PACKAGED_MODELS, read_lora_adapter
    from l2v_models.checkpoint.hub import _resolve_dir
    from l2v_models.checkpoint.sources import _checkpoint_files, _load_bin, _safe_open

    model = loaded.model
    if getattr(loaded.hf_config, "tie_word_embeddings", True):
        return model.embed
    arg = base_arg(model_arg)
    if arg.endswith(".gguf") or arg.lower() in PACKAGED_MODELS:
        raise ValueError(f"{arg}: MNTP on an untied GGUF model is not supported (its LM head "
                         "is not read); pass the Hugging Face model directory")  # fmt: skip
    directory = _resolve_dir(arg, "base model")
    if (directory / "adapter_config.json").is_file():  # an -mntp dir: the base weights
        base = read_lora_adapter(directory).base_model_name_or_path
        directory = _resolve_dir(str(base), "base weights")
    fmt, files = _checkpoint_files(directory)
    for f in files:
        if fmt == "safetensors":
            handle = _safe_open(f)
            for key in ("lm_head.weight", "model.lm_head.weight"):
                if key in handle.keys():
                    w = handle.get_tensor(key)
                    return w.to(device=model.device, dtype=model.dtype)
        else:
            state = _load_bin(f)
            if "lm_head.weight" in state:
                return state["lm_head.weight"].to(device=model.device, dtype=model.dtype)
    raise ValueError(
        f"{directory}: the config does not tie the LM head to the embeddings and the checkpoint "
        "has no lm_head.weight; MNTP needs the model's LM head (save the *ForCausalLM)"
    )
