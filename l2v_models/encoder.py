"""The drop-in `LLM2Vec` encoder: llm2vec 0.2.3's API and embeddings, on packed batches.

    from l2v_models import LLM2Vec            # instead of: from llm2vec import LLM2Vec
    model = LLM2Vec.from_pretrained(base, peft_model_name_or_path=adapter,
                                    device_map="cuda", torch_dtype=torch.bfloat16)
    emb = model.encode([[instruction, query], passage, ...])   # float32 [N, D] on the CPU

Same as llm2vec 0.2.3 (see l2v_models.tokenization for the text rules): inputs are strings or
[instruction, text] pairs; the text is truncated by words to `doc_max_length` tokens; chat
templates by the config's `_name_or_path`; ids right-truncated at `max_length`; pooling
`mean` / `weighted_mean` over the last N tokens (N = the text's own token count) when
`skip_instruction`, else over all tokens; `eos_token` / `last_token` = the last token;
`bos_token` = the BOS token; llm2vec_config.json defaults; float32 CPU output in input order.

Where llm2vec is broken or batch-dependent, the rule here is "what llm2vec gives for the text
encoded alone (a batch of one, no padding)", or a documented sensible value where even that
crashes:
- a bare string is one text -> one embedding of shape [D] (llm2vec encodes it character by
  character); a list may mix strings and pairs, read item by item (llm2vec reads the whole list
  by its first item and crashes or encodes characters); an item is a string, an
  [instruction, text] pair or llm2vec's MEDI [instruction, text, int]; anything else (e.g.
  three strings, of which llm2vec silently drops the third) is a TypeError naming the item;
- where llm2vec's truncation by words would keep no word (a text without spaces longer than
  doc_max_length tokens: CJK, a URL, base64), llm2vec embeds an empty text; here the text is
  cut by tokens (its longest prefix within doc_max_length tokens, see l2v_models.tokenization);
- an empty text (N = 0) with `mean` pools all tokens of the sequence (BOS, instruction, chat
  template): llm2vec's `h[-0:]` slice does exactly that for an unpadded row, but pools the padding
  too in a padded batch; with `weighted_mean` it gives zeros, as llm2vec always does;
- a whitespace-only text is encoded like any other (its N is whatever the tokenizer gives);
- N larger than the sequence (issue 80: llm2vec crashes, or pools padding) is clamped to it;
- `bos_token` pools the first token equal to bos_token_id, or the first token when there is none
  (llm2vec returns a wrongly shaped result when a text has 0 or 2 BOS tokens, and matches pad
  tokens when bos == eos);
- a text that tokenizes to no token at all (empty text, no instruction, no BOS) gives zeros;
- an empty list gives an empty [0, D] result (llm2vec raises IndexError);
- empty or whitespace-only texts are embedded as above and logged: one warning per call
  (logger "l2v_models.encoder") naming their indices; a lone surrogate is a ValueError naming
  the item (the tokenizer's own error names none).

llm2vec's other methods: `tokenize(prepared texts)` returns its padded features (input_ids,
attention_mask, embed_mask), `forward(features)` pools them (packed, the padding is never
computed; float32 on the CPU, like encode), `save(path)` writes config.json, model.safetensors,
the tokenizer and llm2vec_config.json, a folder l2v and transformers (hence llm2vec) load.

Beyond llm2vec: batches are filled up to `max_tokens_per_batch` real tokens (no padding is
computed), so results do not depend on batching; `normalize_embeddings=True` L2-normalizes in
the pooling kernel; `device=` places the model (one GPU per process: llm2vec's multi-GPU
process pool is not reproduced); `cuda_graphs=True` replays batches of up to 2048 tokens from
captured CUDA graphs, padded to buckets (l2v_models.cuda_graphs; CUDA + triton backend only).
Attention is as llm2vec runs each family: bidirectional, except Qwen2, which llm2vec 0.2.3
encodes causally (its Qwen2BiModel keeps the causal mask); enable_bidirectional=False makes any
family causal, and l2v's attention="bidirectional" makes Qwen2 truly bidirectional.

Longer than ~500 lines on purpose: it is llm2vec 0.2.3's `LLM2Vec` contract in one place
(from_pretrained's keywords, encode, tokenize, forward, save and the text helpers, each with the
llm2vec behaviour it reproduces or changes); engine, text rules and checkpoints live elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from l2v_models import tokenization as tk
from l2v_models.engine import Engine, check_int
from l2v_models.packing import TokenizedTexts

logger = logging.getLogger(__name__)

_POOL_OP_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last",
                 "last_token": "last", "bos_token": "last"}  # fmt: skip

# Keywords transformers' from_pretrained takes that have no meaning for l2v's own kernels.
_IGNORED_HF_KWARGS = ("attn_implementation", "low_cpu_mem_usage", "trust_remote_code",
                      "use_safetensors", "use_flash_attention_2")  # fmt: skip
_OUR_KWARGS = ("backend", "base_weights_path", "max_tokens_per_batch", "cuda_graphs")


def _check_settings(*, pooling_mode=None, max_length=None, doc_max_length=None,
                    skip_instruction=None, max_tokens_per_batch=None) -> None:  # fmt: skip
    """ValueError for an invalid encoder setting (None = not given)."""
    if pooling_mode is not None and pooling_mode not in tk.POOLING_MODES:
        raise ValueError(f"pooling_mode must be one of {tk.POOLING_MODES}, got {pooling_mode!r}")
    check_int("max_length", max_length)
    check_int("doc_max_length", doc_max_length, minimum=0)
    if skip_instruction is not None and not isinstance(skip_instruction, (bool, np.bool_)):
        raise ValueError(f"skip_instruction must be a bool, got {skip_instruction!r}")
    check_int("max_tokens_per_batch", max_tokens_per_batch)


def _parse_device_map(device_map):
    """transformers-style device_map -> a device for load_model (None = default placement).

    l2v runs a whole model on one device: "auto", "cpu", "cuda", "cuda:N", an int N (GPU N), a
    torch.device, or a dict whose values all name one device ({"": 0}) are accepted.
    """
    if device_map is None or (isinstance(device_map, str) and device_map == "auto"):
        return None
    if isinstance(device_map, dict):
        targets = {str(v) for v in device_map.values()}
        if len(targets) != 1:
            raise ValueError(
                f"device_map={device_map!r} splits the model across devices; l2v runs the whole "
                "model on one device: pass device_map='cuda', 'cuda:N' or 'cpu'"
            )
        return _parse_device_map(next(iter(device_map.values())))
    if isinstance(device_map, bool):
        raise ValueError(f"invalid device_map {device_map!r}")
    if isinstance(device_map, (int, np.integer)):
        return f"cuda:{int(device_map)}"
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} (multi-GPU sharding) is not supported; l2v runs the whole "
            "model on one GPU per process: pass device_map='cuda' or 'cuda:N'"
        )
    if isinstance(device_map, (str, torch.device)):
        return device_map
    raise ValueError(
        f"invalid device_map {device_map!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or a GPU index"
    )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _as_pair(item) -> tuple[str, str] | None:
    """An item's (instruction, text): a string, an [instruction, text] pair of strings, or
    llm2vec's MEDI form [instruction, text, int] (the int, a dataset id, is ignored); else None."""
    if isinstance(item, str):
        return "", item
    if not isinstance(item, (list, tuple, np.ndarray)) or len(item) not in (2, 3):
        return None
    if not (isinstance(item[0], str) and isinstance(item[1], str)):
        return None
    if len(item) == 3 and not _is_int(item[2]):
        return None
    return str(item[0]), str(item[1])


