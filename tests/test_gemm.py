"""l2v_kernels.gemm: LoRA merge, GEMM + bias/residual epilogue, GEMM + SwiGLU/GELU epilogue.

CPU: the merge through the extension's CPU op and the torch fallback, the torch paths of the
GEMMs, the Triton SwiGLU kernel in the interpreter (fp16/fp32), packing, argument checks.
GPU (marker gpu): every op at Mistral-7B shapes in bf16 against an fp32 reference, strided and
misaligned inputs, CUDA graph capture, torch.compile, opcheck of the CUDA ops.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import REL_TOL, poison, rel_err

from l2v_kernels import gemm, reference

HAS_EXT = gemm.extension_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"extension not built: {gemm._EXTENSION_ERROR}")
ADAPTER_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.float32,
                 torch.float16: torch.float16}


def _randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _lora_inputs(n, k, rank, dtype, adapter_dtype, device="cpu", seed=0):
    weight = _randn(n, k, dtype=dtype, device=device, seed=seed)
    lora_a = _randn(rank, k, dtype=adapter_dtype, device=device, scale=0.3, seed=seed + 1)
    lora_b = _randn(n, rank, dtype=adapter_dtype, device=device, scale=0.3, seed=seed + 2)
    return weight, lora_a, lora_b


def _check_merge(merged, weight, lora_a, lora_b, scale):
    """Against reference.lora_merge (fp64 sum, one rounding), on the tensors' device. 16-bit
    weights: within one ulp of it and equal almost everywhere (an fp32 sum rounded once differs
    only where fp32 and fp64 fall on two sides of a rounding boundary; a second rounding would
    differ far more often)."""
    assert torch.isfinite(merged).all()
    truth = weight.double() + scale * (lora_b.double() @ lora_a.double())
    assert rel_err(merged, truth) < REL_TOL[weight.dtype]
    if weight.dtype == torch.float32:
        return
    ref = reference.lora_merge(weight, lora_a, lora_b, scale).double()
    eps = torch.finfo(weight.dtype).eps
    diff = (merged.double() - ref).abs()
    assert bool((diff <= eps * ref.abs() + 1e-6).all()), f"max diff {diff.max():.3e}"
    mismatched = (diff > 0).double().mean().item()
    assert mismatched < 0.01, f"{mismatched:.2%} of elements differ from the one-rounding result"


# ----------------------------------------------------------------------------------------------
# LoRA merge (CPU)
# ----------------------------------------------------------------------------------------------

MERGE_IMPLS = [pytest.param("fused", marks=needs_ext), "torch"]


@pytest.mark.parametrize("impl", MERGE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
def test_lora_merge_matches_reference(impl, dtype, rank):
    weight, lora_a, lora_b = _lora_inputs(97, 123, rank, dtype, ADAPTER_DTYPE[dtype], seed=rank)
    merged = weight.clone()
    out = gemm.lora_merge_(merged, lora_a, lora_b, 2.0, impl=impl)
    assert out is merged
    _check_merge(merged, weight, lora_a, lora_b, 2.0)


@pytest.mark.parametrize("impl", MERGE_IMPLS)
def test_lora_merge_row_strided_weight_leaves_neighbours(impl):
    # A column slice of a wider matrix (row stride 130): only the slice changes.
    big = _randn(61, 130, dtype=torch.bfloat16, seed=3)
    before = big.clone()
    weight = big[:, 3:126]
    _, lora_a, lora_b = _lora_inputs(61, 123, 16, torch.bfloat16, torch.bfloat16, seed=4)
    gemm.lora_merge_(weight, lora_a, lora_b, 0.5, impl=impl)
    _check_merge(weight, before[:, 3:126], lora_a, lora_b, 0.5)
    assert torch.equal(big[:, :3], before[:, :3]) and torch.equal(big[:, 126:], before[:, 126:])


def test_lora_merge_auto_without_extension_uses_torch(monkeypatch):
    monkeypatch.setattr(gemm, "_EXTENSION_ERROR", "not built (test)")
    weight, lora_a, lora_b = _lora_inputs(33, 40, 4, torch.bfloat16, torch.float32)
    merged = gemm.lora_merge_(weight.clone(), lora_a, lora_b, 1.5)
    _check_merge(merged, weight, lora_a, lora_b, 1.5)
    with pytest.raises(RuntimeError, match=r"impl='fused'\) cannot run: not built"):
        gemm.lora_merge_(weight.clone(), lora_a, lora_b, 1.5, impl="fused")


def test_lora_merge_rejects_bad_arguments():
    w = torch.zeros(6, 10, dtype=torch.bfloat16)
    a, b = torch.zeros(2, 10), torch.zeros(6, 2)
    with pytest.raises(ValueError, match="lora_A has shape"):
        gemm.lora_merge_(w, torch.zeros(2, 9), b, 1.0)
    with pytest.raises(ValueError, match="lora_B has shape"):
        gemm.lora_merge_(w, a, torch.zeros(6, 3), 1.0)
    with pytest.raises(ValueError, match="lora_B has dtype"):
        gemm.lora_merge_(w, a, b.half(), 1.0)
    with pytest.raises(ValueError, match="weight has dtype"):
        gemm.lora_merge_(w.to(torch.int32), a, b, 1.0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        gemm.lora_merge_(w[0], a, b, 1.0)
    with pytest.raises(ValueError, match="one device"):
        gemm.lora_merge_(w, a.to("meta"), b, 1.0)
    with pytest.raises(TypeError, match="scale must be a real number"):
        gemm.lora_merge_(w, a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="impl must be one of"):
        gemm.lora_merge_(w, a, b, 1.0, impl="cuda")
    if HAS_EXT:
        with pytest.raises(RuntimeError, match="contiguous last dimension"):
            gemm.lora_merge_(w.T.contiguous().T, a, b.T.contiguous()[:, :6].T, 1.0, impl="fused")


# ----------------------------------------------------------------------------------------------
# GEMM + bias + residual (CPU: torch path and the extension's CPU op)
# ----------------------------------------------------------------------------------------------


def _residual_inputs(m, n, k, dtype, device="cpu", residual=True, bias=True, seed=0):
    x = _randn(m, k, dtype=dtype, device=device, seed=seed)
    w = _randn(n, k, dtype=dtype, device=device, scale=k**-0.5, seed=seed + 1)
    r = _randn(m, n, dtype=dtype, device=device, seed=seed + 2) if residual else None
    b = _randn(n, dtype=dtype, device=device, seed=seed + 3) if bias else None
    return x, w, r, b


def _residual_ref(x, w, r, b):
    wide = [None if t is None else t.double() for t in (x, w, r, b)]
    return reference.gemm_residual(*wide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("residual,bias", [(True, False), (False, True), (True, True),
                                           (False, False)])
def test_gemm_residual_torch_path(dtype, m, residual, bias):
    x, w, r, b = _residual_inputs(m, 97, 123, dtype, residual=residual, bias=bias, seed=m)
    out = gemm.gemm_residual(x, w, r, b)  # auto on CPU: the torch path
    assert out.dtype == dtype and out.shape == (m, 97)
    assert rel_err(out, _residual_ref(x, w, r, b)) < REL_TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_residual_cpu_op(dtype):
    x, w, r, b = _residual_inputs(7, 97, 123, dtype)
    out = torch.ops.l2v.gemm_residual(x, w, r, b)
    assert rel_err(out, _residual_ref(x, w, r, b)) < REL_TOL[dtype]


def test_gemm_residual_fused_on_cpu_raises():
    x, w, r, b = _residual_inputs(4, 8, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"gemm_residual\(impl='fused'\) cannot run"):
        gemm.gemm_residual(x, w, r, b, impl="fused")


def test_gemm_residual_rejects_bad_arguments():
    x, w, r, b = _residual_inputs(4, 8, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="w has shape"):
        gemm.gemm_residual(x, w[:, :15], r, b)
    with pytest.raises(ValueError, match="w has dtype"):
        gemm.gemm_residual(x, w.half(), r, b)
    with pytest.raises(ValueError, match="residual has shape"):
        gemm.gemm_residual(x, w, r.T, b)
    with pytest.raises(ValueError, match="bias has shape"):
        gemm.gemm_residual(x, w, r, b[:7])
    with pytest.raises(ValueError, match="one device"):
        gemm.gemm_residual(x, w, r.to("meta"), b)
    with pytest.raises(ValueError, match="impl must be one of"):
        gemm.gemm_residual(x, w, r, b, impl="cublas")


# ----------------------------------------------------------------------------------------------
# GEMM + SwiGLU / GELU-tanh (CPU: torch path, Triton interpreter)
# ----------------------------------------------------------------------------------------------


def _swiglu_inputs(m, i, k, dtype, device="cpu", seed=0):
    x = _randn(m, k, dtype=dtype, device=device, seed=seed)
    gate = _randn(i, k, dtype=dtype, device=device, scale=k**-0.5, seed=seed + 1)
    up = _randn(i, k, dtype=dtype, device=device, scale=k**-0.5, seed=seed + 2)
    return x, gate, up


def _swiglu_ref(x, gate, up, act):
    return reference.gemm_gated(x.double(), gate.double(), up.double(), act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gemm_swiglu_torch_path(dtype, act):
    x, gate, up = _swiglu_inputs(33, 130, 96, dtype)
    out = gemm.gemm_swiglu(x, gemm.pack_gate_up(gate, up), act=act)  # auto on CPU: torch
    assert out.dtype == dtype and out.shape == (33, 130)
    assert rel_err(out, _swiglu_ref(x, gate, up, act)) < REL_TOL[dtype]


# Every awkward shape in fp32 with SiLU; fp16 and GELU on a diagonal of them (interpreter time).
INTERPRETER_CASES = [(torch.float32, "silu", m, k, i)
                     for m, k, i in itertools.product((1, 7, 33), (64, 96), (80, 130))]
INTERPRETER_CASES += [(torch.float16, "silu", 1, 96, 130), (torch.float16, "silu", 33, 64, 80),
                      (torch.float16, "gelu_tanh", 7, 96, 130),
                      (torch.float32, "gelu_tanh", 33, 96, 80)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-large): exp -> inf
@pytest.mark.parametrize("dtype,act,m,k,i", INTERPRETER_CASES)
def test_gemm_swiglu_triton_interpreter(dtype, act, m, k, i):
    if torch.cuda.is_available():
        pytest.skip("interpreter test (CPU only); the GPU tests cover the compiled kernel")
    x, gate, up = _swiglu_inputs(m, i, k, dtype, seed=m + k + i)
    out = gemm.gemm_swiglu(x, gemm.pack_gate_up(gate, up), act=act, impl="fused")
    assert out.dtype == dtype and out.shape == (m, i)
    assert rel_err(out, _swiglu_ref(x, gate, up, act)) < REL_TOL[dtype]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_gemm_swiglu_interpreter_row_strided_input():
    if torch.cuda.is_available():
        pytest.skip("interpreter test (CPU only)")
    x, gate, up = _swiglu_inputs(7, 80, 64, torch.float32)
    wide = torch.cat([x, poison(torch.empty(7, 9))], dim=1)  # row stride 73, NaN past column 64
    out = gemm.gemm_swiglu(wide[:, :64], gemm.pack_gate_up(gate, up), impl="fused")
    assert rel_err(out, _swiglu_ref(x, gate, up, "silu")) < REL_TOL[torch.float32]
    with pytest.raises(RuntimeError, match="x must have a contiguous last dimension"):
        gemm.gemm_swiglu(x.T.contiguous().T, gemm.pack_gate_up(gate, up), impl="fused")


def test_gemm_swiglu_fused_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, gate, up = _swiglu_inputs(3, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match=r"gemm_swiglu\(impl='fused'\) cannot run: .*CUDA"):
        gemm.gemm_swiglu(x, gemm.pack_gate_up(gate, up), impl="fused")


def test_gemm_swiglu_rejects_bad_arguments():
    x, gate, up = _swiglu_inputs(3, 8, 16, torch.float32)
    w = gemm.pack_gate_up(gate, up)
    with pytest.raises(ValueError, match="2\\*I rows"):
        gemm.gemm_swiglu(x, w[:15])
    with pytest.raises(ValueError, match="w_gate_up has shape"):
        gemm.gemm_swiglu(x, w[:, :15])
    with pytest.raises(ValueError, match="w_gate_up has dtype"):
        gemm.gemm_swiglu(x, w.half())
    with pytest.raises(ValueError, match="act must be one of"):
        gemm.gemm_swiglu(x, w, act="relu")


def test_pack_unpack_round_trip():
    gate = _randn(130, 96, seed=1)
    up = _randn(130, 96, seed=2)
    packed = gemm.pack_gate_up(gate, up)
    assert packed.shape == (260, 96) and packed.is_contiguous()
    g, u = gemm.unpack_gate_up(packed)
    assert torch.equal(g, gate) and torch.equal(u, up)
    with pytest.raises(ValueError, match="up_proj has shape"):
        gemm.pack_gate_up(gate, up[:, :95])
    with pytest.raises(ValueError, match="2\\*I rows"):
        gemm.unpack_gate_up(packed[:259])


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
# Mistral-7B: hidden 4096, intermediate 14336, 32 query / 8 kv heads of 128.
HIDDEN, INTER, QKV = 4096, 14336, 6144
GPU_M = [1, 7, 128, 2048]


def _poison_next_alloc(*shape, dtype=torch.bfloat16):
    """Fill a freed block of the caching allocator with NaN bytes (0xFF is NaN in bf16/fp16/fp32):
    an op's output of this size is allocated from that block, so unwritten elements stay NaN."""
    n = 1
    for s in shape:
        n *= s
    block = torch.empty(n * torch.tensor([], dtype=dtype).element_size(), dtype=torch.uint8,
                        device="cuda")
    block.fill_(255)
    del block


