"""Gated activation (SwiGLU) on a fused gate|up buffer: l2v Triton kernel vs plain torch,
torch.compile and a copy.

python -m bench.bench_activation [--smoke] [--out DIR]

GB/s counts the bytes the op must move: read [T, 2I], write [T, I]. `d2d_copy` copies the same
number of bytes: its ratio (ours_speedup) is the fraction of copy bandwidth the kernel reaches.
"l2v" times what the model runs when the GEMM's fused epilogue is not used: the unchecked
launcher plus the allocation of its output.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import Case, compiled, copy_case, kernel_bench_main, on_gpu  # noqa: E402
from l2v_kernels.activation import gated_act_fwd  # noqa: E402

# (name, intermediate size) from the models' config.json
MODELS = [("Mistral-7B", 14336), ("Llama-2-7B", 11008), ("SmolLM2-135M", 1536)]


def l2v_gated_act(x, act="silu"):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    gated_act_fwd(x, out, act)
    return out


def torch_swiglu(x):
    """Plain PyTorch, as Hugging Face's MLP computes it (in the activation dtype)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up



def cases(smoke: bool) -> list[Case]:
    device = "cuda" if on_gpu() else "cpu"
    if smoke:
        dtype, models, token_counts = torch.float16, [("tiny", 48)], [7, 33]
    else:
        dtype, models, token_counts = torch.bfloat16, MODELS, [2048, 16384]
    swiglu_c = None if smoke else compiled(torch_swiglu)
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, I in models:
        for T in token_counts:
            x = torch.randn(T, 2 * I, generator=g, device=device).to(dtype)
            nbytes = 3 * T * I * x.element_size()
            group = f"swiglu {name} T{T} I{I}"
            params = {"model": name, "T": T, "I": I, "dtype": str(dtype)[6:]}
            out.append(Case(group, "l2v", lambda x=x: l2v_gated_act(x), bytes=nbytes,
                            params=params))
            out.append(Case(group, "torch", lambda x=x: torch_swiglu(x), bytes=nbytes,
                            params=params))
            if swiglu_c is not None:
                out.append(Case(group, "torch.compile", lambda x=x: swiglu_c(x), bytes=nbytes,
                                params=params))
            out.append(copy_case(group, nbytes, params, device))
    return out


if __name__ == "__main__":
    kernel_bench_main("activation", cases, title="Gated activation (SwiGLU)")
