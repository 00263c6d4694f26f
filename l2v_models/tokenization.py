"""Text -> token ids with llm2vec 0.2.3 semantics (pure functions, no model, no padding).

llm2vec turns an (instruction, text) pair into token ids in four steps, reproduced here:

1. `_convert_to_str`: truncate the text by words until its own tokenization (no special tokens,
   truncated at `max_length`) has at most `doc_max_length` tokens, then join:
   ``f"{instruction.strip()} !@#$%^&*(){text}"`` (or ``"!@#$%^&*()" + text`` when the
   instruction is empty).
2. `prepare_for_tokenization`: wrap the joined string in a chat template chosen by the model
   config's `_name_or_path`, and append an end-of-sequence string in `eos_token` pooling mode,
   chosen by the config class.
3. `tokenize`: split at the separator; the ids are the tokenization of the two parts glued
   together (special tokens added, right-truncated at `max_length`); the embed mask is the LAST
   N tokens, N = the length of the text part tokenized on its own (no special tokens, truncated
   at `max_length`).
4. Pooling (in the encoder) over the embed mask when `skip_instruction`, else over all tokens.

Where llm2vec is broken we differ, on purpose and documented:
- N larger than the joined sequence (llm2vec issue 80, a crash there; or pad tokens pooled in a
  padded batch) is clamped to the sequence length;
- where the word truncation would keep no word (a long text without spaces: CJK, a URL, base64;
  or one whose first word alone is over the limit), llm2vec's text becomes "" and its embedding
  that of an empty text (zeros without an instruction); here the text is cut by tokens instead:
  the longest prefix of it (in characters) with at most `doc_max_length` tokens.
Everything else is reproduced string for string and id for id.

Tokenizer calls are batched (one call for many texts); Hugging Face tokenizers give each text
the same ids alone or in a batch, so this changes nothing but speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from l2v_models.architectures import REGISTRY

# llm2vec's instruction/text separator: removed before tokenization, only marks the split.
SEPARATOR = "!@#$%^&*()"

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")

# llm2vec 0.2.3 defaults (LLM2Vec.__init__), overridden by llm2vec_config.json, then by kwargs.
DEFAULT_ENCODER_ARGS = {
    "pooling_mode": "mean",
    "max_length": 512,
    "doc_max_length": 400,
    "skip_instruction": True,
}

# Chat templates llm2vec applies, keyed by the exact config `_name_or_path`.
_LLAMA3_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"
_INST_WRAPPED = ("mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf")
_GEMMA_WRAPPED = ("google/gemma-2-9b-it",)
_QWEN_WRAPPED = ("Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct")
_LLAMA3_BASE = "meta-llama/Meta-Llama-3-8B"

# Config classes llm2vec tests with isinstance() for the eos_token suffix, checked in its order.
_FAMILY_BY_CONFIG_CLASS = (
    ("LlamaConfig", "llama"),
    ("MistralConfig", "mistral"),
    ("GemmaConfig", "gemma"),
    ("Qwen2Config", "qwen2"),
)


def config_family(hf_config: Any) -> str:
    """The family llm2vec's isinstance() checks see for a transformers config object.

    Returns "llama", "mistral", "gemma", "qwen2", or "" for any other class. The test is on the
    class and its bases (isinstance), not on `model_type`, exactly like llm2vec: a Gemma-2 or
    Qwen2-MoE config is none of these and gets no eos suffix.
    """
    names = {cls.__name__ for cls in type(hf_config).__mro__}
    for class_name, family in _FAMILY_BY_CONFIG_CLASS:
        if class_name in names:
            return family
    return ""


def token_lengths(tokenizer, texts: Sequence[str], max_length: int | None) -> list[int]:
    """len(tokenizer(text, add_special_tokens=False, truncation=True, max_length)) per text
    (no truncation when max_length is None)."""
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=False,
    )
    return [len(ids) for ids in enc["input_ids"]]


def truncate_by_words(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    doc_max_length: int,
    *,
    by_tokens_when_no_word: bool = True,
) -> tuple[list[str], list[int]]:
    """llm2vec's doc_max_length loop for many texts: (truncated texts, their token counts).

    For each text: while its token count (no special tokens, truncated at max_length) exceeds
    doc_max_length, keep the first int(words * doc_max_length / count) whitespace-separated
    words, joined by single spaces. A text that is never cut is returned unchanged (its
    whitespace included). Texts still too long are re-tokenized together, round by round.

    by_tokens_when_no_word (l2v's rule, the default): when a round would keep no word (llm2vec
    then returns "", whatever the text was), the text is cut by tokens instead
    (`truncate_by_tokens`), so a non-empty text never becomes empty. False: llm2vec exactly.
    """
    texts = list(texts)
    lengths = token_lengths(tokenizer, texts, max_length)
    pending = [i for i, n in enumerate(lengths) if n > doc_max_length]
    while pending:
        by_tokens = []
        for i in pending:
            words = texts[i].split()
            keep = int(len(words) * (doc_max_length / lengths[i]))
            if keep == 0 and by_tokens_when_no_word:
                by_tokens.append(i)
                continue
            texts[i] = " ".join(words[:keep])
        for i in by_tokens:
            texts[i], lengths[i] = truncate_by_tokens(
                tokenizer, texts[i], max_length, doc_max_length
            )
        done = set(by_tokens)
        pending = [i for i in pending if i not in done]
        new_lengths = token_lengths(tokenizer, [texts[i] for i in pending], max_length)
        for i, n in zip(pending, new_lengths, strict=True):
            lengths[i] = n
        pending = [i for i in pending if lengths[i] > doc_max_length]
    return texts, lengths


def truncate_by_tokens(tokenizer, text: str, max_length: int, budget: int) -> tuple[str, int]:
    """The longest prefix of `text` (in characters) with at most `budget` tokens, and its count.

    Counted like llm2vec counts a text (no special tokens, truncated at max_length). The prefix
    is cut from the original string, never decoded from ids, so no character is altered or
    half-cut. First guess: the end of the budget-th token (the tokenizer's offsets, when it has
    them); when that prefix tokenizes to more than `budget` tokens (a multi-byte character split
    across tokens, a BPE merge across the cut), the longest valid prefix is found by bisection.
    """
    if budget <= 0 or not text:
        return "", 0
    end = len(text)
    try:
        enc = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=budget,
            return_offsets_mapping=True, return_attention_mask=False,
        )  # fmt: skip
        offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
        if offsets:
            end = max(o[1] for o in offsets)
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizer: no offsets
        pass
    (n,) = token_lengths(tokenizer, [text[:end]], max_length)
    if n <= budget:
        return text[:end], n
    lo, hi = 0, end  # count(text[:lo]) <= budget < count(text[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (m,) = token_lengths(tokenizer, [text[:mid]], max_length)
        if m <= budget:
            lo = mid
        else:
            hi = mid
    (n,) = token_lengths(tokenizer, [text[:lo]], max_length)
    return text[:lo], n


def join_instruction(instruction: str, text: str) -> str:
    """llm2vec's `_convert_to_str` join (after truncation): instruction, space, separator, text."""
    return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def convert_to_str(
    tokenizer, instruction: str, text: str, max_length: int, doc_max_length: int
) -> str:
    """llm2vec's `LLM2Vec._convert_to_str` for one pair."""
    (text,), _ = truncate_by_words(tokenizer, [text], max_length, doc_max_length)
    return join_instruction(instruction, text)


