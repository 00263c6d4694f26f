"""The C++/CUDA extension l2v_kernels._C: it is built, loads, and registers well-formed ops.

CI compiles the extension on a CPU-only machine (torch is a CUDA build, nvcc is installed), so a
failed import here is a failed build and FAILS the suite; it is skipped only where setup.py is
told not to build (L2V_SKIP_CUDA_BUILD=1) or cannot (torch without CUDA).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import REL_TOL, rel_err

from l2v_kernels import gemm, reference  # importing gemm loads _C and registers the fakes

SKIP_REASON = None
if os.environ.get("L2V_SKIP_CUDA_BUILD", "0") == "1":
    SKIP_REASON = "L2V_SKIP_CUDA_BUILD=1: the extension was not built"
elif not torch.version.cuda:
    SKIP_REASON = f"torch {torch.__version__} is not a CUDA build: setup.py builds no extension"
needs_build = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

OPS = ("lora_merge_", "gemm_residual")


@needs_build
def test_extension_imports():
    module = importlib.import_module("l2v_kernels._C")
    assert module.__name__ == "l2v_kernels._C"
    assert gemm.extension_available(), gemm._EXTENSION_ERROR


@needs_build
@pytest.mark.parametrize("name", OPS)
def test_ops_registered_for_cpu_and_cuda(name):
    assert isinstance(getattr(torch.ops.l2v, name).default, torch._ops.OpOverload)
    # The CUDA kernels are registered even where no GPU is present: the build linked them.
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"l2v::{name}", key), key


@needs_build
def test_schemas():
    merge = torch.ops.l2v.lora_merge_.default._schema
    assert merge.arguments[0].alias_info is not None and merge.arguments[0].alias_info.is_write
    assert len(merge.returns) == 0
    gemm_schema = torch.ops.l2v.gemm_residual.default._schema
    assert [a.name for a in gemm_schema.arguments] == ["x", "w", "residual", "bias"]


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu_lora_merge(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 53, generator=g).to(dtype)
    lora_a = torch.randn(8, 53, generator=g)
    lora_b = torch.randn(37, 8, generator=g)
    torch.library.opcheck(torch.ops.l2v.lora_merge_.default, (weight, lora_a, lora_b, 0.5))


@needs_build
@pytest.mark.parametrize("with_residual,with_bias", [(False, False), (True, True)])
def test_opcheck_cpu_gemm_residual(with_residual, with_bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 45, generator=g).bfloat16()
    w = torch.randn(29, 45, generator=g).bfloat16()
    residual = torch.randn(7, 29, generator=g).bfloat16() if with_residual else None
    bias = torch.randn(29, generator=g).bfloat16() if with_bias else None
    torch.library.opcheck(torch.ops.l2v.gemm_residual.default, (x, w, residual, bias))
    out = torch.ops.l2v.gemm_residual(x, w, residual, bias)
    ref = reference.gemm_residual(
        x.double(), w.double(),
        None if residual is None else residual.double(), None if bias is None else bias.double(),
    )
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]


@needs_build
def test_cpp_checks_say_what_was_expected():
    weight = torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match=r"lora_A must be \[r, K\] with K = 6"):
        torch.ops.l2v.lora_merge_(weight, torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, r\] = \[4, 2\]"):
        torch.ops.l2v.lora_merge_(weight, torch.zeros(2, 6), torch.zeros(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="w must have x's dtype"):
        torch.ops.l2v.gemm_residual(torch.zeros(3, 6), torch.zeros(5, 6).half(), None, None)
    with pytest.raises(RuntimeError, match=r"residual must be \[M, N\] = \[3, 5\]"):
        torch.ops.l2v.gemm_residual(torch.zeros(3, 6), torch.zeros(5, 6), torch.zeros(5, 3), None)
