"""GEMMs with fused epilogues, and the in-place LoRA merge.

- `lora_merge_(weight, lora_A, lora_B, scale)`: W += scale * B @ A in place, the product summed in
  fp32 and rounded once to W's dtype. C++ extension (`torch.ops.l2v.lora_merge_`: a CUDA kernel
  and an ATen CPU implementation), else the same math in torch.
- `gemm_residual(x, w, residual, bias)`: x @ w.T (+ bias) (+ residual) with one rounding: on CUDA
  one cuBLASLt call with the residual (beta = 1) and the bias added to the fp32 accumulator in
  the epilogue (`torch.ops.l2v.gemm_residual`), else cuBLAS (torch.addmm / F.linear).
- `gemm_swiglu(x, w_gate_up, act)`: act(x @ W_gate.T) * (x @ W_up.T), a Triton GEMM with two fp32
  accumulators (gate and up tiles of the same output columns) and the activation-times-up
  epilogue, so the [M, 2I] intermediate never reaches memory (`torch.ops.l2v.gemm_swiglu`).
- `pack_gate_up` / `unpack_gate_up`: Hugging Face gate_proj/up_proj <-> the packed weight.
- `extension_available()`: whether l2v_kernels._C loaded.

`impl` on every op: "auto" (the fused path where it can run and pays off, else torch), "fused"
(raises RuntimeError saying why when it cannot run), "torch".

Longer than ~500 lines on purpose: the three GEMM-shaped ops share the extension's loading, the
fallback rules and the alignment checks (lora_merge_, gemm_residual, gemm_swiglu).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from l2v_kernels._checks import FLOAT_DTYPES, check_tensor, interpreting
from l2v_kernels.torch_paths import lora_merge_torch_

log = logging.getLogger(__name__)

IMPLS = ("auto", "fused", "torch")
ACTIVATIONS = ("silu", "gelu_tanh")
HALF_DTYPES = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------
# The C++/CUDA extension
# ----------------------------------------------------------------------------------------------


def _fake_lora_merge_(weight, lora_A, lora_B, scale):
    return None


def _fake_gemm_residual(x, w, residual=None, bias=None):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "gemm_residual: x and w must be 2-D")
    torch._check(x.shape[1] == w.shape[1], lambda: "gemm_residual: x and w must share K")
    return x.new_empty((x.shape[0], w.shape[0]))


def _load_extension() -> str | None:
    """Import l2v_kernels._C and register its fake functions; None if it loaded, else why not.

    Runs once, when this module is imported; the ops read the result from _EXTENSION_ERROR (a
    plain global, which torch.compile can trace through).
    """
    try:
        importlib.import_module("l2v_kernels._C")
    except ImportError as e:
        reason = (f"the C++ extension l2v_kernels._C is not built ({e}); build it with "
                  "`pip install --no-build-isolation -e .` on a machine with a CUDA toolkit")
        log.debug("l2v: %s", reason)
        return reason
    except (OSError, RuntimeError) as e:  # built, but cannot load (library or registration error)
        reason = f"the C++ extension l2v_kernels._C failed to load: {e}"
        log.warning("l2v: %s; using the torch fallbacks", reason)
        return reason
    # Fake (meta) functions: shapes for torch.compile tracing and torch.library.opcheck.
    torch.library.register_fake("l2v::lora_merge_")(_fake_lora_merge_)
    torch.library.register_fake("l2v::gemm_residual")(_fake_gemm_residual)
    return None


# Once per process. Torch points at this module when an op's fake function is missing
# (set_python_module in csrc/ops.cpp): importing it registers them.
_EXTENSION_ERROR: str | None = _load_extension()


def extension_available() -> bool:
    """True when the C++/CUDA extension l2v_kernels._C is built and loaded."""
    return _EXTENSION_ERROR is None


_said = set()


def _fallback(op: str, reason: str) -> None:
    """Automatic choice fell back to torch: say so once per reason, at debug level."""
    if (op, reason) not in _said:
        _said.add((op, reason))
        log.debug("l2v %s: using the torch path (%s)", op, reason)


def _check_impl(op: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")


def _cannot_fuse(op: str, reason: str) -> RuntimeError:
    return RuntimeError(f"{op}(impl='fused') cannot run: {reason}. Use impl='auto' or 'torch'.")


def _same_device(op: str, *tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise ValueError(f"{op}: all tensors must be on one device, got {names}")


def _aligned16(t: torch.Tensor) -> bool:
    """Base address and row stride multiples of 16 bytes (what the fast GEMM kernels want)."""
    if torch.compiler.is_compiling():
        return True  # fake tensors have no address; the extension handles any alignment anyway
    rows_ok = t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0 and rows_ok


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


# ----------------------------------------------------------------------------------------------
# LoRA merge
# ----------------------------------------------------------------------------------------------


def lora_merge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Merge a LoRA adapter into a weight in place: W += scale * B @ A. Returns `weight`.

    weight [N, K] float32/float16/bfloat16 (last dim contiguous for the extension), lora_A [r, K]
    and lora_B [N, r] of one float dtype (may differ from W's), all on one device (CPU or CUDA).
    The product is accumulated in fp32 and added to W in fp32, then rounded once to W's dtype
    (PEFT's adapter scale is lora_alpha / r). impl: "auto" (extension if built, else torch),
    "fused" (the extension: CUDA kernel or its CPU implementation), "torch".
    """
    op = "lora_merge_"
    _check_impl(op, impl)
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    n, k = weight.shape
    check_tensor(op, "lora_A", lora_A, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, k))
    check_tensor(op, "lora_B", lora_B, ndim=2, dtypes=(lora_A.dtype,), shape=(n, lora_A.shape[0]))
    _same_device(op, weight, lora_A, lora_B)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")

    reason = _EXTENSION_ERROR
    if reason is None and not _last_dim_contiguous(weight):
        reason = "weight must have a contiguous last dimension (stride 1)"
    if impl == "fused" and reason is not None:
        raise _cannot_fuse(op, reason)
    with torch.no_grad():
        if impl != "torch" and reason is None:
            torch.ops.l2v.lora_merge_(weight, lora_A, lora_B, float(scale))
        else:
            if impl == "auto":
                _fallback(op, reason)
            lora_merge_torch_(weight, lora_A, lora_B, float(scale))
    return weight