def _fp32_residual_ref(x, w, r, b):
    """reference.gemm_residual in fp32 (on the GPU: fast enough at 7B shapes)."""
    return reference.gemm_residual(*[None if t is None else t.float() for t in (x, w, r, b)])


@pytest.mark.gpu
@pytest.mark.parametrize("name,n,k,residual,bias", [
    ("o_proj", HIDDEN, HIDDEN, True, False),
    ("down_proj", HIDDEN, INTER, True, False),
    ("qkv_proj+bias", QKV, HIDDEN, False, True),
    ("qkv_proj", QKV, HIDDEN, False, False),
])
@pytest.mark.parametrize("m", GPU_M + [8192])
def test_gpu_gemm_residual(name, n, k, residual, bias, m):
    if m == 8192 and name != "down_proj":
        pytest.skip("M = 8192 runs for one shape only")
    x, w, r, b = _residual_inputs(m, n, k, torch.bfloat16, "cuda", residual, bias, seed=m)
    ref = _fp32_residual_ref(x, w, r, b)
    _poison_next_alloc(m, n)
    out = gemm.gemm_residual(x, w, r, b, impl="fused")
    err = rel_err(out, ref)
    base = rel_err(gemm.gemm_residual(x, w, r, b, impl="torch"), ref)  # cuBLAS: the yardstick
    assert err < REL_TOL[torch.bfloat16] and err <= 2 * base + 1e-4, (err, base)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m", GPU_M + [8192])
