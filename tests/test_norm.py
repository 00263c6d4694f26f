"""rms_norm (fused residual add + RMSNorm) against reference.rms_norm, and norm_add_norm (the
Gemma-2/3 post-norm step) against reference.norm_add_norm.

CPU: Triton interpreter, fp16/fp32, awkward shapes. GPU: bf16 at model sizes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import REL_TOL, poison, rel_err

from l2v_kernels import reference
from l2v_kernels.norm import MAX_HIDDEN, norm_add_norm, norm_add_norm_fwd, rms_norm, rms_norm_fwd

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
    """out vs the fp64 truth: below docs/architecture.md's bound for dtype and at most 2x the
    error of the reference computed at the same dtype (plus a small atol for fp32 summation
    order)."""
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


# ------------------------------------------------------------------------------------------
# norm_add_norm: h = residual + rmsnorm_a(x); y = rmsnorm_b(h)
# ------------------------------------------------------------------------------------------
def sandwich_inputs(T, D, dtype, seed, device="cpu", weight_dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(T, D, generator=g, device=device) * 4).to(dtype)  # an o_proj / MLP output
    residual = torch.randn(T, D, generator=g, device=device).to(dtype)
    # Gemma stores w with the 1 taken out: small values around 0.
    w_a = (torch.randn(D, generator=g, device=device) * 0.3).to(weight_dtype)
    w_b = (torch.randn(D, generator=g, device=device) * 0.3).to(weight_dtype)
    return x, residual, w_a, w_b


def check_sandwich(x, residual, w_a, w_b, weight_offset=1.0):
    dtype = x.dtype
    with poisoned_allocations():
        y, h = norm_add_norm(x, residual, w_a, w_b, EPS, weight_offset=weight_offset)
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == dtype
    assert y.is_contiguous() and h.is_contiguous()
    # h is the model's rounded sum of the rounded post-norm output and the residual, bit for bit
    # (the post-norm output taken from rms_norm, the same kernel's statistics).
    a = rms_norm(x, w_a, EPS, weight_offset=weight_offset)
    assert torch.equal(h, (a.float() + residual.float()).to(dtype))
    ref_y, ref_h = reference.norm_add_norm(x, residual, w_a, w_b, EPS, weight_offset)
    # Against the reference's h only up to the dtype's bound: a post-norm output one ulp apart
    # (another fp32 summation order) moves h by an ulp.
    assert rel_err(h, ref_h) < REL_TOL[dtype] / 10, rel_err(h, ref_h)
    # y normalizes the rounded h: against the fp64 truth of that h.
    truth = reference.rms_norm(h.double(), w_b.double(), EPS, None, weight_offset)
    base = reference.rms_norm(h, w_b, EPS, None, weight_offset)
    assert_accurate(y, truth, base, dtype, "y")
    assert_accurate(y, ref_y.double(), ref_y, dtype, "y vs reference")
    # Both norms matter: swapping the weights would be caught.
    swapped = reference.norm_add_norm(x, residual, w_b, w_a, EPS, weight_offset)[0]
    assert rel_err(swapped, ref_y) > 10 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, D", [(1, 64), (17, 96), (37, 640), (3, 2304)])
def test_norm_add_norm_matches_reference(dtype, T, D):
    check_sandwich(*sandwich_inputs(T, D, dtype, seed=T + D))


def test_norm_add_norm_offsets_strides_and_3d():
    x, residual, w_a, w_b = sandwich_inputs(20, 96, torch.float16, seed=5,
                                            weight_dtype=torch.float16)
    check_sandwich(x, residual, (w_a.float() + 1).half(), (w_b.float() + 1).half(), 0.0)
    check_sandwich(x.view(4, 5, 96), residual.view(4, 5, 96), w_a, w_b)
    wide = torch.randn(20, 300, generator=torch.Generator().manual_seed(6)).half()
    check_sandwich(wide[:, 8:104], wide[:, 200:296], w_a, w_b)  # strided rows


def test_norm_add_norm_launcher_in_place():
    """The unchecked launcher may write h over the residual and y over x."""
    x, residual, w_a, w_b = sandwich_inputs(19, 640, torch.float16, seed=7)
    y_ref, h_ref = norm_add_norm(x, residual, w_a, w_b, EPS, weight_offset=1.0)
    y, h = norm_add_norm_fwd(x, residual, w_a, w_b, EPS, x, residual, weight_offset=1.0)
    assert y.data_ptr() == x.data_ptr() and h.data_ptr() == residual.data_ptr()
    assert torch.equal(x, y_ref) and torch.equal(residual, h_ref)


def test_norm_add_norm_validation_and_empty():
    x, residual, w_a, w_b = sandwich_inputs(4, 64, torch.float32, seed=8)
    with pytest.raises(ValueError, match="weight_b has shape"):
        norm_add_norm(x, residual, w_a, w_b[:32], EPS)
    with pytest.raises(ValueError, match="weight_a must be 1-D"):
        norm_add_norm(x, residual, w_a[None], w_b, EPS)
    with pytest.raises(ValueError, match="residual has dtype"):
        norm_add_norm(x, residual.half(), w_a, w_b, EPS)
    with pytest.raises(ValueError, match="residual has shape"):
        norm_add_norm(x, residual[:3], w_a, w_b, EPS)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        norm_add_norm(x, residual, w_a, w_b, -1.0)
    y, h = norm_add_norm(x[:0], residual[:0], w_a, w_b, EPS)
    assert y.shape == h.shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("T, D", [(16384, 4096), (4099, 576)])
def test_gpu_bf16(T, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    residual = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    weight = (torch.rand(D, generator=g, device="cuda") + 0.5).bfloat16()
    run_and_check(x, weight, residual, 0.0)
    run_and_check(x, weight, None, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("T, D", [(16384, 2304), (4099, 640), (2048, 3584)])
def test_gpu_bf16_norm_add_norm(T, D):
    """Gemma-2-2B (2304), Gemma-3-270M (640), Gemma-2-9B (3584) widths in bf16."""
    check_sandwich(*sandwich_inputs(T, D, torch.bfloat16, seed=T, device="cuda"))
