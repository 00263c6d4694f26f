"""flash_attn_varlen / flash_attn_padded against l2v_kernels.reference (fp64 truth).

Without CUDA the kernels run in the Triton interpreter (fp16 and fp32: the interpreter has no
bf16 arithmetic) on small shapes; the same tests run on CUDA on a GPU machine, plus the `gpu`
tests at real sizes in bf16 against torch SDPA and a CUDA-graph replay.

Tolerances are docs/architecture.md's ||out - ref|| / ||ref|| bounds (fp32 1e-5, fp16 2e-3,
bf16 1e-2):
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


def _ref_varlen(q, k, v, cu, causal=False, scale=None, window=None, softcap=None):
    return reference.attention_varlen(q.double(), k.double(), v.double(), cu, causal, scale,
                                      window, softcap)


def _ref_padded(q, k, v, mask, causal=False, scale=None, window=None, softcap=None):
    return reference.attention_padded(q.double(), k.double(), v.double(), mask, causal, scale,
                                      window, softcap)


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
# local (sliding-window) attention and soft-capping
# ------------------------------------------------------------------------------------------
# The interpreter runs one tile config: BLOCK_M = BLOCK_N = 32 ((token, head) rows x keys).
WINDOW_CASES = [
    # dtype, lengths, hq, hkv, d, window, causal
    (torch.float32, [1, 17, 97, 3, 40], 9, 3, 64, (5, 5), False),  # window << BLOCK_N
    (torch.float16, [1, 17, 97, 3, 40], 9, 3, 64, (31, 31), False),  # BLOCK_N - 1
    (torch.float16, [70, 130], 4, 2, 64, (33, 0), True),  # left > BLOCK_N, causal
    (torch.float32, [70, 130], 4, 2, 128, (40, 7), True),  # causal: right side irrelevant
    (torch.float32, [23, 61], 4, 4, 64, (200, 200), False),  # wider than every text
    (torch.float16, [1, 33, 64], 4, 1, 128, (0, 0), False),  # MQA, each token sees itself only
    (torch.float32, [100, 9], 6, 2, 64, (None, 3), False),  # one side unlimited
    (torch.float16, [100, 9], 6, 2, 64, (7, None), False),
]


@pytest.mark.parametrize("dtype,lengths,hq,hkv,d,window,causal", WINDOW_CASES)
def test_varlen_window(dtype, lengths, hq, hkv, d, window, causal):
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dtype, seed=len(lengths) + hq)
    out = poison(torch.empty_like(q))
    flash_attn_varlen_fwd(q, k, v, cu, max(lengths), causal, None, window=window, out=out)
    ref = _ref_varlen(q, k, v, cu, causal, window=window)
    assert_close_rel(out, ref, REL_TOL[dtype], f"window {window} causal={causal}")
    if window[0] is not None and window[0] < max(lengths) - 1:
        # The window changes the result: this test would catch a kernel that ignores it.
        assert rel_err(_ref_varlen(q, k, v, cu, causal), ref) > 10 * REL_TOL[dtype]


def _count_dots(monkeypatch):
    """Count tl.dot calls of the interpreted kernels (two per key tile: q.k and p.v)."""
    from triton.runtime import interpreter

    calls = [0]
    create_dot = interpreter.interpreter_builder.create_dot

    def counting(*args, **kwargs):
        calls[0] += 1
        return create_dot(*args, **kwargs)

    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", counting)
    return calls


@pytest.mark.skipif(DEV != "cpu", reason="counts tiles in the Triton interpreter")
@pytest.mark.parametrize("window", [(8, 8), (40, 40), (64, 0)])
def test_window_skips_key_blocks(monkeypatch, window):
    """A program walks only the key blocks its rows can see: at most ceil(span / BLOCK_N) + 1
    tiles per query block (span = the keys some row of the block sees), not all of them."""
    T, hq, hkv, block = 256, 2, 1, 32
    q, k, v, cu = _varlen_inputs([T], hq, hkv, 64, torch.float32, seed=1)
    calls = _count_dots(monkeypatch)
    out = flash_attn_varlen(q, k, v, cu, T, window=window)
    assert_close_rel(out, _ref_varlen(q, k, v, cu, window=window), REL_TOL[torch.float32])
    tiles = calls[0] // 2
    bound = 0
    for start_m in range(0, T * hq, block):
        t_first, t_last = start_m // hq, (start_m + block - 1) // hq
        span = min(T, t_last + window[1] + 1) - max(0, t_first - window[0])
        bound += -(-span // block) + 1
    calls[0] = 0
    flash_attn_varlen(q, k, v, cu, T)
    full = calls[0] // 2
    assert full == (T * hq // block) * (T // block)
    assert tiles <= bound < full, (tiles, bound, full)


@pytest.mark.parametrize(
    "pattern,dtype,causal,window,softcap",
    [
        ("holes", torch.float32, False, (6, 6), None),
        ("left", torch.float16, True, (10, 0), 5.0),
        ("mixed", torch.float16, False, (3, 40), None),
        ("right", torch.float32, False, (33, 33), 2.0),
    ],
)
def test_padded_window_softcap(pattern, dtype, causal, window, softcap):
    b, l, hq, hkv, d = 4, 45, 4, 2, 64
    mask = _mask(b, l, pattern, seed=2)
    q = _randn(b, l, hq, d, dtype=dtype, seed=3) * 2
    k = _randn(b, l, hkv, d, dtype=dtype, seed=4)
    v = _randn(b, l, hkv, d, dtype=dtype, seed=5)
    out = poison(torch.empty_like(q))
    flash_attn_padded_fwd(q, k, v, mask, causal, None, window=window, softcap=softcap, out=out)
    assert (out[~mask] == 0).all()
    ref = _ref_padded(q, k, v, mask, causal, window=window, softcap=softcap)
    assert_close_rel(out, ref, REL_TOL[dtype], f"padded {pattern} {window} cap={softcap}")


SOFTCAP_CASES = [
    # dtype, lengths, hq, hkv, d, causal, softcap, window, scale
    (torch.float32, [1, 17, 97, 3, 40], 9, 3, 64, False, 5.0, None, None),
    (torch.float16, [1, 17, 97, 3, 40], 8, 2, 128, True, 2.0, None, None),
    (torch.float32, [70, 45], 4, 1, 64, False, 1.5, (20, 20), 0.3),  # + window, custom scale
    (torch.float16, [130], 4, 4, 256, False, 50.0, (31, 31), None),  # Gemma-2's 50, D 256
]


@pytest.mark.parametrize("dtype,lengths,hq,hkv,d,causal,softcap,window,scale", SOFTCAP_CASES)
def test_varlen_softcap(dtype, lengths, hq, hkv, d, causal, softcap, window, scale):
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dtype, seed=d + hq)
    q = (q.float() * 3).to(dtype)  # large scores, so the cap bends them
    out = flash_attn_varlen(q, k, v, cu, max(lengths), causal=causal, softmax_scale=scale,
                            window=window, softcap=softcap)
    ref = _ref_varlen(q, k, v, cu, causal, scale, window, softcap)
    assert_close_rel(out, ref, REL_TOL[dtype], f"softcap {softcap}")
    if softcap < 10:  # the cap changes the result
        assert rel_err(_ref_varlen(q, k, v, cu, causal, scale, window), ref) > 10 * REL_TOL[dtype]


@pytest.mark.parametrize("w", [512, 7, 10])
def test_window_rule_matches_transformers_bidirectional_gemma3(w):
    """The documented rule: Gemma-3 with use_bidirectional_attention=True and config.json
    sliding_window W masks exactly window=(W // 2, W // 2) (transformers' own mask function)."""
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    overlay = getattr(gemma3, "_bidirectional_window_overlay", None)
    if overlay is None:
        pytest.skip("this transformers has no bidirectional Gemma-3")
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(sliding_window=w, use_bidirectional_attention=True)
    n = 2 * w + 9
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hf = overlay(cfg.sliding_window)(0, 0, i, j)
    assert torch.equal(hf, reference._window_allowed(n, n, (w // 2, w // 2), "cpu"))


def test_window_and_softcap_validation():
    a = _good()
    for bad in ((1,), (1, 2, 3), (-1, 3), (2.0, 3), (True, 3), 5, "4,4"):
        with pytest.raises(ValueError, match="window must be None or"):
            flash_attn_varlen(**a, window=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "30"):
        with pytest.raises(ValueError, match="softcap must be None or a positive"):
            flash_attn_varlen(**a, softcap=bad)
    q = _randn(2, 6, 4, 64, dtype=torch.float16, seed=0)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="window must be None or"):
        flash_attn_padded(q, q[:, :, :2], q[:, :, :2], mask, window=(3, -3))


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


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lengths,window,causal",
    [([2048, 700, 4096], (256, 256), False),  # EmbeddingGemma: config sliding_window 512
     ([8192], (512, 512), False),  # Gemma-3-4B made bidirectional: config sliding_window 1024
     ([3000, 1000], (1023, 0), True),
     ([300, 5, 2000], (100, 4000), False)],
)
def test_gpu_bf16_window(lengths, window, causal):
    hq, hkv, d, dt = 8, 2, 256, torch.bfloat16  # Gemma-3-like heads
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dt, seed=sum(lengths))
    out = flash_attn_varlen(q, k, v, cu, max(lengths), causal=causal, window=window)
    ref = _ref_varlen(q, k, v, cu, causal, window=window)
    err = rel_err(out, ref)
    assert err < REL_TOL[dt], err
    if len(lengths) == 1 and not causal:
        # SDPA with the equivalent boolean band mask, against the same truth.
        L = lengths[0]
        i = torch.arange(L, device=DEV)
        band = (i[None, :] >= i[:, None] - window[0]) & (i[None, :] <= i[:, None] + window[1])
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        qt, kt, vt = (x.view(1, L, -1, d).transpose(1, 2) for x in (q, k, v))
        kt, vt = kt.repeat_interleave(hq // hkv, 1), vt.repeat_interleave(hq // hkv, 1)
        base = sdpa(qt, kt, vt, attn_mask=band).transpose(1, 2).reshape(L, hq, d)
        assert err <= 2 * rel_err(base, ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (2047, 2047))])
