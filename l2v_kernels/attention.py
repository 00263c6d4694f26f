"""Bidirectional (or causal) flash attention for packed varlen and padded batches, with optional
local (sliding-window) attention and attention-logit soft-capping.

Forward only, FlashAttention-2 style: one program owns a block of query rows of one sequence and
one kv head, keeps the softmax statistics in fp32 registers (online softmax with exp2, log2(e)
folded into the scale) and walks over the keys of its own sequence only.

- GQA packing: the query heads that share a kv head are processed together. A program's
  BLOCK_M rows are (token, head) pairs in token-major order, row r = token r // G, query head
  kv_head * G + r % G (G = Hq // Hkv), so every K/V tile is loaded once for the G heads, the
  rows of one token are adjacent in memory, and short sequences waste G times fewer rows in
  their last partial block than one-head-per-program would.
- The key loop is split into full blocks without any masking and one masked tail (the last
  partial block, plus the diagonal blocks when causal), so the inner loop stays cheap.
- Padded layout: keys are walked only over [first real key, last real key] of each row;
  padding inside that range (holes) is masked per key block; query blocks outside it just store
  zeros. Padded query rows give 0 and a row with no real key gives 0, never NaN.
- Local attention, window=(left, right): query i sees key j only when i - left <= j <= i + right.
  A program walks only the keys that some row of its block can see, [t_first - left,
  t_last + right], so a text of length T costs O(T * window); blocks that every row sees
  whole run unmasked, only the window's edge blocks are masked.
- Soft-capping (Gemma-2): s = (q . k) * scale becomes softcap * tanh(s / softcap) before the mask
  and the softmax. Both are constexpr-gated: the default path compiles exactly as before.
- Grid: 1-D, query blocks fastest (the programs that share K/V run together and hit L2), in
  reverse order so that with causal the heaviest (last) blocks of a sequence start first.
  Query blocks past a sequence's end exit at once.
- `flash_attn_varlen_fwd` / `flash_attn_padded_fwd` are the unchecked launchers for the model's
  hot loop: no host sync, no validation, no data-dependent allocation, so they can be captured in
  a CUDA graph (after one warm-up call, which compiles and autotunes).

Longer than ~500 lines on purpose: one op, one kernel, with its layouts (packed, padded), modes
(causal, window, soft-cap), tile lists per mode, launchers and checks; splitting it would split
the kernel from the configurations it was compiled and checked with (bench/aot_check.py).
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import triton
import triton.language as tl

from l2v_kernels._checks import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_tensor,
    check_triton_device,
    interpreting,
    sync_allowed,
)

SUPPORTED_HEAD_DIMS = (64, 128, 256)
_LOG2E = 1.4426950408889634
# A window side larger than any text is "unlimited"; clamped so t + right + 1 fits in int32.
_NO_WINDOW = 1 << 30


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, for sm90 (they also compile for sm80;
# a tile that does not fit there times as inf and is skipped). Every tile is spill-free on sm_90a
# under Triton 3.6 and 3.8 (ptxas reports from bench/aot_check.py, which the test suite runs):
# BLOCK_M=128 with 4 warps spills, so BLOCK_M=128 uses 8 warps; D=128 128x128 tiles spill 8-440 B
# (more with causal / padded) and D=256 128x64 spills 24 B, so neither is listed.
# _CUDA_TILES: the encoder's plain bidirectional varlen attention.
_CUDA_TILES = {
    64: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 8, 3), (64, 32, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
}
# Masked modes (causal, padded, window, softcap) keep more values live in the key loop: the tiles
# that stay spill-free there (D=128: 64x64/4 warps spills 4 B causal; D=256: 64x64 and 128x32
# spill 20-96 B with a window or softcap).
_CUDA_TILES_MASKED = {
    64: _CUDA_TILES[64],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3)],
    256: [(64, 32, 8, 2), (64, 16, 4, 2)],
}


# Autotuning size classes: the longest text (max_rows) and the launch's rows (batch * max_rows,
# an upper bound of the tokens) decide which tile wins, so each class is tuned on its own (the
# first call in a class tunes it). class = length class + 3 * rows class:
#   length  0: <= 128 tokens (queries)   1: <= 512 (passages)   2: longer
#   rows    0: < 2048 (batch-1/8 latency, tests)   1: >= 2048 (packed throughput batches)
LENGTH_CLASS_BOUNDS = (128, 512)
ROWS_CLASS_MIN = 2048


def size_class_of(batch: int, max_rows: int) -> int:
    """The autotuning size class of a launch over `batch` texts of at most `max_rows` tokens."""
    length = sum(max_rows > bound for bound in LENGTH_CLASS_BOUNDS)
    return length + 3 * int(batch * max_rows >= ROWS_CLASS_MIN)


def _configs() -> list[triton.Config]:
    if interpreting():
        # The interpreter would run every config when autotuning: one small fixed config.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = sorted({t for table in (_CUDA_TILES, _CUDA_TILES_MASKED)
                    for ts in table.values() for t in ts})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in tiles
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles listed for this head dim and mode; fp32 (a testing dtype) is not tuned:
    the first one."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    masked = any(arg(n) for n in ("CAUSAL", "PADDED", "WINDOW", "SOFTCAP"))
    tiles = (_CUDA_TILES_MASKED if masked else _CUDA_TILES).get(arg("HEAD_DIM"))
    if tiles is None:
        return configs
    kept = [
        c for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles
    ] or configs
    q = named_args.get("Q")
    return kept[:1] if getattr(q, "dtype", None) == torch.float32 else kept


# Tuning results are kept on disk where this Triton can (3.2+), so a new process does not
# benchmark every tile again on its first call.
_AUTOTUNE_EXTRA = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)


@triton.jit
def _attn_loop(
    acc, l_i, m_i, q,
    K, V, KM,
    stride_kt, stride_vt, stride_ml,
    n_start, n_stop, k_end, t_rows, qk_scale,
    offs_d, win_left, win_right, cap_scale, skip_at, skip_by,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr,
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks n_start, n_start+BLOCK_N, ...
    < n_stop. MASKED: the blocks may hold keys >= k_end (and, when causal, keys after a row's
    token; with WINDOW, keys outside a row's window). PADDED: keys whose padding-mask entry is
    False are skipped. SOFTCAP: qk becomes tanh(qk * cap_scale), qk_scale then holds
    softcap * log2(e). WINDOW and MASKED: blocks from skip_at on are moved by skip_by, so one loop
    walks both masked edges of the window (one loop body: fewer registers than two)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_v in range(n_start, n_stop, BLOCK_N):
        if WINDOW and MASKED:
            start_n = start_v + (start_v >= skip_at).to(tl.int32) * skip_by
        else:
            start_n = start_v
        offs_k = start_n + offs_n
        k_ptrs = K + offs_k[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_k[:, None] * stride_vt + offs_d[None, :]
        if PADDED:
            if MASKED:
                kval = tl.load(KM + offs_k * stride_ml, mask=offs_k < k_end, other=0) != 0
            else:
                kval = tl.load(KM + offs_k * stride_ml) != 0
        else:
            kval = offs_k < k_end
        if MASKED or PADDED:
            k = tl.load(k_ptrs, mask=kval[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SOFTCAP:
            # tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|): no overflow, no tanh needed
            # (core tl has none, the interpreter has no libdevice).
            z = qk * cap_scale
            e = tl.math.exp2(tl.abs(z) * (-2.0 * 1.4426950408889634))
            th = (1.0 - e) / (1.0 + e)
            qk = tl.where(z < 0.0, -th, th)
        if MASKED or PADDED:
            if CAUSAL and MASKED:
                allowed = kval[None, :] & (offs_k[None, :] <= t_rows[:, None])
            else:
                allowed = kval[None, :]
            if WINDOW and MASKED:
                allowed = allowed & (offs_k[None, :] >= t_rows[:, None] - win_left)
                allowed = allowed & (offs_k[None, :] <= t_rows[:, None] + win_right)
            qk = tl.where(allowed, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED or PADDED:
            v = tl.load(v_ptrs, mask=kval[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(),
    # GROUP too: models with different GQA group sizes may run in one process, and the tuning
    # results are kept on disk across processes. WINDOW / SOFTCAP: a windowed program walks a
    # few key blocks, not the whole text, so its best tile may differ.
    # size_class (see size_class_of): a 6-text test batch or a batch-1 query must not fix the
    # tile that packed 16k-token batches of passages run, nor the other way round.
    key=["HEAD_DIM", "GROUP", "CAUSAL", "PADDED", "WINDOW", "SOFTCAP", "size_class"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **_AUTOTUNE_EXTRA,
)
@triton.jit(do_not_specialize=["max_rows", "size_class"])
def _attn_fwd_kernel(
    Q, K, V, O,
    Cu, KLo, KHi, KM,
    qk_scale, cap_scale, win_left, win_right,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_mb, stride_ml,
    num_kv_heads, max_rows, size_class,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr,
    DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M (token, head) rows of one sequence and one kv head.

    Varlen (PADDED=False): sequence b is tokens Cu[b] ... Cu[b+1]-1, max_rows >= its length.
    Padded: sequence b is row b of length max_rows; keys are walked over [KLo[b], KHi[b]) and
    masked by KM[b, :] (nonzero = real token); padded query rows are stored as 0.
    WINDOW: row t sees keys t - win_left ... t + win_right only (positions in the text / padded
    row). SOFTCAP: scores are capped (see _attn_loop). size_class is not read: it is the
    autotuning key's size class (size_class_of).
    """
    n_m = tl.cdiv(max_rows * GROUP, BLOCK_M)
    pid = tl.program_id(0)
    m_blk = n_m - 1 - pid % n_m
    rest = pid // n_m
    hk = rest % num_kv_heads
    b = rest // num_kv_heads

    if PADDED:
        seqlen = max_rows
        k_lo = tl.load(KLo + b)
        k_hi = tl.load(KHi + b)
        b64 = b.to(tl.int64)
        q_base = Q + b64 * stride_qb
        k_base = K + b64 * stride_kb
        v_base = V + b64 * stride_vb
        o_base = O + b64 * stride_ob
        KM += b64 * stride_mb
    else:
        start = tl.load(Cu + b)
        seqlen = tl.load(Cu + b + 1) - start
        k_lo = 0
        k_hi = seqlen
        s64 = start.to(tl.int64)
        q_base = Q + s64 * stride_qt
        k_base = K + s64 * stride_kt
        v_base = V + s64 * stride_vt
        o_base = O + s64 * stride_ot

    start_m = m_blk * BLOCK_M
    t_first = start_m // GROUP
    t_last = (start_m + BLOCK_M - 1) // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    t_rows = offs_m // GROUP
    h_rows = hk * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = t_rows < seqlen
    # The [BLOCK_M, HEAD_DIM] output pointers are built only where they are stored: live across
    # the key loop they would cost registers (and spills) in every tile.

    if PADDED:
        if (t_first >= k_hi) | (t_last < k_lo):  # no real query in this block
            zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=O.dtype.element_ty)
            o_ptrs = (o_base + t_rows[:, None] * stride_ot + h_rows[:, None] * stride_oh
                      + offs_d[None, :])
            tl.store(o_ptrs, zero, mask=row_in[:, None])
            return
    else:
        if t_first >= seqlen:  # past this sequence's end
            return

    q_ptrs = q_base + t_rows[:, None] * stride_qt + h_rows[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
    k_base += hk * stride_kh
    v_base += hk * stride_vh

    # A finite start for the running max: a row that sees no key keeps l == 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys [k_start, k_end) are seen by some row of the block; keys [full_lo, full_hi) by every
    # row (those blocks need no causal / window mask).
    k_start = k_lo
    k_end = k_hi
    full_hi = k_hi
    if CAUSAL:
        k_end = tl.minimum(k_end, t_last + 1)  # no row of the block sees a key past t_last
        full_hi = tl.minimum(full_hi, t_first + 1)  # every row sees the keys up to t_first
    if WINDOW:
        k_start = tl.maximum(k_start, t_first - win_left)
        k_end = tl.minimum(k_end, t_last + win_right + 1)
        full_lo = tl.maximum(k_start, t_last - win_left)
        full_hi = tl.minimum(full_hi, t_first + win_right + 1)
        # Masked blocks from k_start up to the first key every row sees (pre_end), unmasked
        # blocks [pre_end, pre_end + skip), masked blocks from there to k_end: the two masked
        # edges run as one loop that jumps over the unmasked middle.
        pre_end = k_start + tl.cdiv(tl.maximum(full_lo - k_start, 0), BLOCK_N) * BLOCK_N
        skip = (tl.maximum(full_hi - pre_end, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            pre_end, pre_end + skip, k_end, t_rows, qk_scale, offs_d,
            win_left, win_right, cap_scale, 0, 0,
            BLOCK_N, CAUSAL, PADDED, False, DOT_PREC, WINDOW, SOFTCAP,
        )
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            k_start, k_end - skip, k_end, t_rows, qk_scale, offs_d,
            win_left, win_right, cap_scale, pre_end, skip,
            BLOCK_N, CAUSAL, PADDED, True, DOT_PREC, WINDOW, SOFTCAP,
        )
    else:
        n_full = tl.maximum(full_hi - k_start, 0) // BLOCK_N
        mid = k_start + n_full * BLOCK_N
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            k_start, mid, k_end, t_rows, qk_scale, offs_d, win_left, win_right, cap_scale, 0, 0,
            BLOCK_N, CAUSAL, PADDED, False, DOT_PREC, WINDOW, SOFTCAP,
        )
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            mid, k_end, k_end, t_rows, qk_scale, offs_d, win_left, win_right, cap_scale, 0, 0,
            BLOCK_N, CAUSAL, PADDED, True, DOT_PREC, WINDOW, SOFTCAP,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if PADDED:
        q_real = tl.load(KM + t_rows * stride_ml, mask=row_in, other=0) != 0
        out = tl.where(q_real[:, None], out, 0.0)
    o_ptrs = o_base + t_rows[:, None] * stride_ot + h_rows[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_in[:, None])