# ----------------------------------------------------------------------------------------------
# GEMM + bias + residual
# ----------------------------------------------------------------------------------------------


def _gemm_residual_torch(x, w, residual, bias):
    if x.device.type == "cpu":
        # Reference numerics: fp32 products and sums, one rounding.
        out = x.float() @ w.float().T
        if bias is not None:
            out += bias.float()
        if residual is not None:
            out += residual.float()
        return out.to(x.dtype)
    # cuBLAS as a plain PyTorch model runs it: addmm adds the residual (beta = 1) to the fp32
    # accumulator; F.linear fuses the bias.
    if residual is None:
        return F.linear(x, w, bias)
    out = torch.addmm(residual, x, w.T)
    return out if bias is None else out.add_(bias)


def _gemm_residual_fused_reason(x, w, residual, bias) -> str | None:
    """Why the extension's cuBLASLt GEMM cannot take these inputs (None: it can)."""
    if _EXTENSION_ERROR is not None:
        return _EXTENSION_ERROR
    if x.device.type != "cuda":
        return f"it needs CUDA tensors, got {x.device}"
    if x.dtype not in HALF_DTYPES:
        return f"it takes float16/bfloat16, got {x.dtype}"
    for name, t in (("x", x), ("w", w), ("residual", residual)):
        if t is not None and not _last_dim_contiguous(t):
            return f"{name} must have a contiguous last dimension (stride 1)"
    return None