def test_gpu_bf16_softcap(causal, window):
    lengths = _lognormal_lengths(200, seed=11)
    hq, hkv, d, dt = 16, 8, 256, torch.bfloat16  # Gemma-2-9B heads, softcap 50
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dt, seed=12)
    q = (q.float() * 4).to(dt)
    scale = 256 ** -0.5
    out = flash_attn_varlen(q, k, v, cu, max(lengths), causal=causal, softmax_scale=scale,
                            softcap=50.0, window=window)
    ref = _ref_varlen(q, k, v, cu, causal, scale, window, 50.0)
    assert rel_err(out, ref) < REL_TOL[dt]


@pytest.mark.gpu
def test_gpu_window_softcap_cuda_graph_and_padded():
    lengths = [1500, 37, 600]
    q, k, v, cu = _varlen_inputs(lengths, 8, 4, 128, torch.bfloat16, seed=13)
    kw = dict(window=(127, 127), softcap=30.0)
    out = torch.empty_like(q)
    flash_attn_varlen_fwd(q, k, v, cu, 1500, False, None, out=out, **kw)  # compile + tune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash_attn_varlen_fwd(q, k, v, cu, 1500, False, None, out=out, **kw)
    q.copy_(_randn(*q.shape, dtype=q.dtype, seed=14))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = _ref_varlen(q, k, v, cu, window=kw["window"], softcap=kw["softcap"])
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    # The padded layout (right-padded rows of the same texts) gives the same rows.
    b, l = len(lengths), max(lengths)
    mask = torch.arange(l, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]
    qp, kp, vp = (x.new_zeros(b, l, *x.shape[1:]) for x in (q, k, v))
    qp[mask], kp[mask], vp[mask] = q, k, v
    outp = flash_attn_padded(qp, kp, vp, mask, **kw)
    assert rel_err(outp[mask], ref) < REL_TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------
