"""Rotary position embedding (Llama/Hugging Face rotate-half) on packed q and k in one launch.

q [T, Hq, D] and k [T, Hkv, D] are usually column slices of the fused QKV GEMM output, so any
token/head strides are accepted as long as the head dim is contiguous. Each program rotates a
block of tokens for a block of heads; the grid's second axis walks the q heads, then the k heads,
so one launch covers both. cos/sin rows are gathered by position id (positions restart at 0 for
each packed text). inplace=True writes back into q and k: the model's hot path, one read and one
write of q and k.

Gemma-3's and Qwen3's per-head q/k RMSNorm (q_norm / k_norm over the head dim, with Gemma's
(1 + w) or Qwen3's w) is an option of the same kernel: each head is normalized, rounded once to
the activation dtype (the norm module's output), then rotated, still one read and one write of
q and k. (rms_norm on the strided q/k slices of the fused QKV buffer cannot do this in place:
[T, H, D] with a row stride that is not H * D has no [T * H, D] view with one row stride.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2v_kernels._checks import FLOAT_DTYPES, check_tensor, check_triton_device, sync_allowed


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    tokens64,
    token_ok,
    heads,
    n_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    cos,
    sin,
    HALF,
    norm_w_ptr,
    eps,
    weight_offset,
    NORM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate x[tokens, heads, :] into out (tiles [BLOCK_T, BLOCK_H, BLOCK_HALF]); with NORM,
    RMS-normalize each head first (weight norm_w [2 * HALF]) and round it to the dtype."""
    j = tl.arange(0, BLOCK_HALF)
    ok = (token_ok[:, None, None] & (heads < n_heads)[None, :, None]) & (j < HALF)[None, None, :]
    x1_ptrs = x_ptr + tokens64[:, None, None] * stride_xt + heads[None, :, None] * stride_xh
    x1_ptrs = x1_ptrs + j[None, None, :]
    x1 = tl.load(x1_ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        mean_square = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF)
        rstd = tl.rsqrt(mean_square + eps)[:, :, None]
        w1 = tl.load(norm_w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32) + weight_offset
        w2 = tl.load(norm_w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        w2 = w2 + weight_offset
        dt = out_ptr.dtype.element_ty
        x1 = ((x1 * rstd) * w1[None, None, :]).to(dt).to(tl.float32)
        x2 = ((x2 * rstd) * w2[None, None, :]).to(dt).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    o1_ptrs = out_ptr + tokens64[:, None, None] * stride_ot + heads[None, :, None] * stride_oh
    o1_ptrs = o1_ptrs + j[None, None, :]
    tl.store(o1_ptrs, o1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(o1_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    T,
    Hq,
    Hkv,
    HALF,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cos,
    stride_sin,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    weight_offset,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    tokens64 = tokens.to(tl.int64)
    head_block = tl.program_id(1)

    pos = tl.load(pos_ptr + tokens, mask=token_ok, other=0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cs_ok = token_ok[:, None] & (j < HALF)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * stride_cos + j[None, :], mask=cs_ok, other=0.0)
    sin = tl.load(sin_ptr + pos[:, None] * stride_sin + j[None, :], mask=cs_ok, other=0.0)

    n_q_blocks = tl.cdiv(Hq, BLOCK_H)
    if head_block < n_q_blocks:
        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr, q_out_ptr, tokens64, token_ok, heads, Hq, stride_qt, stride_qh,
                      stride_qot, stride_qoh, cos, sin, HALF, q_norm_ptr, eps, weight_offset,
                      NORM, BLOCK_HALF)
    else:
        heads = (head_block - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(k_ptr, k_out_ptr, tokens64, token_ok, heads, Hkv, stride_kt, stride_kh,
                      stride_kot, stride_koh, cos, sin, HALF, k_norm_ptr, eps, weight_offset,
                      NORM, BLOCK_HALF)


def _launch_config(Hq: int, Hkv: int, half: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF, num_warps): ~2K (x1, x2) pairs per program."""
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(Hq, Hkv)), max(1, 512 // block_half))
    block_t = max(1, 2048 // (block_h * block_half))
    return block_t, block_h, block_half, 4


def apply_rotary_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked launcher of apply_rotary (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees what apply_rotary checks: q/q_out [T, Hq, D], k/k_out [T, Hkv, D] of
    one float dtype with stride(2) == 1 (token/head strides free; out may alias the input: pass
    q, k for in place), D even, cos/sin fp32 [P, D/2] with stride(1) == 1, position_ids int32/64
    [T] contiguous with values in [0, P), one device. q_out / k_out are allocated (contiguous)
    when None. With q_norm_weight and k_norm_weight ([D] each, contiguous, both or neither),
    each head is RMS-normalized first (Gemma-3 / Qwen3 q_norm, k_norm). Returns (q_out, k_out).
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    norm = q_norm_weight is not None
    half = D // 2
    block_t, block_h, block_half, num_warps = _launch_config(Hq, Hkv, half)
    grid = (triton.cdiv(T, block_t), triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        position_ids,
        T,
        Hq,
        Hkv,
        half,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_norm_weight if norm else cos,
        k_norm_weight if norm else cos,
        float(norm_eps),
        float(norm_weight_offset),
        NORM=norm,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    inplace: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on packed q and k in one launch.

    q: [T, Hq, D], k: [T, Hkv, D], same float dtype (fp16/bf16/fp32), D even; the head dim must be
    contiguous, token and head strides are free (e.g. views of a fused QKV buffer).
    cos, sin: fp32 [P, D/2] (l2v_kernels.reference.rope_cos_sin; rope scaling such as llama3's
    is folded into inv_freq by the caller). position_ids: int32 or int64 [T], each in [0, P)
    (packed batches: reference.positions_from_cu_seqlens).
    With x1, x2 the two halves of a head: out = [x1*cos - x2*sin, x2*cos + x1*sin], in fp32,
    rounded once to q's dtype.
    Returns (q_out, k_out): new contiguous tensors, or q and k themselves when inplace=True.
    Matches l2v_kernels.reference.apply_rotary applied to q and to k.

    Gemma-3 / Qwen3 q_norm, k_norm: with q_norm_weight and k_norm_weight ([D] each, any float dtype;
    both or neither), each head is first RMS-normalized over D,
    x / sqrt(mean(x**2) + norm_eps) * (norm_weight_offset + w) with fp32 statistics
    (norm_weight_offset=1.0 for Gemma's (1 + w), 0.0 for Qwen3's w), rounded once to q's dtype
    (the norm module's output; Qwen3's module rounds the normalized row before the weight
    product too, a difference of one bf16 rounding), then rotated:
    l2v_kernels.reference.norm_rotary. Still one read and one write of q, k.
    """
    op = "apply_rotary"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, Hq, D = q.shape
    check_tensor(op, "k", k, ndim=3, dtypes=(q.dtype,), last_dim_contiguous=True)
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(
            f"{op}: k has shape {tuple(k.shape)}, expected [T={T}, Hkv, D={D}] to match q "
            f"{tuple(q.shape)}"
        )
    if D % 2 != 0:
        raise ValueError(f"{op}: head dim D={D} must be even (rotate-half RoPE)")
    check_tensor(op, "cos", cos, ndim=2, dtypes=(torch.float32,), last_dim_contiguous=True)
    check_tensor(op, "sin", sin, ndim=2, dtypes=(torch.float32,), last_dim_contiguous=True)
    if cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"{op}: cos and sin must both be [P, D/2={D // 2}], got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}"
        )
    check_tensor(
        op, "position_ids", position_ids, ndim=1, shape=(T,), dtypes=(torch.int32, torch.int64)
    )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{op}: pass both q_norm_weight and k_norm_weight, or neither")
    if q_norm_weight is not None:
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            check_tensor(op, name, w, ndim=1, shape=(D,), dtypes=FLOAT_DTYPES, contiguous=True)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not (
            norm_eps >= 0
        ):
            raise ValueError(f"{op}: norm_eps must be a float >= 0, got {norm_eps!r}")
        if isinstance(norm_weight_offset, bool) or not isinstance(norm_weight_offset,
                                                                  (int, float)):
            raise TypeError(
                f"{op}: norm_weight_offset must be a float, got {norm_weight_offset!r}"
            )
    check_triton_device(op, q, k, cos, sin, position_ids, q_norm_weight, k_norm_weight)
    if T > 0 and sync_allowed():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(
                f"{op}: position_ids must lie in [0, P={cos.shape[0]}), got {lo} ... {hi}; "
                "build cos/sin for more positions"
            )
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return apply_rotary_fwd(
        q, k, cos, sin, position_ids.contiguous(), q_out, k_out,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
        norm_weight_offset=norm_weight_offset,
    )
