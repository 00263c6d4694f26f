"""Tokenized texts -> token-budget batches -> packed batches (no padding).

    texts = TokenizedTexts(input_ids, pool_starts, pool_counts)   # what the text rules produce
    for rows in plan_batches(texts.lengths, max_tokens=16384):    # caller's indices per batch
        batch = pack(texts, rows)                                  # host tensors
        batch = batch.to("cuda")                                   # one pinned, async copy

Nothing here knows llm2vec's text rules: a text is its token ids plus the span of its tokens that
pooling reads (`pool_starts[i]`, `pool_counts[i]`, relative to the text's first token). The
encoder (l2v_models.encoder), the server, the corpus runner and the trainer build
`TokenizedTexts`; the engine (l2v_models.engine) runs the batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a batch is built: text preparation (the server's
    import torch  # tokenizer processes) imports this module without it


@dataclass
class TokenizedTexts:
    """Per text: token ids (special tokens included, already truncated) and the pooled span.

    input_ids: N sequences of ints. pool_starts / pool_counts: int64 [N]; text i pools its tokens
    pool_starts[i] ... pool_starts[i] + pool_counts[i] - 1 (a count of 0 gives a zero vector;
    "last" pooling reads the last token of the span).
    """

    input_ids: Sequence[Sequence[int]]
    pool_starts: np.ndarray
    pool_counts: np.ndarray

    def __post_init__(self):
        n = len(self.input_ids)
        self.pool_starts = np.asarray(self.pool_starts, dtype=np.int64).reshape(-1)
        self.pool_counts = np.asarray(self.pool_counts, dtype=np.int64).reshape(-1)
        if self.pool_starts.shape[0] != n or self.pool_counts.shape[0] != n:
            raise ValueError(
                f"TokenizedTexts: {n} texts but {self.pool_starts.shape[0]} pool starts and "
                f"{self.pool_counts.shape[0]} pool counts"
            )
        lengths = self.lengths
        bad = (self.pool_starts < 0) | (self.pool_counts < 0)
        bad |= (self.pool_counts > 0) & (self.pool_starts + self.pool_counts > lengths)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"TokenizedTexts: text {i} has {int(lengths[i])} tokens but pools "
                f"{int(self.pool_counts[i])} from token {int(self.pool_starts[i])}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Token count per text, int64 [N]."""
        n = len(self.input_ids)
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=n)

    @classmethod
    def whole(cls, input_ids: Sequence[Sequence[int]]) -> TokenizedTexts:
        """Texts that pool all of their tokens."""
        n = len(input_ids)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
        return cls(input_ids, np.zeros(n, dtype=np.int64), lengths)

    @classmethod
    def from_flat(cls, ids: np.ndarray, lengths: np.ndarray, pool_starts, pool_counts
                  ) -> TokenizedTexts:  # fmt: skip
        """Texts stored back to back: ids int [sum(lengths)], text i is the next lengths[i] of
        them (the compact form the server's tokenizer processes send; input_ids become views)."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        ids = np.asarray(ids).reshape(-1)
        if int(lengths.sum()) != ids.shape[0]:
            raise ValueError(
                f"TokenizedTexts.from_flat: {ids.shape[0]} ids but the lengths add up to "
                f"{int(lengths.sum())}"
            )
        views = np.split(ids, np.cumsum(lengths)[:-1]) if lengths.size else []
        return cls(views, pool_starts, pool_counts)

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [sum(lengths)], lengths int64 [N]): the texts back to back."""
        lengths = self.lengths
        return _flat_ids(self.input_ids, range(len(self.input_ids)), int(lengths.sum())), lengths

    @classmethod
    def concat(cls, parts: Sequence[TokenizedTexts]) -> TokenizedTexts:
        """The texts of several parts, in order (e.g. many requests in one batch)."""
        ids: list = []
        for p in parts:
            ids.extend(p.input_ids)
        starts = [p.pool_starts for p in parts] or [np.zeros(0, dtype=np.int64)]
        counts = [p.pool_counts for p in parts] or [np.zeros(0, dtype=np.int64)]
        return cls(ids, np.concatenate(starts), np.concatenate(counts))

    def select(self, rows) -> TokenizedTexts:
        """The texts at the given indices, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return TokenizedTexts(
            [self.input_ids[i] for i in rows.tolist()], self.pool_starts[rows],
            self.pool_counts[rows],
        )  # fmt: skip


@dataclass
class PackedBatch:
    """Texts back to back, no padding: what one forward pass reads.

    input_ids int32 [T]; cu_seqlens int32 [B+1] (text b is tokens cu_seqlens[b]:cu_seqlens[b+1]);
    positions int32 [T] (restarting at 0 for each text); pool_mask uint8 [T] (1 = pooled);
    max_seqlen the longest text (a host int); rows int64 [B]: each text's index in the
    TokenizedTexts it was packed from (the caller's order).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    pool_mask: torch.Tensor
    max_seqlen: int
    rows: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device) -> PackedBatch:
        """The same batch on `device`. To CUDA: one pinned host buffer and one non-blocking copy
        (each segment 16-byte aligned); the caching host allocator keeps the pinned block alive
        until the copy has run, so no sync is needed."""
        import torch

        device = torch.device(device)
        if device == self.device:
            return self
        if device.type != "cuda" or self.device.type != "cpu":
            return PackedBatch(
                self.input_ids.to(device), self.cu_seqlens.to(device),
                self.positions.to(device), self.pool_mask.to(device), self.max_seqlen, self.rows,
            )  # fmt: skip
        parts = (self.cu_seqlens, self.input_ids, self.positions, self.pool_mask)
        offsets, total = [], 0
        for t in parts:
            offsets.append(total)
            total += _align16(t.numel() * t.element_size())
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        for t, o in zip(parts, offsets, strict=True):
            n = t.numel() * t.element_size()
            host[o : o + n] = t.contiguous().view(torch.uint8).reshape(-1)
        dev = host.to(device, non_blocking=True)
        views = [
            dev[o : o + t.numel() * t.element_size()].view(t.dtype)
            for t, o in zip(parts, offsets, strict=True)
        ]
        cu, ids, pos, mask = views
        return PackedBatch(ids, cu, pos, mask, self.max_seqlen, self.rows)


