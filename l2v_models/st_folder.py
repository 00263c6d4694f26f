"""Reading a sentence-transformers model folder: which modules it runs and with what settings.

    folder = read_st_folder(path)       # None when path has no modules.json
    folder.transformer_dir, folder.pooling, folder.dense, folder.normalize, folder.prompts, ...

A sentence-transformers folder is a pipeline listed in `modules.json`: one Transformer (the
decoder: config.json, weights and tokenizer in the folder or a subfolder, settings in
`sentence_bert_config.json`), one Pooling (`<path>/config.json`: the mode and `include_prompt`),
then optional Dense layers (`<path>/config.json` + weights) and Normalize. Named prompts and the
default prompt name come from `config_sentence_transformers.json`.

This module only reads and checks those files; l2v_models.text_rules turns them into the
model's text rules and l2v_models.head into what runs after pooling. Anything l2v would not run
exactly is refused with an `StFolderError` naming the file and what is wrong: a custom module
(code outside sentence-transformers), StaticEmbedding, a Router, multimodal or multi-vector
settings, a combination of pooling modes, a Dense activation l2v does not compute. A Dense or
Normalize module is never skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MODULES_FILE = "modules.json"
PROMPTS_FILE = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"

# Pooling modes as sentence-transformers names them (its config's `pooling_mode`, or the legacy
# `pooling_mode_*_tokens` booleans), l2v runs all but mean_sqrt_len_tokens.
POOLING_MODES = ("mean", "lasttoken", "cls", "max", "weightedmean")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations (torch.nn module paths, as sentence-transformers saves them) -> l2v's name.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.SiLU": "silu",
}
_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# sentence_bert_config.json keys that do not change what l2v computes (values checked below).
_HARMLESS_TRANSFORMER_KEYS = {"max_seq_length", "do_lower_case", "unpad_inputs",
                              "module_output_name", "transformer_task", "modality_config",
                              "model_args", "model_kwargs", "processing_kwargs"}  # fmt: skip
# Keys of sentence-transformers' loading kwargs (model_args, model_kwargs) that change only how
# the weights are loaded, not what the model computes (l2v picks its own dtype and kernels).
_HARMLESS_MODEL_KWARGS = {"torch_dtype", "dtype", "attn_implementation", "low_cpu_mem_usage"}
# Loading kwargs that change the model or its tokenizer at load time, by their old and new names.
_LOAD_TIME_CHANGES = ("config_args", "config_kwargs", "tokenizer_args", "tokenizer_kwargs")
# Settings sentence-transformers >= 6 writes into every Dense / Normalize config.json.
_ROUTING_KEYS = {"module_input_name": "sentence_embedding",
                 "module_output_name": "sentence_embedding"}  # fmt: skip


class StFolderError(ValueError):
    """A sentence-transformers folder l2v cannot run exactly (the message names the file)."""


@dataclass(frozen=True)
class DenseSpec:
    """One Dense module: `activation(x @ weight.T + bias)`; weights read by l2v_models.head."""

    directory: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a value of DENSE_ACTIVATIONS


@dataclass(frozen=True)
class StFolder:
    """What a sentence-transformers folder says (see the module docstring).

    transformer_dir: where the decoder's config.json, weights and tokenizer are. max_seq_length:
    the Transformer's token limit (None: the tokenizer's, capped by the config). pooling: one of
    POOLING_MODES. include_prompt: False pools only the tokens after the prompt. prompts: named
    prompts; default_prompt_name: the prompt used when none is asked for (or None)."""

    root: Path
    transformer_dir: Path
    max_seq_length: int | None
    do_lower_case: bool
    pooling: str
    include_prompt: bool
    embedding_dimension: int | None
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def module_names(self) -> list[str]:
        """The pipeline, e.g. ["Transformer", "Pooling(mean)", "Dense(768->3072)", "Normalize"]."""
        names = ["Transformer", f"Pooling({self.pooling}"
                 + ("" if self.include_prompt else ", prompt not pooled") + ")"]  # fmt: skip
        names += [f"Dense({d.in_features}->{d.out_features}, {d.activation})" for d in self.dense]
        return names + (["Normalize"] if self.normalize else [])


def is_st_folder(path) -> bool:
    """Whether `path` is a folder holding a sentence-transformers modules.json."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / MODULES_FILE).is_file()


