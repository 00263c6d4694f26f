"""The engine boundary (l2v_models.packing, l2v_models.engine) on its own, without llm2vec's
text rules: packing is exact, batching never changes results, rows come back in the caller's
order, edge cases (empty input, empty texts, empty pool spans, one text over the budget) are
defined, bad token ids are refused before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rel_err
from test_model import hf_and_ours
from tiny import tiny_config

from l2v_kernels import reference
from l2v_models.engine import Engine
from l2v_models.packing import PackedBatch, TokenizedTexts, pack, plan_batches


@pytest.fixture(scope="module")
def model():
    return hf_and_ours(tiny_config("llama"))[1]


def _random_texts(lengths, seed=0, vocab=256):
    g = np.random.default_rng(seed)
    ids = [g.integers(0, vocab, n).tolist() for n in lengths]
    starts = np.array([g.integers(0, max(n, 1)) for n in lengths])
    counts = np.array(
        [g.integers(0, n - s + 1) if n else 0 for n, s in zip(lengths, starts, strict=True)]
    )
    return TokenizedTexts(ids, starts, counts)


def _one_by_one(model, texts: TokenizedTexts, mode: str, normalize=False) -> torch.Tensor:
    """Each text alone, through the model's plain forward and the reference pooling."""
    rows = []
    for i in range(len(texts)):
        ids = torch.tensor(texts.input_ids[i], dtype=torch.int64)
        n = ids.shape[0]
        if n == 0:
            rows.append(torch.zeros(model.config.hidden_size))
            continue
        cu = torch.tensor([0, n], dtype=torch.int32)
        hidden = model(ids, cu, n)
        mask = torch.zeros(n, dtype=torch.bool)
        s, c = int(texts.pool_starts[i]), int(texts.pool_counts[i])
        mask[s : s + c] = True
        rows.append(reference.masked_pool(hidden, mask, mode, cu, normalize)[0])
    return torch.stack(rows)


def test_plan_batches_budget_order_and_edges():
    lengths = np.array([5, 0, 9, 3, 9, 1, 20, 0])
    batches = plan_batches(lengths, max_tokens=12)
    flat = np.concatenate(batches)
    # every non-empty text exactly once, longest first (ties in input order), empties in none
    assert sorted(flat.tolist()) == [0, 2, 3, 4, 5, 6]
    assert flat.tolist() == [6, 2, 4, 0, 3, 5]
    for b in batches:
        assert lengths[b].sum() <= 12 or len(b) == 1  # the 20-token text goes alone
    assert [b.tolist() for b in plan_batches(lengths, 100, max_texts=2)] == [[6, 2], [4, 0], [3, 5]]
    assert plan_batches(np.zeros(3), 8) == []
    assert plan_batches(np.array([], dtype=np.int64), 8) == []
    with pytest.raises(ValueError, match=">= 1"):
        plan_batches(lengths, 0)


def test_pack_layout():
    texts = TokenizedTexts([[5, 6, 7], [], [8, 9]], [1, 0, 0], [2, 0, 1])
    b = pack(texts, np.array([2, 0]))
    assert b.input_ids.tolist() == [8, 9, 5, 6, 7] and b.input_ids.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 2, 5] and b.cu_seqlens.dtype == torch.int32
    assert b.positions.tolist() == [0, 1, 0, 1, 2]
    assert b.pool_mask.tolist() == [1, 0, 0, 1, 1]
    assert b.max_seqlen == 3 and b.rows.tolist() == [2, 0]
    assert b.num_tokens == 5 and b.num_texts == 2
    assert torch.equal(b.positions, reference.positions_from_cu_seqlens(b.cu_seqlens, 5))


