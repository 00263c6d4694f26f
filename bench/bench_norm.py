"""Fused residual add + RMSNorm: l2v Triton kernel vs plain torch, torch.compile and a copy.
Also the Gemma-2/3 post-norm step norm_add_norm (h = residual + norm_a(x); y = norm_b(h)) vs
the same in plain torch (Hugging Face's order), torch.compile, and two launches of our rms_norm.

python -m bench.bench_norm [--smoke] [--out DIR]

GB/s counts the bytes the op must move: read x (and residual) and the weight, write y (and h).
`d2d_copy` copies the same number of bytes device to device: its ratio (ours_speedup) is the
fraction of copy bandwidth the kernel reaches. "l2v" times what the model runs: the unchecked
launcher plus the allocation of its outputs (the public function adds input checks on top).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import Case, compiled, copy_case, kernel_bench_main, on_gpu  # noqa: E402
from l2v_kernels.norm import norm_add_norm_fwd, rms_norm_fwd  # noqa: E402

EPS = 1e-5


def l2v_rms_norm(x, weight, eps, residual=None):
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    rms_norm_fwd(x, weight, eps, y, residual=residual, h_out=h)
    return y if residual is None else (y, h)


def torch_rms_norm(x, weight, eps, residual=None):
    """Plain PyTorch (the Hugging Face way, fp32 statistics)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.float()).to(x.dtype)
    return y if residual is None else (y, x)



def l2v_norm_add_norm(x, residual, w_a, w_b, eps):
    return norm_add_norm_fwd(x, residual, w_a, w_b, eps, weight_offset=1.0)


def l2v_two_rms_norms(x, residual, w_a, w_b, eps):
    """The same step from two launches of our rms_norm (what the model would run unfused)."""
    a = rms_norm_fwd(x, w_a, eps, weight_offset=1.0)
    return rms_norm_fwd(a, w_b, eps, residual=residual, weight_offset=1.0)


def torch_norm_add_norm(x, residual, w_a, w_b, eps):
    """Plain PyTorch, Hugging Face's Gemma2 layer: (1 + w) norms in fp32, add in the dtype."""
    def norm(t, w):
        tf = t.float()
        y = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * (1.0 + w.float())).to(t.dtype)

    h = residual + norm(x, w_a)
    return norm(h, w_b), h


def norm_add_norm_cases(shapes, dtype, device, smoke) -> list[Case]:
    torch_compiled = None if smoke else compiled(torch_norm_add_norm)
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    for T, D in shapes:
        x = (torch.randn(T, D, generator=g, device=device) * 4).to(dtype)
        residual = torch.randn(T, D, generator=g, device=device).to(dtype)
        w_a = (torch.randn(D, generator=g, device=device) * 0.3).to(dtype)
        w_b = (torch.randn(D, generator=g, device=device) * 0.3).to(dtype)
        # x, residual read; y, h written (+ two weights)
        nbytes = 4 * x.numel() * x.element_size() + 2 * D * w_a.element_size()
        group = f"norm_add_norm T{T} D{D}"
        params = {"T": T, "D": D, "residual": "norm_add_norm", "dtype": str(dtype)[6:]}
        args = (x, residual, w_a, w_b, EPS)
        out.append(Case(group, "l2v", lambda a=args: l2v_norm_add_norm(*a), bytes=nbytes,
                        params=params))
        out.append(Case(group, "l2v_2x_rms_norm", lambda a=args: l2v_two_rms_norms(*a),
                        bytes=nbytes, params=params))
        out.append(Case(group, "torch", lambda a=args: torch_norm_add_norm(*a), bytes=nbytes,
                        params=params))
        if torch_compiled is not None:
            out.append(Case(group, "torch.compile", lambda a=args: torch_compiled(*a),
                            bytes=nbytes, params=params))
        out.append(copy_case(group, nbytes, params, device))
    return out


def cases(smoke: bool) -> list[Case]:
    device = "cuda" if on_gpu() else "cpu"
    if smoke:
        dtype, shapes = torch.float16, [(7, 64), (33, 96)]
    else:
        dtype = torch.bfloat16
        shapes = [(T, D) for D in (4096, 576) for T in (128, 2048, 16384, 65536)]
    torch_compiled = None if smoke else compiled(torch_rms_norm)
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for T, D in shapes:
        x = torch.randn(T, D, generator=g, device=device).to(dtype)
        residual = torch.randn(T, D, generator=g, device=device).to(dtype)
        weight = (torch.rand(D, generator=g, device=device) + 0.5).to(dtype)
        for with_residual in (False, True):
            r = residual if with_residual else None
            n_tensors = 4 if with_residual else 2  # x (+ residual) read, y (+ h) written
            nbytes = (n_tensors * x.numel() * x.element_size()
                      + weight.numel() * weight.element_size())
            group = f"rms_norm T{T} D{D}" + (" +residual" if with_residual else "")
            params = {"T": T, "D": D, "residual": with_residual, "dtype": str(dtype)[6:]}
            out.append(Case(group, "l2v", lambda x=x, r=r, w=weight: l2v_rms_norm(x, w, EPS, r),
                            bytes=nbytes, params=params))
            out.append(Case(group, "torch", lambda x=x, r=r, w=weight: torch_rms_norm(x, w, EPS, r),
                            bytes=nbytes, params=params))
            if torch_compiled is not None:
                out.append(Case(group, "torch.compile",
                                lambda x=x, r=r, w=weight: torch_compiled(x, w, EPS, r),
                                bytes=nbytes, params=params))
            out.append(copy_case(group, nbytes, params, device))
    # Gemma-2/3 widths: Gemma-3-270M 640, Gemma-2-2B 2304, Gemma-2-9B 3584.
    sandwich = [(7, 64)] if smoke else [(T, D) for D in (640, 2304, 3584) for T in (2048, 16384)]
    return out + norm_add_norm_cases(sandwich, dtype, device, smoke)


if __name__ == "__main__":
    kernel_bench_main("norm", cases, title="Fused add + RMSNorm; Gemma norm -> add -> norm")