def read_st_folder(path) -> StFolder | None:
    """Read and check a sentence-transformers folder; None when it has no modules.json."""
    root = Path(path).expanduser()
    if not is_st_folder(root):
        return None
    modules = _read_json(root / MODULES_FILE)
    if not isinstance(modules, list) or not modules:
        raise StFolderError(f"{root / MODULES_FILE}: expected a non-empty list of modules")
    # sentence-transformers runs the modules in the file's order (its "idx" is informative).
    kinds = []
    for i, entry in enumerate(modules):
        where = f"{root / MODULES_FILE}: module {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise StFolderError(f'{where}: expected an object with a string "type"')
        if not isinstance(entry.get("path"), str):
            raise StFolderError(f'{where}: "path" must be a string (the module\'s folder; "" '
                                "for the model folder itself)")  # fmt: skip
        kinds.append((_module_kind(entry["type"], where), _module_dir(root, entry["path"], where)))
    order = [k for k, _ in kinds]
    if order[:2] != ["Transformer", "Pooling"] or any(
        k not in ("Dense", "Normalize") for k in order[2:]
    ):
        raise StFolderError(
            f"{root / MODULES_FILE}: l2v runs Transformer, Pooling, then Dense and Normalize "
            f"modules; this model lists {', '.join(order)}"
        )
    if "Normalize" in order[2:] and order.index("Normalize") != len(order) - 1:
        raise StFolderError(
            f"{root / MODULES_FILE}: a Normalize module before a Dense module is not supported "
            f"(modules: {', '.join(order)})"
        )
    transformer_dir = kinds[0][1]
    max_seq_length, lower = _transformer_settings(transformer_dir)
    pooling, include_prompt, dim = _pooling_settings(kinds[1][1])
    dense = tuple(_dense_spec(d) for k, d in kinds[2:] if k == "Dense")
    for k, d in kinds[2:]:
        if k == "Normalize":
            _check_normalize(d)
    prompts, default_prompt = _prompts(root)
    if pooling == "weightedmean" and not include_prompt:
        raise StFolderError(
            f"{kinds[1][1] / 'config.json'}: weightedmean pooling with include_prompt false "
            "(sentence-transformers weights each text token by its position counted from the "
            "prompt's first token; l2v's kernel counts from the first pooled token) is not run "
            "exactly by l2v"
        )
    return StFolder(
        root=root, transformer_dir=transformer_dir, max_seq_length=max_seq_length,
        do_lower_case=lower, pooling=pooling, include_prompt=include_prompt,
        embedding_dimension=dim, dense=dense, normalize="Normalize" in order,
        prompts=prompts, default_prompt_name=default_prompt,
    )  # fmt: skip


# ------------------------------------------------------------------------------ helpers
def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StFolderError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StFolderError(f"{path}: not valid JSON ({e})") from None


def _module_kind(type_ref: str, where: str) -> str:
    """"sentence_transformers.models.Pooling" (or any sentence_transformers.* path) -> "Pooling";
    StFolderError for custom code and for modules l2v does not run."""
    name = type_ref.rsplit(".", 1)[-1]
    if not type_ref.startswith("sentence_transformers."):
        raise StFolderError(
            f"{where}: {type_ref!r} is custom code (not a sentence-transformers module); l2v runs "
            "Transformer, Pooling, Dense and Normalize modules only"
        )
    if name not in _KNOWN_MODULES:
        raise StFolderError(
            f"{where}: l2v does not run the {name} module ({type_ref}); it runs Transformer, "
            "Pooling, Dense and Normalize modules only"
        )
    return name


def _module_dir(root: Path, rel: str, where: str) -> Path:
    path = (root / rel) if rel else root
    if ".." in Path(rel).parts or Path(rel).is_absolute():
        raise StFolderError(f"{where}: path {rel!r} must stay inside the model folder")
    if not path.is_dir():
        raise StFolderError(f"{where}: folder {path} not found")
    return path


