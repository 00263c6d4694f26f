"""The three LLM2Vec objectives on packed batches, and the training forward.

MNTP (masked next-token prediction), llm2vec's run_mntp.py on packed texts:
  - each non-special token is selected with probability `mask_prob`;
  - policy "bert" (llm2vec's default collator): a selected token becomes the mask token 80% of
    the time, a random token 10%, stays itself 10%; policy "all" (llm2vec's Mistral setting):
    every selected token becomes the mask token;
  - the loss of a selected token at position i of its text is the cross-entropy of the LM head
    at position i-1 (transformers' causal-LM shift: logits[:, :-1] vs labels[:, 1:]); a selected
    first token of a text is replaced in the input but has no prediction (nothing precedes it);
  - mean over the predicted tokens of the batch. Only those rows go through the LM head, so no
    [T, vocab] logits are ever built.
SimCSE: each sentence twice in one packed batch (independent dropout masks), mean pooled;
cross-entropy over cosine similarities x scale (20), in-batch negatives: text b's positive is
its own second copy. Supervised: (query, positive, hard negatives) texts, the query with its
instruction attended to but not pooled; scores over [positives; negatives] x scale (50).
Both contrastive losses (contrastive_loss) mask false negatives: an in-batch candidate whose
text is the target's (a duplicate sentence, a negative equal to the positive), and optionally
every candidate scoring above the target minus a margin; `symmetric` adds the
document-to-query direction. scale = 1 / temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from l2v_models.packing import PackedBatch

MASK_POLICIES = ("bert", "all")


def train_forward(model, batch: PackedBatch, *, checkpointing: bool = False) -> torch.Tensor:
    """Final-norm hidden states [T, H] of a packed batch through `model` with its current ops
    table (LoraOps while training), with autograd when enabled. checkpointing: recompute each
    layer in the backward pass (Transformer.gradient_checkpointing: torch.utils.checkpoint per
    layer, RNG state preserved, so dropout masks repeat)."""
    model.gradient_checkpointing = checkpointing
    return model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.positions,
                 check_inputs=False)  # fmt: skip


# ------------------------------------------------------------------------------ MNTP
@dataclass
class MntpBatch:
    """A packed batch with MNTP masking applied.

    packed: input_ids already masked. labels int64 [M]: the original ids of the predicted
    tokens; predict_from int64 [M]: the packed row whose output predicts each (its position
    minus one, same text); masked bool [T]: every selected token (predicted or not)."""

    packed: PackedBatch
    labels: torch.Tensor
    predict_from: torch.Tensor
    masked: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    def to(self, device) -> MntpBatch:
        return MntpBatch(self.packed.to(device), self.labels.to(device),
                         self.predict_from.to(device), self.masked.to(device))  # fmt: skip


def mask_tokens(batch: PackedBatch, *, mask_prob: float, policy: str, mask_token_id: int,
                special_ids, vocab_size: int, generator: torch.Generator | None = None,
                seeds=None) -> MntpBatch:  # fmt: skip
    """MNTP masking of a host PackedBatch (see the module docstring). The draws, in a fixed
    order (selection, replacement, random-or-keep, random ids), come from `generator` over the
    whole batch, or with `seeds` (one int per text) from a generator seeded per text, so a
    text's masks do not depend on the rest of the batch (the same on any number of ranks)."""
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy must be one of {MASK_POLICIES}, got {policy!r}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {mask_prob!r}")
    if (generator is None) == (seeds is None):
        raise ValueError("mask_tokens: give a generator or per-text seeds (one of them)")
    ids = batch.input_ids.long()
    T = ids.shape[0]
    special = torch.zeros(T, dtype=torch.bool)
    if len(special_ids):
        special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long))
    draws = (_batch_draws(T, vocab_size, generator) if seeds is None
             else _text_draws(batch.cu_seqlens.tolist(), vocab_size, seeds))  # fmt: skip
    u_select, u_replace, u_random, random_ids = draws
    selected = (u_select < mask_prob) & ~special
    new = ids.clone()
    if policy == "all":
        new[selected] = mask_token_id
    else:
        replace = (u_replace < 0.8) & selected
        randomize = (u_random < 0.5) & selected & ~replace
        new[replace] = mask_token_id
        new[randomize] = random_ids[randomize]
    positions = batch.positions.long()
    predicted = selected & (positions > 0)
    rows = torch.nonzero(predicted).flatten()
    packed = PackedBatch(new.to(batch.input_ids.dtype), batch.cu_seqlens, batch.positions,
                         batch.pool_mask, batch.max_seqlen, batch.rows)  # fmt: skip
    return MntpBatch(packed, ids[rows], rows - 1, selected)


def _batch_draws(T: int, vocab_size: int, generator: torch.Generator):
    return (torch.rand(T, generator=generator), torch.rand(T, generator=generator),
            torch.rand(T, generator=generator),
            torch.randint(vocab_size, (T,), generator=generator))  # fmt: skip


