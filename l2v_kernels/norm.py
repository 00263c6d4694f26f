"""Fused residual add + RMSNorm (Llama/Mistral/Qwen2, and Gemma's (1 + w) variant), and the
Gemma-2/3 "sandwich" step norm -> add -> norm.

One program normalizes BLOCK_ROWS rows held whole in registers: the row is read once, its
statistics are taken in fp32, and the normalized row (and, with a residual, the sum x + residual
the next layer needs) is written once. Small hidden sizes (SmolLM2's 576) put several rows in one
program so each program still moves a useful amount of memory.

- rms_norm: y = norm(x) or (y, h) = (norm(x + residual), x + residual).
- norm_add_norm (Gemma-2/3's post-norms): h = residual + norm_a(x); y = norm_b(h), one kernel that
  reads x and residual once and writes h and y once (the same kernel with the PRE_NORM switch).
- rms_norm_fwd / norm_add_norm_fwd: the unchecked launchers (no validation, no host sync,
  CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2v_kernels._checks import FLOAT_DTYPES, check_tensor, check_triton_device

# The whole row lives in registers; above this a row would spill (no supported model comes close:
# Llama-3-405B has 16384).
MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    h_ptr,
    pre_weight_ptr,
    n_rows,
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    PRE_NORM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y = norm(h) * (weight_offset + weight), h = x, or h = x + residual (HAS_RESIDUAL), or
    h = norm_pre(x) + residual (PRE_NORM, with pre_weight). Every rounding to the activation
    dtype happens where the unfused model stores a tensor."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    # int64 row offsets: T * D passes 2**31 elements for long batches of wide models.
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    if PRE_NORM:
        # Normalize x first and round the result to the activation dtype: the output of the
        # model's post-attention / post-feed-forward norm module, which the model then adds.
        xf = x.to(tl.float32)
        rstd_pre = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
        w_pre = tl.load(pre_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = ((xf * rstd_pre[:, None]) * (w_pre + weight_offset)[None, :]).to(
            x_ptr.dtype.element_ty
        )
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows64[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
        # Round the sum to the activation dtype first, as the unfused model stores it, and
        # normalize that rounded value, so y matches norm(h) for the h we hand back.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h, mask=ok)
        hf = h.to(tl.float32)
    else:
        hf = x.to(tl.float32)

    mean_square = tl.sum(hf * hf, axis=1) / D
    rstd = tl.rsqrt(mean_square + eps)
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + weight_offset
    y = (hf * rstd[:, None]) * w[None, :]
    y_ptrs = y_ptr + rows64[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)


def _launch_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): whole rows, ~4-8K elements per program."""
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, 4096 // block_d)
    elements = block_rows * block_d
    num_warps = 4 if elements <= 4096 else (8 if elements <= 8192 else 16)
    return block_rows, block_d, num_warps