def _transformer_settings(directory: Path) -> tuple[int | None, bool]:
    path = directory / TRANSFORMER_CONFIG
    if not path.is_file():
        return None, False
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise StFolderError(f"{path}: expected a JSON object")
    for key in sorted(cfg):
        value = cfg[key]
        if key in _LOAD_TIME_CHANGES:
            if value:
                raise StFolderError(
                    f"{path}: {key} {value!r} changes the model or its tokenizer at load time; "
                    "l2v reads only the folder's own config.json and tokenizer files"
                )
            continue
        if key in ("model_args", "model_kwargs"):
            if not isinstance(value, dict) or set(value) - _HARMLESS_MODEL_KWARGS:
                raise StFolderError(
                    f"{path}: {key} {value!r} changes how the model is loaded beyond its dtype "
                    f"and attention kernels ({', '.join(sorted(_HARMLESS_MODEL_KWARGS))}); l2v "
                    "does not run that"
                )
            continue
        if key in ("query_length", "document_length", "query_expansion"):
            if value is not None:
                raise StFolderError(
                    f"{path}: {key} (multi-vector / ColBERT settings) is not supported"
                )
            continue
        if key not in _HARMLESS_TRANSFORMER_KEYS:
            raise StFolderError(f"{path}: unknown setting {key!r}; l2v cannot tell what it changes")
    task = cfg.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise StFolderError(
            f"{path}: transformer_task {task!r} is not supported (l2v embeds with the model's "
            "hidden states: feature-extraction)"
        )
    modality = cfg.get("modality_config")
    text = modality.get("text") if isinstance(modality, dict) else None
    if modality is not None and (
        set(modality) - {"text"} or not isinstance(text, dict)
        or text.get("method", "forward") != "forward"
        or text.get("method_output_name", "last_hidden_state") != "last_hidden_state"
    ):  # fmt: skip
        raise StFolderError(
            f"{path}: modality_config {modality!r}: l2v embeds plain text through the model's "
            "forward and its last hidden states only (no chat messages, images or audio)"
        )
    output = cfg.get("module_output_name", "token_embeddings")
    if output not in ("token_embeddings", None):
        raise StFolderError(f"{path}: module_output_name {output!r} is not supported")
    kwargs = cfg.get("processing_kwargs") or {}
    text_kwargs = kwargs.get("text", {}) if isinstance(kwargs, dict) else None
    if text_kwargs is None or set(kwargs) - {"text"} or set(text_kwargs) - {"padding",
                                                                            "padding_side"}:
        raise StFolderError(
            f"{path}: processing_kwargs {kwargs!r} change how texts are tokenized; l2v does not "
            "run them"
        )
    length = cfg.get("max_seq_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 1):  # fmt: skip
        raise StFolderError(f"{path}: max_seq_length must be a positive integer, got {length!r}")
    lower = cfg.get("do_lower_case", False)
    if not isinstance(lower, bool):
        raise StFolderError(f"{path}: do_lower_case must be true or false, got {lower!r}")
    return length, lower


def _pooling_settings(directory: Path) -> tuple[str, bool, int | None]:
    path = directory / "config.json"
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise StFolderError(f"{path}: expected a JSON object")
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if cfg.get(key)]
        mode = modes if modes else ["mean"]
    if not (isinstance(mode, str) or (isinstance(mode, list)
                                      and all(isinstance(m, str) for m in mode))):  # fmt: skip
        raise StFolderError(f"{path}: pooling_mode must be a mode name or a list of them, got "
                            f"{mode!r}")  # fmt: skip
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise StFolderError(
            f"{path}: several pooling modes at once ({', '.join(map(str, modes))}, concatenated "
            "by sentence-transformers) are not supported; l2v runs one of "
            + ", ".join(POOLING_MODES)
        )
    (mode,) = modes
    if mode not in POOLING_MODES:
        raise StFolderError(
            f"{path}: pooling mode {mode!r} is not supported; l2v runs "
            + ", ".join(POOLING_MODES)
        )
    include = cfg.get("include_prompt", True)
    if not isinstance(include, bool):
        raise StFolderError(f"{path}: include_prompt must be true or false, got {include!r}")
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise StFolderError(f"{path}: the embedding dimension must be a positive integer")
    return mode, include, dim


