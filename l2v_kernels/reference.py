"""Plain-PyTorch definitions of every l2v op.

These are the ground truth that kernels, tests and benchmarks all import, so the three can never
drift. They favour clarity over speed, run on any device (CPU included) and compute in fp32 or in
the input's dtype when that is wider (pass fp64 inputs to get an fp64 "truth"). Outputs are cast
back to the input's dtype where the op's contract says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32, keeping fp64 as fp64."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _window_allowed(n_q: int, n_k: int, window, device) -> torch.Tensor:
    """bool [n_q, n_k]: key j is inside query i's window, i - left <= j <= i + right (a side that
    is None is unlimited). Positions are indices in the text (varlen) or padded row (padded)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    left, right = window
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    return keep


def _scores(qs: torch.Tensor, ks: torch.Tensor, scale: float, softcap: float | None):
    """(q . k) * scale, then softcap * tanh(s / softcap) when softcap is given (Gemma-2 order:
    scale, then cap, then the mask)."""
    scores = (qs @ ks.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Packed attention. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int [B+1] -> [T, Hq, D].

    Every token attends to every token of its own sequence (only to earlier ones and itself when
    causal). GQA: query head h reads kv head h // (Hq // Hkv).
    window=(left, right): query i of a text sees key j of the same text only when
    i - left <= j <= i + right (combined with causal; None on a side = unlimited).
    softcap: scores s = (q . k) * scale become softcap * tanh(s / softcap) before the mask and
    the softmax.
    dropout_keep: attention dropout with a given mask, bool [T, Hq, >= longest text] (entry
    [t, h, j]: token t, query head h keeps key position j of its text): the softmax
    probabilities are multiplied by keep / (1 - dropout_p) before P @ V.
    Differentiable (autograd of this definition is the gradients' reference).
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        n = end - start
        qs = _wide(q[start:end]).transpose(0, 1)  # [Hq, n, D]
        ks = _wide(k[start:end]).transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        vs = _wide(v[start:end]).transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        scores = _scores(qs, ks, scale, softcap)
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            keep &= keep.tril()
        if window is not None:
            keep &= _window_allowed(n, n, window, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = scores.softmax(-1)
        if dropout_keep is not None:
            kept = dropout_keep[start:end, :, :n].transpose(0, 1)  # [Hq, n, n]
            probs = probs * kept / (1.0 - dropout_p)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


def attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Padded attention. q [B, L, Hq, D], k/v [B, L, Hkv, D], key_padding_mask bool [B, L]
    (True = real token) -> [B, L, Hq, D].

    Padded keys are ignored; outputs at padded query positions are 0; a query with no real key
    (causal with leading padding, or a window holding only padding) gives 0. Causal and window
    are by position in the padded row: query i sees keys j <= i (causal) and
    i - left <= j <= i + right (window). softcap as in attention_varlen.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qs = _wide(q).transpose(1, 2)  # [B, Hq, L, D]
    ks = _wide(k).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    vs = _wide(v).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    scores = _scores(qs, ks, scale, softcap)  # [B, Hq, L, L]
    allowed = key_padding_mask[:, None, None, :].expand(B, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        allowed = allowed & _window_allowed(L, L, window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    out = (probs @ vs).transpose(1, 2)  # [B, L, Hq, D]
    out = out * key_padding_mask[:, :, None, None]
    return out.to(q.dtype)


def masked_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Pool the masked tokens of each row -> float32 [B, D].

    hidden [B, L, D] with mask [B, L], or packed hidden [T, D] with mask [T] and cu_seqlens [B+1].
    mode: "mean" (mean over masked tokens), "weighted_mean" (weights 1..n over the masked tokens
    of a row in order, divided by their sum: llm2vec's weighted_mean), "last" (last masked token),
    "max" (element-wise max over the masked tokens: sentence-transformers'
    pooling_mode_max_tokens). A row with no masked token gives zeros. normalize: L2-normalize
    each row (a zero row stays 0).
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        rows = [(hidden[s:e], mask[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        rows = [(hidden[b], mask[b]) for b in range(hidden.shape[0])]
    out = []
    for h, m in rows:
        h = _wide(h)
        m = m.bool()
        n = int(m.sum())
        if n == 0:
            out.append(torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device))
            continue
        if mode == "mean":
            out.append(h[m].mean(0))
        elif mode == "weighted_mean":
            w = torch.arange(1, n + 1, dtype=h.dtype, device=h.device)
            out.append((h[m] * w[:, None]).sum(0) / w.sum())
        elif mode == "last":
            out.append(h[m][-1])
        elif mode == "max":
            out.append(h[m].amax(0))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    pooled = torch.stack(out) if out else hidden.new_zeros(0, hidden.shape[-1])
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled.float() if pooled.dtype != torch.float64 else pooled


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
):
    """RMSNorm over the last dim, optionally after a residual add.

    Without residual: returns y = x / rms(x) * (weight_offset + weight), in x's dtype.
    With residual: h = x + residual (rounded to x's dtype, as the unfused model stores it);
    returns (norm(h), h). Statistics in fp32 (fp64 for fp64 inputs).
    """
    h = x if residual is None else (_wide(x) + _wide(residual)).to(x.dtype)
    hw = _wide(h)
    y = hw * torch.rsqrt(hw.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * (weight_offset + _wide(weight))).to(x.dtype)
    return y if residual is None else (y, h)


def norm_add_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
):
    """Gemma-2/3 sandwich step: h = residual + rmsnorm_a(x); y = rmsnorm_b(h) -> (y, h).

    Rounding as Hugging Face's Gemma2/Gemma3 decoder layer: rmsnorm_a(x) is rounded to x's dtype
    (the norm module's output), the add is done on those rounded values and rounded to x's dtype
    (h, the residual stream), and rmsnorm_b normalizes that rounded h. Each norm is
    rms_norm(., weight, eps, weight_offset=weight_offset) (1.0 for Gemma's (1 + w)).
    """
    a = rms_norm(x, weight_a, eps, weight_offset=weight_offset)
    h = (_wide(residual) + _wide(a)).to(x.dtype)
    return rms_norm(h, weight_b, eps, weight_offset=weight_offset), h


def rope_cos_sin(
    inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_position, D/2] in fp32 for rotate-half RoPE with the given inv_freq."""
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token in its own sequence (restarting at 0): int32 [T]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return (torch.arange(total, device=cu_seqlens.device) - starts).to(torch.int32)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Rotate-half (Llama/HF) RoPE. x [T, H, D], cos/sin [P, D/2], position_ids int [T].

    out[..., :D/2] = x1*cos - x2*sin, out[..., D/2:] = x2*cos + x1*sin, x1/x2 the two halves.
    Computed in fp32, returned in x's dtype.
    """
    half = x.shape[-1] // 2
    c = _wide(cos)[position_ids.long()][:, None, :]
    s = _wide(sin)[position_ids.long()][:, None, :]
    xw = _wide(x)
    x1, x2 = xw[..., :half], xw[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def norm_rotary(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """Per-head RMSNorm over the head dim, then rotate-half RoPE (Gemma-3's and Qwen3's q_norm /
    k_norm before RoPE). x [T, H, D], weight [D]. The normalized head is rounded to x's dtype
    (as the norm module returns it) before the rotation; returned in x's dtype."""
    return apply_rotary(rms_norm(x, weight, eps, weight_offset=weight_offset), cos, sin,
                        position_ids)


def gated_act(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[..., 2I] -> [..., I]: act(gate) * up, gate = x[..., :I], up = x[..., I:] (HF order)."""
    half = x.shape[-1] // 2
    g, u = _wide(x[..., :half]), _wide(x[..., half:])
    if act == "silu":
        a = F.silu(g)
    elif act == "gelu_tanh":
        a = F.gelu(g, approximate="tanh")
    else:
        raise ValueError(f"unknown activation {act!r}")
    return (a * u).to(x.dtype)


def lora_merge(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + scale * B @ A, accumulated in fp64, rounded once to W's dtype (out of place).

    weight [N, K], lora_A [r, K], lora_B [N, r].
    """
    merged = weight.double() + scale * (lora_B.double() @ lora_A.double())
    return merged.to(weight.dtype)


def gemm_residual(
    x: torch.Tensor,
    w: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ bias [N]) (+ residual [M, N]), fp32 accumulate, one rounding."""
    out = _wide(x) @ _wide(w).T
    if bias is not None:
        out = out + _wide(bias)
    if residual is not None:
        out = out + _wide(residual)
    return out.to(x.dtype)


def gemm_gated(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """act(x @ w_gate.T) * (x @ w_up.T): x [M, K], w_gate/w_up [I, K] -> [M, I], one rounding."""
    xw = _wide(x)
    g = xw @ _wide(w_gate).T
    u = xw @ _wide(w_up).T
    a = F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")
    return (a * u).to(x.dtype)
