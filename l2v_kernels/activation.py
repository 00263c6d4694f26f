"""Gated activation: act(gate) * up from one [..., 2I] gate|up buffer (SwiGLU / GeGLU).

Used where the gate|up GEMM runs without its fused epilogue (the cuBLAS fallback). The gate is
the first half of the last dim and up the second half, the order Hugging Face's fused gate_up
weights use. Math in fp32, one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2v_kernels._checks import FLOAT_DTYPES, check_tensor, check_triton_device

_ACTS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _gated_act_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    I,
    stride_x,
    stride_out,
    ACT: tl.constexpr,  # 0: silu, 1: gelu_tanh
    BLOCK_ROWS: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows < n_rows)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)

    gate_ptrs = x_ptr + rows64[:, None] * stride_x + cols[None, :]
    gate = tl.load(gate_ptrs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + I, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        # silu(g) = g * sigmoid(g)
        act = gate / (1.0 + tl.exp(-gate))
    else:
        # 0.5 * g * (1 + tanh(z)) == g * sigmoid(2z): no tanh needed (core tl has none).
        # 0.7978845608028654 = sqrt(2 / pi)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * z))
    out = act * up
    tl.store(
        out_ptr + rows64[:, None] * stride_out + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=ok,
    )


def _launch_config(I: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_I, num_warps): ~2K outputs per program, several rows when I is small."""
    block_i = min(triton.next_power_of_2(I), 1024)
    block_rows = max(1, 2048 // block_i)
    return block_rows, block_i, 4


def gated_act_fwd(
    x: torch.Tensor, out: torch.Tensor | None = None, act: str = "silu"
) -> torch.Tensor:
    """Unchecked launcher of gated_act (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees: x [M, 2I] fp16/bf16/fp32 with stride(1) == 1 on CUDA (or CPU under
    TRITON_INTERPRET=1), act in ("silu", "gelu_tanh"), out [M, I] in x's dtype with
    stride(1) == 1 (allocated when None). Writes act(x[:, :I]) * x[:, I:] into out, returns it.
    """
    if out is None:
        out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    n_rows, I = out.shape
    if n_rows == 0 or I == 0:
        return out
    block_rows, block_i, num_warps = _launch_config(I)
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(I, block_i))
    _gated_act_kernel[grid](
        x,
        out,
        n_rows,
        I,
        x.stride(0),
        out.stride(0),
        ACT=_ACTS[act],
        BLOCK_ROWS=block_rows,
        BLOCK_I=block_i,
        num_warps=num_warps,
    )
    return out


def gated_act(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up for a fused gate|up activation.

    x: [..., 2I], fp16/bf16/fp32, last dim contiguous (rows may be strided, e.g. a column slice
    of a wider buffer); gate = x[..., :I], up = x[..., I:]. act: "silu" (SwiGLU: Llama, Mistral,
    Qwen2) or "gelu_tanh" (GeGLU with GELU's tanh approximation: Gemma).
    Returns a new contiguous [..., I] tensor in x's dtype; math in fp32, one rounding.
    Matches l2v_kernels.reference.gated_act.
    """
    op = "gated_act"
    if act not in _ACTS:
        raise ValueError(f"{op}: act must be one of {sorted(_ACTS)}, got {act!r}")
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"{op}: x must be [..., 2I] with an even last dim (gate | up), got shape "
            f"{tuple(x.shape)}"
        )
    check_triton_device(op, x)
    I = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], I), dtype=x.dtype, device=x.device)
    x_rows = x if x.dim() == 2 else x.reshape(-1, 2 * I)
    gated_act_fwd(x_rows, out.view(-1, I), act)
    return out
