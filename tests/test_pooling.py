"""masked_pool (fused masked mean / weighted mean / last-token / max pooling) against
reference.masked_pool, in the padded [B, L, D] and packed [T, D] + cu_seqlens layouts.

CPU: Triton interpreter, fp16/fp32, random masks with empty rows. GPU: bf16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, poisoned_allocations, rel_err

from l2v_kernels import reference
from l2v_kernels.pooling import masked_pool

MODES = ["mean", "weighted_mean", "last", "max"]


def run_and_check(hidden, mask, mode, normalize, cu_seqlens=None):
    with poisoned_allocations():
        out = masked_pool(hidden, mask, mode=mode, cu_seqlens=cu_seqlens, normalize=normalize)
    B = hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    assert out.shape == (B, hidden.shape[-1]) and out.dtype == torch.float32
    truth = reference.masked_pool(hidden.double(), mask, mode, cu_seqlens, normalize)
    base = reference.masked_pool(hidden, mask, mode, cu_seqlens, normalize)
    err, base_err = rel_err(out, truth), rel_err(base, truth)
    # fp32 accumulation of fp16/fp32 inputs: the fp32 bound applies to every input dtype.
    assert err < REL_TOL[torch.float32], f"rel error {err:.3e}"
    assert err <= 2 * base_err + 1e-6, f"rel error {err:.3e} > 2 x reference's {base_err:.3e}"
    # Rows without a masked token are exactly zero (also after normalize).
    if cu_seqlens is None:
        empty_rows = ~mask.bool().any(dim=1)
    else:
        bounds = cu_seqlens.tolist()
        empty_rows = torch.tensor([not bool(mask[s:e].bool().any())
                                   for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    empty_out = out[empty_rows.to(out.device)]
    assert torch.equal(empty_out, torch.zeros_like(empty_out))
    return out


def random_mask(shape, generator, p=0.6):
    return torch.rand(shape, generator=generator) < p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, L, D", [(1, 1, 64), (3, 17, 96), (4, 129, 576), (2, 5, 4096)])
def test_padded_matches_reference(dtype, normalize, mode, B, L, D):
    g = torch.Generator().manual_seed(B * L + D)
    hidden = (torch.randn(B, L, D, generator=g) + 0.5).to(dtype)
    mask = random_mask((B, L), g)
    mask[0, -1] = True  # at least one pooled token overall (and a last token at the end)
    if B > 2:
        mask[1] = False  # a row with nothing to pool -> zeros
        mask[2, : L // 2] = False  # llm2vec-style: the instruction prefix is left out
    run_and_check(hidden, mask, mode, normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_matches_reference(dtype, normalize, mode):
    g = torch.Generator().manual_seed(7)
    lengths = [1, 0, 17, 97, 14]  # mixed, with an empty text; T = 129
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    T, D = int(cu[-1]), 96
    hidden = (torch.randn(T, D, generator=g) - 0.3).to(dtype)
    mask = random_mask((T,), g)
    mask[0] = True  # the single-token text is pooled
    mask[18:35] = False  # third text (17 tokens) has nothing to pool -> zeros
    run_and_check(hidden, mask, mode, normalize, cu_seqlens=cu)


@pytest.mark.parametrize("mask_dtype", [torch.int8, torch.uint8])
def test_integer_masks(mask_dtype):
    """Any nonzero value selects the token."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 23, 64, generator=g).half()
    values = torch.randint(-3, 4, (3, 23), generator=g)
    if mask_dtype == torch.uint8:
        values = values.abs()
    mask = values.to(mask_dtype)
    assert (mask > 1).any()
    for mode in MODES:
        out = masked_pool(hidden, mask, mode=mode)
        torch.testing.assert_close(out, masked_pool(hidden, mask != 0, mode=mode), rtol=0, atol=0)
        assert rel_err(out, reference.masked_pool(hidden.double(), mask != 0, mode)) < 1e-5


def test_strided_inputs():
    """hidden with a token stride != D and a row stride != L * D, mask with strides."""
    g = torch.Generator().manual_seed(13)
    big = torch.randn(3, 2 * 31, 96 + 32, generator=g).half()
    hidden = big[:, ::2, 16 : 16 + 96]  # [3, 31, 96], strides (7936, 256, 1)
    mask = random_mask((31, 3), g).t()  # [3, 31], strides (1, 3)
    mask[0, 3] = True
    assert not hidden.is_contiguous() and not mask.is_contiguous()
    for mode in MODES:
        run_and_check(hidden, mask, mode, normalize=mode == "mean")
    packed = torch.randn(40, 96 + 8, generator=g)[:, :96]  # row stride 104
    cu = torch.tensor([0, 9, 40], dtype=torch.int32)
    pmask = random_mask((80,), g)[::2]
    for mode in MODES:
        run_and_check(packed, pmask, mode, normalize=False, cu_seqlens=cu)