def _launch(x, weight, eps, out, residual, h_out, pre_weight, weight_offset):
    n_rows, D = x.shape
    if n_rows == 0:
        return
    block_rows, block_d, num_warps = _launch_config(D)
    has_residual = residual is not None
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_kernel[grid](
        x,
        residual if has_residual else x,
        weight,
        out,
        h_out if has_residual else out,
        pre_weight if pre_weight is not None else weight,
        n_rows,
        D,
        x.stride(0),
        residual.stride(0) if has_residual else 0,
        out.stride(0),
        h_out.stride(0) if has_residual else 0,
        float(eps),
        float(weight_offset),
        HAS_RESIDUAL=has_residual,
        PRE_NORM=pre_weight is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    weight_offset: float = 0.0,
):
    """Unchecked launcher of rms_norm (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees what rms_norm checks: x, residual, out, h_out 2-D [T, D] of one float
    dtype (fp16/bf16/fp32) with stride(1) == 1 (rows may be strided), 1 <= D <= MAX_HIDDEN,
    weight [D] contiguous (any float dtype), one device (CUDA, or CPU under TRITON_INTERPRET=1).
    Writes out = rmsnorm(x (+ residual)) and, with a residual, h_out = x + residual (rounded to
    x's dtype). out / h_out are allocated when None. Each program reads its rows before writing
    them, so h_out may be residual and out may be x (in place).
    Returns out, or (out, h_out) when residual is given.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None and h_out is None:
        h_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, weight, eps, out, residual, h_out, None, weight_offset)
    return out if residual is None else (out, h_out)


def norm_add_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked launcher of norm_add_norm (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees what norm_add_norm checks: x, residual, out, h_out 2-D [T, D] of one
    float dtype with stride(1) == 1, 1 <= D <= MAX_HIDDEN, weight_a / weight_b [D] contiguous, one
    device. Writes h_out = residual + norm_a(x) and out = norm_b(h_out) (allocated when None);
    in place is allowed (h_out may be residual, out may be x). Returns (out, h_out).
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if h_out is None:
        h_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, weight_b, eps, out, residual, h_out, weight_a, weight_offset)
    return out, h_out


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [T, D], a view whenever the layout allows (rows may be strided)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _check_eps_offset(op: str, eps, weight_offset) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"{op}: eps must be >= 0, got {eps!r}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"{op}: weight_offset must be a float, got {weight_offset!r}")


def _check_x(op: str, x: torch.Tensor) -> int:
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., D], got a scalar")
    D = x.shape[-1]
    if D == 0 or D > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size D={D} must be in 1..{MAX_HIDDEN}")
    return D


def _check_residual(op: str, x: torch.Tensor, residual: torch.Tensor) -> None:
    check_tensor(op, "residual", residual, dtypes=(x.dtype,), last_dim_contiguous=True)
    if residual.shape != x.shape:
        raise ValueError(
            f"{op}: residual has shape {tuple(residual.shape)}, expected x's shape "
            f"{tuple(x.shape)}"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
):
    """RMSNorm over the last dim, optionally fused with the residual add before it.

    x: [..., D] (mainly packed tokens [T, D]), fp16/bf16/fp32, last dim contiguous (rows may be
    strided). weight: [D], any float dtype. residual: same shape and dtype as x, or None.
    weight_offset: added to the weight in fp32 (1.0 for Gemma's (1 + w)).

    Returns y = h / sqrt(mean(h**2) + eps) * (weight_offset + weight) in x's dtype, where h = x,
    or, when residual is given, the pair (y, h) with h = x + residual rounded to x's dtype (the
    stream the next layer adds to). Statistics in fp32. Outputs are new contiguous tensors.
    Matches l2v_kernels.reference.rms_norm.
    """
    op = "rms_norm"
    D = _check_x(op, x)
    check_tensor(op, "weight", weight, ndim=1, shape=(D,), dtypes=FLOAT_DTYPES, contiguous=True)
    if residual is not None:
        _check_residual(op, x, residual)
    _check_eps_offset(op, eps, weight_offset)
    check_triton_device(op, x, weight, residual)

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    rms_norm_fwd(
        _as_rows(x),
        weight,
        eps,
        _as_rows(y),
        residual=_as_rows(residual) if residual is not None else None,
        h_out=_as_rows(h) if h is not None else None,
        weight_offset=weight_offset,
    )
    return y if residual is None else (y, h)


def norm_add_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    eps: float,
    *,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma-2/3 post-norm step in one kernel: h = residual + rmsnorm_a(x); y = rmsnorm_b(h).

    In the Gemma-2/3 decoder layer x is the attention output (o_proj) with rmsnorm_a the
    post-attention norm and rmsnorm_b the pre-feed-forward norm, or x is the MLP output with
    rmsnorm_a the post-feed-forward norm and rmsnorm_b the next layer's input norm (the final
    norm after the last layer). x and residual are read once, y and h written once.

    x, residual: [..., D] (mainly [T, D]), one dtype (fp16/bf16/fp32), last dims contiguous
    (rows may be strided). weight_a, weight_b: [D], any float dtype. Each norm is
    rmsnorm(t) = t / sqrt(mean(t**2) + eps) * (weight_offset + w) with fp32 statistics and
    weight_offset added in fp32 (1.0 for Gemma's (1 + w)).
    Rounding points match Hugging Face's Gemma2/Gemma3 layer in the model dtype: rmsnorm_a(x) is
    rounded to x's dtype (the norm module's output), the add uses those rounded values and is
    rounded to x's dtype (h, returned bit for bit as the unfused model stores it), and y
    normalizes that rounded h and is rounded once.
    Returns (y, h), new contiguous tensors. Matches l2v_kernels.reference.norm_add_norm.
    """
    op = "norm_add_norm"
    D = _check_x(op, x)
    _check_residual(op, x, residual)
    for name, w in (("weight_a", weight_a), ("weight_b", weight_b)):
        check_tensor(op, name, w, ndim=1, shape=(D,), dtypes=FLOAT_DTYPES, contiguous=True)
    _check_eps_offset(op, eps, weight_offset)
    check_triton_device(op, x, residual, weight_a, weight_b)

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y)
    norm_add_norm_fwd(
        _as_rows(x), _as_rows(residual), weight_a, weight_b, eps, _as_rows(y), _as_rows(h),
        weight_offset=weight_offset,
    )
    return y, h