def test_gpu_gemm_swiglu(act, m):
    if act == "gelu_tanh" and m not in (7, 2048):
        pytest.skip("GELU runs at two sizes")
    x, gate, up = _swiglu_inputs(m, INTER, HIDDEN, torch.bfloat16, "cuda", seed=m)
    w = gemm.pack_gate_up(gate, up)
    ref = reference.gemm_gated(x.float(), gate.float(), up.float(), act)
    _poison_next_alloc(m, INTER)
    out = gemm.gemm_swiglu(x, w, act=act, impl="fused")
    err = rel_err(out, ref)
    base = rel_err(gemm.gemm_swiglu(x, w, act=act, impl="torch"), ref)  # cuBLAS + torch
    assert err < REL_TOL[torch.bfloat16] and err <= 2 * base + 1e-4, (err, base)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_gemm_swiglu_other_dtypes(dtype):
    x, gate, up = _swiglu_inputs(257, 1000, 520, dtype, "cuda")
    _poison_next_alloc(257, 1000, dtype=dtype)
    out = gemm.gemm_swiglu(x, gemm.pack_gate_up(gate, up), impl="fused")
    ref = reference.gemm_gated(x.double(), gate.double(), up.double())
    assert rel_err(out, ref) < REL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,rank", [(HIDDEN, INTER, 16), (97, 123, 8), (1000, 4104, 64),
                                      (4096, 4096, 256)])
