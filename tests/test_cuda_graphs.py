"""CUDA-graph buckets (l2v_models.cuda_graphs): padding a batch to its bucket changes nothing.

CPU: the runner with capture=False runs exactly the padded static-buffer computation the graphs
capture (texts, then a dummy sequence of padding tokens, then empty slots; max_seqlen = the
bucket), eagerly; it must equal the plain forward + pool of the unpadded batch for every pooling
mode, on the torch backend and on the triton backend in the interpreter. The encoder refuses
cuda_graphs=True where graphs cannot run, and routes small batches through the runner.
GPU: capture + replay equals eager on a 2-layer Mistral-7B-shaped bf16 model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from test_model import _mistral_7b_two_layers, _triton_config, hf_and_ours, pack, random_texts
from tiny import randomize_, tiny_config

from l2v_kernels.reference import positions_from_cu_seqlens
from l2v_models.checkpoint import from_hf_state_dict
from l2v_models.config import ModelConfig
from l2v_models.cuda_graphs import BucketedGraphRunner
from l2v_models.encoder import LLM2Vec
from l2v_models.hf_compat import build_hf_model
from l2v_models.model import POOL_MODES
from l2v_models.packing import PackedBatch

HAS_CUDA = torch.cuda.is_available()
# B = 1 (one token), 3 (mixed, with a single token), 8 (mixed), T exactly at a bucket (32, 16).
BATCHES = {
    "b1-len1": [1],
    "b3-mixed": [5, 1, 12],
    "b8-mixed": [9, 1, 3, 14, 2, 7, 1, 6],
    "b3-T32-boundary": [16, 9, 7],
    "b1-T16-boundary": [16],
}


def _batch(lengths, seed):
    ids, cu, max_len = pack(random_texts(lengths, 256, seed=seed))
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(ids.shape[0], generator=g) < 0.7).to(torch.uint8)
    mask[cu[1:].long() - 1] = 1  # every text pools at least its last token
    return ids.to(torch.int32), cu, mask, max_len


def _plain(model, ids, cu, mask, max_len, mode, normalize):
    hidden = model(ids, cu, max_len)
    return model.pool(hidden, mask, cu, mode, normalize)


def _packed(ids, cu, mask, max_len) -> PackedBatch:
    positions = positions_from_cu_seqlens(cu, ids.shape[0])
    return PackedBatch(ids, cu, positions, mask, max_len, np.arange(cu.shape[0] - 1))


@pytest.fixture(scope="module")
def torch_model():
    return hf_and_ours(tiny_config("llama"))[1]


@pytest.fixture(scope="module")
def triton_model():
    if HAS_CUDA:
        pytest.skip("interpreter test; the GPU tests cover CUDA")
    model = hf_and_ours(_triton_config(), backend="triton")[1]
    assert model.backend == "triton"
    return model


def _check_buckets(model, batches, modes_normalize, tol=1e-5):
    runner = BucketedGraphRunner(model, capture=False, max_tokens=64, max_seqs=8)
    for seed, (name, lengths) in enumerate(batches.items()):
        ids, cu, mask, max_len = _batch(lengths, seed)
        T, B = ids.shape[0], len(lengths)
        t_b, b_b = runner.bucket(T, B)
        assert t_b >= T and b_b >= B
        for mode, normalize in modes_normalize:
            got = runner(_packed(ids, cu, mask, max_len), mode, normalize)
            ref = _plain(model, ids, cu, mask, max_len, mode, normalize)
            assert got.shape == ref.shape == (B, model.config.hidden_size)
            err = rel_err(got, ref)
            assert err < tol, f"{name} {mode} normalize={normalize}: rel error {err:.2e}"
    assert runner.calls["eager"] == 0 and runner.calls["padded_eager"] > 0
    return runner


def test_padded_buckets_equal_unpadded_torch_backend(torch_model):
    modes = [(m, n) for m in POOL_MODES for n in (False, True)]
    runner = _check_buckets(torch_model, BATCHES, modes)
    keys = runner.graphs_captured()
    assert (16, 1, "mean", False) in keys and (32, 4, "last", True) in keys
    assert (64, 8, "weighted_mean", False) in keys  # 43 tokens, 8 texts


def test_padded_buckets_equal_unpadded_triton_interpreter(triton_model):
    # Every mode with and without normalization, spread over the batches (the interpreter is
    # slow; the pooling kernel itself is tested per mode in test_pooling).
    modes = [("mean", False), ("weighted_mean", True), ("last", False), ("mean", True)]
    _check_buckets(triton_model, BATCHES, modes)


def test_reusing_a_bucket_with_other_batches(torch_model):
    """Static buffers are re-filled per call: a shorter batch after a longer one in the same
    bucket (stale tokens, stale cu_seqlens slots: 17 after [0, 10, 20, 30] would end the dummy
    before it starts) gives its own result."""
    runner = BucketedGraphRunner(torch_model, capture=False, max_tokens=64, max_seqs=8)
    batches = [[1, 1, 1, 14], [10, 10, 10], [20, 9, 2, 1], [4, 11, 2], [17], [2] * 8]
    for seed, lengths in enumerate(batches):
        ids, cu, mask, max_len = _batch(lengths, 10 + seed)
        got = runner(_packed(ids, cu, mask, max_len), "mean")
        assert rel_err(got, _plain(torch_model, ids, cu, mask, max_len, "mean", False)) < 1e-5
    assert runner.graphs_captured() == [(16, 8, "mean", False), (32, 1, "mean", False),
                                        (32, 4, "mean", False)]  # fmt: skip
    # out= writes into the caller's buffer.
    ids, cu, mask, max_len = _batch([6, 3], 20)
    with torch.inference_mode():  # as the encoder calls it
        buf = torch.full((2, torch_model.config.hidden_size), float("nan"))
        assert runner(_packed(ids, cu, mask, max_len), "mean", out=buf) is buf
    assert rel_err(buf, _plain(torch_model, ids, cu, mask, max_len, "mean", False)) < 1e-5


def test_bucket_choice_large_batches_and_warmup(torch_model):
    runner = BucketedGraphRunner(torch_model, capture=False, max_tokens=100, max_seqs=6,
                                 min_tokens=16)  # fmt: skip
    assert runner.token_buckets == (16, 32, 64, 100)
    assert runner.seq_buckets == (1, 2, 4, 6)
    assert runner.bucket(1, 1) == (16, 1) and runner.bucket(16, 3) == (16, 4)
    assert runner.bucket(17, 5) == (32, 6) and runner.bucket(100, 6) == (100, 6)
    assert runner.bucket(101, 1) is None and runner.bucket(10, 7) is None
    # Over the largest bucket: the plain eager forward + pool.
    ids, cu, mask, max_len = _batch([60, 50], 3)
    got = runner(_packed(ids, cu, mask, max_len), "weighted_mean")
    assert runner.calls["eager"] == 1 and not runner.graphs_captured()
    assert rel_err(got, _plain(torch_model, ids, cu, mask, max_len, "weighted_mean", False)) < 1e-6
    # warmup builds every bucket up to the limits, per mode and flag.
    done = runner.warmup(("mean", "last"), (False, True), max_tokens=20, max_seqs=2)
    assert sorted(done) == runner.graphs_captured()
    assert {(t, b) for t, b, _, _ in done} == {(16, 1), (16, 2), (32, 1), (32, 2)}
    assert len(done) == 4 * 2 * 2
    # A sliding window caps the token buckets (a bucket is one attention span).
    mistral = hf_and_ours(tiny_config("mistral", sliding_window=48))[1]
    assert BucketedGraphRunner(mistral, capture=False).token_buckets == (16, 32, 48)
    with pytest.raises(ValueError, match="mode"):
        runner(_packed(ids, cu, mask, max_len), "median")


@pytest.mark.skipif(HAS_CUDA, reason="CPU refusal")
def test_graphs_refused_without_cuda(torch_model, tmp_path):
    with pytest.raises(RuntimeError, match="CUDA graphs were requested.*not a CUDA device"):
        BucketedGraphRunner(torch_model)
    with pytest.raises(ValueError, match="cuda_graphs=True needs .*CUDA"):
        LLM2Vec.from_model(torch_model, cuda_graphs=True)
    # from_pretrained refuses before loading anything (the path is never read).
    with pytest.raises(ValueError, match="cuda_graphs=True needs .*cpu"):
        LLM2Vec.from_pretrained(str(tmp_path / "none"), device_map="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        LLM2Vec.from_model(torch_model, cuda_graphs="yes")


def test_encoder_routes_small_batches_through_the_runner(torch_model):
    """The encoder's hook, on CPU: a capture=False runner stands in for the CUDA one."""
    ids = [t.tolist() for t in random_texts([30, 1, 7, 12, 40, 5], 256, seed=4)]
    n_pool = [10, 1, 3, 50, 38, 2]
    plain = LLM2Vec.from_model(torch_model, max_tokens_per_batch=48)
    graphed = LLM2Vec.from_model(torch_model, max_tokens_per_batch=48)
    graphed.engine._graphs = BucketedGraphRunner(torch_model, capture=False, max_tokens=32)
    graphed.engine.cuda_graphs = True
    for mode in ("mean", "weighted_mean", "last_token"):
        plain.pooling_mode = graphed.pooling_mode = mode
        for normalize in (False, True):
            a = plain.encode_token_ids(ids, n_pool, normalize_embeddings=normalize)
            b = graphed.encode_token_ids(ids, n_pool, normalize_embeddings=normalize)
            assert rel_err(b, a) < 1e-5, (mode, normalize)
    calls = graphed.engine._graphs.calls
    assert calls["padded_eager"] > 0  # batches of <= 32 tokens went through the runner ...
    assert calls["eager"] == 0  # ... and larger ones took the encoder's own eager path