def test_tokenized_texts_validation_and_concat():
    with pytest.raises(ValueError, match="2 texts but 1 pool starts"):
        TokenizedTexts([[1], [2]], [0], [1, 1])
    with pytest.raises(ValueError, match="text 1 has 2 tokens but pools 3 from token 0"):
        TokenizedTexts([[1], [2, 3]], [0, 0], [1, 3])
    a = TokenizedTexts.whole([[1, 2], [3]])
    b = TokenizedTexts([[4, 5, 6]], [1], [2])
    c = TokenizedTexts.concat([a, b])
    assert [list(x) for x in c.input_ids] == [[1, 2], [3], [4, 5, 6]]
    assert c.pool_starts.tolist() == [0, 0, 1] and c.pool_counts.tolist() == [2, 1, 2]
    assert c.select([2, 0]).pool_starts.tolist() == [1, 0]
    assert len(TokenizedTexts.concat([])) == 0


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last", "max"])
def test_embed_equals_each_text_alone_for_any_budget(model, mode):
    texts = _random_texts([7, 1, 0, 30, 12, 3, 19, 2, 25], seed=1)
    ref = _one_by_one(model, texts, mode)
    engine = Engine(model)
    for max_tokens, max_texts in ((4096, None), (31, None), (1, None), (64, 2), (8, 1)):
        got = engine.embed(texts, mode=mode, max_tokens=max_tokens, max_texts=max_texts)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert rel_err(got, ref) < 1e-5, (max_tokens, max_texts)
    # zero rows for the empty text and for the empty pool spans
    empty = [i for i in range(len(texts)) if texts.pool_counts[i] == 0]
    assert empty and got[empty].abs().sum() == 0


def test_embed_normalize_and_empty_inputs(model):
    engine = Engine(model)
    texts = _random_texts([6, 9, 4], seed=2)
    texts.pool_counts[:] = np.maximum(texts.pool_counts, 1)
    texts.pool_starts[:] = np.minimum(texts.pool_starts, texts.lengths - texts.pool_counts)
    got = engine.embed(texts, normalize=True)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    assert rel_err(got, _one_by_one(model, texts, "mean", normalize=True)) < 1e-5
    assert engine.embed(TokenizedTexts([], [], [])).shape == (0, model.config.hidden_size)
    assert engine.embed(TokenizedTexts([[]], [0], [0])).abs().sum() == 0


def test_forward_one_batch_in_caller_order(model):
    engine = Engine(model)
    texts = _random_texts([5, 11, 3], seed=3)
    rows = np.array([2, 0, 1])
    batch = pack(texts, rows)
    assert isinstance(batch, PackedBatch) and batch.to("cpu") is batch
    with torch.inference_mode():
        pooled = engine.forward(batch, "mean")
    ref = _one_by_one(model, texts, "mean")
    assert rel_err(pooled, ref[rows]) < 1e-5


def test_bad_ids_and_settings_refused_before_running(model):
    engine = Engine(model)
    calls = []
    original = model.forward
    texts = TokenizedTexts.whole([[1, 2], [3, 256]])
    try:
        model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
        with pytest.raises(ValueError, match=r"text 1: token ids must lie in \[0, 256\)"):
            engine.embed(texts)
        assert not calls
    finally:
        del model.forward
    with pytest.raises(ValueError, match="pooling mode must be one of"):
        engine.embed(TokenizedTexts.whole([[1]]), mode="median")
    with pytest.raises(ValueError, match="max_tokens_per_batch must be an int >= 1"):
        Engine(model, max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        engine.embed(TokenizedTexts.whole([[1]]), max_texts=0)
    with pytest.raises(TypeError, match="Engine runs an l2v_models.model.Transformer"):
        Engine(object())


def test_gradient_checkpointing_gives_the_same_gradients():
    """The trainer's memory option: recomputing each layer in backward changes nothing."""
    from l2v_models.ops import TorchOps

    model = hf_and_ours(tiny_config("gemma3"))[1]
    ids = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 12, 19], dtype=torch.int32)
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.build_ops(TorchOps(model.config))
        model.embed.requires_grad_(True)
        model(ids, cu, 12).square().sum().backward()
        grads.append(model.embed.grad.clone())
        model.embed.grad = None
        model.embed.requires_grad_(False)
    model.gradient_checkpointing = False
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
