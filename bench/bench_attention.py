"""Bidirectional varlen attention: l2v Triton kernel vs torch SDPA, varlen_attn and FlexAttention.

python -m bench.bench_attention [--backward] [--smoke] [--out DIR] [--time-budget SECONDS]

Without --backward: the forward (inference) groups below, report `attention`. With --backward:
the training groups (forward + backward, and backward alone; see "Backward" below), report
`backward_attention`. `cases()` (pytest-benchmark, bench/test_kernels_bench.py) holds both.

Heads from the models' config.json (bench.workloads): Mistral-7B (Hq 32 / Hkv 8 / D 128) and
Llama-2-7B (32 / 32 / 128), bf16, non-causal. One group per (batch, heads):
- equal lengths (B, L) in (256, 64), (64, 128), (32, 512), (8, 2048);
- "mixed": a seeded log-normal batch (median 120, max 512, ~32k tokens), packed for the varlen
  kernels and left-padded to [B, 512] (llm2vec's layout) for the padded ones.
Implementations (each baseline guarded: one missing on this torch records an error row):
- "l2v": our varlen kernel through its unchecked launcher (what the model's hot loop calls);
- "l2v_padded" (mixed): our padded kernel on the padded layout with its boolean key mask;
- "sdpa_flash" (equal lengths): SDPA with the flash backend on [B, H, L, D] views;
- "sdpa_efficient_mask" (mixed): SDPA with the efficient backend and the boolean padding mask;
- "varlen_attn": torch.nn.attention.varlen.varlen_attn (torch >= 2.10) on the packed tokens;
- "flex_doc_mask": compiled FlexAttention on the packed tokens with a document mask (block mask
  built once, outside the timed call).
Where a baseline has no GQA support on this torch its k/v are expanded to Hq heads once, outside
the timed call (noted as kv_expanded). FLOPs = 4 * sum(len_i^2) * Hq * D over real tokens only.
Inputs are built lazily (on a group's first timed call), so collecting the cases allocates
nothing. Cases run in tiers so a time budget loses the expensive baselines first: ours and SDPA
for every group, then varlen_attn for every group, then FlexAttention (one compile per group).
Local attention and soft-capping (Gemma-2/3), after the groups above:
- "window512 B.. L..": Gemma-3-4B heads (Hq 8 / Hkv 4 / D 256), L in 2048, 4096, 8192 (32k tokens
  per batch), window=(512, 512): Gemma-3-4B made bidirectional (config.json sliding_window 1024;
  transformers halves it for use_bidirectional_attention: |i - j| <= 512): "l2v" (window, key
  blocks outside it skipped), "l2v_full" (our kernel without the window: what skipping saves),
  "sdpa_efficient_band_mask" (SDPA, boolean [L, L] band mask), "flex_window_mask" (compiled
  FlexAttention, document + window mask_mod: it skips blocks too). FLOPs count the attended
  (query, key) pairs only, so every row's TFLOP/s is the same useful work.
- "softcap50 mixed": Gemma-2-9B heads (16 / 8 / 256), the mixed batch, softcap=50: "l2v"
  (capped), "l2v_no_softcap" (what the cap costs), "flex_softcap" (FlexAttention score_mod).
--smoke (the default without CUDA): tiny fp32 shapes, our kernel in the Triton interpreter and
SDPA's math backend (also with a window band mask and with softcap), seconds. The padded
layout's comparison is l2v_padded vs sdpa_efficient_mask (ours_speedup is always relative to
"l2v", the varlen kernel).

Backward (training: MNTP and the contrastive stages run attention forward and backward),
Mistral-7B heads (32 / 8 / 128), bf16; groups "fwd+bwd ..." (forward with its log-sum-exp, then
the backward, through autograd) and "bwd ..." (the backward alone, on a saved forward):
- "l2v": our FlashAttnVarlen / flash_attn_varlen_bwd on the packed tokens;
- equal lengths (B, L) in (32, 512), (8, 2048), non-causal and causal: "sdpa_flash" (SDPA's
  flash backend on [B, H, L, D]; no padding exists there);
- "mixed" (the log-normal batch above): "sdpa_efficient_mask", SDPA's efficient backend on the
  left-padded [B, H, 512, D] batch with its boolean key mask (training's old padded path).
FLOPs count real tokens' attended pairs only, as FlashAttention-2's paper counts them: forward
4 * pairs * Hq * D, backward 2.5x that (5 matmuls against 2), fwd+bwd 3.5x. FlashAttention-2's
published figures (quoted, not measured here) are appended to the backward report.
"""

