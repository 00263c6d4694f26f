"""One optimizer step's forward and backward on this rank: the stage's loss over the whole step
(every rank's examples), gradients into the LoRA matrices (DDP averages them over the ranks).

    runner = StepRunner(model, config, dist, holder, lm_head=..., final_softcap=...)
    loss = runner.backward(batch, step)   # float: the step's loss; .grad of the adapters filled
    loss = runner.loss(batch, step)       # the same value with autograd, no backward (checks)

Paths, all giving the gradients of the whole step's loss:
- contrastive, one chunk: this rank's pooled rows are gathered from every rank with their
  gradients (distributed.gather_rows) and the loss is taken over all rows, so 2 ranks x B
  examples train as 1 rank x 2B.
- contrastive, GradCache (--grad-cache-chunk N, several chunks): a first forward of every
  chunk without autograd gives the pooled rows; the loss over the gathered rows is
  differentiated with respect to the rows alone; then each chunk runs forward again with
  autograd and back-propagates its rows' gradient (memory: one chunk's activations). The
  second forward repeats the first one's dropout (seeded per chunk, l2v_models.train.seeding).
- MNTP: the summed cross-entropy of this rank's predicted tokens over the step's predicted
  tokens (all ranks), per chunk (accumulation) when chunked.
Each rank back-propagates `world` times its share (DDP averages); under DDP every chunk but the
last runs in no_sync, so the gradients are all-reduced once per step.
"""

from __future__ import annotations

import contextlib

import torch

from l2v_models.train.distributed import Dist, all_reduce_sum, gather_rows
from l2v_models.train.objectives import contrastive_loss, mntp_loss, pooled_rows, train_forward
from l2v_models.train.seeding import DROPOUT, derive_seed


def regroup_rows(parts: list[torch.Tensor], sizes: list) -> torch.Tensor:
    """Parts laid out [queries; positives; negatives] ((n, m) = sizes[k] of part k) -> one
    tensor in the same layout over all parts: [all queries; all positives; all negatives]."""
    qs = [p[:n] for p, (n, _) in zip(parts, sizes, strict=True)]
    ps = [p[n : 2 * n] for p, (n, _) in zip(parts, sizes, strict=True)]
    ns = [p[2 * n : 2 * n + m] for p, (n, m) in zip(parts, sizes, strict=True)]
    return torch.cat(qs + ps + ns)


def split_rows(rows: torch.Tensor, sizes: list) -> list[torch.Tensor]:
    """The inverse of regroup_rows: each part's rows [queries; positives; negatives]."""
    total = sum(n for n, _ in sizes)
    q, p, neg = 0, total, 2 * total
    out = []
    for n, m in sizes:
        out.append(torch.cat([rows[q : q + n], rows[p : p + n], rows[neg : neg + m]]))
        q, p, neg = q + n, p + n, neg + m
    return out


class StepRunner:
    """The forward and backward of one step (see the module docstring).

    model: the l2v Transformer with LoraOps built. config: the resolved TrainConfig. d: this
    process's Dist. holder: distributed.replicate(adapters) (DDP or the plain holder)."""

    def __init__(self, model, config, d: Dist, holder, *, lm_head=None, final_softcap=None):
        self.model, self.config, self.dist, self.holder = model, config, d, holder
        self.lm_head, self.final_softcap = lm_head, final_softcap

    # ------------------------------------------------------------------ pieces
    def _seed(self, step: int, chunk: int) -> None:
        """Dropout of this chunk's forward: a function of (seed, step, rank, chunk) only."""
        torch.manual_seed(derive_seed(self.config.seed, DROPOUT, step, self.dist.rank, chunk))

    def _chunk_output(self, chunk, index: int, step: int) -> torch.Tensor:
        """MNTP: the summed cross-entropy of the chunk; contrastive: its pooled rows [2n+m, H]."""
        self._seed(step, index)
        c = self.config
        hidden = train_forward(self.model, chunk.packed, checkpointing=c.gradient_checkpointing)
        if c.stage == "mntp":
            return mntp_loss(hidden, chunk, self.lm_head, self.final_softcap, reduction="sum")
        return pooled_rows(self.model, hidden, chunk.packed)

    def _gathered(self, parts: list, batch, *, grad: bool) -> torch.Tensor:
        """Chunks' pooled rows -> the step's rows (every rank) in [queries; positives; negs]."""
        local = regroup_rows(parts, batch.chunk_sizes)
        counts = [2 * n + m for n, m in batch.rank_sizes]
        return regroup_rows(gather_rows(local, counts, self.dist, grad=grad), batch.rank_sizes)

    def _contrastive(self, rows: torch.Tensor, batch) -> torch.Tensor:
        c = self.config
        return contrastive_loss(rows, batch.n, c.scale, keys=batch.keys,
                                margin=c.false_negative_margin, symmetric=c.symmetric)  # fmt: skip

    def _contrastive_step(self, batch, step: int) -> torch.Tensor:
        parts = [self._chunk_output(ch, i, step) for i, ch in enumerate(batch.chunks)]
        return self._contrastive(self._gathered(parts, batch, grad=True), batch)

    def _sync(self, last: bool):
        """DDP all-reduces the gradients in the backward of the last chunk only."""
        no_sync = getattr(self.holder, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    # ------------------------------------------------------------------ public
    def loss(self, batch, step: int) -> torch.Tensor:
        """The step's loss (the same value on every rank), differentiable in this rank's part."""
        if batch.stage == "mntp":
            local = sum(self._chunk_output(ch, i, step) for i, ch in enumerate(batch.chunks))
            total = all_reduce_sum(local.detach(), self.dist)
            return (local + (total - local.detach())) / max(batch.total_predicted, 1)
        return self._contrastive_step(batch, step)

    def backward(self, batch, step: int) -> float:
        """Fill the adapters' gradients with the step's (averaged over the ranks by DDP);
        returns the step's loss."""
        if batch.stage == "mntp":
            return self._mntp_backward(batch, step)
        if len(batch.chunks) == 1:
            loss = self.holder(self._contrastive_step, batch, step)
            loss.backward()
            return float(loss.detach())
        return self._grad_cache_backward(batch, step)

    def _mntp_backward(self, batch, step: int) -> float:
        factor = self.dist.world / max(batch.total_predicted, 1)
        total = None
        last = len(batch.chunks) - 1
        for i, chunk in enumerate(batch.chunks):
            with self._sync(i == last):
                summed = self.holder(self._chunk_output, chunk, i, step)
                (summed * factor).backward()
            total = summed.detach() if total is None else total + summed.detach()
        return float(all_reduce_sum(total, self.dist)) / max(batch.total_predicted, 1)

    def _grad_cache_backward(self, batch, step: int) -> float:
        with torch.no_grad():
            parts = [self._chunk_output(ch, i, step) for i, ch in enumerate(batch.chunks)]
        rows = self._gathered(parts, batch, grad=False).detach().requires_grad_(True)
        loss = self._contrastive(rows, batch)
        loss.backward()
        mine = split_rows(rows.grad, batch.rank_sizes)[self.dist.rank]
        grads = split_rows(mine, batch.chunk_sizes)
        last = len(batch.chunks) - 1
        for i, chunk in enumerate(batch.chunks):
            with self._sync(i == last):
                pooled = self.holder(self._chunk_output, chunk, i, step)
                # The rows' gradient is the whole loss's; DDP averages, so scale by the world.
                ((pooled * grads[i]).sum() * self.dist.world).backward()
        return float(loss.detach())