# backward (training): dq, dk, dv against autograd of the reference
# ------------------------------------------------------------------------------------------
# fp32: rel error < REL_TOL (1e-5; the kernels land ~5e-7). fp16: flash-attention's rule, at most
# 2x (+1e-5) the error of plain PyTorch at that precision (SDPA per text, autograd) against the
# same fp64 truth, and below REL_TOL[fp16]. Every gradient buffer the kernels write is poisoned
# (NaN) first; rel_err gives inf on any NaN, so NaN never passes.

def _grads(fn, inputs, dout):
    """(out, dq, dk, dv) of fn(q, k, v) with autograd, inputs cloned as leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return (out, *(x.grad for x in leaves))


def _ref_grads(q, k, v, cu, dout, causal=False, scale=None, window=None, softcap=None,
               keep=None, dropout_p=0.0):
    """Autograd of the reference in fp64."""
    def fn(q_, k_, v_):
        return reference.attention_varlen(q_, k_, v_, cu, causal, scale, window, softcap, keep,
                                          dropout_p)
    return _grads(fn, [x.double() for x in (q, k, v)], dout.double())


def _sdpa_varlen(q, k, v, cu, causal=False, window=None):
    """Plain PyTorch (SDPA per text, boolean mask) in the inputs' dtype: the error baseline."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        n = e - s
        qs = q[s:e].transpose(0, 1)[None]
        ks, vs = (x[s:e].transpose(0, 1).repeat_interleave(g, 0)[None] for x in (k, v))
        allowed = reference._window_allowed(n, n, window or (None, None), q.device)
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        outs.append(sdpa(qs, ks, vs, attn_mask=allowed)[0].transpose(0, 1))
    return torch.cat(outs)


