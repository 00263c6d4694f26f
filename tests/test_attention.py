"""flash_attn_varlen / flash_attn_padded against l2v_kernels.reference (fp64 truth).

Without CUDA the kernels run in the Triton interpreter (fp16 and fp32: the interpreter has no
bf16 arithmetic) on small shapes; the same tests run on CUDA on a GPU machine, plus the `gpu`
tests at real sizes in bf16 against torch SDPA and a CUDA-graph replay.

Tolerances are DESIGN.md's ||out - ref|| / ||ref|| bounds (fp32 1e-5, fp16 2e-3, bf16 1e-2):
the blocked online softmax stays far inside them (fp32 ~1e-7, fp16 ~3e-4 on these shapes), so
no bound had to be derived from PyTorch's own error on CPU. The GPU bf16 tests also require our
error to be within 2x (+1e-3) of SDPA's own error against the same fp64 truth.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import REL_TOL, assert_close_rel, poison, rel_err

from l2v_kernels import reference
from l2v_kernels.attention import (
    flash_attn_padded,
    flash_attn_padded_fwd,
    flash_attn_varlen,
    flash_attn_varlen_fwd,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lengths, device=DEV):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _randn(*shape, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _varlen_inputs(lengths, hq, hkv, d, dtype, seed=0):
    t = sum(lengths)
    q = _randn(t, hq, d, dtype=dtype, seed=seed)
    k = _randn(t, hkv, d, dtype=dtype, seed=seed + 1)
    v = _randn(t, hkv, d, dtype=dtype, seed=seed + 2)
    return q, k, v, _cu(lengths)


def _ref_varlen(q, k, v, cu, causal=False, scale=None):
    return reference.attention_varlen(q.double(), k.double(), v.double(), cu, causal, scale)


def _ref_padded(q, k, v, mask, causal=False, scale=None):
    return reference.attention_padded(q.double(), k.double(), v.double(), mask, causal, scale)


def _check_varlen(lengths, hq, hkv, d, dtype, causal, seed=0):
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dtype, seed)
    out = flash_attn_varlen(q, k, v, cu, max(lengths), causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_rel(out, _ref_varlen(q, k, v, cu, causal), REL_TOL[dtype],
                     f"varlen {lengths} {hq}/{hkv} D{d} {dtype} causal={causal}")


# ------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 17, 97, 129])
def test_varlen_single_sequence(length, causal):
    _check_varlen([length], 9, 3, 64, torch.float32, causal)


@pytest.mark.parametrize(
    "dtype,hq,hkv,d,causal",
    [
        (torch.float16, 9, 3, 64, False),
        (torch.float16, 9, 3, 128, True),
        (torch.float16, 4, 4, 64, True),
        (torch.float16, 8, 2, 128, False),
        (torch.float32, 9, 3, 128, False),
        (torch.float32, 4, 4, 128, False),
        (torch.float32, 8, 2, 64, True),
        (torch.float16, 4, 1, 64, False),  # MQA
    ],
)
def test_varlen_mixed_batch(dtype, hq, hkv, d, causal):
    _check_varlen([1, 17, 97, 3, 40], hq, hkv, d, dtype, causal, seed=hq + d)


def test_varlen_head_dim_256():
    _check_varlen([33, 70], 4, 2, 256, torch.float16, False, seed=3)


def test_varlen_empty_sequences_scale_and_loose_max_seqlen():
    # Zero-length sequences in the batch, a custom scale, max_seqlen above the real max.
    lengths = [0, 5, 0, 45, 0]
    q, k, v, cu = _varlen_inputs(lengths, 6, 2, 64, torch.float32, seed=7)
    out = flash_attn_varlen(q, k, v, cu, 100, softmax_scale=0.3)
    assert_close_rel(out, _ref_varlen(q, k, v, cu, scale=0.3), REL_TOL[torch.float32])


def test_varlen_strided_views_of_fused_qkv():
    """q/k/v as column slices of one fused [T, (Hq+2Hkv)*D] buffer, and k with head-major
    storage: the kernel reads them through their strides, no copies."""
    lengths, hq, hkv, d = [23, 64, 9], 9, 3, 64
    t = sum(lengths)
    qkv = _randn(t, (hq + 2 * hkv) * d, dtype=torch.float16, seed=11)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    cu = _cu(lengths)
    ref = _ref_varlen(q, k, v, cu)
    assert_close_rel(flash_attn_varlen(q, k, v, cu, 64), ref, REL_TOL[torch.float16], "fused")
    k_hm = k.transpose(0, 1).contiguous().transpose(0, 1)  # token stride d, head stride t*d
    assert k_hm.stride() == (d, t * d, 1)
    assert_close_rel(flash_attn_varlen(q, k_hm, v, cu, 64), ref, REL_TOL[torch.float16], "k hm")


def test_varlen_launcher_writes_every_output_element():
    """The unchecked launcher fills a poisoned (NaN) `out`, strided like a column slice."""
    lengths = [31, 1, 66]
    q, k, v, cu = _varlen_inputs(lengths, 9, 3, 64, torch.float16, seed=5)
    buf = poison(torch.empty(q.shape[0], 2, 9, 64, dtype=q.dtype, device=DEV))
    out = buf[:, 1]
    ret = flash_attn_varlen_fwd(q, k, v, cu, max(lengths), False, None, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[:, 0]).all()  # nothing written outside `out`
    assert_close_rel(out, _ref_varlen(q, k, v, cu), REL_TOL[torch.float16])


def test_varlen_empty_input():
    q, k, v, _ = _varlen_inputs([], 4, 2, 64, torch.float16)
    out = flash_attn_varlen(q, k, v, _cu([0, 0]), 0)
    assert out.shape == (0, 4, 64) and out.dtype == torch.float16


# ------------------------------------------------------------------------------------------
# padded
# ------------------------------------------------------------------------------------------
def _mask(b, l, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(b, l, dtype=torch.bool)
    if pattern == "left":
        for i, n in enumerate(torch.randint(0, l, (b,), generator=g).tolist()):
            m[i, :n] = False
    elif pattern == "right":
        for i, n in enumerate(torch.randint(1, l + 1, (b,), generator=g).tolist()):
            m[i, n:] = False
    elif pattern == "holes":
        m = torch.rand(b, l, generator=g) > 0.4
        m[0, :] = False  # an all-padded row
        m[1, :] = True
    elif pattern == "mixed":  # left, right, all-padded, single token
        m[0, :30] = False
        m[1, 7:] = False
        m[2, :] = False
        m[3, :] = False
        m[3, l // 2] = True
    return m.to(DEV)


def _check_padded(pattern, dtype, causal, hq=9, hkv=3, d=64, b=4, l=45, seed=0):
    mask = _mask(b, l, pattern, seed)
    q = _randn(b, l, hq, d, dtype=dtype, seed=seed)
    k = _randn(b, l, hkv, d, dtype=dtype, seed=seed + 1)
    v = _randn(b, l, hkv, d, dtype=dtype, seed=seed + 2)
    out = flash_attn_padded(q, k, v, mask, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all(), "padded query positions must be 0"
    assert_close_rel(out, _ref_padded(q, k, v, mask, causal), REL_TOL[dtype],
                     f"padded {pattern} {dtype} causal={causal}")


@pytest.mark.parametrize(
    "pattern,dtype,causal",
    [
        ("left", torch.float16, False),
        ("left", torch.float32, True),
        ("right", torch.float32, False),
        ("right", torch.float16, True),
        ("holes", torch.float16, False),
        ("holes", torch.float32, True),
        ("mixed", torch.float32, False),
    ],
)
def test_padded_patterns(pattern, dtype, causal):
    _check_padded(pattern, dtype, causal)


def test_padded_mha_d128_matches_varlen_on_real_tokens():
    """Right-padded rows hold the same tokens as a packed batch: same outputs."""
    lengths, hq, d = [40, 7, 33], 4, 128
    b, l = len(lengths), max(lengths)
    q, k, v, cu = _varlen_inputs(lengths, hq, hq, d, torch.float32, seed=21)
    mask = torch.arange(l, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]
    qp, kp, vp = (torch.zeros(b, l, hq, d, device=DEV) for _ in range(3))
    qp[mask], kp[mask], vp[mask] = q, k, v
    out = flash_attn_padded(qp, kp, vp, mask)
    assert_close_rel(out[mask], flash_attn_varlen(q, k, v, cu, l), 1e-6)
    assert_close_rel(out, _ref_padded(qp, kp, vp, mask), REL_TOL[torch.float32])


def test_padded_strided_views_and_poisoned_out():
    b, l, hq, hkv, d = 3, 37, 9, 3, 64
    qkv = _randn(b, l, (hq + 2 * hkv) * d, dtype=torch.float16, seed=31)
    q = qkv[..., : hq * d].view(b, l, hq, d)
    k = qkv[..., hq * d : (hq + hkv) * d].view(b, l, hkv, d)
    v = qkv[..., (hq + hkv) * d :].view(b, l, hkv, d)
    mask = _mask(b, l, "left", seed=4)
    mask[1, 20:] = False
    mask[2, 30] = False
    out = poison(torch.empty(b, l, hq, d, dtype=torch.float16, device=DEV))
    flash_attn_padded_fwd(q, k, v, mask, False, None, out=out)
    assert (out[~mask] == 0).all()
    assert_close_rel(out, _ref_padded(q, k, v, mask), REL_TOL[torch.float16])


def test_padded_empty_input():
    for b, l in ((0, 5), (2, 0)):
        q = torch.empty(b, l, 4, 64, dtype=torch.float16, device=DEV)
        k = torch.empty(b, l, 2, 64, dtype=torch.float16, device=DEV)
        mask = torch.ones(b, l, dtype=torch.bool, device=DEV)
        assert flash_attn_padded(q, k, k, mask).shape == (b, l, 4, 64)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _good():
    q, k, v, cu = _varlen_inputs([5, 7], 4, 2, 64, torch.float16)
    return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=7)


def _varlen_case(**changes):
    def run():
        args = _good()
        for key, fn in changes.items():
            args[key] = fn(args)
        return flash_attn_varlen(**args)
    return run


VARLEN_ERRORS = [
    ("q not a tensor", _varlen_case(q=lambda a: a["q"].tolist()), TypeError, "q must be a torch"),
    ("q 2-D", _varlen_case(q=lambda a: a["q"][:, 0]), ValueError, "q must be 3-D"),
    ("int dtype", _varlen_case(q=lambda a: a["q"].to(torch.int32)), ValueError, "q has dtype"),
    ("mixed dtypes", _varlen_case(k=lambda a: a["k"].float()), ValueError, "one dtype"),
    ("k/v shapes", _varlen_case(v=lambda a: a["v"][:, :1]), ValueError, "same shape"),
    ("token count", _varlen_case(k=lambda a: a["k"][1:], v=lambda a: a["v"][1:]), ValueError,
     "must agree"),
    ("head dim", _varlen_case(k=lambda a: a["k"][..., :32], v=lambda a: a["v"][..., :32]),
     ValueError, "must agree"),
    ("heads", _varlen_case(k=lambda a: a["q"][:, :3], v=lambda a: a["q"][:, :3]), ValueError,
     "multiple of the kv head count"),
    ("unsupported D", _varlen_case(q=lambda a: a["q"][..., :32], k=lambda a: a["k"][..., :32],
                                   v=lambda a: a["v"][..., :32]), ValueError, "not supported"),
    ("last dim stride", _varlen_case(q=lambda a: a["q"].repeat_interleave(2, -1)[..., ::2]),
     ValueError, "contiguous last dimension"),
    ("cu dtype", _varlen_case(cu_seqlens=lambda a: a["cu_seqlens"].long()), ValueError,
     "cu_seqlens has dtype"),
    ("cu end", _varlen_case(cu_seqlens=lambda a: a["cu_seqlens"] - 1), ValueError,
     "start at 0 and end"),
    ("cu order", _varlen_case(cu_seqlens=lambda a: _cu([0, 0]).new_tensor([0, 8, 5, 12])),
     ValueError, "non-decreasing"),
    ("max_seqlen small", _varlen_case(max_seqlen=lambda a: 6), ValueError,
     "less than the longest"),
    ("max_seqlen type", _varlen_case(max_seqlen=lambda a: 7.0), ValueError, "non-negative int"),
]


@pytest.mark.parametrize("name,fn,exc,msg", VARLEN_ERRORS, ids=[e[0] for e in VARLEN_ERRORS])
def test_varlen_validation(name, fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()


def test_validation_scale_device_and_padded_mask(monkeypatch):
    a = _good()
    with pytest.raises(ValueError, match="softmax_scale must be a positive"):
        flash_attn_varlen(**a, softmax_scale=-1.0)
    q = _randn(2, 6, 4, 64, dtype=torch.float16, seed=0)
    k = _randn(2, 6, 2, 64, dtype=torch.float16, seed=1)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="key_padding_mask has dtype"):
        flash_attn_padded(q, k, k, mask.int())
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        flash_attn_padded(q, k, k, mask[:, :5])
    with pytest.raises(ValueError, match="q must be 4-D"):
        flash_attn_padded(q[0], k[0], k[0], mask)
    # Tensors off CUDA without the interpreter are refused.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        flash_attn_padded(q.cpu(), k.cpu(), k.cpu(), mask.cpu())


# ------------------------------------------------------------------------------------------
# GPU: bf16 at real sizes, SDPA agreement, CUDA graphs
# ------------------------------------------------------------------------------------------
def _sdpa_err(q, k, v, ref, mask=None):
    """SDPA's own rel error against the same fp64 truth (q/k/v in [B, L, H, D])."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
    am = None if mask is None else mask[:, None, None, :]
    out = sdpa(qt, kt, vt, attn_mask=am).transpose(1, 2)
    if mask is not None:
        return rel_err(out[mask], ref[mask])
    return rel_err(out, ref)


