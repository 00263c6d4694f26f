"""GEMMs with fused epilogues and the LoRA merge: l2v vs cuBLAS plus a separate epilogue.

python -m bench.bench_gemm [--smoke] [--out DIR]

Groups, one per (op, model, M, N, K), with (N, K) from the models' config.json (bench.workloads):
- "gemm+residual" (o_proj, down_proj): l2v = one cuBLASLt GEMM adding the residual in its fp32
  epilogue (torch.ops.l2v.gemm_residual); "cublas+epilogue" = torch.addmm(residual, x, w.T);
  "matmul+add" = x @ w.T + residual (the Hugging Face model's two kernels).
- "gemm+bias" (qkv_proj, Qwen2-style bias): l2v = the same op with the bias epilogue;
  "cublas+epilogue" = torch.addmm(bias, x, w.T).
- "gemm+swiglu" (gate_up_proj): l2v = the Triton GEMM with the SiLU-times-up epilogue
  (torch.ops.l2v.gemm_swiglu); "cublas+epilogue" = x @ w.T, then silu(gate) * up.
- every GEMM group also times "cublas_matmul" = the bare x @ w.T of the same shape, so
  ours_speedup on that row is our fraction of plain cuBLAS speed (epilogue included).
- "lora_merge" (Mistral-7B down_proj, r = 16): l2v = the extension's in-place merge; "torch" =
  the same fp32 math in PyTorch (row blocks of B @ A, add, one rounding).

"l2v" calls the registered ops directly (what the model's hot path runs), so Python-side checks
are not timed; FLOPs are 2*M*N*K (swiglu: N = 2I), bytes the minimal HBM traffic. --smoke (the
default without CUDA): tiny shapes, fp32, torch paths and the Triton interpreter, seconds.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import Case, Lazy, kernel_bench_main  # noqa: E402
from bench.workloads import MODEL_SHAPES  # noqa: E402
from l2v_kernels import gemm  # noqa: E402

# Run order: the encoder's packed batches (its default token budget, 16384), the latency
# sizes, then the rest; the LoRA merge right after the first M (bench.common.run_cases
# times cases in list order and stops at the time budget).
REAL_M = (16384, 128, 2048, 8192)
SMOKE_M = (1, 17)
LORA_RANK = 16


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of a decoder layer's GEMMs, from config.json fields."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }


SMOKE_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 80}
REAL_MODELS = ("mistral-7b", "llama-2-7b")



def _ours_gemm_residual():
    if gemm.extension_available():
        return torch.ops.l2v.gemm_residual
    return lambda x, w, r, b: gemm.gemm_residual(x, w, r, b)  # torch path without the build


def _silu_mul(h):
    i = h.shape[-1] // 2
    return F.silu(h[:, :i]) * h[:, i:]


def gemm_cases(model: str, shapes: dict, m: int, dtype, device, inputs: dict) -> list[Case]:
    """The groups of one model at one M. `inputs` caches tensors shared between groups."""
    elt = torch.tensor([], dtype=dtype).element_size()

    def tensor(key, *shape, scale=1.0):
        def make():
            if key not in inputs:
                gen = torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))
                t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
                inputs[key] = t.to(dtype)
            return inputs[key]

        return Lazy(make)

    ours_residual = _ours_gemm_residual()
    cases = []
    for proj, (n, k) in shapes.items():
        group = f"{proj} {model} M{m} N{n} K{k}"
        params = {"op": proj, "model": model, "M": m, "N": n, "K": k, "dtype": str(dtype)[6:]}
        x = tensor(("x", m, k), m, k)
        w = tensor(("w", model, proj), n, k, scale=k**-0.5)
        flops = 2.0 * m * n * k
        if proj in ("o", "down"):
            r = tensor(("residual", m, n), m, n)
            nbytes = (m * k + n * k + 2 * m * n) * elt
            fns = {
                "l2v": lambda x=x, w=w, r=r: ours_residual(x(), w(), r(), None),
                "cublas+epilogue": lambda x=x, w=w, r=r: torch.addmm(r(), x(), w().T),
                "matmul+add": lambda x=x, w=w, r=r: x() @ w().T + r(),
            }
            group = "gemm+residual " + group
        elif proj == "qkv":
            b = tensor(("bias", model, proj), n)
            nbytes = (m * k + n * k + m * n + n) * elt
            fns = {
                "l2v": lambda x=x, w=w, b=b: ours_residual(x(), w(), None, b()),
                "cublas+epilogue": lambda x=x, w=w, b=b: torch.addmm(b(), x(), w().T),
            }
            group = "gemm+bias " + group
        else:  # gate_up
            nbytes = (m * k + n * k + m * n // 2) * elt
            fns = {
                "l2v": lambda x=x, w=w: torch.ops.l2v.gemm_swiglu(x(), w(), "silu"),
                "cublas+epilogue": lambda x=x, w=w: _silu_mul(x() @ w().T),
            }
            group = "gemm+swiglu " + group
        fns["cublas_matmul"] = lambda x=x, w=w: x() @ w().T
        for impl, fn in fns.items():
            cases.append(Case(group, impl, fn, flops=flops, bytes=nbytes, params=params))
    return cases


def lora_cases(n: int, k: int, rank: int, dtype, device) -> list[Case]:
    """In-place merge into a [n, k] weight; the tiny scale keeps W finite over many repeats."""
    def make():
        gen = torch.Generator(device=device).manual_seed(7)
        w = torch.randn(n, k, generator=gen, device=device).to(dtype)
        a = torch.randn(rank, k, generator=gen, device=device).to(dtype)
        b = torch.randn(n, rank, generator=gen, device=device).to(dtype)
        return w, a, b

    tensors = Lazy(make)
    elt = torch.tensor([], dtype=dtype).element_size()
    group = f"lora_merge N{n} K{k} r{rank}"
    params = {"op": "lora_merge", "N": n, "K": k, "rank": rank, "dtype": str(dtype)[6:]}
    nbytes = 2 * n * k * elt + (n + k) * rank * elt  # W read + written, A and B read
    flops = 2.0 * n * k * rank

    def run(impl):
        w, a, b = tensors()
        return gemm.lora_merge_(w, a, b, 1e-4, impl=impl)

    impls = {"l2v": "auto", "torch": "torch"}
    return [Case(group, name, lambda impl=impl: run(impl), flops=flops, bytes=nbytes, params=params)
            for name, impl in impls.items()]


def cases(smoke: bool) -> list[Case]:
    if smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        shapes = projection_shapes(SMOKE_CONFIG)
        out = []
        for m in SMOKE_M:
            out += gemm_cases("smoke", shapes, m, dtype, device, {})
        return out + lora_cases(96, 160, LORA_RANK, dtype, device)
    out = []
    inputs: dict = {}  # x and residual of one M are shared by both models' groups
    mistral = projection_shapes(MODEL_SHAPES["mistral-7b"])
    n, k = mistral["down"]
    for i, m in enumerate(REAL_M):
        for model in REAL_MODELS:
            shapes = projection_shapes(MODEL_SHAPES[model])
            if model != REAL_MODELS[0]:
                shapes.pop("o")  # the same 4096 x 4096 GEMM as Mistral's
            out += gemm_cases(model, shapes, m, torch.bfloat16, "cuda", inputs)
        if i == 0:  # early: the cases run in order and a time budget cuts the tail
            out += lora_cases(n, k, LORA_RANK, torch.bfloat16, "cuda")
    return out


if __name__ == "__main__":
    kernel_bench_main("gemm", cases, title="GEMM epilogues and LoRA merge: l2v vs cuBLAS")