def _align16(n: int) -> int:
    return (n + 15) & ~15


def fits(n_tokens: int, batch_tokens: int, batch_texts: int, max_tokens: int | None,
         max_texts: int | None = None) -> bool:  # fmt: skip
    """The cut rule: whether a text of n_tokens joins a batch that holds batch_texts texts of
    batch_tokens tokens. An empty batch takes any text (a text longer than the budget runs
    alone); otherwise the text must keep the batch within max_tokens tokens and max_texts texts
    (None: no limit of that kind)."""
    if batch_texts == 0:
        return True
    if max_texts is not None and batch_texts >= max_texts:
        return False
    return max_tokens is None or batch_tokens + n_tokens <= max_tokens


def take_fifo(
    lengths, start: int, max_tokens: int | None, max_texts: int | None = None, *,
    tokens: int = 0, texts: int = 0,
) -> tuple[int, int, int]:  # fmt: skip
    """First in, first out from lengths[start:] into a batch already holding `texts` texts of
    `tokens` tokens: -> (stop, tokens, texts), texts start ... stop-1 taken and the batch's
    totals after them. Empty texts (length 0) are taken without counting (nothing runs for
    them); the first text that does not fit (see `fits`) ends the take."""
    i, n_texts = start, len(lengths)
    while i < n_texts:
        n = int(lengths[i])
        if n:
            if not fits(n, tokens, texts, max_tokens, max_texts):
                break
            tokens += n
            texts += 1
        i += 1
    return i, tokens, texts


def plan_batches(
    lengths: np.ndarray, max_tokens: int, max_texts: int | None = None
) -> list[np.ndarray]:
    """Token-budget batches: indices of the texts in each batch, longest texts first.

    Texts are sorted by length (longest first, ties in input order) and cut first in, first out
    by `take_fifo` into batches of at most `max_tokens` tokens (a longer text goes alone) and at
    most `max_texts` texts. Empty texts (length 0) are in no batch: they have nothing to run.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if max_tokens < 1 or (max_texts is not None and max_texts < 1):
        raise ValueError(f"plan_batches: budgets must be >= 1, got {max_tokens}, {max_texts}")
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    sorted_lengths = lengths[order].tolist()
    batches: list[np.ndarray] = []
    start = 0
    while start < order.size:
        stop, _, _ = take_fifo(sorted_lengths, start, max_tokens, max_texts)
        batches.append(order[start:stop])
        start = stop
    return batches


def pack(texts: TokenizedTexts, rows: np.ndarray) -> PackedBatch:
    """Host-side PackedBatch of texts[rows] (in that order), on the CPU."""
    import torch

    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    lengths = texts.lengths[rows] if rows.size else np.zeros(0, dtype=np.int64)
    cu = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    ids = _flat_ids(texts.input_ids, rows.tolist(), total)
    starts_per_token = np.repeat(cu[:-1], lengths)
    positions = np.arange(total, dtype=np.int64) - starts_per_token
    lo = np.repeat(texts.pool_starts[rows], lengths)
    hi = lo + np.repeat(texts.pool_counts[rows], lengths)
    mask = (positions >= lo) & (positions < hi)
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        positions=torch.from_numpy(positions.astype(np.int32)),
        pool_mask=torch.from_numpy(mask.astype(np.uint8)),
        max_seqlen=int(lengths.max()) if lengths.size else 0,
        rows=rows,
    )


def _flat_ids(input_ids: Sequence, rows, total: int) -> np.ndarray:
    """The ids of input_ids[rows] back to back, int32 [total]: one concatenate when the texts
    are numpy arrays (the server's), else one pass over the Python ints."""
    parts = [input_ids[i] for i in rows]
    if parts and all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts).astype(np.int32, copy=False)
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64,
                       count=total).astype(np.int32)  # fmt: skip
