"""gated_act (SwiGLU / GeGLU on a fused gate|up buffer) against reference.gated_act.

CPU: Triton interpreter, fp16/fp32, awkward shapes. GPU: bf16 at model sizes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, poisoned_allocations, rel_err

from l2v_kernels import reference
from l2v_kernels.activation import gated_act

# exp(-g) overflows to inf for very negative gates, which is the intended limit (act -> 0);
# only the interpreter's numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")




def run_and_check(x, act):
    dtype = x.dtype
    with poisoned_allocations():
        out = gated_act(x, act)
    I = x.shape[-1] // 2
    assert out.shape == (*x.shape[:-1], I) and out.dtype == dtype and out.is_contiguous()
    truth = reference.gated_act(x.double(), act)
    base = reference.gated_act(x, act)
    err, base_err = rel_err(out, truth), rel_err(base, truth)
    assert err < REL_TOL[dtype], f"rel error {err:.3e} >= {REL_TOL[dtype]:.0e}"
    # Within 2x of the reference's own error at this dtype (plus fp32 exp/rounding slack).
    assert err <= 2 * base_err + 1e-6, f"rel error {err:.3e} > 2 x reference's {base_err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(
    "shape", [(1, 2 * 64), (17, 2 * 48), (97, 2 * 1536), (2, 5, 2 * 100), (3, 2 * 4096)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_reference(dtype, act, shape):
    g = torch.Generator().manual_seed(sum(shape))
    # Wide range: exercises both tails of the activation (large negative gates saturate to 0).
    x = (torch.randn(*shape, generator=g) * 4).to(dtype)
    run_and_check(x, act)


def test_strided_rows():
    """x as a column slice of a wider buffer (row stride != 2I)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 2 * 96 + 24, generator=g).half()[:, 16 : 16 + 2 * 96]
    assert x.stride(0) != x.shape[1]
    run_and_check(x, "silu")
    run_and_check(x, "gelu_tanh")


def test_extreme_gates_fp32():
    """Very negative / positive gates: act(g) -> 0 and -> g without NaN or inf."""
    g = torch.tensor([[-1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0, 1.5]])
    x = torch.cat([g, torch.full_like(g, 2.0)], dim=-1)
    for act in ("silu", "gelu_tanh"):
        out = gated_act(x, act)
        torch.testing.assert_close(out, reference.gated_act(x, act), rtol=1e-6, atol=1e-30)


def test_empty():
    assert gated_act(torch.randn(0, 64)).shape == (0, 32)


def test_validation_errors(monkeypatch):
    x = torch.randn(4, 64)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            gated_act(*args, **kwargs)

    raises(ValueError, "act must be one of", x, "relu")
    raises(ValueError, "even last dim", torch.randn(4, 63))
    raises(ValueError, "x has dtype", x.to(torch.int32))
    raises(TypeError, "x must be a torch.Tensor", x.numpy())
    raises(ValueError, "contiguous last dimension", torch.randn(64, 4).t())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raises(ValueError, "need CUDA tensors", x)


@pytest.mark.gpu
@pytest.mark.parametrize("act, T, I", [("silu", 16384, 14336), ("gelu_tanh", 4099, 1536)])
def test_gpu_bf16(act, T, I):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(T, 2 * I, generator=g, device="cuda") * 2).bfloat16()
    run_and_check(x, act)