def gemm_residual(
    x: torch.Tensor,
    w: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """x @ w.T (+ bias) (+ residual) -> [M, N] in x's dtype: fp32 accumulate, one rounding.

    x [M, K], w [N, K] (nn.Linear's weight), residual [M, N], bias [N], one dtype
    (float16/bfloat16; float32 takes the torch path), one device. The fused path (CUDA, the
    extension) is one cuBLASLt GEMM whose epilogue adds bias and residual to the fp32 accumulator
    before the single rounding; rows may be strided, the last dim must be contiguous. "auto" uses
    it for 16-byte aligned inputs and falls back to torch (cuBLAS addmm / F.linear) otherwise.
    """
    op = "gemm_residual"
    _check_impl(op, impl)
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    m, k = x.shape
    check_tensor(op, "w", w, ndim=2, dtypes=(x.dtype,), shape=(None, k))
    n = w.shape[0]
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=2, dtypes=(x.dtype,), shape=(m, n))
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(x.dtype,), shape=(n,))
    _same_device(op, x, w, residual, bias)

    if impl == "torch":
        return _gemm_residual_torch(x, w, residual, bias)
    reason = _gemm_residual_fused_reason(x, w, residual, bias)
    if impl == "fused":
        if reason is not None:
            raise _cannot_fuse(op, reason)
        return torch.ops.l2v.gemm_residual(x, w, residual, bias)
    if reason is None and not all(_aligned16(t) for t in (x, w, residual) if t is not None):
        reason = "inputs are not 16-byte aligned"
    if reason is not None:
        if x.device.type == "cuda":
            _fallback(op, reason)
        return _gemm_residual_torch(x, w, residual, bias)
    return torch.ops.l2v.gemm_residual(x, w, residual, bias)


# The extension's cuBLASLt op when it is loaded, else the cuBLAS torch path.
_gemm_residual_unchecked = (
    torch.ops.l2v.gemm_residual if _EXTENSION_ERROR is None else _gemm_residual_torch
)


