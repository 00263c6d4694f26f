"""Bidirectional (or causal) flash attention for packed varlen and padded batches, with optional
local (sliding-window) attention and attention-logit soft-capping; for packed batches also the
backward (training), with attention dropout.

Forward, FlashAttention-2 style: one program owns a block of query rows of one sequence and
one kv head, keeps the softmax statistics in fp32 registers (online softmax with exp2, log2(e)
folded into the scale) and walks over the keys of its own sequence only. Backward: see
"Backward" below (a dq pass and a dk/dv pass from the forward's saved log-sum-exp);
FlashAttnVarlen is the autograd Function, flash_attn_varlen is differentiable.

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
  a CUDA graph (after one warm-up call, which compiles and autotunes). Training adds the
  forward's `lse` output and dropout (constexpr-gated: the inference kernel is unchanged) and
  the unchecked backward `flash_attn_varlen_bwd`.

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

# Training's forward with dropout (Philox draws in the key loop): the tiles that stay spill-free
# (D=256: 64x64 spills 32 B, 64x16/4 warps 24 B with softcap; D=128: 64x64/4 warps is at 242
# registers without a mask, so the masked modes' list).
_CUDA_TILES_DROPOUT = {
    64: _CUDA_TILES[64],
    128: _CUDA_TILES_MASKED[128],
    256: [(64, 32, 8, 2)],
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
    tiles = sorted({t for table in (_CUDA_TILES, _CUDA_TILES_MASKED, _CUDA_TILES_DROPOUT)
                    for ts in table.values() for t in ts})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in tiles
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles listed for this head dim and mode (dropout: _CUDA_TILES_DROPOUT); fp32 (a
    testing dtype) is not tuned: the first one."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    masked = any(arg(n) for n in ("CAUSAL", "PADDED", "WINDOW", "SOFTCAP"))
    table = _CUDA_TILES_MASKED if masked else _CUDA_TILES
    if arg("DROPOUT"):
        table = _CUDA_TILES_DROPOUT
    tiles = table.get(arg("HEAD_DIM"))
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
def _tanh(z):
    """tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|): no overflow, no tanh needed (core tl
    has none, the interpreter has no libdevice)."""
    e = tl.math.exp2(tl.abs(z) * (-2.0 * 1.4426950408889634))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -th, th)


@triton.jit
def _dropout_keep(seed, row_ids, key_pos, dropout_p):
    """Attention dropout's keep mask, a pure function of (seed, row, key): Philox with the key's
    position in its text as the low and the row's global id (token * Hq + head, int64) as the
    high counter word, kept when the uniform draw is >= dropout_p. The forward and both backward
    kernels call it on the same (row, key) pairs, so they see the same mask."""
    offsets = row_ids * 4294967296 + key_pos
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _rule_mask(allowed, q_pos, k_pos, win_left, win_right, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):  # fmt: skip
    """allowed, narrowed to the (query, key) pairs the attention rule keeps: k <= q when causal,
    q - win_left <= k <= q + win_right with a window (q_pos, k_pos: broadcastable positions)."""
    if CAUSAL:
        allowed = allowed & (k_pos <= q_pos)
    if WINDOW:
        allowed = allowed & (k_pos >= q_pos - win_left) & (k_pos <= q_pos + win_right)
    return allowed


@triton.jit
def _key_walk(k_lo, k_hi, t_first, t_last, win_left, win_right, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """The keys the query rows t_first..t_last of a block walk, among keys [k_lo, k_hi):
    (k_start, k_end, full_start, n_full). Some row sees each key of [k_start, k_end); every row
    sees each key of the BLOCK_N-aligned run [full_start, full_start + n_full), whose blocks need
    no causal / window mask. Without a window full_start is k_start (the masked blocks follow
    the run); with one, masked blocks lie on both sides of it."""
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
        full_start = k_start + tl.cdiv(tl.maximum(full_lo - k_start, 0), BLOCK_N) * BLOCK_N
    else:
        full_start = k_start
    n_full = (tl.maximum(full_hi - full_start, 0) // BLOCK_N) * BLOCK_N
    return k_start, k_end, full_start, n_full


@triton.jit
def _attn_loop(
    acc, l_i, m_i, q,
    K, V, KM,
    stride_kt, stride_vt, stride_ml,
    n_start, n_stop, k_end, t_rows, qk_scale,
    offs_d, win_left, win_right, cap_scale, skip_at, skip_by, row_ids, dropout_p, dropout_seed,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr,
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks n_start, n_start+BLOCK_N, ...
    < n_stop. MASKED: the blocks may hold keys >= k_end (and, when causal, keys after a row's
    token; with WINDOW, keys outside a row's window). PADDED: keys whose padding-mask entry is
    False are skipped. SOFTCAP: qk becomes tanh(qk * cap_scale), qk_scale then holds
    softcap * log2(e). WINDOW and MASKED: blocks from skip_at on are moved by skip_by, so one loop
    walks both masked edges of the window (one loop body: fewer registers than two).
    DROPOUT: the probabilities that reach P @ V are dropped (_dropout_keep of the row's global id
    row_ids and the key's position); l_i sums them undropped, the caller rescales by
    1 / (1 - dropout_p)."""
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
            qk = _tanh(qk * cap_scale)
        if MASKED or PADDED:
            allowed = kval[None, :]
            if MASKED:
                allowed = _rule_mask(allowed, t_rows[:, None], offs_k[None, :], win_left,
                                     win_right, CAUSAL, WINDOW)  # fmt: skip
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
        if DROPOUT:
            keep = _dropout_keep(dropout_seed, row_ids[:, None], offs_k[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
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
    key=["HEAD_DIM", "GROUP", "CAUSAL", "PADDED", "WINDOW", "SOFTCAP", "STORE_LSE", "DROPOUT",
         "size_class"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **_AUTOTUNE_EXTRA,
)
@triton.jit(do_not_specialize=["max_rows", "size_class", "dropout_seed"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    Cu, KLo, KHi, KM,
    qk_scale, cap_scale, win_left, win_right, dropout_p, dropout_seed,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_mb, stride_ml,
    num_kv_heads, max_rows, size_class,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr,
    DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M (token, head) rows of one sequence and one kv head.

    Varlen (PADDED=False): sequence b is tokens Cu[b] ... Cu[b+1]-1, max_rows >= its length.
    Padded: sequence b is row b of length max_rows; keys are walked over [KLo[b], KHi[b]) and
    masked by KM[b, :] (nonzero = real token); padded query rows are stored as 0.
    WINDOW: row t sees keys t - win_left ... t + win_right only (positions in the text / padded
    row). SOFTCAP: scores are capped (see _attn_loop). size_class is not read: it is the
    autotuning key's size class (size_class_of).
    Varlen only (training): STORE_LSE writes each row's natural-log log-sum-exp of its scores to
    LSE (fp32 [T, Hq], contiguous; +inf for a row that sees no key); DROPOUT drops attention
    probabilities with probability dropout_p (_dropout_keep, seeded by dropout_seed).
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
    if DROPOUT:  # each row's global id: token * Hq + head (_dropout_keep's counter)
        row_ids = (s64 + t_rows) * (num_kv_heads * GROUP) + h_rows
    else:
        row_ids = t_rows

    # First the unmasked run of key blocks every row sees, then the masked ones (_key_walk).
    k_start, k_end, full_start, n_full = _key_walk(k_lo, k_hi, t_first, t_last, win_left,
                                                   win_right, BLOCK_N, CAUSAL, WINDOW)  # fmt: skip
    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
        full_start, full_start + n_full, k_end, t_rows, qk_scale, offs_d,
        win_left, win_right, cap_scale, 0, 0, row_ids, dropout_p, dropout_seed,
        BLOCK_N, CAUSAL, PADDED, False, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
    )
    if WINDOW:  # the masked edges on both sides of the run: one loop that jumps over it
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            k_start, k_end - n_full, k_end, t_rows, qk_scale, offs_d,
            win_left, win_right, cap_scale, full_start, n_full, row_ids, dropout_p, dropout_seed,
            BLOCK_N, CAUSAL, PADDED, True, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
        )
    else:
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, k_base, v_base, KM, stride_kt, stride_vt, stride_ml,
            full_start + n_full, k_end, k_end, t_rows, qk_scale, offs_d,
            win_left, win_right, cap_scale, 0, 0, row_ids, dropout_p, dropout_seed,
            BLOCK_N, CAUSAL, PADDED, True, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if STORE_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
        tl.store(LSE + (s64 + t_rows) * (num_kv_heads * GROUP) + h_rows, lse, mask=row_in)
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


def _scales(d: int, scale, softcap) -> tuple[float, float, float]:
    """(softmax scale, cap_scale, qk_scale): the kernels' exp2 argument is s * qk_scale, s the
    raw score q . k, or tanh(q . k * cap_scale) with softcap (softcap * tanh(qk * scale / softcap)
    * log2(e))."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    if softcap is not None:
        return scale, scale / float(softcap), float(softcap) * _LOG2E
    return scale, 1.0, scale * _LOG2E


def _launch(q, k, v, out, cu, k_lo, k_hi, kmask, *, padded, batch, max_rows, causal, scale,
            window, softcap, lse=None, dropout_p=0.0, dropout_seed=0):
    """Strides are passed as (batch, token, head); the head dim must have stride 1. lse and
    dropout: varlen only."""
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    group = hq // hkv

    def bth(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if padded else (0, t.stride(0), t.stride(1))

    def grid(meta):
        return (triton.cdiv(max_rows * group, meta["BLOCK_M"]) * hkv * batch,)

    _, cap_scale, qk_scale = _scales(d, scale, softcap)
    left, right = _window_sides(window)
    ms = (kmask.stride(0), kmask.stride(1)) if padded else (0, 0)
    dropout = dropout_p > 0.0
    _attn_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else out,
        cu, k_lo, k_hi, kmask,
        qk_scale, cap_scale, left, right, float(dropout_p), int(dropout_seed) if dropout else 0,
        *bth(q), *bth(k), *bth(v), *bth(out),
        *ms,
        hkv, max_rows, size_class_of(batch, max_rows),
        HEAD_DIM=d, GROUP=group, CAUSAL=bool(causal), PADDED=padded,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        WINDOW=(left, right) != (_NO_WINDOW, _NO_WINDOW), SOFTCAP=softcap is not None,
        STORE_LSE=lse is not None, DROPOUT=dropout,
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
    lse: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    """Unchecked launcher of flash_attn_varlen for the hot loop (no validation, no host sync, no
    allocation depending on data values: CUDA-graph capturable once compiled and tuned).

    The caller guarantees what flash_attn_varlen checks: q [T, Hq, D], k/v [T, Hkv, D] of one
    dtype (fp16/bf16/fp32), Hq % Hkv == 0, D in SUPPORTED_HEAD_DIMS, any token/head strides with
    stride(-1) == 1; cu_seqlens int32 [B+1] on q's device (0 ... T, non-decreasing); max_seqlen
    an int >= the longest sequence; softmax_scale > 0 or None (1/sqrt(D)); window None or
    (left, right) with ints >= 0 (or None = unlimited on that side); softcap None or > 0.
    Writes into `out` ([T, Hq, D], q's dtype, stride(-1) == 1; allocated when None), returns it.

    For training (flash_attn_varlen_bwd): `lse`, a contiguous fp32 [T, Hq] tensor, receives each
    row's log-sum-exp (natural log) of its (scaled, capped) scores over the keys it sees;
    dropout_p in [0, 1) drops attention probabilities (before P @ V, survivors scaled by
    1 / (1 - dropout_p)) by a mask that is a pure function of (dropout_seed, token, head, key),
    dropout_seed an int in [0, 2**31). With lse=None and dropout_p=0 the kernel is the
    inference one, unchanged.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = cu_seqlens.shape[0] - 1
    if q.shape[0] == 0 or batch <= 0 or max_seqlen <= 0:
        return out
    return _launch(
        q, k, v, out, cu_seqlens, cu_seqlens, cu_seqlens, cu_seqlens, padded=False,
        batch=batch, max_rows=int(max_seqlen), causal=causal, scale=softmax_scale,
        window=window, softcap=softcap, lse=lse, dropout_p=dropout_p, dropout_seed=dropout_seed,
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


# ------------------------------------------------------------------------------------------
# Backward (training): dq, dk, dv of packed attention
# ------------------------------------------------------------------------------------------
# FlashAttention-2's algorithm with a deterministic split and no atomics:
# 1. _attn_bwd_dq_kernel, one program per block of query rows (the forward's layout and key
#    walk): first delta = rowsum(dO * O) of its rows (stored for pass 2: FA2's "preprocess",
#    folded into this pass, which reads dO anyway), then P from the saved log-sum-exp,
#    dS = P * (dO V^T - delta), dQ = scale * dS K, written once.
# 2. _attn_bwd_dkdv_kernel, one program per block of keys of one kv head: walks the query rows
#    that see its keys, over all query heads of its GQA group (so dK / dV sum the group),
#    dV += P^T dO, dK += scale * dS^T Q, written once.
# P and dS are recomputed in both passes (7 GEMMs per tile pair instead of 5 with an fp32
# atomic dQ); in exchange nothing is accumulated in memory, the result is deterministic (bit
# for bit run to run) and both kernels can be autotuned (re-running them changes nothing).
# Soft-capping: dS is multiplied by d cap / d s = 1 - tanh^2. Dropout: the same keep mask as
# the forward (_dropout_keep), applied to P in dV and to dO V^T in dS.

# (BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) per head dim, spill-free on sm_90a in
# bf16 and fp16 under Triton 3.8 (bench/aot_check.py compiles every one in every mode).
# The dq kernel keeps q, dO and the fp32 dq accumulator live across its key loop: at D = 256
# every tile of 64 rows or more spills (150-800 B), so it runs 16-32 rows (32 x 32 / 8 warps
# spills 28 B with softcap). dk/dv keep k, v and two fp32 accumulators: D = 256 takes 32 keys
# (64 keys spill 1-2 KB); with dropout (Philox keeps more live) D = 128 needs 32-row tiles
# (64 x 64 spills 24 B) and D = 256 8 warps (4 spill 32-40 B).
_BWD_DQ_TILES = {
    64: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
    128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
    256: [(32, 64, 8, 1), (16, 64, 4, 1)],
}
_BWD_DKDV_TILES = {
    64: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)],
    128: [(32, 128, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2)],
    256: [(32, 32, 8, 1), (32, 32, 4, 1)],
}
_BWD_DKDV_TILES_DROPOUT = {128: [(32, 128, 8, 2), (32, 64, 8, 2)], 256: [(32, 32, 8, 1)]}


def _bwd_configs(*tables) -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = sorted({t for table in tables for ts in table.values() for t in ts})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in tiles
    ]


def _bwd_pruner(table, dropout_table=None):
    """Keep the tiles listed for this head dim (with dropout: dropout_table's, where it has
    the head dim); fp32 (a testing dtype): the first one."""
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        tiles = table.get(head_dim)
        if kwargs.get("DROPOUT", named_args.get("DROPOUT")) and dropout_table:
            tiles = dropout_table.get(head_dim, tiles)
        if tiles is None:
            return configs
        kept = [
            c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles
        ] or configs
        q = named_args.get("Q")
        return kept[:1] if getattr(q, "dtype", None) == torch.float32 else kept

    return prune


_BWD_KEY = ["HEAD_DIM", "GROUP", "CAUSAL", "WINDOW", "SOFTCAP", "DROPOUT", "size_class"]


@triton.jit
def _attn_bwd_dq_loop(
    dq, q, do, lse2, delta, K, V,
    stride_kt, stride_vt,
    n_start, n_stop, k_end, t_rows, row_ids, qk_scale, cap_scale,
    offs_d, win_left, win_right, skip_at, skip_by, dropout_p, dropout_seed,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dq += dS K over key blocks n_start, n_start + BLOCK_N, ... < n_stop (unscaled: the caller
    multiplies by the softmax scale). Blocks, MASKED and the WINDOW jump as in _attn_loop."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_v in range(n_start, n_stop, BLOCK_N):
        if WINDOW and MASKED:
            start_n = start_v + (start_v >= skip_at).to(tl.int32) * skip_by
        else:
            start_n = start_v
        offs_k = start_n + offs_n
        k_ptrs = K + offs_k[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_k[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            kval = offs_k < k_end
            k = tl.load(k_ptrs, mask=kval[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kval[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SOFTCAP:
            s = _tanh(s * cap_scale)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            allowed = _rule_mask(kval[None, :], t_rows[:, None], offs_k[None, :], win_left,
                                 win_right, CAUSAL, WINDOW)  # fmt: skip
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            keep = _dropout_keep(dropout_seed, row_ids[:, None], offs_k[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - s * s)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(
    configs=_bwd_configs(_BWD_DQ_TILES),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _bwd_pruner(_BWD_DQ_TILES)},
    **_AUTOTUNE_EXTRA,
)
@triton.jit(do_not_specialize=["max_rows", "size_class", "dropout_seed"])
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, Cu,
    qk_scale, cap_scale, softmax_scale, win_left, win_right, dropout_p, dropout_seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    num_kv_heads, max_rows, size_class,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M (token, head) rows of one sequence and one kv head, laid out and
    walking the keys as _attn_fwd_kernel (varlen). Writes DELTA (fp32 [T, Hq]) and DQ."""
    n_m = tl.cdiv(max_rows * GROUP, BLOCK_M)
    pid = tl.program_id(0)
    m_blk = n_m - 1 - pid % n_m
    rest = pid // n_m
    hk = rest % num_kv_heads
    b = rest // num_kv_heads
    start = tl.load(Cu + b)
    seqlen = tl.load(Cu + b + 1) - start
    start_m = m_blk * BLOCK_M
    t_first = start_m // GROUP
    if t_first >= seqlen:  # past this sequence's end
        return
    t_last = (start_m + BLOCK_M - 1) // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    t_rows = offs_m // GROUP
    h_rows = hk * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = t_rows < seqlen
    s64 = start.to(tl.int64)
    row_ids = (s64 + t_rows) * (num_kv_heads * GROUP) + h_rows  # index in LSE / DELTA [T, Hq]

    rows_t, rows_h = (s64 + t_rows)[:, None], h_rows[:, None]
    o = tl.load(O + rows_t * stride_ot + rows_h * stride_oh + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    do = tl.load(DO + rows_t * stride_dot + rows_h * stride_doh + offs_d[None, :],
                 mask=row_in[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_ids, delta, mask=row_in)
    lse2 = tl.load(LSE + row_ids, mask=row_in, other=0.0) * 1.4426950408889634
    q = tl.load(Q + rows_t * stride_qt + rows_h * stride_qh + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    k_base = K + s64 * stride_kt + hk * stride_kh
    v_base = V + s64 * stride_vt + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The forward's key walk (_key_walk): the unmasked run first, then the masked blocks.
    k_start, k_end, full_start, n_full = _key_walk(0, seqlen, t_first, t_last, win_left,
                                                   win_right, BLOCK_N, CAUSAL, WINDOW)  # fmt: skip
    dq = _attn_bwd_dq_loop(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
        full_start, full_start + n_full, k_end, t_rows, row_ids, qk_scale, cap_scale,
        offs_d, win_left, win_right, 0, 0, dropout_p, dropout_seed,
        BLOCK_N, CAUSAL, False, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
    )
    if WINDOW:
        dq = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
            k_start, k_end - n_full, k_end, t_rows, row_ids, qk_scale, cap_scale,
            offs_d, win_left, win_right, full_start, n_full, dropout_p, dropout_seed,
            BLOCK_N, CAUSAL, True, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
        )
    else:
        dq = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
            full_start + n_full, k_end, k_end, t_rows, row_ids, qk_scale, cap_scale,
            offs_d, win_left, win_right, 0, 0, dropout_p, dropout_seed,
            BLOCK_N, CAUSAL, True, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
        )
    dq = dq * softmax_scale
    tl.store(DQ + rows_t * stride_dqt + rows_h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_in[:, None])


@triton.jit
def _attn_bwd_dkdv_loop(
    dk, dv, k, v, Q, DO, LSE, DELTA,
    stride_qt, stride_qh, stride_dot, stride_doh,
    r_start, r_stop, seqlen, offs_k, kval, hk, row_base, num_q_heads, qk_scale, cap_scale,
    offs_d, win_left, win_right, skip_at, skip_by, dropout_p, dropout_seed,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    JUMP: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dv += P^T dO, dk += dS^T Q (unscaled) over blocks of (token, head) rows r_start,
    r_start + BLOCK_M, ... < r_stop of one sequence (row r = token r // GROUP, query head
    hk * GROUP + r % GROUP), for the keys offs_k. MASKED: rows past the sequence's end, keys
    past it (kval False) and pairs outside the causal / window mask give P = 0. JUMP: blocks
    from skip_at on are moved by skip_by (both masked edges in one loop)."""
    offs_r = tl.arange(0, BLOCK_M)
    for start_v in range(r_start, r_stop, BLOCK_M):
        if JUMP:
            start_r = start_v + (start_v >= skip_at).to(tl.int32) * skip_by
        else:
            start_r = start_v
        rows = start_r + offs_r
        t_rows = rows // GROUP
        h_rows = hk * GROUP + rows % GROUP
        row_ids = row_base + t_rows * num_q_heads + h_rows  # global: index in LSE / DELTA
        q_ptrs = Q + t_rows[:, None] * stride_qt + h_rows[:, None] * stride_qh + offs_d[None, :]
        do_ptrs = (DO + t_rows[:, None] * stride_dot + h_rows[:, None] * stride_doh
                   + offs_d[None, :])
        if MASKED:
            row_in = t_rows < seqlen
            q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_in[:, None], other=0.0)
            lse2 = tl.load(LSE + row_ids, mask=row_in, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_ids, mask=row_in, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(LSE + row_ids) * 1.4426950408889634
            delta = tl.load(DELTA + row_ids)
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]: S^T
        if SOFTCAP:
            s = _tanh(s * cap_scale)
        p = tl.math.exp2(s * qk_scale - lse2[None, :])
        if MASKED:
            allowed = _rule_mask(kval[:, None] & row_in[None, :], t_rows[None, :],
                                 offs_k[:, None], win_left, win_right, CAUSAL, WINDOW)  # fmt: skip
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dP^T
        if DROPOUT:
            keep = _dropout_keep(dropout_seed, row_ids[None, :], offs_k[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep, p * inv_keep, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PREC)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - s * s)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(
    configs=_bwd_configs(_BWD_DKDV_TILES, _BWD_DKDV_TILES_DROPOUT),
    key=_BWD_KEY,
    prune_configs_by={
        "early_config_prune": _bwd_pruner(_BWD_DKDV_TILES, _BWD_DKDV_TILES_DROPOUT)
    },
    **_AUTOTUNE_EXTRA,
)
@triton.jit(do_not_specialize=["max_rows", "size_class", "dropout_seed"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, Cu,
    qk_scale, cap_scale, softmax_scale, win_left, win_right, dropout_p, dropout_seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_kv_heads, max_rows, size_class,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_N keys of one sequence and one kv head: dK and dV of those keys, over
    every query row (of the GROUP query heads sharing the kv head) that sees one of them. Reads
    LSE and DELTA (fp32 [T, Hq], written by the forward and by _attn_bwd_dq_kernel)."""
    n_n = tl.cdiv(max_rows, BLOCK_N)
    pid = tl.program_id(0)
    n_blk = pid % n_n
    rest = pid // n_n
    hk = rest % num_kv_heads
    b = rest // num_kv_heads
    start = tl.load(Cu + b)
    seqlen = tl.load(Cu + b + 1) - start
    start_n = n_blk * BLOCK_N
    if start_n >= seqlen:  # past this sequence's end
        return
    s64 = start.to(tl.int64)
    num_q_heads = num_kv_heads * GROUP
    offs_k = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kval = offs_k < seqlen
    k_rows = (s64 + offs_k)[:, None]
    k = tl.load(K + k_rows * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=kval[:, None], other=0.0)
    v = tl.load(V + k_rows * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=kval[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query tokens [q_lo, q_hi) see some key of the block; [full_lo, full_hi) see all of them
    # (a partial last key block: none does, every row block is masked).
    key_last = start_n + BLOCK_N - 1
    q_lo = 0
    q_hi = seqlen
    full_lo = 0
    full_hi = seqlen
    if CAUSAL:
        q_lo = start_n
        full_lo = key_last
    if WINDOW:
        q_lo = tl.maximum(q_lo, start_n - win_right)
        q_hi = tl.minimum(q_hi, key_last + win_left + 1)
        full_lo = tl.maximum(full_lo, key_last - win_right)
        full_hi = tl.minimum(full_hi, start_n + win_left + 1)
    full_hi = tl.where(key_last < seqlen, full_hi, 0)
    # In rows: masked blocks from r_start up to the first full row block (pre_end), unmasked
    # blocks [pre_end, pre_end + skip), masked blocks from there to r_end.
    r_start = q_lo * GROUP
    r_end = q_hi * GROUP
    pre_end = r_start + tl.cdiv(tl.maximum(full_lo * GROUP - r_start, 0), BLOCK_M) * BLOCK_M
    skip = (tl.maximum(full_hi * GROUP - pre_end, 0) // BLOCK_M) * BLOCK_M
    q_base = Q + s64 * stride_qt
    do_base = DO + s64 * stride_dot
    row_base = s64 * num_q_heads
    dk, dv = _attn_bwd_dkdv_loop(
        dk, dv, k, v, q_base, do_base, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh,
        pre_end, pre_end + skip, seqlen, offs_k, kval, hk, row_base, num_q_heads,
        qk_scale, cap_scale, offs_d, win_left, win_right, 0, 0, dropout_p, dropout_seed,
        GROUP, BLOCK_M, CAUSAL, False, False, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
    )
    dk, dv = _attn_bwd_dkdv_loop(
        dk, dv, k, v, q_base, do_base, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh,
        r_start, r_end - skip, seqlen, offs_k, kval, hk, row_base, num_q_heads,
        qk_scale, cap_scale, offs_d, win_left, win_right, pre_end, skip, dropout_p, dropout_seed,
        GROUP, BLOCK_M, CAUSAL, True, True, DOT_PREC, WINDOW, SOFTCAP, DROPOUT,
    )
    dk = dk * softmax_scale
    tl.store(DK + k_rows * stride_dkt + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kval[:, None])
    tl.store(DV + k_rows * stride_dvt + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kval[:, None])


def flash_attn_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unchecked backward of flash_attn_varlen: (dq, dk, dv) from dout = dL/d(out).

    The caller guarantees: q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window,
    softcap, dropout_p and dropout_seed exactly as given to flash_attn_varlen_fwd, whose result
    is `out` and whose `lse` output is `lse` (fp32 [T, Hq], contiguous); dout [T, Hq, D] in q's
    dtype with stride(-1) == 1 (any token/head strides). dq [T, Hq, D], dk/dv [T, Hkv, D] (q's
    dtype, stride(-1) == 1) are written when given, else allocated (contiguous); each element is
    written exactly once (dk/dv sum the GQA group's query heads). Two launches (dq with
    delta = rowsum(dO * O), then dk/dv); no host sync, deterministic.
    """
    if dq is None:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if dk is None:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if dv is None:
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    batch = cu_seqlens.shape[0] - 1
    if q.shape[0] == 0 or batch <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    max_rows = int(max_seqlen)
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    group = hq // hkv
    scale, cap_scale, qk_scale = _scales(d, softmax_scale, softcap)
    left, right = _window_sides(window)
    dropout = dropout_p > 0.0
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    common = dict(
        HEAD_DIM=d, GROUP=group, CAUSAL=bool(causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        WINDOW=(left, right) != (_NO_WINDOW, _NO_WINDOW), SOFTCAP=softcap is not None,
        DROPOUT=dropout,
    )
    scalars = (qk_scale, cap_scale, scale, left, right, float(dropout_p),
               int(dropout_seed) if dropout else 0)
    size_class = size_class_of(batch, max_rows)

    def ts(t):
        return t.stride(0), t.stride(1)

    def grid_dq(meta):
        return (triton.cdiv(max_rows * group, meta["BLOCK_M"]) * hkv * batch,)

    _attn_bwd_dq_kernel[grid_dq](
        q, k, v, out, dout, dq, lse, delta, cu_seqlens, *scalars,
        *ts(q), *ts(k), *ts(v), *ts(out), *ts(dout), *ts(dq),
        hkv, max_rows, size_class, **common,
    )

    def grid_kv(meta):
        return (triton.cdiv(max_rows, meta["BLOCK_N"]) * hkv * batch,)

    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, *scalars,
        *ts(q), *ts(k), *ts(v), *ts(dout), *ts(dk), *ts(dv),
        hkv, max_rows, size_class, **common,
    )
    return dq, dk, dv


class FlashAttnVarlen(torch.autograd.Function):
    """flash_attn_varlen as an autograd Function, unchecked (the training hot loop calls it
    directly; flash_attn_varlen checks and calls it when a gradient is needed):

        out = FlashAttnVarlen.apply(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                    window, softcap, dropout_p, dropout_seed)

    Arguments as flash_attn_varlen_fwd (dropout_seed: an int in [0, 2**31), used when
    dropout_p > 0). The forward also writes the log-sum-exp (fp32 [T, Hq]) and saves q, k, v,
    out and it; the backward is flash_attn_varlen_bwd. Gradients flow to q, k and v (any of them
    may be a view of one fused QKV buffer); cu_seqlens and the settings get none. Works under
    torch.utils.checkpoint: the recomputed forward, given the same seed, draws the same dropout
    mask."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal=False, softmax_scale=None,
                window=None, softcap=None, dropout_p=0.0, dropout_seed=0):  # fmt: skip
        lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
        out = flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                    window=window, softcap=softcap, lse=lse,
                                    dropout_p=dropout_p, dropout_seed=dropout_seed)  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.settings = (max_seqlen, causal, softmax_scale, window, softcap, dropout_p,
                        dropout_seed)  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        max_seqlen, causal, scale, window, softcap, dropout_p, seed = ctx.settings
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = flash_attn_varlen_bwd(
            dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale, window=window,
            softcap=softcap, dropout_p=dropout_p, dropout_seed=seed,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


@triton.jit
def _dropout_mask_kernel(M, n_rows, n_keys, dropout_p, dropout_seed,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(dropout_seed, offs_r.to(tl.int64)[:, None], offs_k[None, :], dropout_p)
    inside = (offs_r[:, None] < n_rows) & (offs_k[None, :] < n_keys)
    tl.store(M + offs_r.to(tl.int64)[:, None] * n_keys + offs_k[None, :], keep.to(tl.int8),
             mask=inside)


def attention_dropout_mask(num_tokens: int, num_heads: int, max_seqlen: int, dropout_p: float,
                           dropout_seed: int, device=None) -> torch.Tensor:
    """The keep mask flash_attn_varlen's dropout uses: bool [T, Hq, max_seqlen], entry
    [t, h, j] True when query head h of packed token t keeps its probability of the key at
    position j of the token's own text (False: dropped). For tests and for checking a run: pass
    it with dropout_p to l2v_kernels.reference.attention_varlen to reproduce the kernel."""
    device = torch.device("cuda") if device is None else torch.device(device)
    rows = num_tokens * num_heads
    mask = torch.empty((num_tokens, num_heads, max_seqlen), dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(rows, 32), triton.cdiv(max_seqlen, 64))
        _dropout_mask_kernel[grid](mask, rows, max_seqlen, float(dropout_p), int(dropout_seed),
                                   BLOCK_R=32, BLOCK_K=64)  # fmt: skip
    return mask.bool()


def draw_dropout_seed(generator: torch.Generator | None = None) -> int:
    """A dropout seed in [0, 2**31) from torch's CPU generator (the default one when None):
    torch.manual_seed makes it reproducible, torch.utils.checkpoint's RNG-state restore makes a
    recomputed forward draw the same one, and no device sync is needed."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


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


def _check_dropout(op: str, dropout_p, dropout_seed) -> None:
    if not (isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool)
            and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and not (
        isinstance(dropout_seed, numbers.Integral) and not isinstance(dropout_seed, bool)
        and 0 <= dropout_seed < 2**31
    ):
        raise ValueError(f"{op}: dropout_seed must be None or an int in [0, 2**31), got "
                         f"{dropout_seed!r}")


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
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Packed attention: q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0; D in 64/128/256;
    fp16/bf16, fp32 for testing; any token/head strides with a contiguous last dim, e.g. column
    slices of a fused QKV output), cu_seqlens int32 [B+1] (0 ... T), max_seqlen >= the longest
    sequence. Each token attends to every token of its own sequence (causal: only to earlier
    ones and itself). Returns [T, Hq, D] in q's dtype; softmax_scale (> 0) defaults to
    1/sqrt(D). T = 0 returns an empty tensor.

    Differentiable: when autograd records and q, k or v requires grad it runs as FlashAttnVarlen
    (the forward saves its fp32 [T, Hq] log-sum-exp; the backward, flash_attn_varlen_bwd, gives
    dq [T, Hq, D] and dk, dv [T, Hkv, D] in q's dtype, contiguous, dk/dv summed over each GQA
    group). dropout_p in [0, 1): attention dropout on the probabilities (training; survivors
    scaled by 1 / (1 - dropout_p)), the mask a pure function of (dropout_seed, token, head,
    key); dropout_seed (an int in [0, 2**31)) defaults to one drawn from torch's CPU generator.

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
    _check_dropout(op, dropout_p, dropout_seed)
    if q.shape[0] and sync_allowed():
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(
                f"{op}: max_seqlen={max_seqlen} is less than the longest sequence ({longest})"
            )
    dropout_p = float(dropout_p)
    seed = 0
    if dropout_p > 0:
        seed = draw_dropout_seed() if dropout_seed is None else int(dropout_seed)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttnVarlen.apply(q, k, v, cu_seqlens, int(max_seqlen), bool(causal),
                                     softmax_scale, window, softcap, dropout_p, seed)
    return flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                 window=window, softcap=softcap, dropout_p=dropout_p,
                                 dropout_seed=seed)


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
