"""Ahead-of-time compile of every Triton kernel variant l2v launches, for a GPU target, no GPU.

    python -m bench.aot_check [--fast] [--fp32] [--arch 90a] [--json PATH] [--filter REGEX]

The kernels' own launchers (the unchecked `<op>_fwd` functions the model's hot loop calls) are
run on CPU tensors of the real model shapes (bench.workloads: Mistral-7B, Llama-2-7B,
Sheared-LLaMA-1.3B, SmolLM2-135M; the Gemma-2/3 heads of bench_attention's window and softcap
groups) at every size class (batch-1 and batch-8 queries, packed passages, long documents), with
Triton's launch replaced by a recorder. Each recorded launch is then specialized exactly as
Triton's JIT would (its own binder: dtypes, 16-byte alignment, divisibility by 16) and compiled
for the target (default sm_90a: H100 / H200); for an autotuned kernel every candidate config the
pruning keeps is compiled, as autotuning may pick any of them. ptxas' report gives registers and
spill bytes, Triton's metadata the shared memory.

A bf16 / fp16 variant fails when it spills (local memory traffic in the inner loop: registers
are the budget of a tile) or needs more shared memory than the target has per block (H100 /
H200: 227 KiB). fp32 variants (a testing dtype, never the model's; --fp32) are reported only:
without tensor cores their dots spill tens of KB and take ptxas minutes per attention variant.
--fast: the autotuned kernels of the Mistral-7B model path in bf16 (varlen attention at the
passages size, the SwiGLU GEMM's query and large M classes): under a minute on two cores, run by
the test suite.

Exit status: 0 when no bf16/fp16 variant fails, 1 otherwise, 2 when nothing could be compiled.
TRITON_INTERPRET must be unset (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit as triton_jit
from triton.runtime.autotuner import Autotuner

from bench.workloads import MODEL_SHAPES, head_dim

# Shared memory per block on sm_90 (H100 / H200): 227 KiB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 100: 227 * 1024}
GEMMA_HEADS = {"gemma-3-4b": (8, 4, 256), "gemma-2-9b": (16, 8, 256)}  # bench_attention's groups
# (batch, tokens per text): batch-1 / batch-8 queries, packed passages, long documents.
ATTN_SHAPES = {"b1-query": (1, 56), "b8-query": (8, 56), "passages": (32, 512), "long": (8, 2048)}
SWIGLU_M = {"tiny": 8, "query": 56, "medium": 448, "large": 16384}


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    label: str  # what the model / benchmark does: "mistral-7b varlen b1-query"
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict


@dataclass
class Recorder:
    launches: list = field(default_factory=list)
    label: str = ""

    @contextlib.contextmanager
    def recording(self):
        """JITFunction.run and Autotuner.run record their call instead of launching."""
        jit_run, tune_run = triton_jit.JITFunction.run, Autotuner.run
        rec = self

        def record_jit(self, *args, grid, warmup, **kwargs):
            rec.launches.append(Launch(rec.label, self, args, kwargs))

        def record_tuner(self, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            rec.launches.append(Launch(rec.label, self, args, kwargs))

        triton_jit.JITFunction.run, Autotuner.run = record_jit, record_tuner
        try:
            yield self
        finally:
            triton_jit.JITFunction.run, Autotuner.run = jit_run, tune_run

    def call(self, label: str, fn, *args, **kwargs):
        self.label = label
        fn(*args, **kwargs)


def _empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype)


def _cu(batch: int, length: int) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)


def _packed_qkv(t: int, hq: int, hkv: int, d: int, dtype):
    """q [t, hq, d], k and v [t, hkv, d]: views of one fused QKV output, as the model has them."""
    qkv = _empty(t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    return q, k, v


def _mode_options(words: list[str]) -> dict:
    """The attention call's keyword options for a mode's words (window, softcap, dropout)."""
    extra = {}
    if "window" in words:
        extra["window"] = (511, 511)
    if "softcap" in words:
        extra["softcap"] = 50.0
    if "dropout" in words:
        extra.update(dropout_p=0.1, dropout_seed=1)
    return extra


def record_attention(rec: Recorder, name: str, hq: int, hkv: int, d: int, dtype, modes, shapes):
    from l2v_kernels import attention

    for shape_name in shapes:
        batch, length = ATTN_SHAPES[shape_name]
        t = batch * length
        q, k, v = _packed_qkv(t, hq, hkv, d, dtype)
        cu = _cu(batch, length)
        for mode in modes:  # "varlen", or "-"-joined words of padded, causal, window, softcap
            label = f"{name} attention {mode} {shape_name} {str(dtype)[6:]}"
            words = mode.split("-")
            extra = _mode_options(words)
            if "padded" in words:
                pq = _empty(batch, length, hq, d, dtype=dtype)
                pk = _empty(batch, length, hkv, d, dtype=dtype)
                mask = torch.ones(batch, length, dtype=torch.bool)
                rec.call(label, attention.flash_attn_padded_fwd, pq, pk, pk, mask,
                         "causal" in words, None, **extra)  # fmt: skip
            else:
                rec.call(label, attention.flash_attn_varlen_fwd, q, k, v, cu, length,
                         "causal" in words, None, **extra)  # fmt: skip


def record_attention_train(rec: Recorder, name: str, hq: int, hkv: int, d: int, dtype, modes,
                           shapes):
    """Training's attention: the forward writing its log-sum-exp (flash_attn_varlen_fwd with
    lse, and dropout) and the backward (flash_attn_varlen_bwd: the dq and dk/dv kernels).
    modes: "-"-joined words of train, causal, window, softcap, dropout."""
    from l2v_kernels import attention

    for shape_name in shapes:
        batch, length = ATTN_SHAPES[shape_name]
        t = batch * length
        q, k, v = _packed_qkv(t, hq, hkv, d, dtype)
        out, dout = _empty(t, hq, d, dtype=dtype), _empty(t, hq, d, dtype=dtype)
        lse = torch.empty(t, hq, dtype=torch.float32)
        cu = _cu(batch, length)
        for mode in modes:
            words = mode.split("-")
            extra = _mode_options(words)
            causal = "causal" in words
            label = f"{name} attention {mode} {shape_name} {str(dtype)[6:]}"
            rec.call(f"{label} fwd", attention.flash_attn_varlen_fwd, q, k, v, cu, length, causal,
                     None, lse=lse, **extra)  # fmt: skip
            rec.call(f"{label} bwd", attention.flash_attn_varlen_bwd, dout, q, k, v, out, lse, cu,
                     length, causal, None, **extra)  # fmt: skip


def record_swiglu(rec: Recorder, name: str, cfg: dict, dtype, m_classes, acts=("silu",)):
    """The SwiGLU GEMM of one model shape at a representative M of each class."""
    from l2v_kernels import gemm

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    dt = str(dtype)[6:]
    w = _empty(2 * inter, hidden, dtype=dtype)
    for cls in m_classes:
        m = SWIGLU_M[cls]
        for act in acts:
            rec.call(f"{name} gemm_swiglu {act} M={m} ({cls}) {dt}", gemm.gemm_swiglu_fwd,
                     _empty(m, hidden, dtype=dtype), w, act)  # fmt: skip


def record_model_ops(rec: Recorder, name: str, cfg: dict, dtype):
    """The other per-layer ops of one model shape (norm, rope, gated activation, pooling)."""
    from l2v_kernels import activation, norm, pooling, rope

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hq = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads", hq)
    d = head_dim(cfg)
    dt = str(dtype)[6:]
    t = 4096
    x = _empty(t, hidden, dtype=dtype)
    weight = _empty(hidden, dtype=dtype)
    rec.call(f"{name} rms_norm {dt}", norm.rms_norm_fwd, x, weight, 1e-5)
    rec.call(f"{name} rms_norm+residual {dt}", norm.rms_norm_fwd, x, weight, 1e-5, None,
             _empty(t, hidden, dtype=dtype))  # fmt: skip
    qkv = _empty(t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    cos = torch.empty(4096, d // 2, dtype=torch.float32)
    pos = torch.zeros(t, dtype=torch.int64)
    rec.call(f"{name} rope {dt}", rope.apply_rotary_fwd, q, k, cos, cos, pos, q, k)
    rec.call(f"{name} gated_act {dt}", activation.gated_act_fwd, _empty(t, 2 * inter, dtype=dtype))
    h = _empty(t, hidden, dtype=dtype)
    mask = torch.ones(t, dtype=torch.bool)
    cu = _cu(8, t // 8)
    for mode in ("mean", "last"):
        rec.call(f"{name} masked_pool {mode} {dt}", pooling.masked_pool_fwd, h, mask, None,
                 mode, cu)  # fmt: skip


def record_all(fast: bool, fp32: bool = False) -> list[Launch]:
    rec = Recorder()
    models = ["mistral-7b"] if fast else list(MODEL_SHAPES)
    dtypes = [torch.bfloat16] if fast else [torch.bfloat16, torch.float16]
    if fp32:  # the testing dtype: FMA dots, minutes of ptxas per attention variant
        dtypes.append(torch.float32)
    with rec.recording():
        for name in models:
            cfg = MODEL_SHAPES[name]
            hq = cfg["num_attention_heads"]
            hkv = cfg.get("num_key_value_heads", hq)
            for dtype in dtypes:
                modes = ["varlen"] if fast else ["varlen", "causal", "padded", "padded-causal"]
                shapes = ["passages"] if fast else list(ATTN_SHAPES)
                record_attention(rec, name, hq, hkv, head_dim(cfg), dtype, modes, shapes)
                # Training (MNTP, supervised: plain; SimCSE: dropout): forward + backward.
                train = ["train"] if fast else ["train", "train-dropout", "train-causal"]
                record_attention_train(rec, name, hq, hkv, head_dim(cfg), dtype, train, shapes)
                if fast:  # the autotuned kernels, whose tiles are the register budget
                    record_swiglu(rec, name, cfg, dtype, ["query", "large"])
                else:
                    record_swiglu(rec, name, cfg, dtype, list(SWIGLU_M), ("silu", "gelu_tanh"))
                    record_model_ops(rec, name, cfg, dtype)
        if not fast:
            for name, (hq, hkv, d) in GEMMA_HEADS.items():
                for dtype in (torch.bfloat16, torch.float16):
                    # Gemma runs llm2vec's padded pipeline; the benchmarks the varlen one.
                    local = "window" if name == "gemma-3-4b" else "softcap"
                    modes = ["varlen", local, "padded", f"padded-{local}"]
                    record_attention(rec, name, hq, hkv, d, dtype, modes, ["passages", "long"])
                    record_attention_train(rec, name, hq, hkv, d, dtype,
                                           [f"train-{local}", f"train-{local}-dropout"],
                                           ["passages"])  # fmt: skip
                    record_gemma_ops(rec, name, hq, hkv, d, dtype)
    return rec.launches


def record_gemma_ops(rec: Recorder, name: str, hq: int, hkv: int, d: int, dtype):
    """Gemma's extra steps: the post-norm pair (norm_add_norm) and rope with q / k norms."""
    from l2v_kernels import norm, rope

    dt = str(dtype)[6:]
    t, hidden = 4096, hq * d
    x, r = _empty(t, hidden, dtype=dtype), _empty(t, hidden, dtype=dtype)
    w = _empty(hidden, dtype=dtype)
    rec.call(f"{name} norm_add_norm {dt}", norm.norm_add_norm_fwd, x, r, w, w, 1e-6)
    qkv = _empty(t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    cos = torch.empty(4096, d // 2, dtype=torch.float32)
    pos = torch.zeros(t, dtype=torch.int64)
    qn = _empty(d, dtype=dtype)
    rec.call(f"{name} rope+qk_norm {dt}", rope.apply_rotary_fwd, q, k, cos, cos, pos, q, k,
             q_norm_weight=qn, k_norm_weight=qn)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Compiling for a target
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    kernel: str
    labels: list
    constexprs: dict
    options: dict
    dtype: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    seconds: float | None = None
    error: str | None = None

    def failed(self, shared_limit: int) -> str | None:
        """Why this variant fails the check (None: it passes or is not checked)."""
        if self.error:
            return f"compile error: {self.error}"
        if self.dtype not in ("bf16", "fp16"):
            return None
        if (self.spill_stores or 0) > 0 or (self.spill_loads or 0) > 0:
            return f"spills {self.spill_stores} B stores / {self.spill_loads} B loads"
        if self.shared is not None and self.shared > shared_limit:
            return f"shared memory {self.shared} B > {shared_limit} B"
        return None


def _jit_of(kernel):
    fn = kernel
    while not isinstance(fn, triton_jit.JITFunction):
        fn = fn.fn
    return fn


def _candidates(launch: Launch) -> list[dict]:
    """The kwargs each compile gets: one per config autotuning may pick (after pruning)."""
    if not isinstance(launch.kernel, Autotuner):
        return [dict(launch.kwargs)]
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
    configs = tuner.prune_configs(dict(launch.kwargs)) if len(tuner.configs) > 1 else tuner.configs
    return [{**launch.kwargs, **c.all_kwargs()} for c in configs]


def _tensor_dtype(args, jit) -> str:
    """The first floating-point tensor argument's dtype, as bf16 / fp16 / fp32."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32:
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(a.dtype, str(a.dtype))
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return "fp32"
    return "-"


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_variants(launches: list[Launch], target: GPUTarget, flt: str | None = None,
                     log=print) -> list[Variant]:  # fmt: skip
    backend = make_backend(target)
    binders = {}
    seen: dict[str, Variant] = {}
    knobs = triton.knobs
    for launch in launches:
        if flt and not re.search(flt, launch.label):
            continue
        jit = _jit_of(launch.kernel)
        if id(jit) not in binders:
            binders[id(jit)] = triton_jit.create_function_from_signature(
                jit.signature, jit.params, backend
            )
        binder = binders[id(jit)]
        for kwargs in _candidates(launch):
            kwargs = {**kwargs, "debug": False}
            bound, specialization, options = binder(*launch.args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(
                backend, kwargs, bound, specialization, options
            )
            consts = {jit.params[p[0]].name: v for p, v in constexprs.items() if len(p) == 1}
            opts = {"num_warps": options.num_warps, "num_stages": options.num_stages}
            key = repr((jit.__name__, signature, sorted(consts.items()), attrs, opts))
            if key in seen:
                seen[key].labels.append(launch.label)
                continue
            v = Variant(jit.__name__, [launch.label], consts, opts,
                        _tensor_dtype(launch.args, jit))  # fmt: skip
            seen[key] = v
            t0 = time.perf_counter()
            buf = io.StringIO()
            try:
                src = ASTSource(jit, signature, constexprs, attrs)
                with contextlib.redirect_stdout(buf), _knob(knobs.nvidia, "dump_ptxas_log", True), \
                        _knob(knobs.compilation, "always_compile", True):
                    compiled = triton.compile(src, target=target, options=options.__dict__)
                v.shared = int(compiled.metadata.shared)
                text = buf.getvalue()
                for name, pattern in _PTXAS.items():
                    m = pattern.search(text)
                    setattr(v, name, int(m.group(1)) if m else (0 if name != "registers" else None))
            except Exception as e:  # report it, go on with the others
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            v.seconds = time.perf_counter() - t0
            log(_row(v))
    return list(seen.values())


@contextlib.contextmanager
def _knob(group, name, value):
    old = getattr(group, name)
    setattr(group, name, value)
    try:
        yield
    finally:
        setattr(group, name, old)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

_SHOW = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_D", "BLOCK", "HEAD_DIM", "GROUP",
         "CAUSAL", "PADDED", "WINDOW", "SOFTCAP", "STORE_LSE", "DROPOUT", "M_CLASS", "MODE",
         "ACT")  # fmt: skip


def _describe(v: Variant) -> str:
    parts = [f"{k}={int(c) if isinstance(c, bool) else c}" for k, c in v.constexprs.items()
             if k in _SHOW]  # fmt: skip
    return " ".join(parts) + f" w{v.options['num_warps']} s{v.options['num_stages']}"


def _row(v: Variant) -> str:
    if v.error:
        return f"{v.kernel:24s} {v.dtype:5s} {_describe(v):60s} ERROR {v.error}"
    return (f"{v.kernel:24s} {v.dtype:5s} {_describe(v):60s} regs {v.registers!s:>4} "
            f"spill {v.spill_stores}/{v.spill_loads} B  smem {v.shared / 1024:6.1f} KiB  "
            f"({v.seconds:.1f}s)")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="AOT-compile l2v's Triton kernel variants for a GPU "
                                 "target; registers, spills, shared memory per variant")
    ap.add_argument("--fast", action="store_true", help="the Mistral-7B model path in bf16 only")
    ap.add_argument("--arch", default="90a", help="target compute capability (default 90a)")
    ap.add_argument("--json", default=None, help="write every variant's numbers here")
    ap.add_argument("--filter", default=None, help="only launches whose label matches REGEX")
    ap.add_argument("--fp32", action="store_true",
                    help="also the fp32 variants (a testing dtype; reported, never failing)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench.aot_check: unset TRITON_INTERPRET (it compiles real GPU kernels, "
                         "which the interpreter replaces)")
    m = re.fullmatch(r"(\d+)a?", args.arch)
    if not m:
        raise SystemExit(f"bench.aot_check: --arch takes e.g. 90a or 80, got {args.arch!r}")
    cap = int(m.group(1))
    target = GPUTarget("cuda", cap, 64)
    shared_limit = SHARED_LIMIT.get(cap, 227 * 1024)
    t0 = time.perf_counter()
    launches = record_all(args.fast, args.fp32)
    print(f"[aot] triton {triton.__version__}, target sm_{args.arch}, {len(launches)} launches "
          f"recorded; compiling every distinct variant", flush=True)  # fmt: skip
    variants = compile_variants(launches, target, args.filter,
                                log=lambda s: print(s, flush=True))  # fmt: skip
    failures = [(v, v.failed(shared_limit)) for v in variants if v.failed(shared_limit)]
    print(f"\n[aot] {len(variants)} variants in {time.perf_counter() - t0:.0f}s; "
          f"{len(failures)} failing (bf16/fp16: no spill, shared memory <= "
          f"{shared_limit // 1024} KiB)")  # fmt: skip
    for v, why in failures:
        print(f"  FAIL {v.kernel} {v.dtype} {_describe(v)}: {why}; used by: {v.labels[0]}"
              + (f" (+{len(v.labels) - 1} more)" if len(v.labels) > 1 else ""))
    if args.json:
        data = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "target": f"sm_{args.arch}",
            "shared_limit": shared_limit,
            "variants": [{**v.__dict__, "constexprs": {k: str(c) for k, c in v.constexprs.items()},
                          "failed": v.failed(shared_limit)} for v in variants],
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if not variants or all(v.error for v in variants):
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