from __future__ import annotations

import inspect
import math
import os

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import Case, Lazy, kernel_bench_main, on_gpu  # noqa: E402
from bench.workloads import MODEL_SHAPES, head_dim  # noqa: E402
from l2v_kernels.attention import (  # noqa: E402
    FlashAttnVarlen,
    flash_attn_padded_fwd,
    flash_attn_varlen_bwd,
    flash_attn_varlen_fwd,
)

EQUAL_SHAPES = ((256, 64), (64, 128), (32, 512), (8, 2048))
REAL_MODELS = ("mistral-7b", "llama-2-7b")
MIXED_TOKENS, MIXED_MEDIAN, MIXED_SIGMA, MIXED_MAX = 32768, 120, 0.6, 512


def mixed_lengths(seed: int = 0) -> list[int]:
    """Log-normal lengths (median 120, clipped to [1, 512]) until ~32k tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < MIXED_TOKENS:
        n = math.exp(math.log(MIXED_MEDIAN) + MIXED_SIGMA * torch.randn(1, generator=g).item())
        n = int(min(max(round(n), 1), MIXED_MAX))
        lengths.append(n)
        total += n
    return lengths



def _packed(lengths, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=g, device=device).to(dtype)
    k = torch.randn(t, hkv, d, generator=g, device=device).to(dtype)
    v = torch.randn(t, hkv, d, generator=g, device=device).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    return {"q": q, "k": k, "v": v, "cu": cu, "max": max(lengths), "lengths": lengths}


def _left_padded(x: dict):
    """The packed batch left-padded to [B, max, H, D] plus its boolean key mask."""
    lengths, L = x["lengths"], x["max"]
    lens = torch.tensor(lengths, device=x["q"].device)
    mask = torch.arange(L, device=lens.device)[None, :] >= (L - lens)[:, None]
    out = {"mask": mask}
    for name in ("q", "k", "v"):
        t = x[name]
        p = t.new_zeros(len(lengths), L, *t.shape[1:])
        p[mask] = t
        out[name] = p
    return out


def _expand(t: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=dim)


def _sdpa(backend, q, k, v, mask=None, *, note: dict):
    """SDPA on [B, H, L, D] with one backend; GQA natively where supported, else k/v expanded
    once here (note["kv_expanded"] = True)."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]
    am = None if mask is None else mask[:, None, None, :]
    if group > 1:
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, attn_mask=am, enable_gqa=True)

            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=am, enable_gqa=True)

            return fn
        except (RuntimeError, TypeError):
            k, v = _expand(k, group, 1), _expand(v, group, 1)
            note["kv_expanded"] = True

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=am)

    return fn


def _varlen_attn(x, note: dict):
    from torch.nn.attention.varlen import varlen_attn  # absent before torch 2.10: error row

    q, k, v, cu, m = x["q"], x["k"], x["v"], x["cu"], x["max"]
    group = q.shape[1] // k.shape[1]
    kw = {}
    if group > 1:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            kw["enable_gqa"] = True
        else:
            k, v = _expand(k, group, 1), _expand(v, group, 1)
            note["kv_expanded"] = True
    return lambda: varlen_attn(q, k, v, cu, cu, m, m, **kw)


_flex_compiled = None


def _flex(x):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    if _flex_compiled is None:
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # one compile per group's shape
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v, lengths = x["q"], x["k"], x["v"], x["lengths"]
    t = q.shape[0]
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
    )

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(document, None, None, t, t, device=q.device)
    qf, kf, vf = (y.transpose(0, 1).unsqueeze(0).contiguous() for y in (q, k, v))  # [1, H, T, D]
    gqa = q.shape[1] != k.shape[1]
    return lambda: _flex_compiled(qf, kf, vf, block_mask=block_mask, enable_gqa=gqa)