def _lognormal_lengths(n, seed, median=120, sigma=0.8, cap=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g))
    return x.round().clamp(1, cap).int().tolist()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,l,hq,hkv,causal",
    [(64, 512, 32, 8, False), (16, 2048, 32, 8, False), (32, 512, 32, 32, False),
     (8, 2048, 32, 8, True)],
)
def test_gpu_bf16_equal_lengths(b, l, hq, hkv, causal):
    d, dt = 128, torch.bfloat16
    q, k, v, cu = _varlen_inputs([l] * b, hq, hkv, d, dt, seed=b + l)
    out = flash_attn_varlen(q, k, v, cu, l, causal=causal)
    ref = _ref_varlen(q, k, v, cu, causal)
    err = rel_err(out, ref)
    assert err < REL_TOL[dt], err
    if not causal:
        shape = lambda x: x.view(b, l, x.shape[1], d)  # noqa: E731
        base = _sdpa_err(shape(q), shape(k), shape(v), shape(ref))
        assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.gpu
def test_gpu_bf16_varlen_mixed():
    lengths = _lognormal_lengths(300, seed=1)
    q, k, v, cu = _varlen_inputs(lengths, 32, 8, 128, torch.bfloat16, seed=2)
    out = flash_attn_varlen(q, k, v, cu, max(lengths))
    assert rel_err(out, _ref_varlen(q, k, v, cu)) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_bf16_padded_left_vs_sdpa():
    b, l, hq, hkv, d, dt = 48, 512, 32, 8, 128, torch.bfloat16
    lengths = _lognormal_lengths(b, seed=3)
    mask = torch.arange(l, device=DEV)[None, :] >= l - torch.tensor(lengths, device=DEV)[:, None]
    q = _randn(b, l, hq, d, dtype=dt, seed=4)
    k = _randn(b, l, hkv, d, dtype=dt, seed=5)
    v = _randn(b, l, hkv, d, dtype=dt, seed=6)
    out = flash_attn_padded(q, k, v, mask)
    ref = _ref_padded(q, k, v, mask)
    assert (out[~mask] == 0).all()
    err = rel_err(out, ref)
    assert err < REL_TOL[dt], err
    assert err <= 2 * _sdpa_err(q, k, v, ref, mask) + 1e-3


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    lengths = _lognormal_lengths(64, seed=7)
    q, k, v, cu = _varlen_inputs(lengths, 32, 8, 128, torch.bfloat16, seed=8)
    maxlen = 512
    out = torch.empty_like(q)
    flash_attn_varlen_fwd(q, k, v, cu, maxlen, False, None, out=out)  # compile + tune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash_attn_varlen_fwd(q, k, v, cu, maxlen, False, None, out=out)
    q.copy_(_randn(*q.shape, dtype=q.dtype, seed=9))  # new inputs in the captured buffers
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expect = flash_attn_varlen(q, k, v, cu, maxlen)
    assert torch.equal(out, expect)
    assert rel_err(out, _ref_varlen(q, k, v, cu)) < REL_TOL[torch.bfloat16]
