"""RoPE on packed q and k (views of the fused QKV buffer, in place): l2v Triton kernel vs plain
torch, torch.compile and a copy.

python -m bench.bench_rope [--smoke] [--out DIR]

GB/s counts the bytes the op must move: read and write q and k, read the position ids (the cos/sin
tables are small and stay in cache). `d2d_copy` copies the same number of bytes: its ratio
(ours_speedup) is the fraction of copy bandwidth the kernel reaches. "l2v" times what the model
runs: the unchecked launcher, in place (the public function adds input checks and a sync to
check the positions).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import Case, compiled, copy_case, kernel_bench_main, on_gpu  # noqa: E402
from l2v_kernels import reference  # noqa: E402
from l2v_kernels.rope import apply_rotary_fwd  # noqa: E402

# (name, query heads, kv heads, head dim, rope theta) from the models' config.json
MODELS = [
    ("Mistral-7B", 32, 8, 128, 1e6),
    ("Llama-2-7B", 32, 32, 128, 1e4),
    ("SmolLM2-135M", 9, 3, 64, 1e5),
]


def torch_rope_(q, k, cos, sin, pos):
    """Plain PyTorch rotate-half RoPE in fp32, written back into q and k."""
    c = cos[pos][:, None, :]
    s = sin[pos][:, None, :]
    for x in (q, k):
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
    return q, k



def cases(smoke: bool) -> list[Case]:
    device = "cuda" if on_gpu() else "cpu"
    if smoke:
        dtype, models, token_counts = torch.float16, [("tiny", 4, 2, 64, 1e4)], [7, 33]
    else:
        dtype, models, token_counts = torch.bfloat16, MODELS, [2048, 16384]
    rope_c = None if smoke else compiled(torch_rope_)
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, Hq, Hkv, D, theta in models:
        inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
        cos, sin = reference.rope_cos_sin(inv_freq, 4096)
        for T in token_counts:
            qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g, device=device).to(dtype)
            q = qkv[:, : Hq * D].view(T, Hq, D)
            k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
            # texts of 512 tokens packed back to back
            pos = (torch.arange(T, device=device) % 512).to(torch.int32)
            nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + pos.numel() * 4
            group = f"rope {name} T{T}"
            params = {"model": name, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype)[6:]}
            args = (q, k, cos, sin, pos)
            # In place, like the model: values drift over repetitions, which costs nothing.
            out.append(Case(group, "l2v", lambda a=args: apply_rotary_fwd(*a, a[0], a[1]),
                            bytes=nbytes, params=params))
            out.append(Case(group, "torch", lambda a=args: torch_rope_(*a), bytes=nbytes,
                            params=params))
            if rope_c is not None:
                out.append(Case(group, "torch.compile", lambda a=args: rope_c(*a), bytes=nbytes,
                                params=params))
            out.append(copy_case(group, nbytes, params, device))
    return out


if __name__ == "__main__":
    kernel_bench_main("rope", cases, title="RoPE on packed q, k (in place)")