def _poisoned_autograd_buffers(monkeypatch):
    """flash_attn_varlen_bwd allocates dq/dk/dv/delta with torch.empty: make those NaN."""
    from l2v_kernels import attention

    real = attention.flash_attn_varlen_bwd

    def bwd(dout, q, k, v, *args, **kwargs):
        kwargs["dq"] = poison(torch.empty(q.shape, dtype=q.dtype, device=q.device))
        kwargs["dk"] = poison(torch.empty(k.shape, dtype=k.dtype, device=k.device))
        kwargs["dv"] = poison(torch.empty(v.shape, dtype=v.dtype, device=v.device))
        return real(dout, q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_varlen_bwd", bwd)


BACKWARD_CASES = [
    # dtype, lengths, hq, hkv, d, causal, window, softcap
    (torch.float32, [1, 7, 33, 97], 6, 2, 64, False, None, None),
    (torch.float32, [1, 7, 33, 61], 9, 3, 64, True, None, None),
    (torch.float32, [33, 7, 1], 4, 4, 128, False, None, None),  # MHA, D 128
    (torch.float32, [7, 70, 1], 6, 2, 64, False, (5, 9), None),  # window << BLOCK
    (torch.float32, [33, 61], 6, 1, 64, True, (40, 0), 2.0),  # MQA, causal window, softcap
    (torch.float32, [1, 7, 33, 40], 9, 3, 64, False, None, 3.0),
    (torch.float32, [20, 33], 4, 2, 256, False, (None, 3), None),  # D 256, one side unlimited
    (torch.float16, [1, 7, 33, 97], 6, 2, 64, False, None, None),
    (torch.float16, [1, 7, 33, 40], 9, 3, 128, True, None, None),
    (torch.float16, [7, 70], 6, 2, 64, False, (31, 31), None),
]


@pytest.mark.parametrize("dtype,lengths,hq,hkv,d,causal,window,softcap", BACKWARD_CASES)
def test_backward_matches_reference_autograd(monkeypatch, dtype, lengths, hq, hkv, d, causal,
                                             window, softcap):
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dtype, seed=hq + d + len(lengths))
    if softcap is not None:
        q = (q.float() * 3).to(dtype)  # large scores, so the cap bends them
    dout = _randn(*q.shape, dtype=dtype, seed=99)
    _poisoned_autograd_buffers(monkeypatch)
    ours = _grads(lambda q_, k_, v_: flash_attn_varlen(
        q_, k_, v_, cu, max(lengths), causal=causal, window=window, softcap=softcap),
        (q, k, v), dout)
    ref = _ref_grads(q, k, v, cu, dout, causal, None, window, softcap)
    names = ("out", "dq", "dk", "dv")
    for name, o, r in zip(names, ours, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        err = rel_err(o, r)
        assert err < REL_TOL[dtype], f"{name}: rel error {err:.2e}"
    if dtype != torch.float32:
        base = _grads(lambda q_, k_, v_: _sdpa_varlen(q_, k_, v_, cu, causal, window),
                      (q, k, v), dout)
        for name, o, b, r in zip(names, ours, base, ref, strict=True):
            assert rel_err(o, r) <= 2 * rel_err(b, r) + 1e-5, (name, rel_err(o, r),
                                                                rel_err(b, r))


def test_backward_launcher_writes_every_element_of_strided_views():
    """q/k/v as column slices of one fused QKV buffer, dout strided, and dq/dk/dv written into
    the column slices of one poisoned fused buffer: every element written, nothing outside."""
    from l2v_kernels.attention import flash_attn_varlen_bwd

    lengths, hq, hkv, d, dt = [23, 1, 40], 6, 2, 64, torch.float32
    t, width = sum(lengths), hq + 2 * hkv
    qkv = _randn(t, width, d, dtype=dt, seed=3)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cu = _cu(lengths)
    lse = poison(torch.empty(t, hq, dtype=torch.float32, device=DEV))
    out = flash_attn_varlen_fwd(q, k, v, cu, max(lengths), lse=lse)
    dout = _randn(t, 2 * hq, d, dtype=dt, seed=4)[:, ::2]  # head stride 2 * d
    buf = poison(torch.empty(t, width + 1, d, dtype=dt, device=DEV))
    dq, dk, dv = buf[:, :hq], buf[:, hq:hq + hkv], buf[:, hq + hkv:width]
    ret = flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu, max(lengths), dq=dq, dk=dk, dv=dv)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(ret, (dq, dk, dv), strict=True))
    assert torch.isnan(buf[:, width]).all()  # nothing written outside
    ref = _ref_grads(q, k, v, cu, dout)
    for got, want in zip((dq, dk, dv), ref[1:], strict=True):
        assert_close_rel(got, want, REL_TOL[dt])


