"""rms_norm (fused residual add + RMSNorm) against reference.rms_norm.

CPU: Triton interpreter, fp16/fp32, awkward shapes. GPU: bf16 at model sizes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import REL_TOL, poison, rel_err

from l2v_kernels import reference
from l2v_kernels.norm import MAX_HIDDEN, rms_norm, rms_norm_fwd

EPS = 1e-6


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty/empty_like return NaN-filled tensors while the op runs, so any output
    element the kernel fails to write fails the check."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", nan_empty)
        mp.setattr(torch, "empty_like", nan_empty_like)
        yield


def assert_accurate(out, truth, same_dtype_ref, dtype, what=""):
    """out vs the fp64 truth: below DESIGN's bound for dtype and at most 2x the error of the
    reference computed at the same dtype (plus a small atol for fp32 summation order)."""
    err = rel_err(out, truth)
    base = rel_err(same_dtype_ref, truth)
    assert err < REL_TOL[dtype], f"{what}: rel error {err:.3e} >= {REL_TOL[dtype]:.0e}"
    assert err <= 2 * base + 1e-6, f"{what}: rel error {err:.3e} > 2 x reference's {base:.3e}"


def run_and_check(x, weight, residual, weight_offset, device="cpu"):
    dtype = x.dtype
    with poisoned_allocations():
        got = rms_norm(x, weight, EPS, residual=residual, weight_offset=weight_offset)
    as64 = lambda t: None if t is None else t.double()
    truth = reference.rms_norm(as64(x), as64(weight), EPS, as64(residual), weight_offset)
    base = reference.rms_norm(x, weight, EPS, residual, weight_offset)
    if residual is None:
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        assert_accurate(got, truth, base, dtype, "y")
        return
    y, h = got
    assert y.shape == x.shape and y.dtype == dtype and h.dtype == dtype
    # h is the rounded sum, bit for bit; y normalizes that rounded h.
    assert torch.equal(h, (x.float() + residual.float()).to(dtype))
    assert_accurate(y, truth[0], base[0], dtype, "y")
    truth_of_rounded_h = reference.rms_norm(h.double(), weight.double(), EPS, None, weight_offset)
    assert_accurate(y, truth_of_rounded_h, base[0], dtype, "y of rounded h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, D", [(1, 64), (17, 96), (97, 576), (3, 4096)])
@pytest.mark.parametrize(
    "with_residual, weight_offset", [(False, 0.0), (True, 0.0), (True, 1.0), (False, 1.0)],
    ids=["plain", "residual", "residual-gemma", "gemma"],
)
def test_matches_reference(dtype, T, D, with_residual, weight_offset):
    g = torch.Generator().manual_seed(T * 1000 + D)
    x = (torch.randn(T, D, generator=g) * 3).to(dtype)
    residual = torch.randn(T, D, generator=g).to(dtype) if with_residual else None
    # Gemma stores w with the 1 taken out: keep (offset + w) away from zero either way.
    weight = torch.rand(D, generator=g) + 0.5 - weight_offset
    run_and_check(x, weight, residual, weight_offset)


def test_weight_in_activation_dtype_and_3d_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 96, generator=g).half()
    residual = torch.randn(2, 5, 96, generator=g).half()
    weight = (torch.rand(96, generator=g) + 0.5).half()
    run_and_check(x, weight, residual, 0.0)
    run_and_check(x, weight, None, 0.0)


def test_strided_rows():
    """x and residual as column slices of wider buffers (row stride != D)."""
    g = torch.Generator().manual_seed(2)
    D = 96
    x = torch.randn(33, D + 40, generator=g).half()[:, 8 : 8 + D]
    residual = torch.randn(33, 2 * D, generator=g).half()[:, D:]
    assert x.stride(0) != D and residual.stride(0) != D
    weight = torch.rand(D, generator=g) + 0.5
    run_and_check(x, weight, residual, 0.0)


def test_launcher_in_place():
    """The unchecked launcher may write h over the residual and y over x."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 576, generator=g).half()
    residual = torch.randn(19, 576, generator=g).half()
    weight = torch.rand(576, generator=g) + 0.5
    y_ref, h_ref = rms_norm(x, weight, EPS, residual=residual)
    rms_norm_fwd(x, weight, EPS, x, residual=residual, h_out=residual)
    assert torch.equal(x, y_ref) and torch.equal(residual, h_ref)


def test_zero_rows():
    x = torch.randn(0, 64)
    assert rms_norm(x, torch.ones(64), EPS).shape == (0, 64)
    y, h = rms_norm(x, torch.ones(64), EPS, residual=x.clone())
    assert y.shape == h.shape == (0, 64)


def test_validation_errors(monkeypatch):
    x = torch.randn(4, 64)
    w = torch.ones(64)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            rms_norm(*args, **kwargs)

    raises(ValueError, "x has dtype", x.to(torch.int32), w, EPS)
    raises(TypeError, "x must be a torch.Tensor", x.numpy(), w, EPS)
    raises(ValueError, "contiguous last dimension", torch.randn(64, 4).t(), w, EPS)
    too_wide = MAX_HIDDEN + 1
    raises(ValueError, "hidden size", torch.randn(2, too_wide), torch.ones(too_wide), EPS)
    raises(ValueError, "weight has shape", x, torch.ones(65), EPS)
    raises(ValueError, "weight must be 1-D", x, torch.ones(1, 64), EPS)
    raises(ValueError, "residual has shape", x, w, EPS, residual=torch.randn(3, 64))
    raises(ValueError, "residual has dtype", x, w, EPS, residual=torch.randn(4, 64).half())
    raises(ValueError, "eps must be >= 0", x, w, -1e-6)
    raises(TypeError, "eps must be a float", x, w, "1e-6")
    raises(TypeError, "weight_offset must be a float", x, w, EPS, weight_offset=None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raises(ValueError, "need CUDA tensors", x, w, EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("T, D", [(16384, 4096), (4099, 576)])
def test_gpu_bf16(T, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    residual = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    weight = (torch.rand(D, generator=g, device="cuda") + 0.5).bfloat16()
    run_and_check(x, weight, residual, 0.0)
    run_and_check(x, weight, None, 1.0)