def has_chat_template(name_or_path: str) -> bool:
    """Whether llm2vec wraps texts of the model with this `_name_or_path` in a chat template."""
    return name_or_path == _LLAMA3_INSTRUCT or name_or_path in (
        _INST_WRAPPED + _GEMMA_WRAPPED + _QWEN_WRAPPED
    )


def prepare_for_tokenization(text: str, name_or_path: str, family: str, pooling_mode: str) -> str:
    """llm2vec's `LLM2Vec.prepare_for_tokenization`.

    text: the joined string from `join_instruction`. name_or_path: the model config's
    `_name_or_path` as llm2vec sees it. family: `config_family(hf_config)`.
    """
    if name_or_path == _LLAMA3_INSTRUCT:
        # llm2vec returns here: no eos suffix for Llama-3-Instruct even in eos_token mode.
        return "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
    if name_or_path in _INST_WRAPPED:
        text = "[INST] " + text.strip() + " [/INST]"
    if name_or_path in _GEMMA_WRAPPED:
        text = "<bos><start_of_turn>user\n" + text.strip() + "<end_of_turn>"
    if name_or_path in _QWEN_WRAPPED:
        text = "<|im_start|>user\n" + text.strip() + "<|im_end|>"
    if pooling_mode == "eos_token":
        if name_or_path == _LLAMA3_BASE:
            text = text.strip() + "<|end_of_text|>"
        elif family in REGISTRY and REGISTRY[family].llm2vec_eos_suffix:
            text = text.strip() + REGISTRY[family].llm2vec_eos_suffix
    return text