def test_forward_lse_is_the_log_sum_exp_of_the_scores():
    lengths, hq, hkv, d = [1, 30, 9], 4, 2, 64
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, torch.float32, seed=8)
    for causal, window, softcap in ((False, None, None), (True, (4, 0), 2.0)):
        lse = poison(torch.empty(q.shape[0], hq, dtype=torch.float32, device=DEV))
        flash_attn_varlen_fwd(q, k, v, cu, 30, causal, 0.2, window=window, softcap=softcap,
                              lse=lse)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            n = e - s
            qs = q[s:e].double().transpose(0, 1)
            ks = k[s:e].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
            scores = reference._scores(qs, ks, 0.2, softcap)
            keep = reference._window_allowed(n, n, window or (None, None), DEV)
            if causal:
                keep &= torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
            want = scores.masked_fill(~keep, float("-inf")).logsumexp(-1).transpose(0, 1)
            assert_close_rel(lse[s:e], want, REL_TOL[torch.float32])


def test_backward_zero_length_texts_loose_max_seqlen_and_empty_batch():
    lengths = [0, 5, 0, 45, 0]
    q, k, v, cu = _varlen_inputs(lengths, 6, 2, 64, torch.float32, seed=7)
    dout = _randn(*q.shape, dtype=torch.float32, seed=1)
    ours = _grads(lambda *x: flash_attn_varlen(*x, cu, 100, softmax_scale=0.3), (q, k, v), dout)
    ref = _ref_grads(q, k, v, cu, dout, scale=0.3)
    for o, r in zip(ours, ref, strict=True):
        assert_close_rel(o, r, REL_TOL[torch.float32])
    q, k, v, _ = _varlen_inputs([], 4, 2, 64, torch.float32)
    ours = _grads(lambda *x: flash_attn_varlen(*x, _cu([0, 0]), 0), (q, k, v), q)
    assert [tuple(g.shape) for g in ours[1:]] == [(0, 4, 64), (0, 2, 64), (0, 2, 64)]


def test_dropout_forward_and_backward_match_the_reference_with_the_kernels_mask(monkeypatch):
    from l2v_kernels.attention import attention_dropout_mask

    lengths, hq, hkv, d, p, seed = [1, 7, 33, 40], 6, 2, 64, 0.3, 1234
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, torch.float32, seed=5)
    dout = _randn(*q.shape, dtype=torch.float32, seed=6)
    keep = attention_dropout_mask(q.shape[0], hq, max(lengths), p, seed, DEV)
    _poisoned_autograd_buffers(monkeypatch)
    for causal, window, softcap in ((False, None, None), (True, (9, 3), 2.0)):
        kw = dict(causal=causal, window=window, softcap=softcap, dropout_p=p, dropout_seed=seed)
        ours = _grads(lambda *x, kw=kw: flash_attn_varlen(*x, cu, max(lengths), **kw), (q, k, v),
                      dout)
        ref = _ref_grads(q, k, v, cu, dout, causal, None, window, softcap, keep, p)
        for name, o, r in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
            assert rel_err(o, r) < REL_TOL[torch.float32], (name, rel_err(o, r))
        # The dropout is real: without it the result differs.
        plain = _ref_grads(q, k, v, cu, dout, causal, None, window, softcap)
        assert rel_err(ours[0], plain[0]) > 0.1


