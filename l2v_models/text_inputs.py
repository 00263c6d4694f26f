"""encode()'s input forms and the warnings about them, whatever a model's text rules.

    pairs, squeeze = as_pairs(["a text", ["a prompt", "a text"]])   # [(prompt, text)], False
    pairs = with_prompt(pairs, "Represent this: ")                 # for inputs without one
    warn_empty_texts(empty_text_indices(pairs))                    # one logging warning
    warn_truncations(prepared.truncations, len(pairs))             # one logging warning

An input is a string, a [prompt, text] pair (an llm2vec model's prompt is its instruction) or
llm2vec's MEDI form [instruction, text, int]; anything else is a TypeError naming the item, and a
lone surrogate a ValueError naming it. Warnings go to the logger "l2v_models.text_inputs" (the
CLI prints them as `l2v: warning: ...`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _as_pair(item) -> tuple[str, str] | None:
    """An item's (prompt, text): a string, a [prompt, text] pair of strings, or llm2vec's MEDI
    form [instruction, text, int] (the int, a dataset id, is ignored); else None."""
    if isinstance(item, str):
        return "", item
    if not isinstance(item, (list, tuple, np.ndarray)) or len(item) not in (2, 3):
        return None
    if not (isinstance(item[0], str) and isinstance(item[1], str)):
        return None
    if len(item) == 3 and not _is_int(item[2]):
        return None
    return str(item[0]), str(item[1])


def check_unicode(pairs: Sequence[tuple[str, str]], name: str = "sentences") -> None:
    """ValueError naming the item and position of a lone surrogate (not encodable text)."""
    for i, pair in enumerate(pairs):
        for part, s in zip(("instruction", "text"), pair, strict=True):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"{name}[{i}]: the {part} holds a lone surrogate (U+{ord(s[e.start]):04X} "
                    f"at character {e.start}), which is not valid Unicode text; decode the input "
                    "correctly (e.g. bytes.decode('utf-8', errors='replace'))"
                ) from None


def as_pairs(sentences) -> tuple[list[tuple[str, str]], bool]:
    """encode()'s input -> ([(prompt, text)], squeeze), squeeze meaning one bare string.

    Accepted: a string; a list whose items are strings, [prompt, text] pairs of strings or
    llm2vec's MEDI form [instruction, text, int]; or one bare MEDI item. Anything else (e.g.
    three strings) is a TypeError naming the item, never a silent drop. A lone surrogate is a
    ValueError naming the item."""
    if isinstance(sentences, str):
        check_unicode([("", sentences)])
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
    check_unicode(pairs)
    return pairs, False


def with_prompt(pairs: Sequence[tuple[str, str]], prompt: str | None) -> list[tuple[str, str]]:
    """The pairs, with `prompt` given to those that have none of their own."""
    if not prompt:
        return list(pairs)
    return [(p, t) if p else (prompt, t) for p, t in pairs]


def empty_text_indices(pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the items whose text is empty or whitespace only."""
    return [i for i, (_, text) in enumerate(pairs) if not text.strip()]


def _shown(indices: Sequence[int], limit: int = 20) -> str:
    return ", ".join(map(str, indices[:limit])) + (
        f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    )


def warn_empty_texts(indices: Sequence[int], where: str = "sentences") -> None:
    """One logging warning naming the empty texts (nothing when there are none)."""
    if not indices:
        return
    logger.warning(
        "%d empty text%s at %s[%s]: an empty or whitespace-only text has no content, so its "
        "embedding is that of its instruction and special tokens (or zeros); drop such texts if "
        "that is not wanted",
        len(indices), "" if len(indices) == 1 else "s", where, _shown(indices),
    )  # fmt: skip


def warn_truncations(truncations: Sequence, total: int) -> None:
    """One logging warning saying how many texts were cut, by which rule, and which
    (truncations: l2v_models.text_rules.Truncation)."""
    if not truncations:
        return
    by_rule: dict[tuple[str, int], int] = {}
    for t in truncations:
        by_rule[(t.rule, t.limit)] = by_rule.get((t.rule, t.limit), 0) + 1
    rules = "; ".join(f"{rule} {limit}: {n}" for (rule, limit), n in by_rule.items())
    logger.warning(
        "%d of %d text%s cut to fit the model's limits (%s) at sentences[%s]",
        len(truncations), total, " was" if total == 1 else "s were", rules,
        _shown([t.index for t in truncations]),
    )  # fmt: skip