def _window_sides(window) -> tuple[int, int]:
    """(left, right) for the kernel; None (or a None side) = unlimited."""
    if window is None:
        return _NO_WINDOW, _NO_WINDOW
    left, right = window
    left = _NO_WINDOW if left is None else min(int(left), _NO_WINDOW)
    right = _NO_WINDOW if right is None else min(int(right), _NO_WINDOW)
    return left, right


def _launch(q, k, v, out, cu, k_lo, k_hi, kmask, *, padded, batch, max_rows, causal, scale,
            window, softcap):
    """Strides are passed as (batch, token, head); the head dim must have stride 1."""
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    group = hq // hkv

    def bth(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if padded else (0, t.stride(0), t.stride(1))

    def grid(meta):
        return (triton.cdiv(max_rows * group, meta["BLOCK_M"]) * hkv * batch,)

    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    if softcap is not None:  # exp2 argument: softcap * tanh(qk * scale / softcap) * log2(e)
        cap_scale, qk_scale = scale / float(softcap), float(softcap) * _LOG2E
    else:
        cap_scale, qk_scale = 1.0, scale * _LOG2E
    left, right = _window_sides(window)
    ms = (kmask.stride(0), kmask.stride(1)) if padded else (0, 0)
    _attn_fwd_kernel[grid](
        q, k, v, out,
        cu, k_lo, k_hi, kmask,
        qk_scale, cap_scale, left, right,
        *bth(q), *bth(k), *bth(v), *bth(out),
        *ms,
        hkv, max_rows, size_class_of(batch, max_rows),
        HEAD_DIM=d, GROUP=group, CAUSAL=bool(causal), PADDED=padded,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        WINDOW=(left, right) != (_NO_WINDOW, _NO_WINDOW), SOFTCAP=softcap is not None,
    )
    return out


def flash_attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unchecked launcher of flash_attn_varlen for the hot loop (no validation, no host sync, no
    allocation depending on data values: CUDA-graph capturable once compiled and tuned).

    The caller guarantees what flash_attn_varlen checks: q [T, Hq, D], k/v [T, Hkv, D] of one
    dtype (fp16/bf16/fp32), Hq % Hkv == 0, D in SUPPORTED_HEAD_DIMS, any token/head strides with
    stride(-1) == 1; cu_seqlens int32 [B+1] on q's device (0 ... T, non-decreasing); max_seqlen
    an int >= the longest sequence; softmax_scale > 0 or None (1/sqrt(D)); window None or
    (left, right) with ints >= 0 (or None = unlimited on that side); softcap None or > 0.
    Writes into `out` ([T, Hq, D], q's dtype, stride(-1) == 1; allocated when None), returns it.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = cu_seqlens.shape[0] - 1
    if q.shape[0] == 0 or batch <= 0 or max_seqlen <= 0:
        return out
    return _launch(
        q, k, v, out, cu_seqlens, cu_seqlens, cu_seqlens, cu_seqlens, padded=False,
        batch=batch, max_rows=int(max_seqlen), causal=causal, scale=softmax_scale,
        window=window, softcap=softcap,
    )


def flash_attn_padded_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unchecked launcher of flash_attn_padded (no validation, no host sync: the per-row key
    range is found on the device).

    The caller guarantees what flash_attn_padded checks: q [B, L, Hq, D], k/v [B, L, Hkv, D]
    (one dtype, Hq % Hkv == 0, D supported, stride(-1) == 1), key_padding_mask bool [B, L] on
    the same device; softmax_scale, window and softcap as flash_attn_varlen_fwd. Writes into
    `out` ([B, L, Hq, D], q's dtype, stride(-1) == 1; allocated when None), returns it.
    """
    B, L = q.shape[0], q.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    pos = torch.arange(L, dtype=torch.int32, device=q.device)
    k_lo = torch.where(key_padding_mask, pos, L).amin(1).to(torch.int32)  # L if no real key
    k_hi = torch.where(key_padding_mask, pos + 1, 0).amax(1).to(torch.int32)  # 0 if none
    return _launch(
        q, k, v, out, k_lo, k_lo, k_hi, key_padding_mask.view(torch.uint8), padded=True,
        batch=B, max_rows=L, causal=causal, scale=softmax_scale, window=window, softcap=softcap,
    )


def _check_qkv(op: str, q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=ndim, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_triton_device(op, q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{op}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in every dim but the "
            f"head count ({layout})"
        )
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the query head count ({hq}) must be a multiple of the kv head count ({hkv})"
        )
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim {d} is not supported, expected one of "
                         f"{SUPPORTED_HEAD_DIMS}")


def _check_scale(op: str, softmax_scale) -> None:
    if softmax_scale is not None and not (
        isinstance(softmax_scale, numbers.Real) and math.isfinite(softmax_scale)
        and softmax_scale > 0
    ):
        raise ValueError(f"{op}: softmax_scale must be a positive finite number or None, "
                         f"got {softmax_scale!r}")


def _check_window_softcap(op: str, window, softcap) -> None:
    if window is not None:
        ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
            side is None
            or (isinstance(side, numbers.Integral) and not isinstance(side, bool) and side >= 0)
            for side in window
        )
        if not ok:
            raise ValueError(
                f"{op}: window must be None or (left, right) with ints >= 0 (None on a side = "
                f"unlimited), got {window!r}; e.g. Gemma-3 made bidirectional with config.json "
                "sliding_window W is (W // 2, W // 2)"
            )
    if softcap is not None and not (
        isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
        and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"{op}: softcap must be None or a positive finite number, got "
                         f"{softcap!r}")


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Packed attention: q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0; D in 64/128/256;
    fp16/bf16, fp32 for testing; any token/head strides with a contiguous last dim, e.g. column
    slices of a fused QKV output), cu_seqlens int32 [B+1] (0 ... T), max_seqlen >= the longest
    sequence. Each token attends to every token of its own sequence (causal: only to earlier
    ones and itself). Returns [T, Hq, D] in q's dtype; softmax_scale (> 0) defaults to
    1/sqrt(D). T = 0 returns an empty tensor.

    window=(left, right): local attention, query i of a text attends to key j of the same text
    only when i - left <= j <= i + right (ints >= 0; None on a side = unlimited; combined with
    causal when causal=True). Key blocks outside every row's window are skipped, so a text of
    length T costs O(T * (left + right)). Gemma-3 made bidirectional (transformers'
    use_bidirectional_attention=True, as EmbeddingGemma) masks |i - j| < config.sliding_window
    after Gemma3Config has replaced config.json's W by W // 2 + 1: window=(W // 2, W // 2)
    (EmbeddingGemma, W = 512: (256, 256)). Causal sliding windows (Gemma-2, causal Gemma-3,
    Mistral) see i - W < j <= i: window=(W - 1, 0) with causal=True.
    softcap (> 0, Gemma-2): scores s = (q . k) * softmax_scale become softcap * tanh(s / softcap)
    before the mask and the softmax (transformers' Gemma2 order).
    Same definition as l2v_kernels.reference.attention_varlen."""
    op = "flash_attn_varlen"
    _check_qkv(op, q, k, v, 3, "[T, H, D]")
    check_cu_seqlens(op, cu_seqlens, q.shape[0], q.device)
    _check_scale(op, softmax_scale)
    _check_window_softcap(op, window, softcap)
    integral = isinstance(max_seqlen, numbers.Integral) and not isinstance(max_seqlen, bool)
    if not integral or max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if q.shape[0] == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if sync_allowed():
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(
                f"{op}: max_seqlen={max_seqlen} is less than the longest sequence ({longest})"
            )
    return flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                 window=window, softcap=softcap)


def flash_attn_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Padded attention: q [B, L, Hq, D], k/v [B, L, Hkv, D], key_padding_mask bool [B, L]
    (True = real token; any pattern: left/right padding, holes). Padded keys are ignored,
    outputs at padded query positions are 0, a row with no real key gives 0. Causal and window
    (as flash_attn_varlen) are by position in the padded row; softcap as flash_attn_varlen.
    Returns [B, L, Hq, D] in q's dtype; softmax_scale (> 0) defaults to 1/sqrt(D). Same
    definition as l2v_kernels.reference.attention_padded."""
    op = "flash_attn_padded"
    _check_qkv(op, q, k, v, 4, "[B, L, H, D]")
    check_tensor(op, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,),
                 shape=tuple(q.shape[:2]))
    check_triton_device(op, q, key_padding_mask)
    _check_scale(op, softmax_scale)
    _check_window_softcap(op, window, softcap)
    return flash_attn_padded_fwd(q, k, v, key_padding_mask, causal, softmax_scale,
                                 window=window, softcap=softcap)