def _check_unicode(pairs: Sequence[tuple[str, str]]) -> None:
    """ValueError naming the item and position of a lone surrogate (not encodable text)."""
    for i, pair in enumerate(pairs):
        for part, s in zip(("instruction", "text"), pair, strict=True):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"sentences[{i}]: the {part} holds a lone surrogate (U+{ord(s[e.start]):04X} "
                    f"at character {e.start}), which is not valid Unicode text; decode the input "
                    "correctly (e.g. bytes.decode('utf-8', errors='replace'))"
                ) from None


def _normalize_sentences(sentences) -> tuple[list[tuple[str, str]], bool]:
    """encode() input -> ([(instruction, text)], squeeze) where squeeze means a bare string.

    Accepted: a string; a list whose items are strings, [instruction, text] pairs of strings or
    llm2vec's MEDI form [instruction, text, int]; or one bare MEDI item. Anything else (e.g.
    three strings) is a TypeError naming the item, never a silent drop. A lone surrogate is a
    ValueError naming the item."""
    if isinstance(sentences, str):
        _check_unicode([("", sentences)])
        return [("", sentences)], True
    if isinstance(sentences, (bytes, bytearray, dict)) or not hasattr(sentences, "__iter__"):
        raise TypeError(
            "sentences must be a string, or a list of strings and [instruction, text] pairs; "
            f"got {type(sentences).__name__}"
        )
    items = list(sentences)
    # llm2vec's MEDI special case: one bare [instruction, text, int] item.
    if len(items) == 3 and isinstance(items[0], str) and _as_pair(items) is not None:
        items = [items]
    pairs = []
    for i, item in enumerate(items):
        pair = _as_pair(item)
        if pair is None:
            raise TypeError(
                f"sentences[{i}] must be a string, an [instruction, text] pair of strings or "
                f"llm2vec's MEDI form [instruction, text, int]; got {type(item).__name__}: "
                f"{item!r:.80}"
            )
        pairs.append(pair)
    _check_unicode(pairs)
    return pairs, False


