"""Metrics for `l2v eval` and their bootstrap noise estimate (numpy only).

Correlation tasks score a model by comparing its cosine similarities with human scores:
    pearson(pred, gold), spearman(pred, gold)            pred, gold: float [P] (one per pair)
Retrieval tasks score it by where each query's correct document lands:
    ranks = target_ranks(scores, targets)                scores: float [Q, D], targets: int [Q]
    recall_at_k(ranks, 1), mrr_at_k(ranks, 10)
Noise: a percentile bootstrap over items (pairs or queries), and the same for the difference
between two models scored on the same items (paired: both see the same resamples):
    bootstrap_ci(metric, (pred, gold))                   -> (low, high) of metric(pred[i], gold[i])
    bootstrap_ci(metric, (pred_a, gold), (pred_b, gold)) -> interval of metric(a) - metric(b)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a correlation needs at least 2 items, got {x.size}")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation of two float [N] arrays; 0.0 when either is constant (a model that
    gives every pair the same score has no correlation with anything)."""
    x, y = _pair(x, y)
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0.0:
        return 0.0
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """1-based ranks of a float [N] array, ties given their average rank (float64 [N])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Runs of equal values: each gets the mean of the positions it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # positions starts+1 .. ends, averaged
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two float [N] arrays."""
    x, y = _pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def cosine_matrix(a, b) -> np.ndarray:
    """Cosine similarities float64 [Na, Nb] of the rows of a [Na, D] and b [Nb, D]; an all-zero
    row has similarity 0 with everything."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return a @ b.T


def target_ranks(scores, targets) -> np.ndarray:
    """1-based rank of each query's correct document: int64 [Q].

    scores: float [Q, D], higher = more similar; targets: int [Q], the correct column per query.
    Ties count against the query: rank = number of documents scoring >= the correct one, so a
    model that scores everything alike ranks every target last, never first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"expected scores [Q, D] and targets [Q], got {scores.shape} and {targets.shape}"
        )
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {scores.shape[1]}), got {targets.min()}..{targets.max()}"
        )
    correct = scores[np.arange(scores.shape[0]), targets]
    return (scores >= correct[:, None]).sum(axis=1).astype(np.int64)


def recall_at_k(ranks, k: int) -> float:
    """Share of queries whose correct document ranks within the top k (ranks: int [Q], 1-based)."""
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean())


def mrr_at_k(ranks, k: int) -> float:
    """Mean reciprocal rank, counting 0 for a correct document below rank k (ranks: int [Q])."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


def document_pair_resampler(a, b, n_docs: int) -> Callable[[np.random.Generator], np.ndarray]:
    """A resampler for pairs of documents (a, b: int [P], indices < n_docs): draw n_docs documents
    with replacement and keep each pair once per drawn copy of each of its two documents
    (count[a] * count[b] times). Pairs that share a document are not independent, so this
    interval is the honest one for an all-pairs task like Lee (wider than resampling pairs)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    pairs = np.arange(a.size)

    def resample(rng: np.random.Generator) -> np.ndarray:
        while True:
            count = np.bincount(rng.integers(0, n_docs, size=n_docs), minlength=n_docs)
            idx = np.repeat(pairs, count[a] * count[b])
            if idx.size >= 2:  # a correlation needs two pairs (tiny tasks can draw fewer)
                return idx

    return resample


def bootstrap_ci(
    metric: Callable[..., float],
    *systems: Sequence[np.ndarray],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
    resample: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval over items.

    Each system is a tuple of arrays whose first axis indexes the same N items (e.g.
    (pred [N], gold [N]) for one model). With one system: the interval of metric(*system); with
    two: of metric(*a) - metric(*b), both computed on the same resample each time (paired), so the
    noise shared by the two models cancels. Deterministic for a given seed.
    resample(rng) -> int64 item indices draws one resample (default: N items with replacement);
    see document_pair_resampler for pairs that share documents.
    """
    if len(systems) not in (1, 2):
        raise ValueError(
            f"bootstrap_ci takes one system or two (a paired difference), got {len(systems)}"
        )
    arrays = [[np.asarray(a) for a in system] for system in systems]
    n = arrays[0][0].shape[0]
    if n == 0 or any(a.shape[0] != n for system in arrays for a in system):
        raise ValueError("every array must have the same, non-zero number of items")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples, dtype=np.float64)
    for r in range(n_resamples):
        idx = rng.integers(0, n, size=n) if resample is None else resample(rng)
        value = metric(*(a[idx] for a in arrays[0]))
        if len(arrays) == 2:
            value -= metric(*(a[idx] for a in arrays[1]))
        values[r] = value
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)
