"""load_model: a base model (+ LoRA adapters) -> a ready l2v Transformer, tokenizer, configs.

    loaded = load_model("McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp",
                        "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp-supervised",
                        dtype=torch.bfloat16, device="cuda")

Accepted bases: a Hugging Face model dir (or hub id), an LLM2Vec `-mntp` dir (config + tokenizer
+ LoRA adapter whose adapter_config names the base weights), a `.gguf` file, or a packaged model
name: None = the default encoder "smollm2-llm2vec" (SmolLM2 + l2v's trained adapters), or
"smollm2" (untrained) when only an adapter is given. Names and configs are resolved as llm2vec
0.2.3 resolves them (its chat templates key on the config's `_name_or_path`; llm2vec_config.json
gives encoder defaults).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2v_models.checkpoint.convert import convert_weights, resolve_device, resolve_dtype
from l2v_models.checkpoint.gguf import _gguf_config_and_tokenizer, _GGUFSource, gguf_support_error
from l2v_models.checkpoint.hub import (
    _SMOLLM2_FILE,
    BASE_MODEL,
    DEFAULT_MODEL,
    PACKAGED_ENCODERS,
    PACKAGED_MODELS,
    _resolve_dir,
)
from l2v_models.checkpoint.lora import LoraAdapter, read_lora_adapter
from l2v_models.checkpoint.sources import (
    CheckpointError,
    _load_json,
    _open_checkpoint,
    _reason,
    _Source,
)
from l2v_models.config import ModelConfig
from l2v_models.model import Transformer, resolve_backend
from l2v_models.st_folder import read_st_folder

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What load_model returns; the encoder needs all of it."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, as llm2vec loads it
    name_or_path: str  # config `_name_or_path` as llm2vec 0.2.3 resolves it (chat templates)
    hf_config: Any  # the transformers config (its class picks llm2vec's eos suffix)
    llm2vec_config: dict = field(default_factory=dict)
    # A sentence-transformers folder's modules (l2v_models.st_folder.StFolder), else None.
    st_folder: Any = None
    attention: str = "llm2vec"  # the attention mode the model was loaded with (resolved)


# llm2vec: as llm2vec 0.2.3 runs the family; config: as the model's config.json says
# (`is_causal`, `use_bidirectional_attention`); bidirectional / causal: forced.
ATTENTION_MODES = ("llm2vec", "config", "bidirectional", "causal")


def attention_is_causal(attention: str, config: ModelConfig, hf_dict: dict | None = None) -> bool:
    """Whether the model attends causally: "causal" -> yes, "bidirectional" -> no, "llm2vec" ->
    as llm2vec 0.2.3 runs the family, "config" -> as the config.json dict `hf_dict` says
    (see config_attention).

    llm2vec: llm2vec's Qwen2BiModel never removes the causal mask (its outputs equal the causal
    Qwen2's to 6e-7, under sdpa and eager attention), so every Qwen2 adapter trained with llm2vec
    learned causal attention: l2v reproduces that, and attention="bidirectional" gives a truly
    bidirectional Qwen2 (what l2v's own recipe trains).
    """
    return with_attention(config, attention, hf_dict).causal


def with_attention(config: ModelConfig, attention: str, hf_dict: dict | None = None) -> ModelConfig:
    """The config with the attention of mode `attention` (see attention_is_causal)."""
    if attention == "causal":
        return dataclasses.replace(config, causal=True)
    if attention == "bidirectional":
        return dataclasses.replace(config, causal=False)
    if attention == "config":
        return config_attention(config, hf_dict or {})
    return dataclasses.replace(config, causal=config.spec.llm2vec_causal)


def config_attention(config: ModelConfig, hf_dict: dict) -> ModelConfig:
    """The attention transformers (>= 5.2) builds from a config.json, never guessed from a name.

    `is_causal: false` makes any family bidirectional (a bidirectional sliding-window mask of
    |i - j| <= W in Gemma-2/3's local layers). `use_bidirectional_attention: true` is read by
    transformers' Gemma-3 alone (local layers then see |i - j| <= W // 2, or W // 2 + 1 with
    `is_causal: false` too); on another family transformers ignores it, or, on Gemma, applies it
    to half the model, so l2v cannot tell which attention the model was trained with and
    refuses it (force one with attention="bidirectional" or "causal"). Otherwise causal."""
    flag = hf_dict.get("use_bidirectional_attention") is True
    not_causal = hf_dict.get("is_causal") is False
    if flag and config.arch != "gemma3":
        raise ValueError(
            f"config.json sets use_bidirectional_attention, which transformers honours only for "
            f"Gemma-3, on a {config.arch} model: l2v cannot tell whether it was trained "
            "bidirectionally; pass --attention bidirectional or --attention causal "
            "(attention=...) to say which"
        )
    w = config.local_window
    if flag:
        reach = None if w is None else w // 2 + (1 if not_causal else 0)
        return dataclasses.replace(config, causal=False, local_reach=reach)
    if not_causal:
        return dataclasses.replace(config, causal=False, local_reach=w)
    return dataclasses.replace(config, causal=True)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path.name} not found in {path.parent}")
    return _load_json(path, path.name)


def _llm2vec_name_or_path(base_arg: str, redirected: str | None) -> str:
    """llm2vec 0.2.3: from_pretrained sets config._name_or_path to the (adapter-redirected) name;
    then, if the argument is a local dir with config.json, its `_name_or_path` field wins ("" when
    absent: PretrainedConfig's default)."""
    if os.path.isdir(base_arg) and os.path.exists(f"{base_arg}/config.json"):
        config = _load_json(Path(base_arg) / "config.json", "config.json")
        return str(config.get("_name_or_path", ""))
    return redirected if redirected is not None else base_arg


def _read_llm2vec_config(config_addr: str | None) -> dict:
    """llm2vec 0.2.3 reads `{peft or base}/llm2vec_config.json` only when that path exists."""
    if config_addr is not None and os.path.exists(f"{config_addr}/llm2vec_config.json"):
        return _load_json(Path(config_addr) / "llm2vec_config.json", "llm2vec_config.json")
    return {}


def _gguf_weights(name: str) -> Path | None:
    """The GGUF file an -mntp adapter's base names, when it names a packaged model (e.g. the
    "smollm2" that `l2v train` writes for the default) or a .gguf file; else None."""
    if name.lower() in PACKAGED_MODELS:
        path = PACKAGED_MODELS[name.lower()]()
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} (the -mntp adapter's base) not found")
    else:
        return None
    problem = gguf_support_error(f"the GGUF base {name}")
    if problem is not None:
        raise RuntimeError(problem)
    return path


def load_model(
    base_model_name_or_path=None,
    peft_model_name_or_path=None,
    *,
    dtype: torch.dtype | str | None = None,
    device=None,
    backend: str = "auto",
    base_weights_path=None,
    attention: str | None = None,
) -> Loaded:
    """Load tokenizer, configs and weights (adapters merged) for the l2v encoder.

    base_model_name_or_path: HF model dir or hub id, LLM2Vec -mntp dir or hub id, a .gguf file,
    a packaged model ("smollm2": the untrained embedded SmolLM2-135M-Instruct, "gemma3-270m"), a
    packaged encoder ("smollm2-llm2vec": SmolLM2 + l2v's trained MNTP and SimCSE + supervised
    adapters), or None: "smollm2-llm2vec", or "smollm2" when peft_model_name_or_path is given.
    peft_model_name_or_path: a second LoRA adapter (dir or hub id), merged after the -mntp one.
    dtype: torch.float32 / float16 / bfloat16 or their names (default bf16 on CUDA, fp32 on CPU).
    device: "cpu", "cuda", "cuda:N" (default CUDA when available).
    backend: "auto", "triton" or "torch" (see l2v_models.model.resolve_backend).
    base_weights_path: local copy of the base weights a -mntp adapter names (offline / gated).
    attention: None (the model's own: "config" for a sentence-transformers folder, else
    "llm2vec": as llm2vec 0.2.3 encodes the family, bidirectional except Qwen2), "llm2vec",
    "config", "bidirectional" or "causal" (see attention_is_causal).
    A sentence-transformers folder (modules.json) is read with l2v_models.st_folder: the decoder
    comes from its Transformer module's folder, the modules are returned in `st_folder`.
    """
    from transformers import AutoConfig, AutoTokenizer

    if attention is not None and attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if base_model_name_or_path is None:
        # A lone adapter goes on the untrained base that `l2v train` trains on by default.
        base_model_name_or_path = DEFAULT_MODEL if peft_model_name_or_path is None else BASE_MODEL
    packaged_encoder = PACKAGED_ENCODERS.get(str(base_model_name_or_path).lower())
    if packaged_encoder is not None:
        if peft_model_name_or_path is not None:
            raise ValueError(
                f"{base_model_name_or_path} already holds its two adapters (MNTP, then SimCSE + "
                f"supervised); put an adapter of your own on the untrained base instead: "
                f"--model {BASE_MODEL} (base_model_name_or_path={BASE_MODEL!r})"
            )
        base_model_name_or_path, peft_model_name_or_path = packaged_encoder()
    put_on = str(base_model_name_or_path)  # as the user named it (for the base-name warning)
    if str(base_model_name_or_path).lower() in PACKAGED_MODELS:
        base_model_name_or_path = PACKAGED_MODELS[str(base_model_name_or_path).lower()]()
    base_arg = str(base_model_name_or_path)
    adapters: list[LoraAdapter] = []
    st_folder = None
    hf_dict: dict = {}

    if base_arg.endswith(".gguf"):
        gguf = Path(base_arg).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {base_arg!r} not found")
        if base_weights_path is not None:
            raise ValueError("base_weights_path applies to -mntp adapter dirs, not to a GGUF file")
        problem = gguf_support_error(
            "the default model (SmolLM2-135M-Instruct, a GGUF)"
            if gguf.name == _SMOLLM2_FILE else f"the GGUF model {base_arg}"
        )  # fmt: skip
        if problem is not None:
            raise RuntimeError(problem)
        hf_config, tokenizer = _gguf_config_and_tokenizer(gguf)
        config = ModelConfig.from_hf_config(hf_config)
        source: _Source = _GGUFSource(gguf, config)
        name_or_path = base_arg
    else:
        base_dir = _resolve_dir(base_arg, "base model")
        st_folder = read_st_folder(base_dir)
        if st_folder is not None:
            base_dir = st_folder.transformer_dir
        _read_json(base_dir / "config.json", f"base model {base_arg!r}")
        redirected = None
        if (base_dir / "adapter_config.json").is_file():  # LLM2Vec -mntp layout
            mntp = read_lora_adapter(base_dir)
            adapters.append(mntp)
            redirected = mntp.base_model_name_or_path
            weights_arg = str(base_weights_path) if base_weights_path is not None else redirected
            if not weights_arg:
                raise ValueError(
                    f"{base_dir}/adapter_config.json names no base_model_name_or_path; pass "
                    "base_weights_path= with the base model's weights"
                )
            weights_gguf = _gguf_weights(weights_arg)  # a packaged model or a .gguf file
            weights_dir = None if weights_gguf is not None else _resolve_dir(
                weights_arg, f"base weights of the -mntp adapter {base_arg!r}",
                hint=" (or pass it as base_weights_path=)",
            )  # fmt: skip
        else:
            weights_gguf = None
            if base_weights_path is not None:
                raise ValueError(
                    f"base_weights_path is only used with an LLM2Vec -mntp dir (one holding "
                    f"adapter_config.json); {base_arg!r} is a full model"
                )
            weights_dir = base_dir
        cfg_file = base_dir / "config.json"
        if weights_dir is not None and (weights_dir / "config.json").is_file():
            cfg_file = weights_dir / "config.json"
        hf_dict = _read_json(cfg_file, "config")
        own_model_code = sorted(k for k in (hf_dict.get("auto_map") or {})
                                if str(k).startswith("AutoModel"))  # fmt: skip
        if own_model_code:
            raise ValueError(
                f"{cfg_file}: the model runs its own code (auto_map {own_model_code}), which "
                "may differ from transformers' class for its model_type; l2v runs only the "
                "architectures it implements"
            )
        try:
            config = ModelConfig.from_hf_config(hf_dict)
        except CheckpointError:
            raise
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        if weights_gguf is not None:
            source = _GGUFSource(weights_gguf, config)
        else:
            source = _open_checkpoint(weights_dir)
        try:
            hf_config = AutoConfig.from_pretrained(str(base_dir))
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        except Exception as e:
            raise OSError(
                f"could not load the config/tokenizer from {base_dir} ({_reason(e)}); the "
                "directory needs the model's config.json and tokenizer files (tokenizer.json or "
                "tokenizer.model with tokenizer_config.json)"
            ) from e
        name_or_path = _llm2vec_name_or_path(base_arg, redirected)

    if peft_model_name_or_path is not None:
        peft_dir = _resolve_dir(str(peft_model_name_or_path), "LoRA adapter")
        second = read_lora_adapter(peft_dir)
        # An -mntp base: its MNTP adapter's own base (and the base weights given for it).
        mntp_bases = [adapters[0].base_model_name_or_path, base_weights_path] if adapters else []
        warn_if_other_base(str(peft_model_name_or_path), second.base_model_name_or_path,
                           put_on, mntp_bases=[str(b) for b in mntp_bases if b],
                           has_mntp=bool(adapters))  # fmt: skip
        adapters.append(second)

    if attention is None:
        attention = "config" if st_folder is not None else "llm2vec"
    config = with_attention(config, attention, hf_dict)
    backend = resolve_backend(backend, device, config)
    state = convert_weights(config, source, adapters=adapters, dtype=dtype, device=device)
    model = Transformer.from_state_dict(config, state, backend)
    hf_config.name_or_path = name_or_path  # what llm2vec's model.config._name_or_path holds
    config_addr = peft_model_name_or_path if peft_model_name_or_path is not None else base_arg
    return Loaded(
        model=model,
        config=config,
        tokenizer=tokenizer,
        name_or_path=name_or_path,
        hf_config=hf_config,
        llm2vec_config=_read_llm2vec_config(str(config_addr)),
        st_folder=st_folder,
        attention=attention,
    )


def warn_if_other_base(adapter: str, named: str | None, put_on: str, *,
                       mntp_bases: Sequence[str] = (), has_mntp: bool = False) -> bool:
    """Log a warning (logger l2v_models.checkpoint.load; the CLI prints `l2v: warning: ...`)
    when a second adapter is put on a base it clearly was not trained on; True if it warned.

    adapter: the second adapter as given; named: its adapter_config.json base_model_name_or_path;
    put_on: the base it is put on, as the user named it (a packaged name, a hub id, a path);
    has_mntp: whether that base is an LLM2Vec -mntp model (it holds an MNTP adapter), and
    mntp_bases: the base that MNTP adapter names (and base_weights_path when one is given).

    What a second adapter names: McGill's -supervised / -unsup-simcse adapters name the -mntp
    model they go on (e.g. McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp); `l2v train` names the
    -mntp folder given as the first --peft (an absolute path), or --model; older l2v adapters
    (the packaged default's included) and llm2vec scripts name the bare model the MNTP adapter
    names. So the name matches when it is the base itself or, for an -mntp base, the MNTP
    adapter's base. A mismatch warns only when it is certain:
    - the adapter names an -mntp model (a local folder holding adapter_config.json, or a name
      whose last part ends in "mntp") but the base has no MNTP adapter: the MNTP stage is missing
      (e.g. `--peft ADAPTER` without `--model`, which uses the untrained `smollm2`);
    - both names are hub ids or packaged model names (no local path) and differ.
    A local path is never called a mismatch otherwise: it may be a copy of the named model."""
    if not named:
        return False
    candidates = [put_on, *mntp_bases]
    if _model_key(named) in {_model_key(c) for c in candidates}:
        return False
    if not has_mntp and _names_mntp_model(named):
        logger.warning(
            "the adapter %s was trained on top of the LLM2Vec -mntp model %s (its "
            "adapter_config.json's base_model_name_or_path), but %s has no MNTP adapter: pass "
            "that -mntp model as the base (--model %s)", adapter, named, put_on, named,
        )  # fmt: skip
        return True
    if not any(_is_local_path(name) for name in (named, *candidates)):
        where = f"{put_on} (MNTP adapter on {mntp_bases[0]})" if mntp_bases else put_on
        logger.warning(
            "the adapter %s was trained on %s (its adapter_config.json's "
            "base_model_name_or_path), but is put on %s: pass the base it was trained on "
            "(--model)", adapter, named, where,
        )  # fmt: skip
        return True
    return False


def _model_key(name: str) -> str:
    """A comparable form of a model name: a packaged model's name, a local path resolved, a hub
    id lower-cased (the hub treats ids case-insensitively)."""
    if name.lower() in PACKAGED_MODELS:
        return name.lower()
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.rstrip("/").lower()


def _is_local_path(name: str) -> bool:
    return os.path.isabs(os.path.expanduser(name)) or name.startswith(".") or os.path.exists(name)


def _names_mntp_model(name: str) -> bool:
    """An LLM2Vec -mntp model: a local folder with adapter_config.json, or (not here) a name
    whose last part ends in "mntp" (McGill's *-mntp ids, l2v's .../mntp folders)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return (path / "adapter_config.json").is_file()
    return name.rstrip("/").rsplit("/", 1)[-1].lower().endswith("mntp")
