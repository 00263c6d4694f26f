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
its own second copy. Supervised: (query, positive, negative) texts, the query with its
instruction attended to but not pooled; scores over [positives; negatives] x scale (50).
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
                special_ids, vocab_size: int, generator: torch.Generator) -> MntpBatch:  # fmt: skip
    """MNTP masking of a host PackedBatch (see the module docstring); draws from `generator`
    only, in a fixed order (selection, replacement, random-or-keep, random ids)."""
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy must be one of {MASK_POLICIES}, got {policy!r}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {mask_prob!r}")
    ids = batch.input_ids.long()
    T = ids.shape[0]
    special = torch.zeros(T, dtype=torch.bool)
    if len(special_ids):
        special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long))
    selected = (torch.rand(T, generator=generator) < mask_prob) & ~special
    new = ids.clone()
    if policy == "all":
        new[selected] = mask_token_id
    else:
        replace = (torch.rand(T, generator=generator) < 0.8) & selected
        randomize = (torch.rand(T, generator=generator) < 0.5) & selected & ~replace
        random_ids = torch.randint(vocab_size, (T,), generator=generator)
        new[replace] = mask_token_id
        new[randomize] = random_ids[randomize]
    positions = batch.positions.long()
    predicted = selected & (positions > 0)
    rows = torch.nonzero(predicted).flatten()
    packed = PackedBatch(new.to(batch.input_ids.dtype), batch.cu_seqlens, batch.positions,
                         batch.pool_mask, batch.max_seqlen, batch.rows)  # fmt: skip
    return MntpBatch(packed, ids[rows], rows - 1, selected)


def mntp_loss(hidden: torch.Tensor, batch: MntpBatch, lm_head: torch.Tensor,
              final_softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy (fp32) of the LM head at batch.predict_from against batch.labels.
    hidden [T, H]; lm_head [V, H] (tied embeddings or lm_head.weight). A batch with no
    predicted token gives a zero loss that still back-propagates (zero gradients)."""
    if batch.labels.numel() == 0:
        return hidden.sum() * 0.0
    logits = (hidden[batch.predict_from] @ lm_head.t()).float()
    if final_softcap is not None:
        logits = torch.tanh(logits / final_softcap) * final_softcap
    return F.cross_entropy(logits, batch.labels)


# ------------------------------------------------------------------------------ contrastive
@dataclass
class ContrastiveBatch:
    """Texts packed in groups: rows [0, n) queries, [n, 2n) positives, then n negatives or
    none (groups = 2 or 3). pool_mask marks what pooling reads (the text, not the
    instruction). SimCSE: the positives are the queries again."""

    packed: PackedBatch
    n: int
    groups: int

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    def to(self, device) -> ContrastiveBatch:
        return ContrastiveBatch(self.packed.to(device), self.n, self.groups)


def contrastive_loss(pooled: torch.Tensor, n: int, groups: int, scale: float) -> torch.Tensor:
    """llm2vec's HardNegativeNLLLoss on pooled fp32 [groups * n, D]: cosine similarities of
    each query with every positive (and negative) times `scale`; the target of query b is
    positive b."""
    q = F.normalize(pooled[:n], dim=-1)
    d = F.normalize(pooled[n:], dim=-1)
    scores = (q @ d.t()) * scale
    return F.cross_entropy(scores, torch.arange(n, device=pooled.device))


def pooled_rows(model, hidden: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Mean over each text's pool span -> fp32 [B, H], differentiable (the torch pooling)."""
    return model.ops.pool(hidden, packed.pool_mask, packed.cu_seqlens, "mean", False)


def duplicate_rows(n: int) -> np.ndarray:
    """Row order [0..n-1, 0..n-1]: SimCSE packs every sentence twice."""
    return np.concatenate([np.arange(n), np.arange(n)])