def gemm_residual_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unchecked launcher of gemm_residual (no validation, no host sync: CUDA-graph capturable).

    The caller guarantees (validated once) what gemm_residual(impl="auto") checks per call: CUDA,
    float16/bfloat16, one dtype and device, x [M, K], w [N, K], residual [M, N] or None, bias [N]
    or None, contiguous last dims, 16-byte aligned. Returns x @ w.T (+ bias) (+ residual), fp32
    accumulate, one rounding: the extension's cuBLASLt op when it is loaded, else cuBLAS
    (torch.addmm / F.linear). Both allocate their result: with `out` given the result is copied
    into it (one extra pass over [M, N]; leave out=None on the hot path).
    """
    y = _gemm_residual_unchecked(x, w, residual, bias)
    return y if out is None else out.copy_(y)


# ----------------------------------------------------------------------------------------------
# GEMM + SwiGLU / GELU-tanh gating (Triton)
# ----------------------------------------------------------------------------------------------
# Packed weight layout: w_gate_up = cat([gate_proj, up_proj]) [2I, K], rows 0..I-1 the gate,
# rows I..2I-1 the up projection (the order of HF's gate/up and of reference.gated_act). Each
# program reads the gate tile and the up tile of the same BLOCK_N output columns: two [BLOCK_N, K]
# row slabs, each contiguous along K. The layout does not depend on the kernel's block sizes, so
# autotuning can never disagree with a packing done at load time.

_ACT_CODES = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _gemm_swiglu_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    I,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    ACT: tl.constexpr,  # 0: silu, 1: gelu (tanh approximation)
    IEEE_FP32: tl.constexpr,  # fp32 inputs: exact fp32 dot products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    M_CLASS: tl.constexpr,  # unused: the size class of M, a tuning key (see M_CLASS_BOUNDS)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(I, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks of x sweep the weight's column blocks together, so the
    # weight tiles they share are still in L2 when the next row block needs them.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end read row 0 instead (their results are never stored), so the loads in the
    # K loop are masked along K only. int64: M * K passes 2**31 for long batches.
    rows_x = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_g = tl.where(offs_n < I, offs_n, 0).to(tl.int64)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
    # Weight tiles as [BLOCK_K, BLOCK_N] (K-major), the up rows I rows below the gate rows.
    g_ptrs = w_ptr + rows_g[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = w_ptr + (rows_g + I)[None, :] * stride_wn + offs_k[:, None]

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE_FP32:
            acc_g = tl.dot(x, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(x, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    # Epilogue in fp32, one rounding. gelu_tanh: 0.5 g (1 + tanh(z)) == g * sigmoid(2 z).
    if ACT == 0:
        act = acc_g * tl.sigmoid(acc_g)
    else:
        z = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        act = acc_g * tl.sigmoid(2.0 * z)
    out = (act * acc_u).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=(offs_m < M)[:, None] & (offs_n < I)[None, :])


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps, num_stages=stages,
    )


# sm90 (H100/H200) candidates. Large M: 128-row tiles with 64/128 columns of gate AND of up (an
# effective 128-256 wide B tile), K steps of 64, 3-4 stages (a 128x128x64 stage is 48 KiB).
_LARGE_M_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 64, 64, 4, 4),
    _config(128, 64, 64, 8, 4),
    _config(64, 128, 64, 4, 4),
]
# M <= 128 (one query, a few short texts): the weight stream dominates; narrow M tiles and
# narrower N tiles put more programs on the 132 SMs. No 16 x 64 tile: it spills 4 B on sm_90a
# (ptxas, Triton 3.6 and 3.8, with K steps of 64 and 128; bench/aot_check.py).
_SMALL_M_CONFIGS = [
    _config(16, 32, 128, 4, 4),
    _config(16, 128, 64, 4, 4),
    _config(32, 64, 64, 4, 4),
    _config(32, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]
# M <= 16: 16-row tiles only (the smallest wgmma M); fewer or more columns per program.
_TINY_M_CONFIGS = [
    _config(16, 32, 128, 4, 4),
    _config(16, 128, 64, 4, 4),
]
# fp32 (a testing dtype: "auto" sends it to cuBLAS) is not tuned: one small tile, chosen from
# ptxas reports (sm90: 128 registers, no spills, 20 KiB shared memory). The tiles above spill
# heavily in fp32 (no tensor cores: FMA dots) and need up to 288 KiB of shared memory.
_FP32_CONFIG = _config(32, 64, 32, 4, 2)
# The interpreter (CPU tests): one small config, no autotuning (it would benchmark each config).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}

# M (the token count) changes with every batch, so it is not an autotuning key: each size class
# of M has its own autotuner, tuned per (I, K, dtype) at the first call in that class (so the
# query class is tuned at a query's M, not at M = 1). A class choice guards only a range of M,
# so torch.compile with dynamic shapes does not recompile per M. M_CLASS is in the key so that
# classes with the same candidates keep separate tuning results on disk.
#   0 tiny    M <= 16      a text of a few tokens (tests, tiny batches)
#   1 query   M <= 128     one query (BOS + instruction + 10-40 tokens): batch-1 latency
#   2 medium  M <= 1024    a few texts: batch-8 latency
#   3 large   M > 1024     packed throughput batches (the encoder's token budget)
M_CLASS_BOUNDS = (16, 128, 1024)
M_CLASS_NAMES = ("tiny", "query", "medium", "large")
_CLASS_CONFIGS = (_TINY_M_CONFIGS, _SMALL_M_CONFIGS, _LARGE_M_CONFIGS, _LARGE_M_CONFIGS)
# Weights of at most this many elements per half (I * K: test shapes, SmolLM2-135M's 1536 x 576)
# are not autotuned: one fixed config per M class, as tuning them costs more compile and timing
# than it can win. Model-sized weights (1.3B and up: 5504 x 2048, 14336 x 4096) are tuned.
TUNE_MIN_WEIGHT = 1 << 23
_FIXED_CONFIGS = (
    _config(16, 32, 128, 4, 4),
    _config(32, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 3),
    _config(128, 128, 64, 8, 3),
)
_KEY = ["I", "K", "M_CLASS"]
# Tuning results are kept on disk where this Triton can (3.2+): a new process does not benchmark
# every config again on its first call.
_AUTOTUNE_EXTRA = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)


def m_class(m: int) -> int:
    """The size class of M (0 tiny, 1 query, 2 medium, 3 large; see M_CLASS_BOUNDS)."""
    return sum(m > bound for bound in M_CLASS_BOUNDS)


def _swiglu_autotuner(configs):
    # One config: Triton runs it without benchmarking (the fixed and fp32 paths).
    extra = _AUTOTUNE_EXTRA if len(configs) > 1 else {}
    return triton.autotune(configs=configs, key=_KEY, **extra)(_gemm_swiglu_kernel)


_TUNED = tuple(_swiglu_autotuner(c) for c in _CLASS_CONFIGS)
_FIXED = tuple(_swiglu_autotuner([c]) for c in _FIXED_CONFIGS)
_FP32 = _swiglu_autotuner([_FP32_CONFIG])


def swiglu_config_choice(m: int, i: int, k: int, dtype: torch.dtype):
    """(autotuner, M class, candidate configs) a [M, K] x [2I, K] call of this dtype runs."""
    c = m_class(m)
    if dtype == torch.float32:
        return _FP32, c, [_FP32_CONFIG]
    if i * k <= TUNE_MIN_WEIGHT:
        return _FIXED[c], c, [_FIXED_CONFIGS[c]]
    return _TUNED[c], c, _CLASS_CONFIGS[c]


def gemm_swiglu_fwd(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    act: str = "silu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unchecked launcher of the Triton gemm_swiglu kernel (no validation, no host sync:
    CUDA-graph capturable after one warm-up call per M class has autotuned).

    The caller guarantees (validated once): x [M, K], w_gate_up [2I, K] (pack_gate_up), one dtype
    (fp16/bf16/fp32), one device (CUDA, or CPU under TRITON_INTERPRET=1), contiguous last dims,
    act in ACTIVATIONS; out [M, I] in x's dtype with stride(1) == 1 (allocated when None).
    Writes act(x @ gate.T) * (x @ up.T) into out and returns it.
    """
    m, k = x.shape
    i = w_gate_up.shape[0] // 2
    if out is None:
        out = x.new_empty((m, i))
    if m == 0 or i == 0:
        return out
    if k == 0:
        return out.zero_()
    args = (x, w_gate_up, out, m, i, k, x.stride(0), w_gate_up.stride(0), out.stride(0))
    consts = {"ACT": _ACT_CODES[act], "IEEE_FP32": x.dtype == torch.float32}
    wrap = getattr(torch.library, "wrap_triton", lambda kernel: kernel)  # torch < 2.6: plain
    if interpreting():
        # Not wrapped: under the interpreter the op is an opaque custom_op, and torch 2.11's
        # wrap_triton refuses the interpreter's kernel objects (it wants a JITFunction).
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(i, cfg["BLOCK_N"]),)
        _gemm_swiglu_kernel[grid](*args, **consts, **cfg, M_CLASS=0)
        return out
    kernel, size_class, _ = swiglu_config_choice(m, i, k, x.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(i, meta["BLOCK_N"]),)

    wrap(kernel)[grid](*args, **consts, M_CLASS=size_class)
    return out


