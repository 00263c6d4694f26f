"""Fused masked pooling of the last hidden states: mean, weighted mean, last masked token or
element-wise max.

The embed mask selects which tokens of each text are pooled (llm2vec leaves the instruction and
BOS out). Tokens whose mask is 0 are never read. Each program owns one row (text) and one block of
the hidden dim and walks the row's tokens in chunks, accumulating in fp32; the result is written
once as fp32. For weighted_mean the weight of a masked token is its rank among the row's masked
tokens (1, 2, ..., n), taken from a running count plus a cumulative sum within each chunk, and the
sum is divided by n (n + 1) / 2. For max the accumulator starts at -inf (tokens that are not
pooled load as -inf) and a row without a pooled token gives zeros. normalize=True makes one
program own a whole row (it loops over the hidden dim), so it can L2-normalize what it wrote in
the same launch.
Both the padded layout ([B, L, D] + mask [B, L]) and the packed one ([T, D] + cu_seqlens + mask
[T]) go through the same kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from l2v_kernels._checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor, check_triton_device

_MODES = {"mean": 0, "weighted_mean": 1, "last": 2, "max": 3}
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)


@triton.jit
def _pool_block(
    h_row,
    m_row,
    n_tokens,
    stride_ht,
    stride_mt,
    last,
    offs_d,
    d_ok,
    MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pooled fp32 values of one row for the hidden-dim block offs_d."""
    if MODE == 2:
        # last: one token's block (zeros when the row has no masked token: last == -1)
        # (the scalar test is broadcast to the block first: newer interpreters reject a block
        # mask combined with a scalar one)
        has_last = (offs_d * 0 + last) >= 0
        h = tl.load(h_row + last.to(tl.int64) * stride_ht + offs_d, mask=d_ok & has_last,
                    other=0.0)
        pooled = h.to(tl.float32)
    elif MODE == 3:
        # max: element-wise over the masked tokens; tokens not pooled are not read (-inf)
        offs_t = tl.arange(0, BLOCK_T)
        acc = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
        counts = tl.zeros([BLOCK_T], dtype=tl.int32)
        for t0 in range(0, n_tokens, BLOCK_T):
            idx = t0 + offs_t
            m = tl.load(m_row + idx.to(tl.int64) * stride_mt, mask=idx < n_tokens, other=0) != 0
            h_ptrs = h_row + idx.to(tl.int64)[:, None] * stride_ht + offs_d[None, :]
            h = tl.load(h_ptrs, mask=m[:, None] & d_ok[None, :], other=float("-inf"))
            # NaN propagates, as in torch.amax (the reference), so a NaN state is never hidden
            acc = tl.maximum(acc, h.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
            counts += m.to(tl.int32)
        # tl.max over the tokens, NaN put back where a lane saw one (tl.max may drop it)
        saw_nan = tl.max((acc != acc).to(tl.int32), axis=0) > 0
        best = tl.where(saw_nan, float("nan"), tl.max(acc, axis=0))
        # Zeros for a row with no masked token, and in the lanes past D (normalize sums them).
        has_any = (offs_d * 0 + tl.sum(counts, axis=0)) > 0
        pooled = tl.where(d_ok & has_any, best, 0.0)
    else:
        offs_t = tl.arange(0, BLOCK_T)
        # Per-lane partial sums, reduced across the token axis once after the loop: keeps
        # cross-thread reductions (shared memory + barriers) out of the streaming loop.
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        counts = tl.zeros([BLOCK_T], dtype=tl.int32)
        for t0 in range(0, n_tokens, BLOCK_T):
            idx = t0 + offs_t
            m = tl.load(m_row + idx.to(tl.int64) * stride_mt, mask=idx < n_tokens, other=0) != 0
            # Masked-out tokens (instruction, padding) are not loaded at all.
            h_ptrs = h_row + idx.to(tl.int64)[:, None] * stride_ht + offs_d[None, :]
            h = tl.load(h_ptrs, mask=m[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            m_int = m.to(tl.int32)
            if MODE == 1:
                # weight = rank among the row's masked tokens: 1 for the first, n for the last
                rank = tl.sum(counts, axis=0) + tl.cumsum(m_int, axis=0)
                weight = tl.where(m, rank.to(tl.float32), 0.0)
                acc += h * weight[:, None]
            else:
                acc += h
            counts += m_int
        count = tl.sum(counts, axis=0)
        n = count.to(tl.float32)
        if MODE == 1:
            denom = n * (n + 1.0) * 0.5
        else:
            denom = n
        # A row with no masked token has acc == 0 and gives zeros.
        pooled = tl.sum(acc, axis=0) / tl.maximum(denom, 1.0)
    return pooled


@triton.jit
def _masked_pool_kernel(
    hidden_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    out_ptr,
    seq_len,
    D,
    stride_hb,
    stride_ht,
    stride_mb,
    stride_mt,
    stride_ob,
    MODE: tl.constexpr,  # 0: mean, 1: weighted_mean, 2: last, 3: max
    PACKED: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    if PACKED:
        start = tl.load(cu_seqlens_ptr + row)
        n_tokens = tl.load(cu_seqlens_ptr + row + 1) - start
        h_row = hidden_ptr + start.to(tl.int64) * stride_ht
        m_row = mask_ptr + start.to(tl.int64) * stride_mt
    else:
        n_tokens = seq_len
        h_row = hidden_ptr + row.to(tl.int64) * stride_hb
        m_row = mask_ptr + row.to(tl.int64) * stride_mb
    out_row = out_ptr + row.to(tl.int64) * stride_ob

    last = -1
    if MODE == 2:
        # Index of the row's last masked token, -1 if none.
        offs_t = tl.arange(0, BLOCK_T)
        for t0 in range(0, n_tokens, BLOCK_T):
            idx = t0 + offs_t
            m = tl.load(m_row + idx.to(tl.int64) * stride_mt, mask=idx < n_tokens, other=0) != 0
            last = tl.maximum(last, tl.max(tl.where(m, idx, -1), axis=0))

    if NORMALIZE:
        # This program owns the whole row: write the unnormalized row, then rescale it.
        sum_squares = 0.0
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            pooled = _pool_block(h_row, m_row, n_tokens, stride_ht, stride_mt, last, offs_d, d_ok,
                                 MODE, BLOCK_T, BLOCK_D)
            sum_squares += tl.sum(pooled * pooled, axis=0)
            tl.store(out_row + offs_d, pooled, mask=d_ok)
        # The rescale pass reads values other threads of this program wrote: the barrier
        # (__syncthreads) makes those global writes visible.
        tl.debug_barrier()
        inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_squares), 1e-12)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            pooled = tl.load(out_row + offs_d, mask=d_ok, other=0.0)
            tl.store(out_row + offs_d, pooled * inv_norm, mask=d_ok)
    else:
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        pooled = _pool_block(h_row, m_row, n_tokens, stride_ht, stride_mt, last, offs_d, d_ok,
                             MODE, BLOCK_T, BLOCK_D)
        tl.store(out_row + offs_d, pooled, mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(n_rows: int, D: int, normalize: bool, device: torch.device):
    """(grid, BLOCK_T, BLOCK_D, num_warps).

    Without normalize: (row, D-block) programs; the D-block shrinks (down to 64 elements, one
    128-byte line of bf16 per token) until there are a few programs per SM, so a handful of long
    texts still fills the GPU. Tiles of ~4K elements. With normalize: one program per row.
    """
    if normalize:
        block_d = min(triton.next_power_of_2(D), 1024)
        block_t = max(2, 8192 // block_d)
        return (n_rows, 1), block_t, block_d, 8
    # The CPU interpreter gets a nominal small SM count: fewer, larger programs keep test time
    # down, and the small tests still meet several block shapes.
    n_sm = _sm_count(device.index or 0) if device.type == "cuda" else 8
    block_d = min(triton.next_power_of_2(D), 256)
    while block_d > 64 and n_rows * triton.cdiv(D, block_d) < 4 * n_sm:
        block_d //= 2
    block_t = max(2, 4096 // block_d)
    return (n_rows, triton.cdiv(D, block_d)), block_t, block_d, 4


def masked_pool_fwd(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    out: torch.Tensor | None = None,
    mode: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Unchecked launcher of masked_pool (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees what masked_pool checks: padded hidden [B, L, D] with mask [B, L], or
    packed hidden [T, D] with mask [T] and cu_seqlens int32 [B+1] (0 ... T, non-decreasing) on
    the same device (CUDA, or CPU under TRITON_INTERPRET=1); hidden fp16/bf16/fp32 with a
    contiguous last dim; mask bool/int8/uint8, any strides; mode one of "mean",
    "weighted_mean", "last", "max". Writes fp32 out [B, D] (stride(1) == 1; allocated when None) and
    returns it.
    """
    if out is None:
        n_out = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else hidden.shape[0]
        out = torch.empty((n_out, hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
    n_rows, D = out.shape
    if n_rows == 0 or D == 0:
        return out
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; nonzero = True
    packed = cu_seqlens is not None
    grid, block_t, block_d, num_warps = _launch_config(n_rows, D, normalize, hidden.device)
    if packed:  # rows start at cu_seqlens[b]; no row strides
        seq_len, stride_hb, stride_mb = 0, 0, 0
        stride_ht, stride_mt = hidden.stride(0), mask.stride(0)
    else:
        seq_len = hidden.shape[1]
        stride_hb, stride_ht = hidden.stride(0), hidden.stride(1)
        stride_mb, stride_mt = mask.stride(0), mask.stride(1)
    _masked_pool_kernel[grid](
        hidden,
        mask,
        cu_seqlens if packed else mask,
        out,
        seq_len,
        D,
        stride_hb,
        stride_ht,
        stride_mb,
        stride_mt,
        out.stride(0),
        MODE=_MODES[mode],
        PACKED=packed,
        NORMALIZE=bool(normalize),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def masked_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Pool the masked tokens of each text into one float32 vector.

    Padded layout: hidden [B, L, D] with mask [B, L]. Packed layout: hidden [T, D] with mask [T]
    and cu_seqlens int32 [B+1] (text b is tokens cu_seqlens[b]:cu_seqlens[b+1]).
    hidden: fp16/bf16/fp32, last dim contiguous (other strides free). mask: bool/int8/uint8,
    nonzero = pool this token.
    mode: "mean" (mean of the masked tokens), "weighted_mean" (weights 1..n over the n masked
    tokens of a text in order, divided by their sum: llm2vec's weighted_mean), "last" (the last
    masked token), "max" (the element-wise max over the masked tokens: sentence-transformers'
    pooling_mode_max_tokens). A text with no masked token gives zeros. normalize=True
    L2-normalizes each vector (a zero vector stays zero). Accumulation in fp32.
    Returns a new float32 [B, D] tensor. Matches l2v_kernels.reference.masked_pool.
    """
    op = "masked_pool"
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be one of {sorted(_MODES)}, got {mode!r}")
    check_tensor(op, "hidden", hidden, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(op, "mask", mask, dtypes=_MASK_DTYPES)
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"{op}: without cu_seqlens hidden must be padded [B, L, D], got shape "
                f"{tuple(hidden.shape)} (pass cu_seqlens for packed [T, D] hidden states)"
            )
        B, L, D = hidden.shape
        check_tensor(op, "mask", mask, ndim=2, shape=(B, L))
    else:
        if hidden.dim() != 2:
            raise ValueError(
                f"{op}: with cu_seqlens hidden must be packed [T, D], got shape "
                f"{tuple(hidden.shape)}"
            )
        T, D = hidden.shape
        check_tensor(op, "mask", mask, ndim=1, shape=(T,))
        check_cu_seqlens(op, cu_seqlens, T, hidden.device)
        B = cu_seqlens.numel() - 1
    check_triton_device(op, hidden, mask, cu_seqlens)

    out = torch.empty((B, D), dtype=torch.float32, device=hidden.device)
    return masked_pool_fwd(hidden, mask, out, mode, cu_seqlens=cu_seqlens, normalize=normalize)
