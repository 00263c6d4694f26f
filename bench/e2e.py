"""End-to-end benchmark: our LLM2Vec encoder vs the llm2vec-style Hugging Face pipeline.

    python -m bench.e2e [--models mistral-7b,...] [--workloads passages,...] [--quick] [--smoke]
                        [--out DIR] [--device cuda] [--dtype bfloat16]
    ./run.sh bench ...   (bench/gpu_check.sh, which runs it on a GPU machine)

Both sides get the same random bf16 weights, created on the device for each model shape in
bench/workloads.py (no files), and the same token ids (bench/workloads.py: queries, passages,
long documents), so the comparison is model + batching + pooling, nothing else.

- Baseline `hf_bs32`: transformers' *Model with bidirectional SDPA attention
  (l2v_models.hf_compat), driven the way llm2vec 0.2.3 drives it: texts sorted by length
  (longest first), left-padded batches of 32, pad = eos, mean over the embed mask (the last N
  tokens of each row). Stronger than llm2vec in two harmless ways: no KV cache is built
  (use_cache=False) and the pooling is one vectorized masked sum instead of a per-row loop.
  Also run with batches of 64 (`hf_bs64`) and under torch.compile (`hf_bs32_compile`).
- Ours `l2v`: l2v_models.encoder.LLM2Vec on the triton backend (torch on CPU), packed
  token-budget batches, no padding. In the latency measurement also `l2v_graphs`: the same
  encoder with cuda_graphs=True (small batches replayed from captured CUDA graphs; every bucket
  the timed calls use is captured first; CUDA + triton backend only, not applicable on CPU).

Reported per model and workload: real tokens/s and texts/s (padding never counts), our speedup,
MFU against a bf16 matmul measured in the same process, peak GPU memory (weights of that side
plus the run's peak above what was resident before), the cosine of our embeddings to the
baseline's on the same texts; and latency p50/p99 at batch 1 and 8 on the query workload with
the weight-read floor (weight bytes / measured copy bandwidth). Results: <name>.json and
<name>.md (+ PNG plots via bench/plots.py) in the output folder.

Longer than ~500 lines on purpose: both sides of the end-to-end comparison (l2v and the
llm2vec-style Hugging Face pipeline), every workload and the budgeted report are one benchmark.
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np
import torch

from bench import common
from bench.e2e_report import (  # noqa: F401  (re-exported: the report's own names)
    COS_TARGET,
    IMPL_NOTES,
    OURS,
    OURS_GRAPHS,
    TARGETS,
    add_speedups,
    describe,
    merge_results,
    render_markdown,
    targets,
    write_result,
)
from bench.models import build_hf, build_ours, hf_config_object, random_state_dict  # noqa: F401
from bench.workloads import (
    MODEL_SHAPES,
    WORKLOADS,
    Workload,
    forward_flops,
    make_workload,
    model_shape,
    n_texts,
    weight_bytes,
)

COMPILE_LIMIT_S = 300.0  # torch.compile warm-up of the baseline, at most


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="End-to-end benchmark: l2v vs llm2vec-style transformers.",
    )
    ap.add_argument(
        "--models",
        default=None,
        help="comma list of model shapes (default: all; smoke: a 2-layer SmolLM2 shape): "
        + ", ".join(MODEL_SHAPES),
    )
    ap.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma list of workloads (default: %(default)s)",
    )
    ap.add_argument("--quick", action="store_true", help="half the texts, fewer latency calls")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU-sized run proving the pipeline (default without CUDA)",
    )
    ap.add_argument(
        "--out", default=None, help="output folder (default $L2V_BENCH_OUT or bench/results)"
    )
    ap.add_argument(
        "--name", default=None, help="report file name (default e2e, e2e_smoke when --smoke)"
    )
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="weights and activations (default bfloat16 on GPU, float32 on CPU)",
    )
    ap.add_argument(
        "--backend",
        default=None,
        help="our model's backend (default: triton on CUDA, torch on CPU)",
    )
    ap.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="our token budget per forward (default: the encoder's)",
    )
    ap.add_argument(
        "--hf-batch-sizes",
        default=None,
        help="baseline batch sizes, the first is the reference (default 32,64; smoke 3)",
    )
    ap.add_argument(
        "--compile",
        default="first",
        help="models (comma list, 'first', 'all' or 'none') whose baseline is also run under "
        "torch.compile on the passages workload, last, if time is left (default: the first "
        "model; none with --quick or --smoke)",
    )
    ap.add_argument(
        "--latency-calls",
        type=int,
        default=None,
        help="timed calls per latency measurement (default 60; quick 24; smoke 3)",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; optional measurements are skipped once it is spent",
    )
    ap.add_argument(
        "--warm-passes",
        type=int,
        default=None,
        help="untimed passes of our encoder over the whole workload before its timed pass "
        "(default 2; smoke 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    return ap.parse_args(argv)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_ms(n: int, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    return common.median_ms(lambda: torch.mm(a, b))


def _copy_ms(nbytes: int, device: torch.device, g: torch.Generator) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device, generator=g)
    dst = torch.empty_like(src)
    return common.median_ms(lambda: dst.copy_(src))


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """The two ceilings of this run: a large matmul's TFLOP/s and a large copy's GB/s.

    Random data (zeros run faster), sizes far beyond L2. The copy counts bytes read plus bytes
    written. CPU numbers (smoke runs) only prove the code.
    """
    n = 8192 if device.type == "cuda" else 256
    nbytes = (1 << 30) if device.type == "cuda" else (16 << 20)
    g = torch.Generator(device=device).manual_seed(1234)
    mm_ms = _matmul_ms(n, device, dtype, g)
    copy_ms = _copy_ms(nbytes, device, g)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
        "matmul_tflops": 2.0 * n**3 / mm_ms / 1e9,
        "copy_bytes": nbytes,
        "copy_GBps": 2.0 * nbytes / copy_ms / 1e6,
    }


def _peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_extra(device: torch.device, start: int) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) - start


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def warmup_subset(wl: Workload, every: int = 4) -> Workload:
    """Every `every`-th text in length order: covers the length range at 1/every of the cost."""
    order = sorted(range(len(wl)), key=lambda i: len(wl.ids[i]))
    return wl.subset(order[::every] or order[:1])


def timed(fn, wl: Workload, device: torch.device, warm=()):
    """(embeddings, seconds, extra peak bytes) of one pass over wl after the untimed warm-up
    passes `warm` (workloads, run in order)."""
    for w in warm:
        if w is not None and len(w):
            fn(w)
    start = _peak_start(device)
    t0 = time.perf_counter()
    emb = fn(wl)
    _sync(device)
    seconds = time.perf_counter() - t0
    return emb, seconds, _peak_extra(device, start)


def latency_calls(wl: Workload, batch: int, calls: int) -> list[Workload]:
    """The `calls` batches of `batch` consecutive texts a latency measurement times."""
    n = len(wl)
    subs = []
    for c in range(calls):
        start = (c * batch) % max(1, n - batch + 1)
        subs.append(wl.subset(range(start, min(n, start + batch))))
    return subs


def latencies_ms(fn, wl: Workload, batch: int, calls: int, device: torch.device, warm: int = 1):
    """Wall time of `calls` separate encode calls of `batch` texts each, after `warm` untimed
    passes over the very same calls: every batch shape (and so every Triton specialization and
    autotuning key it needs) is compiled and tuned before the first timed call."""
    subs = latency_calls(wl, batch, calls)
    for _ in range(warm):
        for sub in subs:
            fn(sub)
    out = []
    for sub in subs:
        _sync(device)
        t0 = time.perf_counter()
        fn(sub)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-text cosine of a and b, plus how similar different texts are (the check's contrast)."""
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    other = torch.nn.functional.cosine_similarity(b, b.roll(1, dims=0), dim=-1)
    return {
        "cos_min": float(cos.min()) if len(cos) else None,
        "cos_mean": float(cos.mean()) if len(cos) else None,
        "cos_other_texts": float(other.mean()) if len(b) > 1 else None,
        "finite": bool(torch.isfinite(a).all()),
    }