def test_gpu_lora_merge(dtype, n, k, rank):
    if dtype != torch.bfloat16 and n == 4096:
        pytest.skip("large shapes in bf16 only")
    weight, lora_a, lora_b = _lora_inputs(n, k, rank, dtype, ADAPTER_DTYPE[dtype], "cuda")
    merged = weight.clone()
    gemm.lora_merge_(merged, lora_a, lora_b, 2.0, impl="fused")
    _check_merge(merged, weight, lora_a, lora_b, 2.0)


@pytest.mark.gpu
def test_gpu_lora_merge_strided_and_misaligned():
    big = _randn(300, 1000, dtype=torch.bfloat16, device="cuda", seed=5)
    before = big.clone()
    weight = big[1:, 3:999]  # misaligned start (6 bytes), row stride 1000, K = 996
    _, lora_a, lora_b = _lora_inputs(299, 996, 16, torch.bfloat16, torch.float32, "cuda", seed=6)
    gemm.lora_merge_(weight, lora_a, lora_b, 0.5, impl="fused")
    _check_merge(weight, before[1:, 3:999], lora_a, lora_b, 0.5)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[1:, 3:999] = False
    assert torch.equal(big[untouched], before[untouched])


@pytest.mark.gpu
def test_gpu_strided_and_misaligned_gemm_inputs():
    m, n, k = 37, 520, 1000
    x, w, r, b = _residual_inputs(m, n, k, torch.bfloat16, "cuda")
    ref = _fp32_residual_ref(x, w, r, b)
    # Row-strided, 2-byte aligned x: auto takes torch; fused runs or says why it cannot.
    buf = torch.zeros(m, k + 1, dtype=torch.bfloat16, device="cuda")
    buf[:, 1:] = x
    x_odd = buf[:, 1:]
    assert rel_err(gemm.gemm_residual(x_odd, w, r, b), ref) < REL_TOL[torch.bfloat16]
    try:
        out = gemm.gemm_residual(x_odd, w, r, b, impl="fused")
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    except RuntimeError as e:
        assert "cuBLASLt" in str(e) or "cublasLt" in str(e), str(e)
    # Row-strided but aligned (stride 1008): fused handles it.
    buf = torch.zeros(m, k + 8, dtype=torch.bfloat16, device="cuda")
    buf[:, :k] = x
    out = gemm.gemm_residual(buf[:, :k], w, r, b, impl="fused")
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
    # Column-major x: fused refuses clearly, auto computes it.
    xt = x.T.contiguous().T
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        gemm.gemm_residual(xt, w, r, b, impl="fused")
    assert rel_err(gemm.gemm_residual(xt, w, r, b), ref) < REL_TOL[torch.bfloat16]
    # SwiGLU with a row-strided x and a misaligned one.
    gate, up = w[: n // 2], w[n // 2 :]
    wgu = gemm.pack_gate_up(gate, up)
    sref = reference.gemm_gated(x.float(), gate.float(), up.float())
    for xs in (buf[:, :k], x_odd):
        out = gemm.gemm_swiglu(xs, wgu, impl="fused")
        assert rel_err(out, sref) < REL_TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        gemm.gemm_swiglu(xt, wgu, impl="fused")


def _graph_check(fn, inputs, refresh):
    """Capture fn(*inputs) in a CUDA graph, refill the inputs, replay, compare to eager."""
    fn(*inputs)  # warm-up: autotuning, cuBLASLt plan, lazy init happen outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*inputs)
    refresh()
    graph.replay()
    torch.cuda.synchronize()
    return static_out


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    m = 100
    x, w, r, b = _residual_inputs(m, HIDDEN, HIDDEN, torch.bfloat16, "cuda", seed=1)
    new_x = _randn(m, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=11)
    out = _graph_check(lambda *t: gemm.gemm_residual(*t, impl="fused"), (x, w, r, b),
                       lambda: x.copy_(new_x))
    assert rel_err(out, _fp32_residual_ref(new_x, w, r, b)) < REL_TOL[torch.bfloat16]

    xs, gate, up = _swiglu_inputs(m, 2048, HIDDEN, torch.bfloat16, "cuda", seed=2)
    wgu = gemm.pack_gate_up(gate, up)
    out = _graph_check(lambda *t: gemm.gemm_swiglu(*t, impl="fused"), (xs, wgu),
                       lambda: xs.copy_(new_x))
    ref = reference.gemm_gated(new_x.float(), gate.float(), up.float())
    assert rel_err(out, ref) < REL_TOL[torch.bfloat16]

    weight, lora_a, lora_b = _lora_inputs(512, 1000, 16, torch.bfloat16, torch.float32, "cuda")
    target = weight.clone()
    start = weight.clone()
    _graph_check(lambda *t: gemm.lora_merge_(*t, 0.5, impl="fused"), (target, lora_a, lora_b),
                 lambda: target.copy_(start))
    _check_merge(target, start, lora_a, lora_b, 0.5)


@pytest.mark.gpu
@pytest.mark.compile_heavy
def test_gpu_torch_compile():
    m = 77
    x, w, r, _ = _residual_inputs(m, HIDDEN, 1024, torch.bfloat16, "cuda", bias=False)
    gate, up = w[:2048], w[2048:]
    wgu = gemm.pack_gate_up(gate, up)
    href = _fp32_residual_ref(x, w, r, None)
    sref = reference.gemm_gated(x.float(), gate.float(), up.float())

    def ops(x, w, r, wgu):  # the registered ops: one graph, no breaks
        return torch.ops.l2v.gemm_residual(x, w, r, None), torch.ops.l2v.gemm_swiglu(x, wgu, "silu")

    def public(x, w, r, wgu):  # the public functions, as the model calls them
        return gemm.gemm_residual(x, w, r), gemm.gemm_swiglu(x, wgu)

    for fn, fullgraph in ((ops, True), (public, False)):
        h, s = torch.compile(fn, fullgraph=fullgraph)(x, w, r, wgu)
        assert rel_err(h, href) < REL_TOL[torch.bfloat16], fn.__name__
        assert rel_err(s, sref) < REL_TOL[torch.bfloat16], fn.__name__


@pytest.mark.gpu
@pytest.mark.compile_heavy
def test_gpu_opcheck():
    x, w, r, b = _residual_inputs(33, 264, 200, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.l2v.gemm_residual.default, (x, w, r, b))
    torch.library.opcheck(torch.ops.l2v.gemm_residual.default, (x, w, None, None))
    weight, lora_a, lora_b = _lora_inputs(97, 123, 8, torch.bfloat16, torch.float32, "cuda")
    torch.library.opcheck(torch.ops.l2v.lora_merge_.default, (weight, lora_a, lora_b, 0.5))
    xs, gate, up = _swiglu_inputs(33, 130, 96, torch.bfloat16, "cuda")
    wgu = gemm.pack_gate_up(gate, up)
    torch.library.opcheck(torch.ops.l2v.gemm_swiglu.default, (xs, wgu, "silu"))