def _case(group, impl, make_fn, flops, params):
    """A Case whose callable is built on its first call (inputs, masks, compiled baselines).
    make_fn(params) returns the timed callable and may note how it was built in params."""
    params = dict(params)
    fn = Lazy(lambda: make_fn(params))
    return Case(group, impl, lambda: fn()(), flops=flops, params=params)


def _group_cases(name, lengths, hq, hkv, d, dtype, device, *, equal, smoke=False) -> list[Case]:
    from torch.nn.attention import SDPBackend

    x = Lazy(lambda: _packed(lengths, hq, hkv, d, dtype, device))
    flops = 4.0 * sum(n * n for n in lengths) * hq * d
    b = len(lengths)
    params = {"B": b, "L": lengths[0] if equal else "mixed", "tokens": sum(lengths),
              "max_len": max(lengths), "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype)[6:]}
    group = f"attention {name} Hq{hq} Hkv{hkv} D{d}"

    def ours(_):
        a = x()
        return lambda: flash_attn_varlen_fwd(a["q"], a["k"], a["v"], a["cu"], a["max"], False,
                                              None)

    def dense(backend):
        def make(p):
            a = x()
            L = lengths[0]
            q, k, v = (a[n].view(b, L, -1, d).transpose(1, 2) for n in ("q", "k", "v"))
            return _sdpa(backend, q, k, v, note=p)
        return make

    out = [_case(group, "l2v", ours, flops, params)]
    if smoke:
        out.append(_case(group, "sdpa_math", dense(SDPBackend.MATH), flops, params))
        return out
    if equal:
        out.append(_case(group, "sdpa_flash", dense(SDPBackend.FLASH_ATTENTION), flops, params))
    else:
        padded = Lazy(lambda: _left_padded(x()))

        def ours_padded(_):
            a = padded()
            return lambda: flash_attn_padded_fwd(a["q"], a["k"], a["v"], a["mask"], False, None)

        def sdpa_masked(p):
            a = padded()
            q, k, v = (a[n].transpose(1, 2) for n in ("q", "k", "v"))
            return _sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, a["mask"], note=p)

        out.append(_case(group, "l2v_padded", ours_padded, flops, params))
        out.append(_case(group, "sdpa_efficient_mask", sdpa_masked, flops, params))
    out.append(_case(group, "varlen_attn", lambda p: _varlen_attn(x(), p), flops, params))
    out.append(_case(group, "flex_doc_mask", lambda p: _flex(x()), flops, params))
    return out


WINDOW_LENGTHS, WINDOW, WINDOW_TOKENS = (2048, 4096, 8192), 512, 32768
GEMMA3_HEADS = (8, 4, 256)  # Gemma-3-4B: Hq, Hkv, head_dim
GEMMA2_HEADS = (16, 8, 256)  # Gemma-2-9B
SOFTCAP = 50.0


def _window_pairs(lengths, left, right) -> int:
    """Attended (query, key) pairs of a packed batch under window (left, right)."""
    total = 0
    for n in lengths:
        i = torch.arange(n)
        total += int((torch.clamp(i + right, max=n - 1) - torch.clamp(i - left, min=0) + 1).sum())
    return total


def _band_mask(L, left, right, device):
    i = torch.arange(L, device=device)
    return (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)