def empty_text_indices(pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the items whose text is empty or whitespace only."""
    return [i for i, (_, text) in enumerate(pairs) if not text.strip()]


def warn_empty_texts(indices: Sequence[int], where: str = "sentences") -> None:
    """One logging warning naming the empty texts (nothing when there are none)."""
    if not indices:
        return
    shown = ", ".join(map(str, indices[:20])) + (
        f", ... ({len(indices)} in all)" if len(indices) > 20 else ""
    )
    logger.warning(
        "%d empty text%s at %s[%s]: an empty or whitespace-only text has no content, so its "
        "embedding is that of its instruction and special tokens (or zeros); drop such texts if "
        "that is not wanted",
        len(indices), "" if len(indices) == 1 else "s", where, shown,
    )  # fmt: skip


class LLM2Vec:
    """llm2vec 0.2.3's `LLM2Vec` on the l2v model. Build with `from_pretrained`.

    Attributes llm2vec users touch: model (an l2v_models.model.Transformer), tokenizer,
    pooling_mode, max_length, doc_max_length, skip_instruction (all settable), config (the
    transformers config). Also: name_or_path (what the chat templates key on), device, dtype,
    max_tokens_per_batch (None = DEFAULT_TOKENS_PER_BATCH for the device), cuda_graphs (small
    batches replayed from CUDA graphs, see l2v_models.cuda_graphs and `graph_runner()`).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        *,
        hf_config: Any = None,
        name_or_path: str | None = None,
        max_tokens_per_batch: int | None = None,
        cuda_graphs: bool = False,
    ):
        if not (hasattr(model, "pool") and hasattr(model, "config") and callable(model)):
            raise TypeError(
                f"LLM2Vec wraps an l2v_models.model.Transformer, got {type(model).__name__}; "
                "load models with LLM2Vec.from_pretrained(...)"
            )
        self.tokenizer = tokenizer
        if tokenizer is not None:  # as llm2vec sets them (no padding is ever used here)
            if getattr(tokenizer, "eos_token", None) is not None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self._check_settings(max_tokens_per_batch=max_tokens_per_batch)
        # The engine runs the model: packing, forward, pooling (CUDA graphs when asked).
        self.engine = Engine(
            model, max_tokens_per_batch=max_tokens_per_batch, cuda_graphs=cuda_graphs
        )
        self.config = hf_config if hf_config is not None else model.config
        if name_or_path is None:
            name_or_path = str(getattr(hf_config, "_name_or_path", "") or "")
        self.name_or_path = name_or_path
        # llm2vec tests isinstance(model.config, LlamaConfig/...); without a transformers config
        # (from_model) the l2v architecture name gives the same answer.
        if hf_config is not None:
            self.config_family = tk.config_family(hf_config)
        else:
            self.config_family = getattr(model.config, "arch", "")
        self._load_args: dict | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path=None,
        peft_model_name_or_path=None,
        merge_peft: bool = False,
        enable_bidirectional: bool = True,
        **kwargs,
    ) -> LLM2Vec:
        """Load like llm2vec 0.2.3's `LLM2Vec.from_pretrained`.

        base_model_name_or_path: HF model dir or hub id, an LLM2Vec `-mntp` dir or id, a .gguf
        file, or None / "smollm2" for the embedded SmolLM2-135M-Instruct.
        peft_model_name_or_path: the second LoRA adapter (supervised / SimCSE); its
        llm2vec_config.json (else the base's) gives the encoder defaults.
        merge_peft: accepted for compatibility; adapters are always merged into the weights.
        enable_bidirectional: False encodes causally (llm2vec's option). True (the default)
        encodes as llm2vec does: bidirectionally, except Qwen2, which llm2vec 0.2.3 encodes
        causally; l2v's attention="bidirectional" overrides that
        (see checkpoint.attention_is_causal).
        kwargs: pooling_mode, max_length, doc_max_length, skip_instruction (None = keep the
        default, as llm2vec); torch_dtype / dtype (a torch dtype or "float32", "bfloat16",
        "float16", "auto"; default bf16 on CUDA, fp32 on CPU); device_map / device ("cpu",
        "cuda", "cuda:N", "auto", a GPU index, {"": N}; default CUDA when available); l2v's own
        backend ("auto", "triton", "torch"), attention ("llm2vec", "bidirectional", "causal"),
        base_weights_path, max_tokens_per_batch,
        cuda_graphs (True: batches of up to 2048 tokens and 64 texts replay captured CUDA
        graphs; needs CUDA and the triton backend, else raises).
        attn_implementation, low_cpu_mem_usage, trust_remote_code and use_safetensors are
        accepted and ignored. Anything else raises TypeError.
        """
        from l2v_models import checkpoint

        attention = kwargs.pop("attention", None)
        if not enable_bidirectional:
            if attention not in (None, "causal"):
                raise ValueError(
                    f"enable_bidirectional=False asks for causal attention, but attention="
                    f"{attention!r} was given too; pass one of them"
                )
            attention = "causal"
        if attention is not None and attention not in checkpoint.ATTENTION_MODES:
            raise ValueError(
                f"attention must be one of {checkpoint.ATTENTION_MODES}, got {attention!r}"
            )
        encoder_args = {}
        for key in ("pooling_mode", "max_length", "doc_max_length", "skip_instruction"):
            value = kwargs.pop(key, None)
            if value is not None:
                encoder_args[key] = value
        dtype = _pop_alias(kwargs, "torch_dtype", "dtype")
        device = _parse_device_map(_pop_alias(kwargs, "device_map", "device"))
        ours = {key: kwargs.pop(key) for key in _OUR_KWARGS if key in kwargs}
        for key in _IGNORED_HF_KWARGS:
            if key in kwargs:
                logger.debug("l2v: ignoring %s=%r (l2v uses its own kernels)", key, kwargs.pop(key))
        if kwargs:
            raise TypeError(
                f"LLM2Vec.from_pretrained got unsupported keyword(s) {sorted(kwargs)}; accepted: "
                "pooling_mode, max_length, doc_max_length, skip_instruction, torch_dtype/dtype, "
                "device_map/device, backend, attention, base_weights_path, max_tokens_per_batch, "
                "cuda_graphs"
                + (" (hub options: download the model and pass its local directory)"
                   if {"token", "revision", "cache_dir"} & set(kwargs) else "")
            )  # fmt: skip
        # Validate what can be validated before the (slow) load.
        max_tokens = ours.pop("max_tokens_per_batch", None)
        _check_settings(max_tokens_per_batch=max_tokens, **encoder_args)
        resolved_device = checkpoint.resolve_device(device)
        checkpoint.resolve_dtype(dtype, resolved_device)
        cuda_graphs = ours.pop("cuda_graphs", False)
        if cuda_graphs is True and (
            resolved_device.type != "cuda" or ours.get("backend", "auto") == "torch"
        ):  # refused before the (slow) load; the constructor checks the loaded model too
            raise ValueError(_graphs_refusal(
                f"the model would run on {resolved_device} with backend="
                f"{ours.get('backend', 'auto')!r}"
            ))  # fmt: skip
        load_args = dict(
            base_model_name_or_path=base_model_name_or_path,
            peft_model_name_or_path=peft_model_name_or_path,
            dtype=dtype,
            backend=ours.get("backend", "auto"),
            base_weights_path=ours.get("base_weights_path"),
            attention=attention or "llm2vec",
        )
        loaded = checkpoint.load_model(device=resolved_device, **load_args)

        settings = dict(tk.DEFAULT_ENCODER_ARGS)
        for key, value in loaded.llm2vec_config.items():
            if key in settings:
                settings[key] = value
            else:
                logger.warning("l2v: ignoring unknown llm2vec_config.json key %r", key)
        settings.update(encoder_args)
        encoder = cls(
            loaded.model,
            loaded.tokenizer,
            hf_config=loaded.hf_config,
            name_or_path=loaded.name_or_path,
            max_tokens_per_batch=max_tokens,
            cuda_graphs=cuda_graphs,
            **settings,
        )
        encoder._load_args = load_args
        return encoder

    @classmethod
    def from_model(cls, model, tokenizer=None, **kwargs) -> LLM2Vec:
        """Wrap an already built l2v Transformer (e.g. random weights for benchmarks); without
        a tokenizer only `encode_token_ids` works."""
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def model(self):
        """The l2v Transformer (the engine's)."""
        return self.engine.model

    @model.setter
    def model(self, model) -> None:
        self.engine.model = model

    @property
    def max_tokens_per_batch(self) -> int | None:
        return self.engine.max_tokens_per_batch

    @max_tokens_per_batch.setter
    def max_tokens_per_batch(self, value) -> None:
        self.engine.max_tokens_per_batch = check_int("max_tokens_per_batch", value)

    @property
    def cuda_graphs(self) -> bool:
        return self.engine.cuda_graphs

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def hidden_size(self) -> int:
        return self.engine.hidden_size

    @property
    def engine_pool_mode(self) -> str:
        """The engine's pooling mode for this encoder's pooling_mode ("mean", "weighted_mean" or
        "last"; eos_token / last_token / bos_token pool one token, picked by the pool spans)."""
        return _POOL_OP_MODE[self.pooling_mode]

    def graph_runner(self):
        """The engine's l2v_models.cuda_graphs.BucketedGraphRunner (see Engine.graph_runner)."""
        return self.engine.graph_runner()

    def eval(self) -> LLM2Vec:  # llm2vec is an nn.Module; code calls .eval() on it
        return self

    def to(self, device) -> LLM2Vec:
        """Move the model to `device` (re-loading it there), like nn.Module.to."""
        self._place(device)
        return self

    def _check_settings(self, **extra) -> None:
        _check_settings(
            pooling_mode=self.pooling_mode,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            **extra,
        )

    # ------------------------------------------------------------------ llm2vec text methods
    def _convert_to_str(self, instruction: str, text: str) -> str:
        return tk.convert_to_str(
            self.tokenizer, instruction, text, self.max_length, self.doc_max_length
        )

    def prepare_for_tokenization(self, text: str) -> str:
        return tk.prepare_for_tokenization(
            text, self.name_or_path, self.config_family, self.pooling_mode
        )

    def tokenize(self, texts: Sequence[str]):
        """llm2vec's `tokenize`: prepared strings (`prepare_for_tokenization(_convert_to_str(
        instruction, text))`, the separator marking the text part) -> a transformers
        BatchEncoding of int64 tensors input_ids, attention_mask and embed_mask [B, L], padded on
        the left to the longest text with the pad token (eos), as llm2vec pads. embed_mask marks
        the last N tokens, N = the text part's own token count, clamped to the sequence length
        (llm2vec issue 80, where llm2vec crashes)."""
        from transformers import BatchEncoding

        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of prepared strings, got one string")
        self._require_tokenizer()
        tokens = tk.tokenize(self.tokenizer, list(texts), self.max_length)
        B = len(tokens)
        L = max((len(ids) for ids in tokens.input_ids), default=0)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        input_ids = torch.full((B, L), int(pad), dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        embed_mask = torch.zeros((B, L), dtype=torch.long)
        for b, (ids, n) in enumerate(zip(tokens.input_ids, tokens.embed_lengths, strict=True)):
            if ids:
                input_ids[b, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[b, L - len(ids) :] = 1
            if n:
                embed_mask[b, L - n :] = 1
        return BatchEncoding(
            {"input_ids": input_ids, "attention_mask": attention_mask, "embed_mask": embed_mask}
        )

    def forward(self, sentence_feature) -> torch.Tensor:
        """llm2vec's `forward`: features from `tokenize` (input_ids, attention_mask, optional
        embed_mask [B, L]; padded on either side) -> pooled embeddings, float32 [B, D] on the
        CPU (llm2vec returns the model's dtype on its device), no gradient.

        The padding is dropped, not computed: each row's real tokens (attention_mask) are packed
        and run like encode() runs them, so forward(tokenize(texts)) equals encode() of the same
        texts. As in llm2vec, the pooled text part is the last N real tokens, N =
        embed_mask.sum() of the row; without embed_mask every token is pooled."""
        texts = self._texts_from_features(sentence_feature)
        return self.engine.embed(texts, mode=self.engine_pool_mode)

    __call__ = forward  # llm2vec is an nn.Module: model(features) runs forward

    def _texts_from_features(self, features) -> TokenizedTexts:
        """Padded llm2vec features -> TokenizedTexts (real tokens only); ValueError when a key
        is missing or the shapes disagree."""
        self._check_settings()
        if not hasattr(features, "keys") or "input_ids" not in features:
            raise ValueError(
                "forward takes the features tokenize() returns (a dict with input_ids, "
                f"attention_mask and embed_mask), got {type(features).__name__}"
            )
        ids = torch.as_tensor(features["input_ids"]).cpu()
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        masks = {}
        for key in ("attention_mask", "embed_mask"):
            if features.get(key) is None:
                continue
            masks[key] = torch.as_tensor(features[key]).cpu()
            if masks[key].shape != ids.shape:
                raise ValueError(
                    f"{key} has shape {tuple(masks[key].shape)} but input_ids {tuple(ids.shape)}"
                )
        real = masks.get("attention_mask", torch.ones_like(ids)).bool()
        rows = [ids[b][real[b]].tolist() for b in range(ids.shape[0])]
        if "embed_mask" in masks:
            embed = masks["embed_mask"].long().sum(dim=1).tolist()
        else:
            embed = [len(r) for r in rows]
        return self.texts_from_token_ids(rows, embed)

    def save(self, output_path, merge_before_save: bool = False, save_config: bool = True) -> None:
        """llm2vec's `save`: write a model folder that l2v and llm2vec load back.

        output_path/ receives config.json (the transformers config, with llm2vec's
        `_name_or_path`, which picks the chat template, and the transformers 4.4x spellings
        rope_theta / rope_scaling / torch_dtype next to 5.x's), model.safetensors (the merged
        weights in Hugging Face *Model* names, in the model's dtype), the tokenizer and, with
        save_config, llm2vec_config.json (pooling_mode, max_length, doc_max_length,
        skip_instruction). merge_before_save is accepted for compatibility: l2v's adapters are
        always merged, so the folder is always a plain model.
        """
        import json
        import os

        from safetensors.torch import save_file

        from l2v_models.checkpoint import to_hf_state_dict

        del merge_before_save  # always merged
        self._require_tokenizer()
        if not hasattr(self.config, "save_pretrained"):
            raise ValueError(
                "save() needs the model's transformers config, which an LLM2Vec built with "
                "from_model does not have; load the model with LLM2Vec.from_pretrained"
            )
        os.makedirs(output_path, exist_ok=True)
        state = {
            name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in to_hf_state_dict(self.model).items()
        }
        save_file(state, os.path.join(output_path, "model.safetensors"), metadata={"format": "pt"})
        del state
        self.config.save_pretrained(output_path)
        config_path = os.path.join(output_path, "config.json")
        with open(config_path) as f:
            cfg = json.load(f)
        cfg["_name_or_path"] = self.name_or_path
        dtype = str(self.dtype).removeprefix("torch.")  # the dtype the weights are saved in
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:  # transformers 4.4x spellings
            cfg.setdefault("rope_theta", rope["rope_theta"])
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", scaling)
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        self.tokenizer.save_pretrained(output_path)
        if save_config:
            settings = {
                "pooling_mode": self.pooling_mode,
                "max_length": self.max_length,
                "doc_max_length": self.doc_max_length,
                "skip_instruction": self.skip_instruction,
            }
            with open(os.path.join(output_path, "llm2vec_config.json"), "w") as f:
                json.dump(settings, f, indent=4)

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(
                "this LLM2Vec has no tokenizer (built with from_model); use encode_token_ids"
            )

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> tk.Tokenized:
        """(instruction, text) pairs -> per text token ids + embed length (llm2vec's rules)."""
        self._require_tokenizer()
        return tk.prepare_inputs(
            self.tokenizer,
            pairs,
            name_or_path=self.name_or_path,
            family=self.config_family,
            pooling_mode=self.pooling_mode,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
        )

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        sentences,
        batch_size: int | None = None,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device=None,
        *,
        normalize_embeddings: bool = False,
        max_tokens_per_batch: int | None = None,
    ):
        """Embed texts -> float32 CPU tensor [N, D] in input order (numpy with convert_to_numpy).

        sentences: a string (-> one embedding, shape [D]), or a list of strings and
        [instruction, text] pairs. batch_size: at most this many texts per forward pass
        (default: no limit, the token budget decides). max_tokens_per_batch: real tokens per
        forward pass (default: self.max_tokens_per_batch, else 16384 on CUDA, 4096 on CPU; a
        longer text goes alone). Results do not depend on either, up to rounding.
        device: run there (the model is re-loaded on that device if it lives elsewhere).
        normalize_embeddings: L2-normalize each embedding.
        """
        pairs, squeeze = _normalize_sentences(sentences)
        self._check_settings()
        if device is not None:
            self._place(device)
        out = self.engine.embed(
            self.prepare_texts(pairs),
            mode=self.engine_pool_mode,
            normalize=normalize_embeddings,
            max_tokens=max_tokens_per_batch,
            max_texts=batch_size,
            progress=show_progress_bar,
        )
        if squeeze:
            out = out[0]
        if convert_to_numpy and not convert_to_tensor:
            return out.numpy()
        return out

    def encode_token_ids(
        self,
        input_ids: Sequence[Sequence[int]],
        embed_lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        max_tokens_per_batch: int | None = None,
        normalize_embeddings: bool = False,
        show_progress_bar: bool = False,
    ) -> torch.Tensor:
        """Embed already tokenized texts -> float32 CPU tensor [N, D] in input order.

        input_ids: per text its ids (special tokens included). embed_lengths: per text N, the
        count of last tokens that are the text part (llm2vec's embed mask; clamped to the
        length). Pooling follows self.pooling_mode and self.skip_instruction.
        """
        self._check_settings()
        n = len(input_ids)
        if len(embed_lengths) != n:
            raise ValueError(f"got {n} texts but {len(embed_lengths)} embed lengths")
        texts = self.texts_from_token_ids(input_ids, embed_lengths)
        return self.engine.embed(
            texts,
            mode=self.engine_pool_mode,
            normalize=normalize_embeddings,
            max_tokens=max_tokens_per_batch,
            max_texts=batch_size,
            progress=show_progress_bar,
        )

    def prepare_texts(self, sentences) -> TokenizedTexts:
        """encode()'s input (strings and [instruction, text] pairs) -> the engine's
        TokenizedTexts, by llm2vec's text rules and this encoder's settings. What the server and
        the corpus runner call off the model's thread; `engine.embed` then runs them."""
        pairs, _ = _normalize_sentences(sentences)
        self._check_settings()
        warn_empty_texts(empty_text_indices(pairs))
        tokens = self.tokenize_pairs(pairs)
        return self.texts_from_token_ids(tokens.input_ids, tokens.embed_lengths)

    def texts_from_token_ids(self, input_ids, embed_lengths) -> TokenizedTexts:
        """Token ids + llm2vec embed lengths -> the engine's TokenizedTexts (pool spans by this
        encoder's pooling_mode and skip_instruction; see _pool_spans)."""
        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
        starts, counts = self._pool_spans(input_ids, lengths, embed_lengths)
        return TokenizedTexts(input_ids, starts, counts)

    def _pool_spans(self, input_ids, lengths: np.ndarray, embed_lengths) -> tuple[np.ndarray, ...]:
        """Per text (start, count) of the pooled tokens, llm2vec's rules (see module doc)."""
        n_embed = np.minimum(np.asarray(embed_lengths, dtype=np.int64).reshape(-1), lengths)
        n_embed = np.maximum(n_embed, 0)
        mode = self.pooling_mode
        if mode in ("eos_token", "last_token"):
            return np.maximum(lengths - 1, 0), np.ones_like(lengths)
        if mode == "bos_token":
            bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer else None
            starts = np.array([_first_index(ids, bos) for ids in input_ids], dtype=np.int64)
            return starts, np.ones_like(lengths)
        if not self.skip_instruction:
            return np.zeros_like(lengths), lengths.copy()
        if mode == "mean":  # N = 0: llm2vec's h[-0:] is the whole (unpadded) sequence
            counts = np.where(n_embed > 0, n_embed, lengths)
        else:  # weighted_mean: N = 0 gives zero weights, i.e. zeros, in llm2vec too
            counts = n_embed
        return lengths - counts, counts

    def _place(self, device) -> None:
        """Make the model live on `device`, re-loading it there when it lives elsewhere."""
        from l2v_models import checkpoint

        target = checkpoint.resolve_device(device)
        if _same_device(target, self.device):
            return
        if self._load_args is None:
            raise ValueError(
                f"the model lives on {self.device} and was not loaded by from_pretrained, so it "
                f"cannot be moved to {target}; build it on that device"
            )
        logger.info("l2v: re-loading the model on %s (it was on %s)", target, self.device)
        self.model = checkpoint.load_model(device=target, **self._load_args).model


def _graphs_refusal(problem: str) -> str:
    return (
        f"cuda_graphs=True needs the model on a CUDA device with the triton backend, but "
        f"{problem}; pass cuda_graphs=False (the default)"
    )


def _pop_alias(kwargs: dict, name: str, alias: str):
    a, b = kwargs.pop(name, None), kwargs.pop(alias, None)
    if a is not None and b is not None and a != b:
        raise ValueError(f"got both {name}={a!r} and {alias}={b!r}; pass one")
    return a if a is not None else b


def _first_index(ids, token_id) -> int:
    """Position of the first `token_id` in ids, 0 when absent (or token_id is None)."""
    if token_id is None:
        return 0
    try:
        return list(ids).index(token_id)
    except ValueError:
        return 0