def _text_draws(cu_seqlens: list, vocab_size: int, seeds):
    """The four draws of every text from its own generator, concatenated in batch order."""
    if len(seeds) != len(cu_seqlens) - 1:
        raise ValueError(f"mask_tokens: {len(seeds)} seeds for {len(cu_seqlens) - 1} texts")
    parts = []
    for i, seed in enumerate(seeds):
        parts.append(_batch_draws(cu_seqlens[i + 1] - cu_seqlens[i], vocab_size,
                                  torch.Generator().manual_seed(int(seed))))  # fmt: skip
    if not parts:
        return _batch_draws(0, vocab_size, torch.Generator())
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def mntp_loss(hidden: torch.Tensor, batch: MntpBatch, lm_head: torch.Tensor,
              final_softcap: float | None = None, *,
              reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """Mean (reduction "sum": summed) cross-entropy (fp32) of the LM head at batch.predict_from
    against batch.labels. hidden [T, H]; lm_head [V, H] (tied embeddings or lm_head.weight). A
    batch with no predicted token gives a zero loss that still back-propagates (zero gradients)."""
    if batch.labels.numel() == 0:
        return hidden.sum() * 0.0
    logits = (hidden[batch.predict_from] @ lm_head.t()).float()
    if final_softcap is not None:
        logits = torch.tanh(logits / final_softcap) * final_softcap
    return F.cross_entropy(logits, batch.labels, reduction=reduction)


# ------------------------------------------------------------------------------ contrastive
@dataclass
class ContrastiveBatch:
    """One packed forward of contrastive texts: rows [0, n) queries, [n, 2n) positives, then
    `num_negatives` hard negatives (any number per example, in example order). pool_mask marks
    what pooling reads (the text, not the instruction). SimCSE: the positives are the queries
    again and there are no hard negatives."""

    packed: PackedBatch
    n: int
    num_negatives: int = 0

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    @property
    def num_rows(self) -> int:
        return 2 * self.n + self.num_negatives

    def to(self, device) -> ContrastiveBatch:
        return ContrastiveBatch(self.packed.to(device), self.n, self.num_negatives)


def contrastive_loss(pooled: torch.Tensor, n: int, scale: float, *,
                     keys: torch.Tensor | None = None, margin: float | None = None,
                     symmetric: bool = False) -> torch.Tensor:  # fmt: skip
    """llm2vec's HardNegativeNLLLoss on pooled fp32 [2n + m, D] (queries, positives, m hard
    negatives): cosine similarities of each query with every positive and negative times
    `scale`; the target of query b is positive b.

    keys int64 [2n + m] (text identities, equal for equal texts): a candidate other than the
    target whose key is the target's is masked out of the row (a false negative). margin: also
    mask candidates whose cosine is above the target's minus `margin` (compared without
    gradient). symmetric: the mean with the document-to-query loss (positive b against every
    query, target query b; the same masking among the queries)."""
    q = F.normalize(pooled[:n], dim=-1)
    d = F.normalize(pooled[n:], dim=-1)
    cos = q @ d.t()  # [n, n + m]
    target = torch.arange(n, device=pooled.device)
    loss = F.cross_entropy(_masked(cos, None if keys is None else keys[n:], margin) * scale,
                           target)  # fmt: skip
    if not symmetric:
        return loss
    back = cos[:, :n].t()  # [positives, queries]
    back = _masked(back, None if keys is None else keys[:n], margin)
    return (loss + F.cross_entropy(back * scale, target)) / 2


def _masked(cos: torch.Tensor, candidate_keys: torch.Tensor | None,
            margin: float | None) -> torch.Tensor:  # fmt: skip
    """cos [n, C] (row b's target is column b) with false negatives set to -inf."""
    n = cos.shape[0]
    drop = torch.zeros_like(cos, dtype=torch.bool)
    if candidate_keys is not None:
        drop |= candidate_keys[None, :] == candidate_keys[:n, None]
    if margin is not None:
        with torch.no_grad():
            drop |= cos > (cos.diagonal()[:, None] - margin)
    if not drop.any():
        return cos
    drop[torch.arange(n), torch.arange(n)] = False  # never the target itself
    return cos.masked_fill(drop, float("-inf"))


def text_keys(texts) -> torch.Tensor:
    """int64 [N]: one key per text of a TokenizedTexts, equal for equal token ids (Python's
    hash of a tuple of ints, the same in every process)."""
    return torch.tensor([hash(tuple(int(t) for t in ids)) for ids in texts.input_ids],
                        dtype=torch.int64)  # fmt: skip


def pooled_rows(model, hidden: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Mean over each text's pool span -> fp32 [B, H], differentiable (the torch pooling)."""
    return model.ops.pool(hidden, packed.pool_mask, packed.cu_seqlens, "mean", False)


def duplicate_rows(n: int) -> np.ndarray:
    """Row order [0..n-1, 0..n-1]: SimCSE packs every sentence twice."""
    return np.concatenate([np.arange(n), np.arange(n)])