def _flex_mod(x, window=None, softcap=None):
    """Compiled FlexAttention on the packed tokens: document mask (+ window mask_mod), or a
    softcap score_mod; block mask built once, outside the timed call."""
    from torch.nn.attention.flex_attention import create_block_mask

    global _flex_compiled
    if _flex_compiled is None:
        _flex(x)  # sets up the compiled function and dynamo limits
    q, k, v, lengths = x["q"], x["k"], x["v"], x["lengths"]
    t = q.shape[0]
    lens = torch.tensor(lengths, device=q.device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lens)
    start = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    pos = torch.arange(t, device=q.device) - start

    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc[q_idx] == doc[kv_idx]
        if window is not None:
            d = pos[q_idx] - pos[kv_idx]
            keep = keep & (d <= window[0]) & (-d <= window[1])
        return keep

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, t, t, device=q.device)
    qf, kf, vf = (y.transpose(0, 1).unsqueeze(0).contiguous() for y in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    return lambda: _flex_compiled(qf, kf, vf, block_mask=block_mask, score_mod=score_mod,
                                  enable_gqa=gqa)


def _window_cases(L, b, hq, hkv, d, dtype, device, window, *, smoke=False) -> list[Case]:
    from torch.nn.attention import SDPBackend

    lengths = [L] * b
    x = Lazy(lambda: _packed(lengths, hq, hkv, d, dtype, device, seed=L))
    flops = 4.0 * _window_pairs(lengths, *window) * hq * d
    params = {"B": b, "L": L, "tokens": b * L, "max_len": L, "Hq": hq, "Hkv": hkv, "D": d,
              "dtype": str(dtype)[6:], "window": f"{window[0]},{window[1]}"}
    group = f"attention window{window[0]} B{b} L{L} Hq{hq} Hkv{hkv} D{d}"

    def ours(_):
        a = x()
        return lambda: flash_attn_varlen_fwd(a["q"], a["k"], a["v"], a["cu"], a["max"], False,
                                             None, window=window)

    def ours_full(_):
        a = x()
        return lambda: flash_attn_varlen_fwd(a["q"], a["k"], a["v"], a["cu"], a["max"], False,
                                             None)

    def sdpa_band(backend):
        def make(p):
            a = x()
            q, k, v = (a[n].view(b, L, -1, d).transpose(1, 2) for n in ("q", "k", "v"))
            band = _band_mask(L, *window, q.device)
            return _sdpa_masked(backend, q, k, v, band, note=p)
        return make

    out = [_case(group, "l2v", ours, flops, params)]
    if smoke:
        out.append(_case(group, "sdpa_math_band_mask", sdpa_band(SDPBackend.MATH), flops, params))
        return out
    out.append(_case(group, "l2v_full", ours_full, flops, params))
    out.append(_case(group, "sdpa_efficient_band_mask", sdpa_band(SDPBackend.EFFICIENT_ATTENTION),
                     flops, params))
    out.append(_case(group, "flex_window_mask", lambda p: _flex_mod(x(), window=window), flops,
                     params))
    return out


def _sdpa_masked(backend, q, k, v, mask2d, *, note: dict):
    """SDPA on [B, H, L, D] with one [L, L] boolean mask shared by every row and head."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = _expand(k, group, 1), _expand(v, group, 1)
        note["kv_expanded"] = True

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask2d)

    return fn


def _softcap_cases(name, lengths, hq, hkv, d, dtype, device, softcap, *, smoke=False):
    x = Lazy(lambda: _packed(lengths, hq, hkv, d, dtype, device, seed=7))
    flops = 4.0 * sum(n * n for n in lengths) * hq * d
    params = {"B": len(lengths), "L": "mixed", "tokens": sum(lengths), "max_len": max(lengths),
              "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype)[6:], "softcap": softcap}
    group = f"attention softcap{softcap:g} {name} Hq{hq} Hkv{hkv} D{d}"

    def ours(cap):
        def make(_):
            a = x()
            return lambda: flash_attn_varlen_fwd(a["q"], a["k"], a["v"], a["cu"], a["max"],
                                                 False, None, softcap=cap)
        return make

    out = [_case(group, "l2v", ours(softcap), flops, params)]
    if smoke:
        return out
    out.append(_case(group, "l2v_no_softcap", ours(None), flops, params))
    out.append(_case(group, "flex_softcap", lambda p: _flex_mod(x(), softcap=softcap), flops,
                     params))
    return out


BACKWARD_SHAPES = ((32, 512, False), (8, 2048, False), (8, 2048, True))
# FlashAttention-2's own figures (Dao, "FlashAttention-2", 2023, section 4.1), quoted: they were
# measured on other machines and setups (16k tokens per batch, seqlen 512-16k, head dim 64 and
# 128, hidden 2048, FLOPs counted as here).
FA2_PUBLISHED = (
    "FlashAttention-2's published figures (quoted from the paper, section 4.1; not measured "
    "here): up to 230 TFLOP/s on an A100 80GB SXM4 (73% of its peak), and up to 335 TFLOP/s "
    "forward + backward on an H100 80GB SXM5 (its Fig. 8), with 16k tokens per batch, sequence "
    "lengths 512-16k, head dim 64 or 128, FLOPs counted as here (backward = 2.5x forward)."
)


def _pairs(lengths, causal: bool) -> int:
    """Attended (query, key) pairs of a packed batch."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def _backward_cases(name, lengths, hq, hkv, d, dtype, device, *, causal=False, equal=True,
                    smoke=False) -> list[Case]:  # fmt: skip
    """Two groups: "fwd+bwd" (autograd through the forward and the backward) and "bwd" (the
    backward alone on a saved forward), ours and SDPA's (flash on equal lengths, efficient with
    the padding mask on the mixed batch; math in the smoke run)."""
    from torch.nn.attention import SDPBackend

    fwd_flops = 4.0 * _pairs(lengths, causal) * hq * d
    x = Lazy(lambda: _packed(lengths, hq, hkv, d, dtype, device, seed=3))
    params = {"B": len(lengths), "L": lengths[0] if equal else "mixed", "tokens": sum(lengths),
              "max_len": max(lengths), "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype)[6:],
              "causal": causal}  # fmt: skip
    shape = f"{name} Hq{hq} Hkv{hkv} D{d}" + (" causal" if causal else "")

    def leaves(a):
        return [a[n].detach().clone().requires_grad_() for n in ("q", "k", "v")]

    def ours_fwd_bwd(_):
        a = x()
        q, k, v = leaves(a)
        dout = torch.randn_like(a["q"])

        def run():
            out = FlashAttnVarlen.apply(q, k, v, a["cu"], a["max"], causal, None, None, None,
                                        0.0, 0)  # fmt: skip
            return torch.autograd.grad(out, (q, k, v), dout)
        return run

    def ours_bwd(_):
        a = x()
        lse = torch.empty(a["q"].shape[:2], dtype=torch.float32, device=a["q"].device)
        out = flash_attn_varlen_fwd(a["q"], a["k"], a["v"], a["cu"], a["max"], causal, lse=lse)
        dout = torch.randn_like(a["q"])
        return lambda: flash_attn_varlen_bwd(dout, a["q"], a["k"], a["v"], out, lse, a["cu"],
                                             a["max"], causal)

    def sdpa_inputs(p):
        """[B, H, L, D] leaves (padded when the lengths differ), the mask, the gradient."""
        a = x()
        if equal:
            b, L = len(lengths), lengths[0]
            q, k, v = (a[n].view(b, L, -1, d).transpose(1, 2) for n in ("q", "k", "v"))
            mask = None
        else:
            pad = _left_padded(a)
            q, k, v = (pad[n].transpose(1, 2) for n in ("q", "k", "v"))
            mask = pad["mask"][:, None, None, :]
        group = q.shape[1] // k.shape[1]
        if group > 1:  # the backward of SDPA's GQA path expands k/v anyway: expand once here
            k, v = _expand(k, group, 1), _expand(v, group, 1)
            p["kv_expanded"] = True
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return q, k, v, mask, torch.randn_like(q)

    def sdpa_fwd_bwd(backend):
        def make(p):
            from torch.nn.attention import sdpa_kernel

            q, k, v, mask, dout = sdpa_inputs(p)

            def run():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                         is_causal=causal)  # fmt: skip
                    return torch.autograd.grad(out, (q, k, v), dout)
            return run
        return make

    def sdpa_bwd(backend):
        def make(p):
            from torch.nn.attention import sdpa_kernel

            q, k, v, mask, dout = sdpa_inputs(p)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

            def run():
                with sdpa_kernel(backend):
                    return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            return run
        return make

    if smoke:
        backend, base = SDPBackend.MATH, "sdpa_math"
    elif equal:
        backend, base = SDPBackend.FLASH_ATTENTION, "sdpa_flash"
    else:
        backend, base = SDPBackend.EFFICIENT_ATTENTION, "sdpa_efficient_mask"
    both = f"attention fwd+bwd {shape}"
    bwd = f"attention bwd {shape}"
    return [
        _case(both, "l2v", ours_fwd_bwd, 3.5 * fwd_flops, {**params, "pass": "fwd+bwd"}),
        _case(both, base, sdpa_fwd_bwd(backend), 3.5 * fwd_flops, {**params, "pass": "fwd+bwd"}),
        _case(bwd, "l2v", ours_bwd, 2.5 * fwd_flops, {**params, "pass": "bwd"}),
        _case(bwd, base, sdpa_bwd(backend), 2.5 * fwd_flops, {**params, "pass": "bwd"}),
    ]