def test_dropout_mask_statistics_and_determinism():
    from l2v_kernels.attention import attention_dropout_mask

    t, hq, length, p = 64, 4, 128, 0.3
    a = attention_dropout_mask(t, hq, length, p, 7, DEV)
    assert a.shape == (t, hq, length) and a.dtype == torch.bool
    n = a.numel()
    rate = a.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), rate
    assert torch.equal(a, attention_dropout_mask(t, hq, length, p, 7, DEV))  # pure function
    b = attention_dropout_mask(t, hq, length, p, 8, DEV)
    assert abs((a == b).float().mean().item() - (p * p + (1 - p) ** 2)) < 0.02  # independent
    # Heads and tokens draw independently: no two rows share their pattern.
    rows = a.reshape(t * hq, length)
    assert torch.unique(rows, dim=0).shape[0] == t * hq
    # A row's draws do not depend on the launch's max_seqlen (keys are counted in the text).
    assert torch.equal(attention_dropout_mask(t, hq, 40, p, 7, DEV), a[:, :, :40])


def test_backward_under_checkpoint_with_dropout_repeats_the_mask():
    """torch.utils.checkpoint recomputes the forward in the backward pass: the dropout seed is
    drawn from torch's CPU generator, whose state checkpoint restores, so the recomputed
    forward uses the same mask and the gradients equal those without checkpointing (bit for
    bit: the kernels are deterministic)."""
    from torch.utils.checkpoint import checkpoint

    lengths, hq, hkv, d = [9, 30], 4, 2, 64
    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, torch.float32, seed=11)
    dout = _randn(*q.shape, dtype=torch.float32, seed=12)

    def layer(q_, k_, v_):
        o = flash_attn_varlen(q_ * 1.5, k_, v_, cu, max(lengths), causal=True, dropout_p=0.25)
        return o * 2

    torch.manual_seed(3)
    plain = _grads(layer, (q, k, v), dout)
    torch.manual_seed(3)
    ckpt = _grads(lambda *x: checkpoint(layer, *x, use_reentrant=False), (q, k, v), dout)
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(4)  # another seed: another mask
    assert not torch.equal(_grads(layer, (q, k, v), dout)[0], plain[0])


def test_dropout_validation():
    a = _good()
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="dropout_p must be a number in"):
            flash_attn_varlen(**a, dropout_p=bad)
    for bad in (-1, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="dropout_seed must be None or an int"):
            flash_attn_varlen(**a, dropout_p=0.1, dropout_seed=bad)