def _dense_spec(directory: Path) -> DenseSpec:
    path = directory / "config.json"
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise StFolderError(f"{path}: expected a JSON object")
    sizes = []
    for key in ("in_features", "out_features"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StFolderError(f"{path}: {key} must be a positive integer, got {value!r}")
        sizes.append(value)
    bias = cfg.get("bias", True)
    if not isinstance(bias, bool):
        raise StFolderError(f"{path}: bias must be true or false, got {bias!r}")
    # sentence-transformers' Dense defaults to Tanh when the config names no activation.
    act_ref = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act_ref not in DENSE_ACTIVATIONS:
        raise StFolderError(
            f"{path}: Dense activation {act_ref!r} is not supported; l2v computes "
            + ", ".join(sorted(DENSE_ACTIVATIONS))
        )
    if cfg.get("use_residual", False) is not False:
        raise StFolderError(f"{path}: use_residual (x + Dense(x)) is not supported")
    _check_routing(path, cfg)
    unknown = set(cfg) - {"in_features", "out_features", "bias", "activation_function",
                          "use_residual", *_ROUTING_KEYS}  # fmt: skip
    if unknown:
        raise StFolderError(f"{path}: unknown Dense setting(s) {sorted(unknown)}")
    return DenseSpec(directory, sizes[0], sizes[1], bias, DENSE_ACTIVATIONS[act_ref])


def _check_normalize(directory: Path) -> None:
    """A Normalize module's optional config.json may only name the sentence embedding."""
    path = directory / "config.json"
    if not path.is_file():
        return
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise StFolderError(f"{path}: expected a JSON object")
    _check_routing(path, cfg)
    unknown = set(cfg) - set(_ROUTING_KEYS)
    if unknown:
        raise StFolderError(f"{path}: unknown Normalize setting(s) {sorted(unknown)}")


def _check_routing(path: Path, cfg: dict) -> None:
    """sentence-transformers >= 6 names the feature a module reads and writes; l2v's modules
    read and write the sentence embedding only."""
    for key, expected in _ROUTING_KEYS.items():
        if cfg.get(key, expected) != expected:
            raise StFolderError(
                f"{path}: {key} {cfg[key]!r} is not supported (l2v's modules work on the "
                f"{expected!r} feature only)"
            )


def read_dense_weights(spec: DenseSpec):
    """(weight fp32 [out, in], bias fp32 [out] or None) of a Dense module, checked against its
    config; StFolderError naming the folder for a missing, unreadable or misshapen file."""
    import torch

    state = _read_dense_state(spec.directory)
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    if weight is None or tuple(weight.shape) != (spec.out_features, spec.in_features):
        got = None if weight is None else tuple(weight.shape)
        raise StFolderError(
            f"{spec.directory}: linear.weight must have shape "
            f"{(spec.out_features, spec.in_features)}, got {got}"
        )
    if spec.bias and (bias is None or tuple(bias.shape) != (spec.out_features,)):
        raise StFolderError(f"{spec.directory}: linear.bias missing or of the wrong shape")
    if not spec.bias and bias is not None:
        raise StFolderError(f"{spec.directory}: holds linear.bias but its config says bias false")
    return weight.to(torch.float32), None if bias is None else bias.to(torch.float32)


def _read_dense_state(directory: Path) -> dict:
    st = directory / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as e:
            raise StFolderError(f"{st}: unreadable safetensors file ({e})") from None
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        import torch

        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise StFolderError(f"{binary}: unreadable weights file ({e})") from None
    raise StFolderError(
        f"{directory}: no model.safetensors or pytorch_model.bin with the Dense layer's weights"
    )


def _prompts(root: Path) -> tuple[dict[str, str], str | None]:
    path = root / PROMPTS_FILE
    if not path.is_file():
        return {}, None
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise StFolderError(f"{path}: expected a JSON object")
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise StFolderError(f'{path}: "prompts" must map prompt names to strings')
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise StFolderError(
            f"{path}: default_prompt_name {default!r} is not one of the prompts "
            f"({', '.join(prompts) or 'none'})"
        )
    return dict(prompts), default