def _gemm_swiglu_impl(x: torch.Tensor, w_gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """The body of the registered op torch.ops.l2v.gemm_swiglu (its schema is inferred from this
    signature, so it takes no `out`): a new [M, I] tensor."""
    return gemm_swiglu_fwd(x, w_gate_up, act)


def _fake_gemm_swiglu(x, w_gate_up, act):
    return x.new_empty((x.shape[0], w_gate_up.shape[0] // 2))


def _define_gemm_swiglu_op():
    """Register torch.ops.l2v.gemm_swiglu so torch.compile traces it and CUDA graphs capture it
    (after one warm-up call has autotuned the shape).

    On GPUs a triton_op: Inductor sees the Triton kernel, and the fake function comes from running
    the body on fake tensors. Under the CPU interpreter (and torch < 2.6) an opaque custom_op with
    an explicit fake function: the interpreter would try to run the kernel on fake tensors.
    """
    if hasattr(torch.library, "triton_op") and not interpreting():
        return torch.library.triton_op("l2v::gemm_swiglu", _gemm_swiglu_impl, mutates_args=())
    op = torch.library.custom_op("l2v::gemm_swiglu", _gemm_swiglu_impl, mutates_args=())
    op.register_fake(_fake_gemm_swiglu)
    return op


_gemm_swiglu_op = _define_gemm_swiglu_op()


def _activation(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def _gemm_swiglu_torch(x, w_gate_up, act):
    i = w_gate_up.shape[0] // 2
    if x.device.type == "cpu":
        # Reference numerics: fp32 GEMM and epilogue, one rounding.
        h = x.float() @ w_gate_up.float().T
        return (_activation(h[:, :i], act) * h[:, i:]).to(x.dtype)
    # cuBLAS GEMM into the [M, 2I] intermediate, then the epilogue, as a plain model runs it.
    h = x @ w_gate_up.T
    return _activation(h[:, :i], act) * h[:, i:]


def _gemm_swiglu_fused_reason(x, w_gate_up) -> str | None:
    """Why the Triton kernel cannot take these inputs (None: it can)."""
    if x.device.type == "cpu" and not interpreting():
        return "it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got cpu"
    if x.device.type not in ("cpu", "cuda"):
        return f"it needs CUDA tensors, got {x.device}"
    for name, t in (("x", x), ("w_gate_up", w_gate_up)):
        if not _last_dim_contiguous(t):
            return f"{name} must have a contiguous last dimension (stride 1)"
    return None


def gemm_swiglu(
    x: torch.Tensor, w_gate_up: torch.Tensor, *, act: str = "silu", impl: str = "auto"
) -> torch.Tensor:
    """act(x @ W_gate.T) * (x @ W_up.T) -> [M, I] in x's dtype: the gated MLP's first half.

    x [M, K]; w_gate_up [2I, K] from `pack_gate_up(gate_proj, up_proj)` (gate rows, then up rows),
    x's dtype (float16/bfloat16/float32), same device. act: "silu" (Llama/Mistral/Qwen2) or
    "gelu_tanh" (Gemma). The fused path is one Triton GEMM that keeps gate and up in fp32
    accumulators and rounds act(gate) * up once. "auto" uses it for float16/bfloat16 on CUDA;
    otherwise (and for "torch") cuBLAS computes the [M, 2I] product and torch the epilogue (on
    CPU in fp32 with one rounding, matching the fused numerics).
    """
    op = "gemm_swiglu"
    _check_impl(op, impl)
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}, got {act!r}")
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_gate_up", w_gate_up, ndim=2, dtypes=(x.dtype,), shape=(None, x.shape[1]))
    if w_gate_up.shape[0] % 2:
        raise ValueError(
            f"{op}: w_gate_up must hold 2*I rows (gate, then up; see pack_gate_up), got "
            f"{w_gate_up.shape[0]}"
        )
    _same_device(op, x, w_gate_up)

    if impl == "torch":
        return _gemm_swiglu_torch(x, w_gate_up, act)
    reason = _gemm_swiglu_fused_reason(x, w_gate_up)
    if impl == "fused":
        if reason is not None:
            raise _cannot_fuse(op, reason)
        return torch.ops.l2v.gemm_swiglu(x, w_gate_up, act)
    if reason is None and x.device.type != "cuda":
        reason = "CPU tensors (the interpreter is for tests)"
    if reason is None and x.dtype not in HALF_DTYPES:
        reason = "float32 (cuBLAS is faster than a Triton fp32 GEMM)"
    if reason is not None:
        if x.device.type == "cuda":
            _fallback(op, reason)
        return _gemm_swiglu_torch(x, w_gate_up, act)
    return torch.ops.l2v.gemm_swiglu(x, w_gate_up, act)


def pack_gate_up(gate_proj: torch.Tensor, up_proj: torch.Tensor) -> torch.Tensor:
    """HF gate_proj.weight [I, K] and up_proj.weight [I, K] -> w_gate_up [2I, K] (new tensor).

    The layout gemm_swiglu (fused and torch paths alike) takes: gate rows, then up rows.
    """
    op = "pack_gate_up"
    check_tensor(op, "gate_proj", gate_proj, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "up_proj", up_proj, ndim=2, dtypes=(gate_proj.dtype,), shape=gate_proj.shape)
    _same_device(op, gate_proj, up_proj)
    return torch.cat([gate_proj, up_proj], dim=0)


def unpack_gate_up(w_gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_gate_up: w_gate_up [2I, K] -> (gate_proj [I, K], up_proj [I, K]) views."""
    check_tensor("unpack_gate_up", "w_gate_up", w_gate_up, ndim=2)
    rows = w_gate_up.shape[0]
    if rows % 2:
        raise ValueError(f"unpack_gate_up: w_gate_up must have 2*I rows, got {rows}")
    return w_gate_up[: rows // 2], w_gate_up[rows // 2 :]