@pytest.mark.skipif(DEV != "cpu", reason="counts tiles in the Triton interpreter")
def test_backward_skips_blocks_outside_the_window(monkeypatch):
    """With a window the backward walks only the tiles whose rows see some key, as the forward:
    far fewer dots than without the window."""
    T, hq, hkv = 192, 2, 1
    q, k, v, cu = _varlen_inputs([T], hq, hkv, 64, torch.float32, seed=2)
    dout = _randn(*q.shape, dtype=torch.float32, seed=3)
    calls = _count_dots(monkeypatch)
    ours = _grads(lambda *x: flash_attn_varlen(*x, cu, T, window=(8, 8)), (q, k, v), dout)
    windowed = calls[0]
    ref = _ref_grads(q, k, v, cu, dout, window=(8, 8))
    for o, r in zip(ours, ref, strict=True):
        assert_close_rel(o, r, REL_TOL[torch.float32])
    calls[0] = 0
    _grads(lambda *x: flash_attn_varlen(*x, cu, T), (q, k, v), dout)
    # 32 x 32 tiles: 12 row blocks x 6 key blocks; forward 2 dots per tile, dq 3, dk/dv 4.
    assert calls[0] == (2 + 3 + 4) * (T * hq // 32) * (T // 32)
    assert windowed < calls[0] / 2, (windowed, calls[0])


def _torch_lowp_varlen(q, k, v, cu, causal=False, scale=None, window=None, softcap=None,
                       keep=None, dropout_p=0.0):
    """Plain PyTorch at the inputs' precision, as training's padded path computes soft-capped
    attention (fp32 scores and softmax, probabilities rounded to the dtype before P @ V): the
    error baseline where SDPA has no soft-cap."""
    g = q.shape[1] // k.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        n = e - s
        qs = q[s:e].transpose(0, 1)
        ks, vs = (x[s:e].transpose(0, 1).repeat_interleave(g, 0) for x in (k, v))
        scores = (qs.float() @ ks.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = reference._window_allowed(n, n, window or (None, None), q.device)
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        if keep is not None:
            probs = probs * keep[s:e, :, :n].transpose(0, 1) / (1 - dropout_p)
        outs.append((probs.to(vs.dtype) @ vs).transpose(0, 1))
    return torch.cat(outs)


def _check_gpu_backward(lengths, hq, hkv, d, *, causal=False, window=None, softcap=None,
                        scale=None, q_mult=1.0, dropout_p=0.0, seed=0, dt=torch.bfloat16):
    """bf16 dq/dk/dv within 2x (+1e-3) of plain PyTorch's bf16 error against the fp64
    reference's autograd (SDPA where it applies, else _torch_lowp_varlen)."""
    from l2v_kernels.attention import attention_dropout_mask

    q, k, v, cu = _varlen_inputs(lengths, hq, hkv, d, dt, seed=seed)
    q = (q.float() * q_mult).to(dt)
    dout = _randn(*q.shape, dtype=dt, seed=seed + 5)
    keep = None
    if dropout_p:
        keep = attention_dropout_mask(q.shape[0], hq, max(lengths), dropout_p, seed, DEV)
    ours = _grads(lambda *x: flash_attn_varlen(
        *x, cu, max(lengths), causal=causal, softmax_scale=scale, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=seed), (q, k, v), dout)
    ref = _ref_grads(q, k, v, cu, dout, causal, scale, window, softcap, keep, dropout_p)
    if softcap is None and keep is None and scale is None:
        base = _grads(lambda *x: _sdpa_varlen(*x, cu, causal, window), (q, k, v), dout)
    else:
        base = _grads(lambda *x: _torch_lowp_varlen(*x, cu, causal, scale, window, softcap,
                                                    keep, dropout_p), (q, k, v), dout)
    for name, o, b, r in zip(("out", "dq", "dk", "dv"), ours, base, ref, strict=True):
        err, base_err = rel_err(o, r), rel_err(b, r)
        assert err <= 2 * base_err + 1e-3, (name, err, base_err)
    # Deterministic: no atomics, so a second backward is bit for bit the same.
    again = _grads(lambda *x: flash_attn_varlen(
        *x, cu, max(lengths), causal=causal, softmax_scale=scale, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=seed), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(ours, again, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_backward_mistral_heads_mixed_lengths(causal):
    _check_gpu_backward(_lognormal_lengths(60, seed=31), 32, 8, 128, causal=causal, seed=32)


@pytest.mark.gpu
def test_gpu_bf16_backward_equal_lengths_mha_and_d64():
    _check_gpu_backward([512] * 16, 32, 32, 128, seed=33)  # Llama-2-7B heads
    _check_gpu_backward([1, 77, 512, 300], 9, 3, 64, seed=34)  # SmolLM2-135M heads


@pytest.mark.gpu
def test_gpu_bf16_backward_gemma_window_and_softcap():
    # Gemma-3-4B made bidirectional (window 512 each side), Gemma-2-9B soft-capping at 50.
    _check_gpu_backward([2048, 700, 5], 8, 4, 256, window=(512, 512), seed=35)
    _check_gpu_backward(_lognormal_lengths(40, seed=36), 16, 8, 256, softcap=50.0,
                        scale=256 ** -0.5, q_mult=4.0, seed=37)
    _check_gpu_backward([1000, 333], 16, 8, 256, causal=True, window=(255, 0), softcap=30.0,
                        scale=256 ** -0.5, q_mult=4.0, seed=38)


@pytest.mark.gpu
def test_gpu_bf16_backward_dropout():
    """SimCSE's attention dropout (llm2vec: 0.3) against the reference with the kernel's mask."""
    _check_gpu_backward(_lognormal_lengths(40, seed=39), 32, 8, 128, dropout_p=0.3, seed=40)
