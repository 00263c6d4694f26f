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

`LLM2Vec` is an l2v_models.embedder.Embedder (text rules + engine + head) with llm2vec's API on
top: any model l2v runs loads through it (a sentence-transformers folder too, with its own rules;
llm2vec's settings pooling_mode, doc_max_length and skip_instruction exist for llm2vec models
only). Beyond llm2vec: `prompt=` / `prompt_name=` and `truncate_dim=` in encode, encode_query /
encode_document (see l2v_models.embedder). The text rules live in l2v_models.text_rules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from l2v_models import text_rules as tr
from l2v_models import tokenization as tk
from l2v_models.embedder import Embedder
from l2v_models.packing import TokenizedTexts

logger = logging.getLogger(__name__)

# Keywords transformers' from_pretrained takes that have no meaning for l2v's own kernels.
_IGNORED_HF_KWARGS = ("attn_implementation", "low_cpu_mem_usage", "trust_remote_code",
                      "use_safetensors", "use_flash_attention_2")  # fmt: skip
_OUR_KWARGS = ("backend", "base_weights_path", "max_tokens_per_batch", "cuda_graphs")
_ENCODER_SETTINGS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")


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




def _rule_setting(name: str):
    """A property reading and writing the llm2vec rule's setting `name` (AttributeError naming
    the difference for a model that follows another rule)."""

    def get(self):
        if not hasattr(self.rules, name):
            raise AttributeError(
                f"{name} is a setting of llm2vec models; this model follows "
                f"{self.rules.kind}'s text rules"
            )
        return getattr(self.rules, name)

    def set_(self, value):
        get(self)
        setattr(self.rules, name, value)

    return property(get, set_, doc=f"llm2vec's {name} (read and written on the text rules).")