class Budget:
    """Optional measurements run only while time is left; failures are recorded, not raised."""

    def __init__(self, seconds: float | None, result: dict):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.result = result

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.t0)

    def run(self, what: str, fn, *, need: float = 0.0) -> bool:
        if self.left() < need:
            self.result["skipped"].append(f"{what}: out of time ({self.left():.0f}s left)")
            print(f"[e2e] skip {what}: out of time", flush=True)
            return False
        t0 = time.perf_counter()
        try:
            fn()
            print(f"[e2e] {what}: {time.perf_counter() - t0:.1f}s", flush=True)
            return True
        except Exception as e:  # one failing measurement must not lose the others
            msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            self.result["errors"].append(msg)
            print(f"[e2e] FAILED {msg}", file=sys.stderr, flush=True)
            traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return False


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (torch.compile warm-up)."""
    if not 0 < seconds < math.inf or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise TimeoutError(f"exceeded {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


def ours_encode_fn(encoder):
    """The encoder's own pre-tokenized entry point: packing, token budget, pooling, host copy."""

    def encode(wl: Workload) -> torch.Tensor:
        return encoder.encode_token_ids(wl.ids, wl.n_pool)

    return encode


def hf_encode_fn(model, batch_size: int, pad_id: int, device: torch.device):
    """llm2vec's encode loop on token ids: sort by length (longest first), left-pad batches of
    batch_size with pad = eos, run the *Model, mean over each row's last n_pool tokens."""

    def encode(wl: Workload) -> torch.Tensor:
        order = sorted(range(len(wl)), key=lambda i: -len(wl.ids[i]))
        pooled = []
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                width = len(wl.ids[idx[0]])
                ids = np.full((len(idx), width), pad_id, dtype=np.int64)
                attn = np.zeros((len(idx), width), dtype=np.int64)
                pool = np.zeros((len(idx), width), dtype=np.float32)
                for r, i in enumerate(idx):
                    n = len(wl.ids[i])
                    ids[r, width - n :] = wl.ids[i]
                    attn[r, width - n :] = 1
                    pool[r, width - wl.n_pool[i] :] = 1.0
                ids_t = torch.from_numpy(ids).to(device, non_blocking=True)
                attn_t = torch.from_numpy(attn).to(device, non_blocking=True)
                pool_t = torch.from_numpy(pool).to(device, non_blocking=True)
                hidden = model(input_ids=ids_t, attention_mask=attn_t, use_cache=False)
                hidden = hidden.last_hidden_state.float()
                summed = (hidden * pool_t[:, :, None]).sum(1)
                pooled.append(summed / pool_t.sum(1, keepdim=True).clamp_min(1.0))
            emb = torch.cat(pooled).cpu()
        out = torch.empty_like(emb)
        out[torch.tensor(order)] = emb
        return out

    return encode


