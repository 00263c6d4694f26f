"""Shared test helpers: error metrics and poisoning."""

from __future__ import annotations

import contextlib

import pytest
import torch

# docs/architecture.md "Numerics and tolerances": ||out - ref|| / ||ref|| bounds per dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN/inf anywhere gives inf so it never passes."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err < tol, f"{what} rel error {err:.3e} >= {tol:.1e}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so any element a kernel fails to write fails the check."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty return NaN-filled tensors while the op runs, so any output element the
    kernel fails to write fails the check."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", nan_empty)
        yield


def skip_unless_gguf_readable() -> None:
    """Skip (with the reason l2v gives its users) where the installed transformers cannot read
    the embedded SmolLM2 GGUF's tokenizer faithfully (transformers < 5.6, llm2vec's 4.44 pin)."""
    from l2v_models.checkpoint import gguf_support_error

    problem = gguf_support_error("the default model")
    if problem is not None:
        pytest.skip(problem)
