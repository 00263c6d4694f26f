"""One optimizer step's items -> this rank's packed batches (StepBatch).

    batch = collate_contrastive(items, splits=[8, 8], rank=0, simcse=True, chunk=None)
    batch = collate_mntp(items, splits=[8, 8], rank=1, chunk=4, seeds=[...], mask=dict(...))

`items` are every rank's items of the step in rank order (rank r trains on the `splits[r]`
items after those of the ranks before it), so each rank knows the whole step: how many queries,
positives and hard negatives every rank contributes (the layout of the gathered embeddings),
the text keys of every row (false-negative masking), and how many tokens MNTP predicts over all
ranks (the denominator of its mean), without a collective. This rank's items are packed in
chunks of `chunk` examples (GradCache; MNTP: gradient accumulation), one chunk without.

Contrastive rows, per chunk and for the whole step alike: [queries; positives; hard negatives]
(example order; SimCSE: the positives are the queries again and there are no hard negatives),
so one rank's step with 2B examples and two ranks' steps with B each have the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from l2v_models.packing import TokenizedTexts, pack
from l2v_models.train.data import DataError
from l2v_models.train.objectives import ContrastiveBatch, duplicate_rows, mask_tokens, text_keys


@dataclass
class StepBatch:
    """What this rank trains on in one step.

    chunks: MntpBatch or ContrastiveBatch per chunk of this rank's examples (one without
    GradCache). rank_sizes / chunk_sizes: (examples, hard negatives) of every rank / of every
    chunk (MNTP: (pieces, 0)). keys: int64 text keys of the step's rows in the gathered order
    (contrastive, None when false negatives are not masked). total_predicted: MNTP's predicted
    tokens over all ranks. step_tokens: real tokens over all ranks."""

    stage: str
    chunks: list
    rank_sizes: list
    chunk_sizes: list
    rank: int = 0
    keys: torch.Tensor | None = None
    total_predicted: int = 0
    step_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """Real tokens of this rank's texts."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_texts(self) -> int:
        return sum(c.packed.num_texts for c in self.chunks)

    @property
    def n(self) -> int:
        """Examples of the whole step (all ranks)."""
        return sum(n for n, _ in self.rank_sizes)

    @property
    def num_negatives(self) -> int:
        return sum(m for _, m in self.rank_sizes)

    @property
    def packed(self):
        """The packed batch of a one-chunk step (tests, benchmarks)."""
        if len(self.chunks) != 1:
            raise ValueError(f"this step has {len(self.chunks)} chunks; read batch.chunks")
        return self.chunks[0].packed

    def to(self, device) -> StepBatch:
        keys = self.keys.to(device) if self.keys is not None else None
        return StepBatch(self.stage, [c.to(device) for c in self.chunks], self.rank_sizes,
                         self.chunk_sizes, self.rank, keys, self.total_predicted,
                         self.step_tokens)  # fmt: skip


def rank_slices(splits, total: int) -> list[slice]:
    """The items of each rank: `splits` counts in rank order, summing to `total`."""
    splits = [int(s) for s in splits]
    if sum(splits) != total or any(s < 1 for s in splits):
        raise ValueError(f"splits {splits} must be positive and sum to the {total} items")
    bounds = np.concatenate([[0], np.cumsum(splits)]).tolist()
    return [slice(bounds[r], bounds[r + 1]) for r in range(len(splits))]


