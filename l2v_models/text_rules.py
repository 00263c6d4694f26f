"""Text rules: how a model turns (prompt, text) into token ids and which of them it pools.

    rules = Llm2vecRules(tokenizer, name_or_path=..., config_family=..., pooling_mode="mean")
    rules = SentenceTransformersRules(tokenizer, st_folder, max_position_embeddings=...)
    pairs, _ = text_inputs.as_pairs(["a text", ["an instruction", "a text"]])
    prepared = rules.prepare(pairs)           # .texts: TokenizedTexts, .truncations: what was cut
    rows = engine.embed(prepared.texts, mode=rules.pool_mode)

One object per model, built at load time from the model's own files (l2v_models.embedder does
it); the encoder, server, corpus runner, evaluator and trainer ask it and know nothing about
which rule a model follows. Two implementations of one interface (`TextRules`):

- `Llm2vecRules`: llm2vec 0.2.3's (l2v_models.tokenization): the instruction is joined to the
  text with llm2vec's separator, wrapped in the chat template the config's `_name_or_path`
  picks, the text is cut by words to `doc_max_length` tokens, the ids are right-truncated at
  `max_length`, and pooling reads the text's own tokens only (`skip_instruction`).
- `SentenceTransformersRules`: sentence-transformers' (a model folder with modules.json, see
  l2v_models.st_folder): the prompt is prepended to the text, the ids are right-truncated at the
  Transformer's max_seq_length, and with the Pooling module's `include_prompt: false` the
  prompt's tokens (sentence-transformers' count: the prompt tokenized alone, less a trailing
  special token) are attended to but not pooled.

An input is a (prompt, text) pair; the prompt of an llm2vec model is its instruction, "" for
none. `prepare` reports every text that a rule cut (`Truncation`: which text, its token count,
the limit and the rule), so callers can count, report or refuse them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from l2v_models import tokenization as tk
from l2v_models.packing import TokenizedTexts

LLM2VEC_POOLING_MODES = tk.POOLING_MODES
# llm2vec pooling mode -> the engine's pooling op (the one-token modes pick their token by span).
_LLM2VEC_POOL_OP = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last",
                    "last_token": "last", "bos_token": "last"}  # fmt: skip
# sentence-transformers pooling mode -> the engine's pooling op.
_ST_POOL_OP = {"mean": "mean", "weightedmean": "weighted_mean", "max": "max", "cls": "last",
               "lasttoken": "last"}  # fmt: skip
# Names encode_query / encode_document look for, in sentence-transformers' order.
QUERY_PROMPT_NAMES = ("query",)
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclass(frozen=True)
class Truncation:
    """One text a rule cut: its index, its token count before the cut, the limit, the rule."""

    index: int
    tokens: int
    limit: int
    rule: str  # "doc_max_length" (llm2vec's cut by words), "max_length", "max_seq_length"


@dataclass
class Prepared:
    """Texts ready for the engine and what was cut on the way."""

    texts: TokenizedTexts
    truncations: list[Truncation] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


# ------------------------------------------------------------------------------ the interface
class TextRules:
    """The interface (see the module docstring). Attributes every rule has: tokenizer,
    max_length (tokens per sequence; settable), pool_mode (the engine's pooling op), prompts
    (named prompts), default_prompt_name."""

    kind = ""
    prompts: dict[str, str]
    default_prompt_name: str | None

    def prepare(
        self, pairs: Sequence[tuple[str, str]], *, max_length: int | None = None
    ) -> Prepared:
        """(prompt, text) pairs -> the engine's TokenizedTexts and the texts that were cut.
        max_length: this call's token limit per sequence (default: self.max_length)."""
        raise NotImplementedError

    @property
    def pool_mode(self) -> str:
        raise NotImplementedError

    def from_token_ids(self, input_ids) -> TokenizedTexts:
        """Token-id inputs (special tokens included, no prompt): every token is the text's, and
        the pooled span is the one the rule's mode reads (mean: all; a one-token mode: its
        token, e.g. the first for cls, the BOS for bos_token)."""
        raise NotImplementedError

    def check(self) -> None:
        """ValueError for an invalid setting (they are settable attributes)."""

    def describe(self) -> dict[str, str]:
        """What `l2v info --model` shows: rule, attention-independent settings, prompts."""
        raise NotImplementedError

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The prompt text for a call: `prompt` if given, else the named prompt, else the model's
        default prompt (if it has one), else "". ValueError listing the model's prompts for an
        unknown name; both given is a ValueError too."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("pass a prompt or a prompt_name, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                if not self.prompts:
                    raise ValueError(
                        f"unknown prompt name {prompt_name!r}: this model has no named prompts "
                        "(give the prompt's text instead)"
                    )
                known = ", ".join(repr(k) for k in self.prompts)
                raise ValueError(
                    f"unknown prompt name {prompt_name!r}: this model's prompts are {known}"
                )
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name, "")
        return ""

    def side_prompt_name(self, side: str) -> str | None:
        """The prompt name encode_query ("query") or encode_document ("document") uses when the
        caller names none: the first of sentence-transformers' candidates the model has."""
        names = QUERY_PROMPT_NAMES if side == "query" else DOCUMENT_PROMPT_NAMES
        return next((n for n in names if n in self.prompts), None)

    def _cut_at(self, tokenizer, full_text, ids: Sequence[Sequence[int]], limit: int,
                rule: str) -> list[Truncation]:  # fmt: skip
        """Texts whose ids reached `limit` and whose untruncated tokenization is longer;
        full_text(i): the whole string text i is tokenized from."""
        out = []
        for i in [i for i, x in enumerate(ids) if len(x) >= limit]:
            n = len(tokenizer(full_text(i), truncation=False,
                              return_attention_mask=False)["input_ids"])  # fmt: skip
            if n > limit:
                out.append(Truncation(i, n, limit, rule))
        return out