def test_weighted_mean_by_hand():
    """Weights 1..n over the masked tokens in order, whatever sits between them."""
    hidden = torch.tensor([[[10.0], [1.0], [20.0], [2.0], [3.0]]])  # [1, 5, 1]
    mask = torch.tensor([[False, True, False, True, True]])
    out = masked_pool(hidden, mask, mode="weighted_mean")
    expected = (1 * 1.0 + 2 * 2.0 + 3 * 3.0) / (1 + 2 + 3)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    assert masked_pool(hidden, mask, mode="last").item() == 3.0
    assert masked_pool(hidden, mask, mode="mean").item() == pytest.approx(2.0, rel=1e-6)


def test_max_by_hand():
    """max is element-wise over the pooled tokens only: tokens left out (larger values here)
    are never read, negative maxima stay negative (the accumulator starts at -inf, not 0), an
    empty span gives zeros, and NaN in a pooled token comes through (as torch.amax)."""
    hidden = torch.tensor([[[9.0, 9.0], [-3.0, -1.0], [9.0, 9.0], [-2.0, -4.0], [-5.0, -0.5]],
                           [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 0.0]]])
    mask = torch.tensor([[False, True, False, True, True], [False] * 5])
    for dtype in (torch.float32, torch.float16):
        out = masked_pool(hidden.to(dtype), mask, mode="max")
        assert torch.equal(out, torch.tensor([[-2.0, -0.5], [0.0, 0.0]]))
    packed, cu = hidden.reshape(10, 2), torch.tensor([0, 2, 5, 10], dtype=torch.int32)
    out = masked_pool(packed, mask.reshape(10), mode="max", cu_seqlens=cu)
    assert torch.equal(out, torch.tensor([[-3.0, -1.0], [-2.0, -0.5], [0.0, 0.0]]))
    hidden[0, 3, 1] = float("nan")
    out = masked_pool(hidden, mask, mode="max")
    assert out[0, 0] == -2.0 and out[0, 1].isnan() and torch.equal(out[1], torch.zeros(2))
    ref = reference.masked_pool(hidden, mask, "max")
    assert ref[0, 1].isnan()


def test_degenerate_shapes():
    assert masked_pool(torch.randn(0, 4, 64), torch.ones(0, 4, dtype=torch.bool)).shape == (0, 64)
    out = masked_pool(torch.randn(2, 0, 64), torch.ones(2, 0, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 64))
    out = masked_pool(torch.randn(0, 64), torch.ones(0, dtype=torch.bool),
                      cu_seqlens=torch.zeros(3, dtype=torch.int32), normalize=True)
    assert torch.equal(out, torch.zeros(2, 64))


def test_validation_errors(monkeypatch):
    hidden, mask = torch.randn(2, 6, 64), torch.ones(2, 6, dtype=torch.bool)
    packed, pmask = torch.randn(12, 64), torch.ones(12, dtype=torch.bool)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            masked_pool(*args, **kwargs)

    raises(ValueError, "mode must be one of", hidden, mask, mode="median")
    raises(ValueError, "hidden has dtype", hidden.to(torch.int32), mask)
    raises(TypeError, "hidden must be a torch.Tensor", hidden.numpy(), mask)
    raises(ValueError, "contiguous last dimension", hidden.transpose(1, 2), torch.ones(2, 64))
    raises(ValueError, "mask has dtype", hidden, mask.float())
    raises(ValueError, r"mask has shape \(2, 5\)", hidden, mask[:, :5])
    raises(ValueError, "mask must be 2-D", hidden, mask.flatten())
    raises(ValueError, "without cu_seqlens hidden must be padded", packed, pmask)
    raises(ValueError, "with cu_seqlens hidden must be packed", hidden, mask, cu_seqlens=cu)
    raises(ValueError, "mask must be 1-D", packed, pmask.view(2, 6), cu_seqlens=cu)
    raises(ValueError, "cu_seqlens has dtype", packed, pmask, cu_seqlens=cu.long())
    raises(ValueError, "end at the token count 12", packed, pmask, cu_seqlens=cu - 1)
    raises(ValueError, "non-decreasing", packed, pmask,
           cu_seqlens=torch.tensor([0, 7, 5, 12], dtype=torch.int32))
    raises(ValueError, "B\\+1 >= 2", packed, pmask, cu_seqlens=torch.zeros(1, dtype=torch.int32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raises(ValueError, "need CUDA tensors", hidden, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_bf16_packed(mode):
    D = 4096
    lengths = torch.randint(1, 1025, (32,), generator=torch.Generator().manual_seed(0))
    T = int(lengths.sum())  # ~16K tokens
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).int().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    mask = torch.rand(T, generator=g, device="cuda") < 0.9
    mask[int(cu[3]) : int(cu[4])] = False  # one text with nothing to pool
    for normalize in (False, True):
        run_and_check(hidden, mask, mode, normalize, cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("B, L", [(256, 64), (8, 2048)])
def test_gpu_bf16_padded(B, L):
    D = 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(B, L, D, generator=g, device="cuda").bfloat16()
    mask = torch.rand(B, L, generator=g, device="cuda") < 0.8
    for mode in MODES:
        run_and_check(hidden, mask, mode, normalize=mode == "mean")
