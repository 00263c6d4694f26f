"""The contrastive loss's options and GradCache (tiny models, CPU, one process):

- false negatives (a candidate with the target's text; optionally any candidate scoring above
  the target minus a margin) leave the softmax, the target never does; the symmetric loss is
  the mean of both directions; --temperature is 1 / --scale;
- GradCache (--grad-cache-chunk) gives the full batch's loss and gradients, with dropout off
  and on (its second forward repeats the first one's masks); chunked MNTP accumulates exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from tiny import make_tiny_checkpoint

from l2v_models.train.objectives import contrastive_loss
from l2v_models.train.trainer import TrainConfig, Trainer, load_for_training

WORDS = "the cat sat on a mat and dog was in text of passage which is for that".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) for _ in range(n)]


def reference(pooled, n, scale, drop):
    """Cross-entropy over cos x scale with the `drop` [n, C] entries removed by hand."""
    q = F.normalize(pooled[:n].double(), dim=-1)
    d = F.normalize(pooled[n:].double(), dim=-1)
    cos = q @ d.t()
    losses = []
    for b in range(n):
        keep = [j for j in range(cos.shape[1]) if j == b or not drop[b][j]]
        row = cos[b, keep] * scale
        losses.append(-(row[keep.index(b)] - torch.logsumexp(row, 0)))
    return torch.stack(losses).mean(), cos


# ------------------------------------------------------------------------------ the loss
def test_false_negatives_leave_the_softmax():
    torch.manual_seed(0)
    n, m, S = 4, 3, 5.0
    pooled = torch.randn(2 * n + m, 8)
    keys = torch.arange(2 * n + m) * 7  # all texts different...
    keys[2 * n] = keys[n + 1]  # ...but the first hard negative is positive 1's text,
    keys[n + 3] = keys[n + 0]  # and positives 0 and 3 are the same text
    pooled[2 * n], pooled[n + 3] = pooled[n + 1], pooled[n]  # same text, same embedding
    pooled[:n] = pooled[n : 2 * n] + 0.3 * torch.randn(n, 8)  # queries near their positives
    cand = keys[n:].tolist()
    drop = [[cand[j] == cand[b] for j in range(n + m)] for b in range(n)]
    assert sum(map(sum, drop)) - n == 3  # three false negatives (plus the targets themselves)
    ref, cos = reference(pooled, n, S, drop)
    ours = contrastive_loss(pooled, n, S, keys=keys)
    assert torch.allclose(ours.double(), ref, rtol=1e-5)
    plain, _ = reference(pooled, n, S, [[False] * (n + m)] * n)
    assert torch.allclose(contrastive_loss(pooled, n, S).double(), plain, rtol=1e-5)
    assert ours < 0.9 * plain  # a duplicate of the target scored as a negative costs a lot

    # Margin: also every candidate above the target's cosine minus the margin.
    margin = 0.1
    drop = [[bool(cos[b, j] > cos[b, b] - margin) for j in range(n + m)] for b in range(n)]
    assert sum(map(sum, drop)) > n  # some candidates do score that high
    ref, _ = reference(pooled, n, S, drop)
    assert torch.allclose(contrastive_loss(pooled, n, S, margin=margin).double(), ref,
                          rtol=1e-5)  # fmt: skip
    # Gradients flow, none to a dropped candidate from its row.
    pooled.requires_grad_(True)
    contrastive_loss(pooled, n, S, keys=keys).backward()
    assert torch.isfinite(pooled.grad).all() and pooled.grad.abs().sum() > 0


def test_symmetric_loss_is_the_mean_of_both_directions():
    torch.manual_seed(1)
    n = 5
    pooled = torch.randn(2 * n + 2, 8)
    keys = torch.arange(2 * n + 2)
    keys[3] = keys[1]  # queries 1 and 3 are one text: a false negative document -> query
    q = F.normalize(pooled[:n].double(), dim=-1)
    d = F.normalize(pooled[n : 2 * n].double(), dim=-1)
    back = (d @ q.t()) * 50.0
    back[1, 3] = back[3, 1] = float("-inf")
    dq = F.cross_entropy(back, torch.arange(n))
    qd = contrastive_loss(pooled, n, 50.0, keys=keys).double()
    both = contrastive_loss(pooled, n, 50.0, keys=keys, symmetric=True).double()
    assert torch.allclose(both, (qd + dq) / 2, rtol=1e-6)


def test_temperature_is_one_over_the_scale():
    assert TrainConfig("simcse", temperature=0.05).resolved().scale == pytest.approx(20.0)
    assert TrainConfig("supervised").resolved().scale == 50.0
    with pytest.raises(ValueError, match="not both"):
        TrainConfig("simcse", temperature=0.05, scale=10.0).resolved()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TrainConfig("simcse", temperature=0.0).resolved()
    with pytest.raises(ValueError, match="contrastive settings"):
        TrainConfig("mntp", symmetric=True).resolved()


# ------------------------------------------------------------------------------ GradCache
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("losses"), "llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = root / "s.txt"
    text.write_text("\n".join(sentences(16, 0)) + "\n")
    triples = root / "t.jsonl"
    rows = [{"query": q, "positive": p, "negatives": [x][: i % 2], "instruction": "find it"}
            for i, (q, p, x) in enumerate(zip(sentences(8, 1), sentences(8, 2),
                                              sentences(8, 3), strict=True))]  # fmt: skip
    triples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"mntp": text, "simcse": text, "supervised": triples}


def step_grads(base, path, stage, chunk, dropout: bool, *, full_graph: bool = False):
    """(loss, gradients) of the first step of a fresh trainer with B randomized."""
    kw = {} if dropout else dict(lora_dropout=0.0, attn_dropout=0.0)
    loaded = load_for_training(str(base), dtype=torch.float32, device="cpu")
    trainer = Trainer(loaded, TrainConfig(stage, batch_size=6, grad_cache_chunk=chunk,
                                          symmetric=stage == "supervised", **kw),
                      model_arg=str(base))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trainer.adapters.B:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batch = trainer.collate(*trainer.next_step_items(trainer.batches([path])))
    assert len(batch.chunks) == (1 if chunk is None else -(-6 // chunk))
    trainer.train(True)
    if full_graph:  # autograd through every chunk at once: the reference with dropout on
        loss = trainer.loss(batch)
        loss.backward()
        loss = float(loss.detach())
    else:
        loss = trainer.runner.backward(batch, trainer.step)
    return loss, [p.grad.clone() for p in trainer.adapters.parameters()]


@pytest.mark.parametrize("stage", ["simcse", "supervised", "mntp"])
def test_chunked_step_gives_the_full_batch_gradients(base, data, stage):
    full_loss, full = step_grads(base, data[stage], stage, None, dropout=False)
    loss, grads = step_grads(base, data[stage], stage, 4, dropout=False)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    assert sum(float(g.abs().sum()) for g in full) > 0
    for a, b in zip(grads, full, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("stage", ["simcse", "supervised"])
def test_grad_cache_repeats_the_dropout_of_its_first_forward(base, data, stage):
    """With dropout on, GradCache's gradients equal those of autograd through the same chunks
    with the same masks (both seeded per chunk); a different chunking draws other masks."""
    ref_loss, ref = step_grads(base, data[stage], stage, 2, dropout=True, full_graph=True)
    loss, grads = step_grads(base, data[stage], stage, 2, dropout=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(grads, ref, strict=True):
        assert rel_err(a, b) < 1e-5
    other_loss, _ = step_grads(base, data[stage], stage, 3, dropout=True)
    assert other_loss != pytest.approx(ref_loss, rel=1e-6)