# ------------------------------------------------------------------------------ llm2vec
class Llm2vecRules(TextRules):
    """llm2vec 0.2.3's text rules (see l2v_models.tokenization for each step).

    tokenizer: the model's (pad = eos, as llm2vec sets it). name_or_path: the config's
    `_name_or_path` as llm2vec sees it (picks the chat template). config_family: llm2vec's
    isinstance() family ("llama", "mistral", "gemma", "qwen2" or ""). pooling_mode, max_length,
    doc_max_length, skip_instruction: llm2vec's settings (llm2vec_config.json, then the caller's).
    """

    kind = "llm2vec"

    def __init__(self, tokenizer, *, name_or_path: str = "", config_family: str = "",
                 pooling_mode: str = "mean", max_length: int = 512, doc_max_length: int = 400,
                 skip_instruction: bool = True):  # fmt: skip
        self.tokenizer = tokenizer
        if tokenizer is not None:  # as llm2vec sets them (no padding is ever used here)
            if getattr(tokenizer, "eos_token", None) is not None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
        self.name_or_path = name_or_path
        self.config_family = config_family
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.prompts = {}
        self.default_prompt_name = None

    @property
    def pool_mode(self) -> str:
        return _LLM2VEC_POOL_OP[self.pooling_mode]

    def check(self) -> None:
        check_llm2vec_settings(
            pooling_mode=self.pooling_mode, max_length=self.max_length,
            doc_max_length=self.doc_max_length, skip_instruction=self.skip_instruction,
        )  # fmt: skip

    def describe(self) -> dict[str, str]:
        return {
            "text rules": "llm2vec (instruction joined by llm2vec's separator, attended to but "
            + ("not pooled)" if self.skip_instruction else "pooled too)"),
            "pooling": self.pooling_mode,
            "max tokens": f"{self.max_length} per text (the text itself cut by words to "
            f"{self.doc_max_length} tokens)",
            "chat template": self.name_or_path if tk.has_chat_template(self.name_or_path)
            else "none",
            "prompts": "none (instructions are given per text)",
        }

    def prepare(self, pairs, *, max_length: int | None = None) -> Prepared:
        self._require_tokenizer()
        self.check()
        tok = self.tokenizer
        limit = max_length or self.max_length
        tokens = tk.prepare_inputs(
            tok, pairs, name_or_path=self.name_or_path, family=self.config_family,
            pooling_mode=self.pooling_mode, max_length=limit, doc_max_length=self.doc_max_length,
        )  # fmt: skip
        originals = [p[1] for p in pairs]
        cut_by_words = [i for i, (a, b) in enumerate(zip(originals, tokens.texts, strict=True))
                        if a != b]  # fmt: skip
        full_counts = tk.token_lengths(tok, [originals[i] for i in cut_by_words], None)
        truncations = [Truncation(i, n, self.doc_max_length, "doc_max_length")
                       for i, n in zip(cut_by_words, full_counts, strict=True)]  # fmt: skip

        def full_text(i: int) -> str:  # the sequence as llm2vec tokenizes it, template included
            joined = tk.join_instruction(pairs[i][0], tokens.texts[i])
            return tk.split_instruction(tk.prepare_for_tokenization(
                joined, self.name_or_path, self.config_family, self.pooling_mode))[0]  # fmt: skip

        seen = {t.index for t in truncations}
        truncations += [t for t in self._cut_at(tok, full_text, tokens.input_ids, limit,
                                                "max_length") if t.index not in seen]  # fmt: skip
        truncations.sort(key=lambda t: t.index)
        return Prepared(self.texts_from_token_ids(tokens.input_ids, tokens.embed_lengths),
                        truncations)  # fmt: skip

    def from_token_ids(self, input_ids) -> TokenizedTexts:
        return self.texts_from_token_ids(input_ids, [len(x) for x in input_ids])

    def texts_from_token_ids(self, input_ids, embed_lengths) -> TokenizedTexts:
        """Token ids + llm2vec embed lengths (the last N ids are the text part) -> the engine's
        TokenizedTexts, pool spans by pooling_mode and skip_instruction."""
        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
        starts, counts = self.pool_spans(input_ids, lengths, embed_lengths)
        return TokenizedTexts(input_ids, starts, counts)

    def pool_spans(self, input_ids, lengths: np.ndarray, embed_lengths) -> tuple[np.ndarray, ...]:
        """Per text (start, count) of the pooled tokens, llm2vec's rules: eos_token / last_token
        the last token; bos_token the first token equal to bos_token_id (else the first);
        without skip_instruction every token; mean: the last N tokens (N = 0: all of them, as
        llm2vec's h[-0:] slice of an unpadded row); weighted_mean: the last N (N = 0: none)."""
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
        if mode == "mean":
            counts = np.where(n_embed > 0, n_embed, lengths)
        else:
            counts = n_embed
        return lengths - counts, counts

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer (built with from_model); embed token ids instead"
            )