def split_instruction(prepared: str) -> tuple[str, str]:
    """llm2vec's split of a prepared string: (full text without separators, text part).

    The text part is what follows the first separator, up to a second one if the text itself
    contains the separator (llm2vec's `t[1]`); the full text drops every separator.
    """
    parts = prepared.split(SEPARATOR)
    return "".join(parts), (parts[1] if len(parts) > 1 else "")


@dataclass
class Tokenized:
    """Per text, ready to pack: token ids (special tokens included, truncated, no padding) and
    the embed length N (the last N ids are the text part; 0 <= N <= len(ids)). texts: the text
    parts after llm2vec's cut by words (prepare_inputs; None from tokenize)."""

    input_ids: list[list[int]]
    embed_lengths: list[int]
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(
    tokenizer,
    prepared: Sequence[str],
    max_length: int,
    known_lengths: dict[int, tuple[str, int]] | None = None,
) -> Tokenized:
    """llm2vec's `LLM2Vec.tokenize` without padding: ids and embed length per prepared string.

    known_lengths: optional {index: (text, n)} when the token count n of a text part is already
    known (from `truncate_by_words`); it is used only when the split text part equals `text`.
    The embed length is clamped to the sequence length (llm2vec issue 80, see module doc).
    """
    full_texts, text_parts = [], []
    for p in prepared:
        full, part = split_instruction(p)
        full_texts.append(full)
        text_parts.append(part)
    if not full_texts:
        return Tokenized([], [])
    ids = tokenizer(
        full_texts, truncation=True, max_length=max_length, return_attention_mask=False
    )["input_ids"]
    ids = [list(x) for x in ids]

    n_text: list[int | None] = [None] * len(text_parts)
    if known_lengths:
        for i, (text, n) in known_lengths.items():
            if text_parts[i] == text:
                n_text[i] = n
    todo = [i for i, n in enumerate(n_text) if n is None]
    for i, n in zip(
        todo, token_lengths(tokenizer, [text_parts[i] for i in todo], max_length), strict=True
    ):
        n_text[i] = n
    embed_lengths = [min(n, len(x)) for n, x in zip(n_text, ids, strict=True)]
    return Tokenized(ids, embed_lengths)


def prepare_inputs(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    name_or_path: str,
    family: str,
    pooling_mode: str,
    max_length: int,
    doc_max_length: int,
) -> Tokenized:
    """The whole llm2vec text pipeline for (instruction, text) pairs -> `Tokenized`."""
    instructions = [p[0] for p in pairs]
    texts, lengths = truncate_by_words(tokenizer, [p[1] for p in pairs], max_length, doc_max_length)
    prepared = [
        prepare_for_tokenization(join_instruction(ins, t), name_or_path, family, pooling_mode)
        for ins, t in zip(instructions, texts, strict=True)
    ]
    known = {i: (t, n) for i, (t, n) in enumerate(zip(texts, lengths, strict=True))}
    tokens = tokenize(tokenizer, prepared, max_length, known_lengths=known)
    tokens.texts = texts
    return tokens
