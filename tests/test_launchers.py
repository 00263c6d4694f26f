"""The public unchecked launchers: one convention, `<op>_fwd(..., out=None)`, in every kernel
module.

Each launcher is exported from l2v_kernels, allocates its output when out is None, writes into
(and returns) the `out` it is given, and agrees with its checked public op.
CPU: Triton interpreter (fp16/fp32), tiny shapes.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from helpers import REL_TOL, assert_close_rel, poison

import l2v_kernels
from l2v_kernels import activation, attention, gemm, norm, pooling, reference, rope

LAUNCHERS = {
    "flash_attn_varlen_fwd": attention,
    "flash_attn_padded_fwd": attention,
    "rms_norm_fwd": norm,
    "norm_add_norm_fwd": norm,
    "apply_rotary_fwd": rope,
    "masked_pool_fwd": pooling,
    "gated_act_fwd": activation,
    "gemm_residual_fwd": gemm,
    "gemm_swiglu_fwd": gemm,
}


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_exported_documented_with_out(name):
    fn = getattr(l2v_kernels, name)
    assert fn is getattr(LAUNCHERS[name], name)
    assert name in l2v_kernels.__all__
    outs = [p for n, p in inspect.signature(fn).parameters.items() if n == "out" or
            n.endswith("_out")]  # apply_rotary_fwd has two outputs: q_out, k_out
    assert outs and all(p.default is None for p in outs)
    assert "guarantee" in fn.__doc__  # says what the caller must guarantee


def _same(name, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    if name == "gemm_residual_fwd":  # the extension's CPU op vs the checked op's torch path
        assert_close_rel(got, want, REL_TOL[want.dtype])
    else:  # the same kernel behind both
        assert torch.equal(got, want)


def _cases():
    """(name, call(out) -> result, the checked op's result); out=None must allocate."""
    h = torch.float16
    lengths = [5, 20]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    q, k, v = _randn(25, 4, 64, dtype=h, seed=1), _randn(25, 2, 64, dtype=h, seed=2), _randn(
        25, 2, 64, dtype=h, seed=3)
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)) > 0.3
    qp, kp = _randn(2, 9, 4, 64, dtype=h, seed=5), _randn(2, 9, 2, 64, dtype=h, seed=6)
    x, r = _randn(6, 96, dtype=h, seed=7), _randn(6, 96, dtype=h, seed=8)
    w, w2 = _randn(96, seed=9), _randn(96, seed=10)
    cos, sin = reference.rope_cos_sin(1.0 / 1e4 ** (torch.arange(0, 64, 2) / 64), 32)
    pos = reference.positions_from_cu_seqlens(cu, 25)
    xa = _randn(6, 2 * 96, dtype=h, seed=11)
    wg = _randn(2 * 32, 96, dtype=h, seed=12)
    wr = _randn(40, 96, dtype=h, seed=13)
    return [
        ("flash_attn_varlen_fwd",
         lambda out: attention.flash_attn_varlen_fwd(q, k, v, cu, 20, False, None, out=out,
                                                     window=(3, 3)),
         attention.flash_attn_varlen(q, k, v, cu, 20, window=(3, 3))),
        ("flash_attn_padded_fwd",
         lambda out: attention.flash_attn_padded_fwd(qp, kp, kp, mask, True, 0.2, out=out,
                                                     softcap=4.0),
         attention.flash_attn_padded(qp, kp, kp, mask, causal=True, softmax_scale=0.2,
                                     softcap=4.0)),
        ("rms_norm_fwd", lambda out: norm.rms_norm_fwd(x, w, 1e-6, out),
         norm.rms_norm(x, w, 1e-6)),
        ("norm_add_norm_fwd",
         lambda out: norm.norm_add_norm_fwd(x, r, w, w2, 1e-6, out, weight_offset=1.0)[0],
         norm.norm_add_norm(x, r, w, w2, 1e-6, weight_offset=1.0)[0]),
        ("apply_rotary_fwd",
         lambda out: rope.apply_rotary_fwd(q, k, cos, sin, pos, out, None)[0],
         rope.apply_rotary(q, k, cos, sin, pos)[0]),
        ("masked_pool_fwd",
         lambda out: pooling.masked_pool_fwd(x[:, :64], mask.flatten()[:6], out, "mean",
                                             cu_seqlens=torch.tensor([0, 2, 6],
                                                                     dtype=torch.int32)),
         pooling.masked_pool(x[:, :64], mask.flatten()[:6], cu_seqlens=torch.tensor(
             [0, 2, 6], dtype=torch.int32))),
        ("gated_act_fwd", lambda out: activation.gated_act_fwd(xa, out, "gelu_tanh"),
         activation.gated_act(xa, "gelu_tanh")),
        ("gemm_residual_fwd", lambda out: gemm.gemm_residual_fwd(x, wr, None, None, out),
         gemm.gemm_residual(x, wr)),
        ("gemm_swiglu_fwd", lambda out: gemm.gemm_swiglu_fwd(x, wg, "silu", out),
         gemm.gemm_swiglu(x, wg, act="silu")),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_out_none_allocates_and_out_is_written(case):
    name, call, want = case
    _same(name, call(None), want)
    out = poison(torch.empty(want.shape, dtype=want.dtype))
    ret = call(out)
    assert ret.data_ptr() == out.data_ptr()
    _same(name, out, want)
