"""Fused masked pooling (mean, weighted mean, max): l2v Triton kernel vs plain torch,
torch.compile and a copy.

python -m bench.bench_pooling [--smoke] [--out DIR]

Hidden states of the final layer (D = 4096, bf16), padded [B, L, D] batches and a packed
mixed-length batch. The embed mask leaves each text's instruction prefix out (llm2vec's
skip_instruction), so those tokens need never be read. GB/s counts the bytes the op must move:
the pooled tokens' hidden states, the mask, the fp32 output. `d2d_copy` copies the same number of
bytes: its ratio (ours_speedup) is the fraction of copy bandwidth the kernel reaches. "l2v" times
what the model runs: the unchecked launcher plus the allocation of its output (the public
function adds input checks on top, and a sync to check cu_seqlens).
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import Case, compiled, copy_case, kernel_bench_main, on_gpu  # noqa: E402
from l2v_kernels.pooling import masked_pool_fwd  # noqa: E402


def l2v_pool(hidden, mask, mode, cu_seqlens, normalize, n_rows):
    out = torch.empty(n_rows, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    masked_pool_fwd(hidden, mask, out, mode, cu_seqlens=cu_seqlens, normalize=normalize)
    return out


def torch_pool_padded(hidden, mask, mode, normalize):
    """Plain PyTorch, padded [B, L, D]: one masked, fp32-accumulated sum over tokens (max: one
    masked amax, zeros for a row with nothing pooled)."""
    if mode == "max":
        out = hidden.masked_fill(~mask[..., None], float("-inf")).amax(1).float()
        out = torch.where(mask.any(1, keepdim=True), out, 0.0)
        return F.normalize(out, dim=-1) if normalize else out
    if mode == "weighted_mean":
        m = mask.float() * mask.cumsum(1)  # rank among the row's masked tokens
        total = (hidden * m[..., None]).sum(1)  # fp32 (type promotion)
    else:
        m = mask.to(hidden.dtype)
        total = (hidden * m[..., None]).sum(1, dtype=torch.float32)
    out = total / m.float().sum(1, keepdim=True).clamp_min(1.0)
    return F.normalize(out, dim=-1) if normalize else out


def torch_pool_packed(hidden, mask, mode, normalize, segment, starts, n_rows):
    """Plain PyTorch, packed [T, D]: segment sums with index_add_ (max: scatter_reduce amax)."""
    if mode == "max":
        T, D = hidden.shape
        values = hidden.float().masked_fill(~mask[:, None], float("-inf"))
        out = torch.full((n_rows, D), float("-inf"), device=hidden.device)
        out = out.scatter_reduce(0, segment[:, None].expand(T, D), values, "amax")
        pooled = torch.zeros(n_rows, device=hidden.device).index_add_(0, segment, mask.float())
        out = torch.where(pooled[:, None] > 0, out, 0.0)
        return F.normalize(out, dim=-1) if normalize else out
    m = mask.float()
    if mode == "weighted_mean":
        seen = m.cumsum(0)
        m = (seen - (seen - m)[starts][segment]) * m  # rank within each text
    total = torch.zeros(n_rows, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    total.index_add_(0, segment, hidden.float() * m[:, None])
    weight = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    weight.index_add_(0, segment, m)
    out = total / weight.clamp_min(1.0)[:, None]
    return F.normalize(out, dim=-1) if normalize else out



def pooled_bytes(hidden, mask, n_rows) -> int:
    n_pooled = int(mask.sum())
    D = hidden.shape[-1]
    hidden_bytes = n_pooled * D * hidden.element_size()
    return hidden_bytes + mask.numel() * mask.element_size() + n_rows * D * 4


def cases(smoke: bool) -> list[Case]:
    device = "cuda" if on_gpu() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    if smoke:
        dtype, D = torch.float16, 96
        padded = [(3, 17, "mean", False), (2, 33, "weighted_mean", True), (3, 17, "max", False)]
        n_texts, median_len, max_len = 5, 20, 40
    else:
        dtype, D = torch.bfloat16, 4096
        padded = [(256, 64, "mean", False), (64, 128, "mean", False), (32, 512, "mean", False),
                  (8, 2048, "mean", False), (32, 512, "weighted_mean", False),
                  (32, 512, "max", False), (32, 512, "mean", True)]
        n_texts, median_len, max_len = 128, 120, 512
    pool_c = None if smoke else compiled(torch_pool_padded)
    pool_packed_c = None if smoke else compiled(torch_pool_packed)
    out = []

    for B, L, mode, normalize in padded:
        hidden = torch.randn(B, L, D, generator=g, device=device).to(dtype)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        mask[:, : max(1, L // 10)] = False  # instruction prefix
        group = f"pool {mode}{' +norm' if normalize else ''} B{B} L{L} D{D}"
        params = {"layout": "padded", "B": B, "L": L, "T": B * L, "D": D, "mode": mode,
                  "normalize": normalize, "dtype": str(dtype)[6:]}
        nbytes = pooled_bytes(hidden, mask, B)
        args = (hidden, mask, mode, normalize)
        out.append(Case(group, "l2v", lambda a=args, B=B: l2v_pool(a[0], a[1], a[2], None, a[3], B),
                        bytes=nbytes, params=params))
        out.append(Case(group, "torch", lambda a=args: torch_pool_padded(*a), bytes=nbytes,
                        params=params))
        if pool_c is not None:
            out.append(Case(group, "torch.compile", lambda a=args: pool_c(*a), bytes=nbytes,
                            params=params))
        out.append(copy_case(group, nbytes, params, device))

    # A packed batch of mixed lengths (log-normal, like passages), 5-token instruction prefixes.
    normal = torch.randn(n_texts, generator=torch.Generator().manual_seed(1))
    lengths = torch.exp(normal * 0.6 + math.log(median_len)).clamp(8, max_len).long()
    cu = torch.zeros(n_texts + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    segment = torch.repeat_interleave(torch.arange(n_texts), lengths).to(device)
    starts = cu[:-1].long().to(device)
    cu = cu.to(device)
    hidden = torch.randn(T, D, generator=g, device=device).to(dtype)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    for s in cu[:-1].tolist():
        mask[s : s + 5] = False
    nbytes = pooled_bytes(hidden, mask, n_texts)
    for mode in ("mean", "weighted_mean", "max"):
        group = f"pool {mode} packed B{n_texts} T{T} D{D}"
        params = {"layout": "packed", "B": n_texts, "L": int(lengths.max()), "T": T, "D": D,
                  "mode": mode,
                  "normalize": False, "dtype": str(dtype)[6:]}
        args = (hidden, mask, mode, False, segment, starts, n_texts)
        out.append(Case(group, "l2v", lambda m=mode: l2v_pool(hidden, mask, m, cu, False, n_texts),
                        bytes=nbytes, params=params))
        out.append(Case(group, "torch", lambda a=args: torch_pool_packed(*a), bytes=nbytes,
                        params=params))
        if pool_packed_c is not None:
            out.append(Case(group, "torch.compile", lambda a=args: pool_packed_c(*a),
                            bytes=nbytes, params=params))
        out.append(copy_case(group, nbytes, params, device))
    return out


if __name__ == "__main__":
    kernel_bench_main("pooling", cases, title="Fused masked pooling")