def backward_cases(smoke: bool) -> list[Case]:
    if smoke:
        device = "cuda" if on_gpu() else "cpu"
        return (_backward_cases("smoke B2 L16", [16, 16], 4, 2, 64, torch.float32, device,
                                smoke=True)
                + _backward_cases("smoke mixed", [9, 16], 4, 2, 64, torch.float32, device,
                                  equal=False, smoke=True))  # fmt: skip
    cfg = MODEL_SHAPES["mistral-7b"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    lengths = mixed_lengths()
    out = _backward_cases(f"mixed B{len(lengths)} T{sum(lengths)}", lengths, hq, hkv, d,
                          torch.bfloat16, "cuda", equal=False)  # fmt: skip
    for b, L, causal in BACKWARD_SHAPES:
        out += _backward_cases(f"B{b} L{L}", [L] * b, hq, hkv, d, torch.bfloat16, "cuda",
                               causal=causal)  # fmt: skip
    return out


# Run order (run_cases times cases in list order and stops at the time budget): every group's
# cheap rows first (ours and SDPA), then varlen_attn, then FlexAttention, whose compile
# (dynamic=False) costs 5-30 s per group. ours_speedup pairs rows by group, not by position.
IMPL_TIER = {"varlen_attn": 1, "flex_doc_mask": 2, "flex_window_mask": 2, "flex_softcap": 2}


def _by_tier(cases: list[Case]) -> list[Case]:
    return sorted(cases, key=lambda c: IMPL_TIER.get(c.impl, 0))  # stable: group order kept


def cases(smoke: bool) -> list[Case]:
    """Every group, forward then backward (pytest-benchmark's list)."""
    return forward_cases(smoke) + backward_cases(smoke)


def forward_cases(smoke: bool) -> list[Case]:
    if smoke:  # without CUDA: the Triton interpreter and SDPA's math backend
        device = "cuda" if on_gpu() else "cpu"
        return (
            _group_cases("smoke B2 L16", [16, 16], 4, 2, 64, torch.float32, device,
                         equal=True, smoke=True)
            + _window_cases(40, 2, 4, 2, 64, torch.float32, device, (3, 3), smoke=True)
            + _softcap_cases("smoke", [16, 9], 4, 2, 64, torch.float32, device, SOFTCAP,
                             smoke=True)
        )
    out = []
    for model in REAL_MODELS:
        cfg = MODEL_SHAPES[model]
        hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
        lengths = mixed_lengths()  # the encoder's case first
        out += _group_cases(f"mixed B{len(lengths)} T{sum(lengths)}", lengths, hq, hkv, d,
                            torch.bfloat16, "cuda", equal=False)
        for b, L in EQUAL_SHAPES:
            out += _group_cases(f"B{b} L{L}", [L] * b, hq, hkv, d, torch.bfloat16, "cuda",
                                equal=True)
    for L in WINDOW_LENGTHS:
        out += _window_cases(L, WINDOW_TOKENS // L, *GEMMA3_HEADS, torch.bfloat16, "cuda",
                             (WINDOW, WINDOW))
    lengths = mixed_lengths()
    out += _softcap_cases(f"mixed B{len(lengths)} T{sum(lengths)}", lengths, *GEMMA2_HEADS,
                          torch.bfloat16, "cuda", SOFTCAP)
    return _by_tier(out)


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--backward" not in argv:
        kernel_bench_main("attention", forward_cases, argv,
                          title="Bidirectional varlen attention (forward)")  # fmt: skip
        return
    argv.remove("--backward")
    kernel_bench_main("backward_attention", backward_cases, argv,
                      title="Varlen attention, training: forward + backward and backward alone")
    # The report's markdown gets FlashAttention-2's published figures, marked as quoted.
    from bench.common import out_dir

    out = None
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
    smoke = "--smoke" in argv or not on_gpu()
    for md in out_dir(out).glob("backward_attention" + ("_smoke" if smoke else "") + ".md"):
        md.write_text(md.read_text() + "\n" + FA2_PUBLISHED + "\n")


if __name__ == "__main__":
    main()