def _chunks(n: int, chunk: int | None) -> list[slice]:
    size = n if chunk is None else chunk
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------ MNTP
def collate_mntp(items: list, splits, rank: int, *, chunk: int | None, seeds, mask: dict,
                 ) -> StepBatch:  # fmt: skip
    """MNTP: items are lists of token ids (one piece each); seeds one int per item (its masks,
    see objectives.mask_tokens); mask the mask_tokens keywords (mask_prob, policy, ...)."""
    if not items:
        raise ValueError("collate: no items")
    chunks, chunk_sizes, predicted, tokens = [], [], 0, 0
    for r, part in enumerate(rank_slices(splits, len(items))):
        for sl in _chunks(part.stop - part.start, chunk):
            lo, hi = part.start + sl.start, part.start + sl.stop
            texts = TokenizedTexts.whole(items[lo:hi])
            batch = mask_tokens(pack(texts, np.arange(hi - lo)), seeds=seeds[lo:hi], **mask)
            predicted += int(batch.labels.numel())
            tokens += batch.num_tokens
            if r == rank:
                chunks.append(batch)
                chunk_sizes.append((hi - lo, 0))
    sizes = [(s.stop - s.start, 0) for s in rank_slices(splits, len(items))]
    return StepBatch("mntp", chunks, sizes, chunk_sizes, rank, None, predicted, tokens)


# ------------------------------------------------------------------------------ contrastive
def collate_contrastive(items: list, splits, rank: int, *, simcse: bool, chunk: int | None,
                        keys: bool = True,
                        batch_tokens: int | None = None) -> StepBatch:  # fmt: skip
    """SimCSE: items are TokenizedTexts of one sentence (packed twice). Supervised: of the
    query (with its instruction), the positive and any number of hard negatives.
    keys: compute the text keys (false-negative masking)."""
    if not items:
        raise ValueError("collate: no items")
    n_total = len(items)
    negatives = [0 if simcse else len(t) - 2 for t in items]
    if any(k < 0 for k in negatives):
        raise ValueError("a supervised item needs at least a query and a positive")
    if n_total < 2 and sum(negatives) == 0:  # only --batch-tokens can get here
        stage = "simcse" if simcse else "supervised"
        raise DataError(f"a {stage} step got 1 example, so no negative: the loss would be 0; "
                        f"raise --batch-tokens (now {batch_tokens}) to hold at least 2 "
                        "examples, or lower --max-length")  # fmt: skip
    slices = rank_slices(splits, n_total)
    rank_sizes = [(s.stop - s.start, sum(negatives[s])) for s in slices]
    mine = slices[rank]
    chunks, chunk_sizes = [], []
    for sl in _chunks(mine.stop - mine.start, chunk):
        part = items[mine.start + sl.start : mine.start + sl.stop]
        chunks.append(pack_contrastive(part, simcse))
        chunk_sizes.append((chunks[-1].n, chunks[-1].num_negatives))
    step_keys = step_text_keys(items, simcse) if keys else None
    tokens = sum(int(t.lengths.sum()) for t in items) * (2 if simcse else 1)
    return StepBatch("simcse" if simcse else "supervised", chunks, rank_sizes, chunk_sizes,
                     rank, step_keys, 0, tokens)  # fmt: skip


def pack_contrastive(items: list, simcse: bool) -> ContrastiveBatch:
    """One packed forward of contrastive items in the row order [queries; positives;
    negatives]."""
    texts = TokenizedTexts.concat(items)
    n = len(items)
    if simcse:
        return ContrastiveBatch(pack(texts, duplicate_rows(n)), n, 0)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in items])[:-1]]).astype(np.int64)
    negs = [offsets[i] + 2 + j for i, t in enumerate(items) for j in range(len(t) - 2)]
    rows = np.concatenate([offsets, offsets + 1, np.asarray(negs, dtype=np.int64)])
    return ContrastiveBatch(pack(texts, rows), n, len(negs))


def step_text_keys(items: list, simcse: bool) -> torch.Tensor:
    """Text keys of the step's rows [queries; positives; negatives] (objectives.text_keys)."""
    texts = TokenizedTexts.concat(items)
    keys = text_keys(texts)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in items])[:-1]]).astype(np.int64)
    if simcse:
        order = np.concatenate([offsets, offsets])
    else:
        negs = [offsets[i] + 2 + j for i, t in enumerate(items) for j in range(len(t) - 2)]
        order = np.concatenate([offsets, offsets + 1, np.asarray(negs, dtype=np.int64)])
    return keys[torch.from_numpy(order)]