def check_llm2vec_settings(*, pooling_mode=None, max_length=None, doc_max_length=None,
                           skip_instruction=None) -> None:  # fmt: skip
    """ValueError for an invalid llm2vec setting (None = not given)."""
    from l2v_models.engine import check_int

    if pooling_mode is not None and pooling_mode not in LLM2VEC_POOLING_MODES:
        raise ValueError(
            f"pooling_mode must be one of {LLM2VEC_POOLING_MODES}, got {pooling_mode!r}"
        )
    check_int("max_length", max_length)
    check_int("doc_max_length", doc_max_length, minimum=0)
    if skip_instruction is not None and not isinstance(skip_instruction, (bool, np.bool_)):
        raise ValueError(f"skip_instruction must be a bool, got {skip_instruction!r}")


def _first_index(ids, token_id) -> int:
    """Position of the first `token_id` in ids, 0 when absent (or token_id is None)."""
    if token_id is None:
        return 0
    try:
        return list(ids).index(token_id)
    except ValueError:
        return 0


# ------------------------------------------------------------------------ sentence-transformers
class SentenceTransformersRules(TextRules):
    """sentence-transformers' text rules for a model folder (l2v_models.st_folder.StFolder).

    tokenizer: the Transformer module's. max_position_embeddings: the model config's (caps the
    tokenizer's limit when the folder sets no max_seq_length, as sentence-transformers does)."""

    kind = "sentence-transformers"

    def __init__(self, tokenizer, folder, *, max_position_embeddings: int | None = None):
        self.folder = folder
        self.tokenizer = _lowercasing(tokenizer) if folder.do_lower_case else tokenizer
        limit = folder.max_seq_length
        if limit is None:
            limit = getattr(tokenizer, "model_max_length", None) or 10**9
            if max_position_embeddings:
                limit = min(int(limit), int(max_position_embeddings))
        self.max_length = int(limit)
        self.pooling = folder.pooling
        self.include_prompt = folder.include_prompt
        self.prompts = dict(folder.prompts)
        self.default_prompt_name = folder.default_prompt_name
        self._prompt_lengths: dict[str, int] = {}

    @property
    def pool_mode(self) -> str:
        return _ST_POOL_OP[self.pooling]

    def check(self) -> None:
        from l2v_models.engine import check_int

        check_int("max_length", self.max_length)

    def describe(self) -> dict[str, str]:
        prompts = ", ".join(f"{k}={v!r}" for k, v in self.prompts.items()) or "none"
        default = self.default_prompt_name
        return {
            "text rules": "sentence-transformers (prompt prepended to the text"
            + (", attended to but not pooled)" if not self.include_prompt else ")"),
            "pooling": self.pooling,
            "max tokens": f"{self.max_length} per text",
            "modules": " -> ".join(self.folder.module_names),
            "prompts": prompts + (f" (default: {default})" if default else ""),
        }

    def from_token_ids(self, input_ids) -> TokenizedTexts:
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        return TokenizedTexts(input_ids, *self._spans(lengths, np.zeros_like(lengths)))

    def _spans(self, lengths: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, counts) of the pooled tokens: after `skip` prompt tokens; cls: the first of
        them; lasttoken: the last token of the sequence."""
        starts = np.minimum(skip, lengths)
        counts = lengths - starts
        if self.pooling == "lasttoken":
            return np.maximum(lengths - 1, 0), np.minimum(lengths, 1)
        if self.pooling == "cls":
            counts = np.minimum(counts, 1)
        return starts, counts

    def prompt_length(self, prompt: str) -> int:
        """sentence-transformers' count of a prompt's tokens: the prompt tokenized alone (special
        tokens included), less one when its last token is a special token (an EOS the tokenizer
        appends). The first this many tokens of a prompted text are not pooled."""
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer(prompt, return_attention_mask=False)["input_ids"]
            n = len(ids)
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            if ids and ids[-1] in special:
                n -= 1
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def prepare(self, pairs, *, max_length: int | None = None) -> Prepared:
        self.check()
        limit = max_length or self.max_length
        full = [p + t for p, t in pairs]
        enc = self.tokenizer(full, truncation=True, max_length=limit, return_attention_mask=False)
        ids = [list(x) for x in enc["input_ids"]]
        n = len(ids)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        skip = np.zeros(n, dtype=np.int64)
        if not self.include_prompt:
            skip = np.array([self.prompt_length(p) if p else 0 for p, _ in pairs], dtype=np.int64)
        starts, counts = self._spans(lengths, skip)
        truncations = self._cut_at(self.tokenizer, full.__getitem__, ids, limit, "max_seq_length")
        return Prepared(TokenizedTexts(ids, starts, counts), truncations)


def _lowercasing(tokenizer):
    """A copy of a fast tokenizer that lowercases its input first (sentence-transformers'
    do_lower_case: a Lowercase normalizer in front of the tokenizer's own)."""
    import copy

    from tokenizers import normalizers

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("do_lower_case needs a fast (tokenizers) tokenizer")
    tokenizer = copy.deepcopy(tokenizer)
    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return tokenizer
    parts: list[Any] = [normalizers.Lowercase()]
    if isinstance(current, normalizers.Sequence):
        parts += list(current)
    elif current is not None:
        parts.append(current)
    backend.normalizer = normalizers.Sequence(parts)
    return tokenizer


# ------------------------------------------------------------------------------ per model
def rules_for(loaded, *, pooling_mode: str | None = None, max_length: int | None = None,
              doc_max_length: int | None = None,
              skip_instruction: bool | None = None) -> TextRules:  # fmt: skip
    """The text rules of a loaded model (l2v_models.checkpoint.Loaded), from its own files:
    sentence-transformers' for a folder with modules.json, else llm2vec's (defaults, then
    llm2vec_config.json, then the settings given here). max_length overrides either rule's token
    limit; pooling_mode, doc_max_length and skip_instruction are llm2vec's (a ValueError for a
    sentence-transformers model, whose modules set them)."""
    folder = getattr(loaded, "st_folder", None)
    if folder is not None:
        given = [name for name, value in (("pooling_mode", pooling_mode),
                                          ("doc_max_length", doc_max_length),
                                          ("skip_instruction", skip_instruction))
                 if value is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{given[0]} is a setting of llm2vec models; {folder.root} is a "
                "sentence-transformers model, whose Pooling and Transformer modules set how it "
                f"pools and cuts texts ({', '.join(folder.module_names)})"
            )
        rules = SentenceTransformersRules(
            loaded.tokenizer, folder, max_position_embeddings=loaded.config.max_position_embeddings
        )
        if max_length is not None:
            rules.max_length = max_length
        rules.check()
        return rules
    settings = dict(tk.DEFAULT_ENCODER_ARGS)
    for key, value in (loaded.llm2vec_config or {}).items():
        if key in settings:
            settings[key] = value
        else:
            logging.getLogger(__name__).warning(
                "l2v: ignoring unknown llm2vec_config.json key %r", key
            )
    overrides = dict(pooling_mode=pooling_mode, max_length=max_length,
                     doc_max_length=doc_max_length, skip_instruction=skip_instruction)  # fmt: skip
    settings.update({k: v for k, v in overrides.items() if v is not None})
    rules = Llm2vecRules(loaded.tokenizer, name_or_path=loaded.name_or_path,
                         config_family=tk.config_family(loaded.hf_config), **settings)  # fmt: skip
    rules.check()
    return rules