def padded_tokens(wl: Workload, batch_size: int) -> int:
    """Tokens the padded baseline computes (real + padding)."""
    lengths = sorted(wl.lengths, reverse=True)
    return sum(
        lengths[s] * len(lengths[s : s + batch_size]) for s in range(0, len(lengths), batch_size)
    )


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def run_model(name: str, args, settings: dict, result: dict, budget: Budget, save) -> None:
    device, dtype = settings["device"], settings["dtype"]
    cfg = model_shape(name)
    ceil = result["ceilings"]
    floor_ms = weight_bytes(cfg, torch.finfo(dtype).bits // 8) / (ceil["copy_GBps"] * 1e9) * 1e3
    info = {
        "weight_bytes": weight_bytes(cfg, torch.finfo(dtype).bits // 8),
        "weight_read_floor_ms": floor_ms,
        "layers": cfg["num_hidden_layers"],
        "hidden": cfg["hidden_size"],
        "ceilings": dict(ceil),  # this process's (gpu_check.sh runs one per model)
    }
    result["models"][name] = info
    print(f"[e2e] {name}: building random {settings['dtype_name']} weights on {device}", flush=True)

    t0 = time.perf_counter()
    state = random_state_dict(cfg, device, dtype, args.seed)
    hf = build_hf(cfg, state, dtype, device)
    ours = build_ours(cfg, state, dtype, device, settings["backend"], args.max_tokens_per_batch)
    del state  # both sides hold what they need; the HF model may share these tensors
    info["build_s"] = time.perf_counter() - t0
    info["ours_weight_bytes"] = tensor_bytes(ours.model)
    info["hf_weight_bytes"] = tensor_bytes(hf)
    info["backend"] = getattr(ours.model, "backend", settings["backend"])

    bs_ref, *bs_more = settings["hf_batch_sizes"]
    ref_impl = f"hf_bs{bs_ref}"
    pad_id = cfg.get("eos_token_id", 2)
    ours_fn = ours_encode_fn(ours)
    hf_fns = {
        f"hf_bs{bs}": (hf_encode_fn(hf, bs, pad_id, device), bs)
        for bs in settings["hf_batch_sizes"]
    }
    refs: dict[str, torch.Tensor] = {}

    quick, smoke = settings["quick"], settings["smoke"]
    workloads = {
        w: make_workload(w, n_texts(w, name, quick=quick, smoke=smoke), cfg, seed=args.seed)
        for w in settings["workloads"]
    }

    def throughput(wl: Workload, impl: str, fn, batch: int | None):
        def go():
            # Ours: untimed passes over the whole workload first, so the timed pass runs the
            # very same packed batches (the same SwiGLU M classes, divisibility specializations
            # and attention shapes) on kernels that are already compiled and autotuned; the
            # first pass compiles and tunes, the second runs steady. The baseline has no
            # compile or autotuning step (cuBLAS, SDPA): a quarter of the texts, spread over
            # the length range, warms it.
            warm = [wl] * settings["warm_passes"] if impl == OURS else [warmup_subset(wl, 4)]
            emb, seconds, extra = timed(fn, wl, device, warm)
            flops = forward_flops(cfg, wl.lengths)
            weights = info["ours_weight_bytes"] if impl == OURS else info["hf_weight_bytes"]
            row = {
                "model": name,
                "workload": wl.name,
                "impl": impl,
                "texts": len(wl),
                "tokens": wl.tokens,
                "padded_tokens": padded_tokens(wl, batch) if batch else wl.tokens,
                "seconds": seconds,
                "tokens_per_s": wl.tokens / seconds,
                "texts_per_s": len(wl) / seconds,
                "TFLOP/s": flops / seconds / 1e12,
                "MFU": flops / seconds / 1e12 / ceil["matmul_tflops"],
                "peak_mem_GB": (weights + extra) / 1e9 if extra is not None else None,
            }
            if impl == ref_impl:
                refs[wl.name] = emb
            elif wl.name in refs:
                row.update(cosines(emb, refs[wl.name]))
            if impl == OURS:
                ours_emb[wl.name] = emb
            result["rows"].append(row)
            # Ours runs before the reference: check it once the reference exists.
            if impl == ref_impl and wl.name in ours_emb:
                mine = next(
                    r
                    for r in result["rows"]
                    if r["model"] == name and r["workload"] == wl.name and r["impl"] == OURS
                )
                mine.update(cosines(ours_emb.pop(wl.name), emb))
            save()

        return go

    graphs_problem = None
    if ours.model.backend != "triton" or device.type != "cuda":
        graphs_problem = (
            f"not applicable: needs CUDA and the triton backend (this run: {device.type}, "
            f"{ours.model.backend})"
        )
    info["cuda_graphs"] = graphs_problem or "measured (latency rows l2v_graphs)"
    graphs_encoder: list = []  # built on first use, shares ours' weights

    def latency_graphs(batch: int, wl: Workload, calls: int):
        """Our encoder with cuda_graphs=True: capture every bucket the timed calls can use
        (any failure is recorded in the row and in errors), then the same timing as ours."""

        def go():
            from l2v_models.encoder import LLM2Vec

            try:
                if not graphs_encoder:
                    graphs_encoder.append(
                        LLM2Vec.from_model(
                            ours.model,
                            max_tokens_per_batch=ours.max_tokens_per_batch,
                            cuda_graphs=True,
                        )
                    )
                enc = graphs_encoder[0]
                runner = enc.graph_runner()
                longest = max(sum(sub.lengths) for sub in latency_calls(wl, batch, calls))
                t0 = time.perf_counter()
                captured = runner.warmup(
                    "mean", False, max_tokens=min(longest, runner.max_tokens), max_seqs=batch
                )
                _sync(device)
                info.setdefault("graph_capture", {})[f"b{batch}"] = {
                    "buckets": len(captured),
                    "seconds": time.perf_counter() - t0,
                }
            except Exception as e:
                first_line = str(e).splitlines()[0][:300] if str(e) else ""
                result["latency"].append(
                    {
                        "model": name,
                        "impl": OURS_GRAPHS,
                        "batch": batch,
                        "calls": 0,
                        "floor_ms": floor_ms,
                        "error": f"{type(e).__name__}: {first_line}",
                    }
                )
                save()
                raise  # Budget.run records it in errors too and goes on
            latency(OURS_GRAPHS, ours_encode_fn(enc), batch, wl, calls)()
            # Replays vs eager batches (over the largest bucket) over all calls so far.
            info["graph_capture"][f"b{batch}"]["runner_calls"] = dict(runner.calls)

        return go

    def latency(impl: str, fn, batch: int, wl: Workload, calls: int):
        def go():
            samples = latencies_ms(fn, wl, batch, calls, device, warm=1)
            result["latency"].append(
                {
                    "model": name,
                    "impl": impl,
                    "batch": batch,
                    "calls": len(samples),
                    "p50_ms": float(np.percentile(samples, 50)),
                    "p99_ms": float(np.percentile(samples, 99)),
                    "mean_ms": float(np.mean(samples)),
                    "floor_ms": floor_ms,
                    "samples_ms": [round(s, 4) for s in samples],
                }
            )
            save()

        return go

    ours_emb: dict[str, torch.Tensor] = {}
    ref_fn, _ = hf_fns[ref_impl]
    order = [w for w in ("passages", "queries", "long") if w in workloads]
    # Most important first, so a tight time budget loses the least: the headline workload,
    # latency, the other workloads, then the extra baselines.
    for i, w in enumerate(order):
        wl = workloads[w]
        budget.run(f"{name}/{w}/{OURS}", throughput(wl, OURS, ours_fn, None))
        budget.run(f"{name}/{w}/{ref_impl}", throughput(wl, ref_impl, ref_fn, bs_ref))
        if i == 0 and "queries" in workloads:
            calls = settings["latency_calls"]
            for batch in (1, 8):
                budget.run(
                    f"{name}/latency b{batch}/{OURS}",
                    latency(OURS, ours_fn, batch, workloads["queries"], calls),
                )
                if graphs_problem is None:
                    budget.run(
                        f"{name}/latency b{batch}/{OURS_GRAPHS}",
                        latency_graphs(batch, workloads["queries"], calls),
                    )
                budget.run(
                    f"{name}/latency b{batch}/{ref_impl}",
                    latency(ref_impl, ref_fn, batch, workloads["queries"], calls),
                )
    for w in order:
        for impl in [f"hf_bs{bs}" for bs in bs_more]:
            fn, bs = hf_fns[impl]
            budget.run(f"{name}/{w}/{impl}", throughput(workloads[w], impl, fn, bs))
    if name in settings["compile"] and "passages" in workloads:
        compiled_impl = f"{ref_impl}_compile"

        def compile_and_warm():
            fn = hf_encode_fn(torch.compile(hf, dynamic=True), bs_ref, pad_id, device)
            # Compilation happens in the first calls, once per new batch shape (a last batch of
            # one text, say): one whole pass sees them all. Capped so the rest of the run survives.
            with time_limit(min(COMPILE_LIMIT_S, budget.left() - 20.0)):
                fn(workloads["passages"])
            hf_fns[compiled_impl] = (fn, bs_ref)

        if budget.run(f"{name}/torch.compile warm-up", compile_and_warm, need=60.0):
            fn, bs = hf_fns[compiled_impl]
            budget.run(
                f"{name}/passages/{compiled_impl}",
                throughput(workloads["passages"], compiled_impl, fn, bs),
            )
        hf_fns.pop(compiled_impl, None)
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("l2v bench: --device cuda but no CUDA device is visible")
    smoke = args.smoke or device.type != "cuda"
    if smoke and not args.smoke:
        print("[e2e] no CUDA device: running the smoke configuration (timings are not performance)")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    models = _csv(args.models) or (["smoke"] if smoke else list(MODEL_SHAPES))
    for m in models:
        if m not in MODEL_SHAPES and m != "smoke":  # unknown names fail before any work
            raise SystemExit(
                f"l2v bench: unknown model {m!r}; choose from {', '.join(MODEL_SHAPES)}"
            )
    workloads = _csv(args.workloads)
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(
                f"l2v bench: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}"
            )
    hf_bs = [int(b) for b in _csv(args.hf_batch_sizes)] or ([3] if smoke else [32, 64])
    first = set() if smoke or args.quick else set(models[:1])
    named = {"all": set(models), "none": set(), "first": first}
    compile_models = named.get(args.compile, set(_csv(args.compile)))
    settings = {
        "device": device,
        "dtype": dtype,
        "dtype_name": dtype_name,
        "smoke": smoke,
        "quick": args.quick,
        "workloads": workloads,
        "hf_batch_sizes": hf_bs,
        "backend": args.backend or ("triton" if device.type == "cuda" else "torch"),
        "compile": compile_models,
        "latency_calls": args.latency_calls or (2 if smoke else 24 if args.quick else 60),
        "warm_passes": max(1, args.warm_passes or (1 if smoke else 2)),
    }
    if smoke and args.max_tokens_per_batch is None:
        args.max_tokens_per_batch = 600  # several packed batches even for a few texts
    name = args.name or ("e2e_smoke" if smoke else "e2e")
    result = {
        "kind": "l2v-e2e",
        "stamp": common.stamp(),
        "config": {
            "models": models,
            "workloads": workloads,
            "dtype": dtype_name,
            "device": str(device),
            "smoke": smoke,
            "quick": args.quick,
            "seed": args.seed,
            "backend": settings["backend"],
            "hf_batch_sizes": hf_bs,
            "reference": f"hf_bs{hf_bs[0]}",
            "max_tokens_per_batch": args.max_tokens_per_batch,
            "compile": sorted(compile_models),
            "latency_calls": settings["latency_calls"],
            "warm_passes": settings["warm_passes"],
        },
        "ceilings": {},
        "models": {},
        "rows": [],
        "latency": [],
        "errors": [],
        "skipped": [],
    }
    budget = Budget(args.time_budget, result)
    result["ceilings"] = measure_ceilings(device, dtype)
    print(f"[e2e] ceilings: {result['ceilings']}", flush=True)

    def save():
        write_result(result, args.out, name)

    for m in models:
        budget.run(m, lambda m=m: run_model(m, args, settings, result, budget, save))
        gc.collect()  # free this shape's two models before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    path = write_result(result, args.out, name)
    if not args.no_plots:
        try:
            from bench import plots

            plots.plot_e2e(result, path.parent, prefix=name)
        except Exception as e:  # plots are a convenience; the numbers are written already
            print(f"[e2e] plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(path.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