class LLM2Vec(Embedder):
    """llm2vec 0.2.3's `LLM2Vec` on the l2v model. Build with `from_pretrained`.

    Attributes llm2vec users touch: model (an l2v_models.model.Transformer), tokenizer,
    pooling_mode, max_length, doc_max_length, skip_instruction (all settable), config (the
    transformers config). Also: name_or_path (what the chat templates key on), device, dtype,
    max_tokens_per_batch (None = DEFAULT_TOKENS_PER_BATCH for the device), cuda_graphs (small
    batches replayed from CUDA graphs, see l2v_models.cuda_graphs and `graph_runner()`), and
    everything an Embedder has (rules, engine, encode_query, encode_document, describe).
    """

    pooling_mode = _rule_setting("pooling_mode")
    max_length = _rule_setting("max_length")
    doc_max_length = _rule_setting("doc_max_length")
    skip_instruction = _rule_setting("skip_instruction")
    name_or_path = _rule_setting("name_or_path")
    config_family = _rule_setting("config_family")

    def __init__(
        self,
        model,
        tokenizer=None,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        *,
        hf_config=None,
        name_or_path: str | None = None,
        max_tokens_per_batch: int | None = None,
        cuda_graphs: bool = False,
    ):
        if not (hasattr(model, "pool") and hasattr(model, "config") and callable(model)):
            raise TypeError(
                f"LLM2Vec wraps an l2v_models.model.Transformer, got {type(model).__name__}; "
                "load models with LLM2Vec.from_pretrained(...)"
            )
        if name_or_path is None:
            name_or_path = str(getattr(hf_config, "_name_or_path", "") or "")
        # llm2vec tests isinstance(model.config, LlamaConfig/...); without a transformers config
        # (from_model) the l2v architecture name gives the same answer.
        family = (tk.config_family(hf_config) if hf_config is not None
                  else getattr(model.config, "arch", ""))  # fmt: skip
        rules = tr.Llm2vecRules(
            tokenizer, name_or_path=name_or_path, config_family=family,
            pooling_mode=pooling_mode, max_length=max_length, doc_max_length=doc_max_length,
            skip_instruction=skip_instruction,
        )  # fmt: skip
        rules.check()
        super().__init__(model, rules, hf_config=hf_config,
                         max_tokens_per_batch=max_tokens_per_batch,
                         cuda_graphs=cuda_graphs)  # fmt: skip

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
        file, a sentence-transformers folder, or None / "smollm2-llm2vec" for the default encoder
        (see Embedder.from_pretrained for every form).
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
        backend ("auto", "triton", "torch"), attention ("llm2vec", "config", "bidirectional",
        "causal"), base_weights_path, max_tokens_per_batch,
        cuda_graphs (True: batches of up to 2048 tokens and 64 texts replay captured CUDA
        graphs; needs CUDA and the triton backend, else raises).
        attn_implementation, low_cpu_mem_usage, trust_remote_code and use_safetensors are
        accepted and ignored. Anything else raises TypeError.
        """
        del merge_peft  # adapters are always merged
        attention = kwargs.pop("attention", None)
        if not enable_bidirectional:
            if attention not in (None, "causal"):
                raise ValueError(
                    f"enable_bidirectional=False asks for causal attention, but attention="
                    f"{attention!r} was given too; pass one of them"
                )
            attention = "causal"
        settings = {key: kwargs.pop(key, None) for key in _ENCODER_SETTINGS}
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
        return super().from_pretrained(
            base_model_name_or_path, peft_model_name_or_path, dtype=dtype, device=device,
            attention=attention, **ours, **settings,
        )  # fmt: skip

    @classmethod
    def from_model(cls, model, tokenizer=None, **kwargs) -> LLM2Vec:
        """Wrap an already built l2v Transformer (e.g. random weights for benchmarks); without
        a tokenizer only `encode_token_ids` works."""
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def engine_pool_mode(self) -> str:
        """The engine's pooling op for this model ("mean", "weighted_mean", "max" or "last";
        eos_token / last_token / bos_token pool one token, picked by the pool spans)."""
        return self.rules.pool_mode

    def eval(self) -> LLM2Vec:  # llm2vec is an nn.Module; code calls .eval() on it
        return self

    def to(self, device) -> LLM2Vec:
        """Move the model to `device` (re-loading it there), like nn.Module.to."""
        self._place(device)
        return self

    def _check_settings(self) -> None:
        self.rules.check()

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
        return self.embed(texts)

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
        if not isinstance(self.rules, tr.Llm2vecRules):
            raise ValueError(
                f"this is llm2vec's API for llm2vec's text rules; the model follows "
                f"{self.rules.kind}'s: use encode() / prepare()"
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
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
    ):
        """Embed texts -> float32 CPU tensor [N, D] in input order (numpy with convert_to_numpy).

        llm2vec's signature. sentences: a string (-> one embedding, shape [D]), or a list of
        strings and [instruction, text] pairs. batch_size: at most this many texts per forward
        pass (default: no limit, the token budget decides). max_tokens_per_batch: real tokens per
        forward pass (default: self.max_tokens_per_batch, else 16384 on CUDA, 4096 on CPU; a
        longer text goes alone). Results do not depend on either, up to rounding.
        device: run there (the model is re-loaded on that device if it lives elsewhere).
        normalize_embeddings: L2-normalize each embedding. prompt / prompt_name: the
        instruction (prompt) for inputs without one; truncate_dim: keep the first this many
        features (see l2v_models.embedder).
        """
        return self._encode(
            sentences, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
            show_progress_bar=show_progress_bar, convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor, device=device,
            normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim,
            max_tokens_per_batch=max_tokens_per_batch,
        )  # fmt: skip

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
        return self.embed(
            texts, normalize=normalize_embeddings, batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch, show_progress_bar=show_progress_bar,
        )  # fmt: skip

    def texts_from_token_ids(self, input_ids, embed_lengths) -> TokenizedTexts:
        """Token ids + llm2vec embed lengths -> the engine's TokenizedTexts (pool spans by this
        encoder's pooling_mode and skip_instruction; see text_rules.Llm2vecRules.pool_spans)."""
        if not isinstance(self.rules, tr.Llm2vecRules):
            raise ValueError(
                "embed lengths are llm2vec's embed mask; this model follows "
                f"{self.rules.kind}'s text rules: pass texts to encode() instead"
            )
        return self.rules.texts_from_token_ids(input_ids, embed_lengths)


def _pop_alias(kwargs: dict, name: str, alias: str):
    a, b = kwargs.pop(name, None), kwargs.pop(alias, None)
    if a is not None and b is not None and a != b:
        raise ValueError(f"got both {name}={a!r} and {alias}={b!r}; pass one")
    return a if a is not None else b
