"""apply_rotary (rotate-half RoPE on packed q and k, one launch) against reference.apply_rotary,
and its Gemma-3 option (per-head q/k RMSNorm, then RoPE) against reference.norm_rotary.

q and k are strided views of one fused QKV buffer, as the model hands them over. CPU: Triton
interpreter, fp16/fp32. GPU: bf16 at Mistral-7B's shape.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, poisoned_allocations, rel_err

from l2v_kernels import reference
from l2v_kernels.rope import apply_rotary, apply_rotary_fwd


def rope_tables(D, max_position, device="cpu", base=10000.0, scaling=1.0):
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    return reference.rope_cos_sin(inv_freq, max_position, attention_scaling=scaling)


def fused_qkv(T, Hq, Hkv, D, dtype, generator, device="cpu", pad=8):
    """q, k, v as views of one [T, (Hq + 2 Hkv) D + pad] buffer (row stride != heads * D)."""
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D + pad, generator=generator, device=device).to(dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    return qkv, q, k


def check_rotated(q_out, k_out, q, k, cos, sin, pos):
    dtype = q.dtype
    for out, x, name in ((q_out, q, "q"), (k_out, k, "k")):
        truth = reference.apply_rotary(x.double(), cos.double(), sin.double(), pos)
        base = reference.apply_rotary(x, cos, sin, pos)
        err, base_err = rel_err(out, truth), rel_err(base, truth)
        assert err < REL_TOL[dtype], f"{name}: rel error {err:.3e} >= {REL_TOL[dtype]:.0e}"
        assert err <= 2 * base_err + 1e-6, f"{name}: rel error {err:.3e} > 2 x {base_err:.3e}"


CONFIGS = [  # T, Hq, Hkv, D, sequence lengths of the packed batch
    (1, 4, 2, 64, None),  # one token at a random (non-zero) position
    (17, 9, 3, 64, [5, 1, 11]),  # SmolLM2 heads (GQA 9/3)
    (97, 6, 2, 96, [40, 0, 57]),  # D/2 = 48: not a power of two
    (33, 32, 8, 128, [33]),  # Mistral / Llama heads
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("T, Hq, Hkv, D, lengths", CONFIGS, ids=lambda c: str(c))
def test_matches_reference(dtype, inplace, T, Hq, Hkv, D, lengths):
    g = torch.Generator().manual_seed(T + Hq + D)
    qkv, q, k = fused_qkv(T, Hq, Hkv, D, dtype, g)
    cos, sin = rope_tables(D, 300, scaling=1.1)
    if lengths is None:
        pos = torch.randint(1, 300, (T,), generator=g, dtype=torch.int32)
    else:
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
        pos = reference.positions_from_cu_seqlens(cu, T)
    before = qkv.clone()
    q_in, k_in = q.clone(), k.clone()

    if inplace:
        q_out, k_out = apply_rotary(q, k, cos, sin, pos, inplace=True)
        assert q_out is q and k_out is k
        # v and the padding columns of the fused buffer are untouched
        torch.testing.assert_close(qkv[:, (Hq + Hkv) * D :], before[:, (Hq + Hkv) * D :],
                                   rtol=0, atol=0)
    else:
        with poisoned_allocations():
            q_out, k_out = apply_rotary(q, k, cos, sin, pos)
        assert q_out.is_contiguous() and k_out.is_contiguous()
        assert torch.equal(qkv, before)  # inputs untouched
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    check_rotated(q_out, k_out, q_in, k_in, cos, sin, pos)


def test_int64_positions_and_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(13, 3, 64, generator=g).half()
    k = torch.randn(13, 1, 64, generator=g).half()
    cos, sin = rope_tables(64, 50)
    pos = torch.randint(0, 50, (13,), generator=g)  # int64
    q_out, k_out = apply_rotary(q, k, cos, sin, pos)
    check_rotated(q_out, k_out, q, k, cos, sin, pos)


def test_empty():
    q, k = torch.randn(0, 4, 64), torch.randn(0, 2, 64)
    cos, sin = rope_tables(64, 8)
    q_out, k_out = apply_rotary(q, k, cos, sin, torch.zeros(0, dtype=torch.int32))
    assert q_out.shape == (0, 4, 64) and k_out.shape == (0, 2, 64)


def test_validation_errors(monkeypatch):
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    cos, sin = rope_tables(64, 16)
    pos = torch.arange(5, dtype=torch.int32)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            apply_rotary(*args, **kwargs)

    raises(ValueError, "q must be 3-D", q.view(5, 256), k, cos, sin, pos)
    raises(ValueError, "q has dtype", q.to(torch.int32), k, cos, sin, pos)
    raises(ValueError, "k has dtype", q, k.half(), cos, sin, pos)
    raises(ValueError, "k has shape", q, torch.randn(6, 2, 64), cos, sin, pos)
    raises(ValueError, "k has shape", q, torch.randn(5, 2, 32), cos, sin, pos)
    raises(ValueError, "must be even", torch.randn(5, 4, 63), torch.randn(5, 2, 63), cos, sin, pos)
    raises(ValueError, "q must have a contiguous last dimension",
           torch.randn(5, 64, 4).transpose(1, 2), k, cos, sin, pos)
    raises(ValueError, "cos has dtype", q, k, cos.half(), sin, pos)
    raises(ValueError, r"cos and sin must both be \[P, D/2=32\]", q, k, cos[:, :16], sin, pos)
    raises(ValueError, "cos and sin must both be", q, k, cos, sin[:8], pos)
    raises(ValueError, "position_ids has shape", q, k, cos, sin, torch.arange(4, dtype=torch.int32))
    raises(ValueError, "position_ids has dtype", q, k, cos, sin, pos.float())
    raises(ValueError, r"position_ids must lie in \[0, P=16\)", q, k, cos, sin, pos + 12)
    raises(ValueError, "position_ids must lie in", q, k, cos, sin, pos - 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raises(ValueError, "need CUDA tensors", q, k, cos, sin, pos)


# ------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE (Gemma-3)
# ------------------------------------------------------------------------------------------
def check_norm_rotated(q_out, k_out, q, k, weights, cos, sin, pos, offset=1.0):
    dtype = q.dtype
    for out, x, w, name in ((q_out, q, weights[0], "q"), (k_out, k, weights[1], "k")):
        truth = reference.norm_rotary(x.double(), w.double(), 1e-6, cos.double(), sin.double(),
                                      pos, offset)
        base = reference.norm_rotary(x, w, 1e-6, cos, sin, pos, offset)
        err, base_err = rel_err(out, truth), rel_err(base, truth)
        assert err < REL_TOL[dtype], f"{name}: rel error {err:.3e} >= {REL_TOL[dtype]:.0e}"
        assert err <= 2 * base_err + 1e-6, f"{name}: rel error {err:.3e} > 2 x {base_err:.3e}"
        if dtype != torch.float32:
            # The normalized head is rounded to the dtype before the rotation, as HF's q_norm
            # returns it: closer to the same-dtype reference than that is to the truth.
            assert rel_err(out, base) < 0.5 * base_err, (rel_err(out, base), base_err)


NORM_CONFIGS = [  # T, Hq, Hkv, D, sequence lengths
    (17, 4, 1, 256, [5, 1, 11]),  # Gemma-3-270M heads (MQA, D 256)
    (40, 8, 4, 128, [40]),
    (9, 6, 2, 96, [3, 6]),  # D/2 = 48: not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("T, Hq, Hkv, D, lengths", NORM_CONFIGS, ids=lambda c: str(c))
def test_qk_norm_matches_reference(dtype, inplace, T, Hq, Hkv, D, lengths):
    g = torch.Generator().manual_seed(T * D + Hq)
    qkv, q, k = fused_qkv(T, Hq, Hkv, D, dtype, g)
    q.mul_(3)  # unnormalized scale: the norm matters
    weights = (torch.randn(D, generator=g) * 0.3, (torch.randn(D, generator=g) * 0.3).to(dtype))
    cos, sin = rope_tables(D, 64, base=1e6)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
    pos = reference.positions_from_cu_seqlens(cu, T)
    before, q_in, k_in = qkv.clone(), q.clone(), k.clone()
    kw = dict(q_norm_weight=weights[0], k_norm_weight=weights[1], norm_eps=1e-6,
              norm_weight_offset=1.0)
    if inplace:
        q_out, k_out = apply_rotary(q, k, cos, sin, pos, inplace=True, **kw)
        assert q_out is q and k_out is k
        assert torch.equal(qkv[:, (Hq + Hkv) * D :], before[:, (Hq + Hkv) * D :])
    else:
        with poisoned_allocations():
            q_out, k_out = apply_rotary(q, k, cos, sin, pos, **kw)
        assert torch.equal(qkv, before)
    check_norm_rotated(q_out, k_out, q_in, k_in, weights, cos, sin, pos)
    # q and k use their own weights.
    swapped = reference.norm_rotary(q_in, weights[1], 1e-6, cos, sin, pos, 1.0)
    assert rel_err(q_out, swapped) > 10 * REL_TOL[dtype]


def test_qk_norm_launcher_and_validation():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(7, 4, 64, generator=g).half(), torch.randn(7, 2, 64, generator=g).half()
    wq, wk = torch.randn(64, generator=g) * 0.2 + 1, torch.randn(64, generator=g) * 0.2 + 1
    cos, sin = rope_tables(64, 16)
    pos = torch.arange(7, dtype=torch.int32)
    q_out, k_out = apply_rotary_fwd(q, k, cos, sin, pos, q_norm_weight=wq, k_norm_weight=wk)
    check_norm_rotated(q_out, k_out, q, k, (wq, wk), cos, sin, pos, offset=0.0)
    with pytest.raises(ValueError, match="both q_norm_weight and k_norm_weight"):
        apply_rotary(q, k, cos, sin, pos, q_norm_weight=wq)
    with pytest.raises(ValueError, match="k_norm_weight has shape"):
        apply_rotary(q, k, cos, sin, pos, q_norm_weight=wq, k_norm_weight=wk[:32])
    with pytest.raises(ValueError, match="norm_eps must be a float >= 0"):
        apply_rotary(q, k, cos, sin, pos, q_norm_weight=wq, k_norm_weight=wk, norm_eps=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_bf16_mistral_shape(inplace):
    Hq, Hkv, D = 32, 8, 128
    lengths = torch.randint(1, 513, (64,), generator=torch.Generator().manual_seed(0))
    T = int(lengths.sum())  # ~16K tokens
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).int().cuda()
    pos = reference.positions_from_cu_seqlens(cu, T)
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv, q, k = fused_qkv(T, Hq, Hkv, D, torch.bfloat16, g, device="cuda")
    cos, sin = rope_tables(D, 32768, device="cuda", base=1e6)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = apply_rotary(q, k, cos, sin, pos, inplace=inplace)
    check_rotated(q_out, k_out, q_in, k_in, cos, sin, pos)


@pytest.mark.gpu
def test_gpu_bf16_qk_norm_gemma3_shape():
    """Gemma-3-4B heads (8 / 4, D 256), in place on the fused QKV buffer."""
    Hq, Hkv, D = 8, 4, 256
    lengths = torch.randint(1, 1025, (32,), generator=torch.Generator().manual_seed(1))
    T = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).int().cuda()
    pos = reference.positions_from_cu_seqlens(cu, T)
    g = torch.Generator(device="cuda").manual_seed(1)
    qkv, q, k = fused_qkv(T, Hq, Hkv, D, torch.bfloat16, g, device="cuda")
    weights = tuple((torch.randn(D, generator=g, device="cuda") * 0.3).bfloat16() for _ in "qk")
    cos, sin = rope_tables(D, 2048, device="cuda", base=1e6)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = apply_rotary(q, k, cos, sin, pos, inplace=True, q_norm_weight=weights[0],
                                k_norm_weight=weights[1], norm_weight_offset=1.0)
    check_norm_rotated(q_out, k_out, q_in, k_in, weights, cos, sin, pos)