# ---------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def mistral_bf16():
    config = _mistral_7b_two_layers()
    hf = build_hf_model(config, dtype=torch.float32, device="cuda")
    randomize_(hf, seed=0)
    model = from_hf_state_dict(ModelConfig.from_hf_config(config), hf.state_dict(),
                               dtype=torch.bfloat16, device="cuda", backend="triton")  # fmt: skip
    del hf
    torch.cuda.empty_cache()
    return model


def _cos_min(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


@pytest.mark.gpu
@pytest.mark.parametrize("n_texts", [1, 8])
def test_capture_and_replay_equal_eager_on_gpu(mistral_bf16, n_texts):
    model = mistral_bf16
    runner = BucketedGraphRunner(model, max_seqs=8)
    padded = BucketedGraphRunner(model, max_seqs=8, capture=False)
    # Several batches in one bucket (T <= 128, n_texts texts): one capture, then replays.
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, 128 // n_texts + 1, (n_texts,), generator=g).tolist()
        lengths[0] = max(lengths[0], 65 - sum(lengths[1:]))  # 65..128 tokens: bucket 128
        texts = random_texts(lengths, 32000, seed=seed)
        ids, cu, max_len = pack(texts, "cuda")
        mask = torch.ones(ids.shape[0], dtype=torch.uint8, device="cuda")
        for mode, normalize in (("mean", False), ("last", True)):
            got = runner(_packed(ids, cu, mask, max_len), mode, normalize)
            same_buckets = padded(_packed(ids, cu, mask, max_len), mode, normalize)
            eager = model.pool(model(ids, cu, max_len), mask, cu, mode, normalize)
            assert got.shape == (n_texts, 4096) and torch.isfinite(got).all()
            # The replay is the padded computation, kernel for kernel ...
            assert rel_err(got, same_buckets) < 1e-4, (seed, mode)
            # ... and padding changes nothing beyond bf16 rounding (GEMMs of another M).
            assert rel_err(got, eager) < 1e-2 and _cos_min(got, eager) > 0.9999, (seed, mode)
    assert runner.graphs_captured() == [(128, n_texts, "last", True),
                                        (128, n_texts, "mean", False)]  # fmt: skip
    assert runner.calls["capture"] == 2 and runner.calls["replay"] == 8


@pytest.mark.gpu
def test_encoder_with_cuda_graphs_equals_without_on_gpu(mistral_bf16):
    model = mistral_bf16
    texts = random_texts([40, 1, 23, 57, 12, 33, 8, 300, 2000], 32000, seed=9)
    ids, n_pool = [t.tolist() for t in texts], [20, 1, 10, 50, 12, 3, 8, 299, 1000]
    plain = LLM2Vec.from_model(model)
    graphed = LLM2Vec.from_model(model, cuda_graphs=True)
    for batch_size in (1, 8, None):
        a = plain.encode_token_ids(ids, n_pool, batch_size=batch_size)
        b = graphed.encode_token_ids(ids, n_pool, batch_size=batch_size)
        assert rel_err(b, a) < 1e-2 and _cos_min(b, a) > 0.9999, batch_size
    calls = graphed.graph_runner().calls
    assert calls["capture"] > 0 and calls["replay"] > calls["capture"]


@pytest.mark.gpu
def test_capture_failure_names_the_bucket(mistral_bf16, monkeypatch):
    """Last in the file: a failed capture is the one thing here that may upset the device."""
    model = mistral_bf16
    runner = BucketedGraphRunner(model)
    ids, cu, max_len = pack(random_texts([5, 9], 32000), "cuda")
    mask = torch.ones(ids.shape[0], dtype=torch.uint8, device="cuda")
    pool = model.pool

    def syncing_pool(hidden, *args, **kwargs):
        hidden.sum().item()  # a host sync: not capturable
        return pool(hidden, *args, **kwargs)

    monkeypatch.setattr(model, "pool", syncing_pool)
    with pytest.raises(RuntimeError, match=r"capturing bucket T=16 tokens, B=2 texts"):
        runner(_packed(ids, cu, mask, max_len), "mean")
