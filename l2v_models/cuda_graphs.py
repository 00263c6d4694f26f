"""Small packed batches through captured CUDA graphs: forward + pooling in one replay.

At serving sizes (1-8 queries, a few hundred tokens) a forward pass is launch-bound: the triton
backend issues ~8 kernels and some Python per layer, and the GPU waits on the host. Every op of
that path is free of host syncs when called with check_inputs=False, so the whole forward plus
the pooling can be captured once per batch shape and replayed with one launch:

    runner = BucketedGraphRunner(model)             # model: a Transformer, triton backend, CUDA
    pooled = runner(batch, mode="mean")          # a packing.PackedBatch on the GPU -> fp32 [B, D]

Buckets. A batch of T tokens in B texts runs in the bucket (T_b, B_b): T_b the smallest token
bucket >= T (powers of two from `min_tokens`, 16, up to `max_tokens`, default 2048, the last
one `max_tokens` itself; capped at the model's sliding window) and B_b the smallest sequence
bucket >= B (powers of two up to `max_seqs`, default 64). Its static buffers hold T_b tokens and
B_b + 1 sequence slots: the B texts, then one dummy sequence of the T_b - T padding tokens (id 0,
pool mask 0), then empty slots (cu_seqlens repeats T_b). Texts never see the padding: attention
is per sequence, every other op per token, pooling per sequence. max_seqlen is the bucket's T_b
(a static Python int, so the attention grid is static; programs past a sequence's end exit
early). out[:B] is the result, copied out (or into the caller's `out=`) before the next replay
overwrites it. Pooling mode and normalize are part of the graph key; the static inputs are
shared by all graphs of one (T_b, B_b).

Capture. The first batch of a bucket copies itself into the static buffers, runs eagerly once on
a side stream (Triton compiles and autotunes there: a capture must never autotune), then the
graph is captured into a memory pool shared by all buckets (torch.cuda.graph_pool_handle();
replays are sequential on one stream, so intermediates can share memory) and replayed. The
graph keeps reading the model's weights and RoPE tables in place: the runner keeps the tables it
captured alive, and a model whose weights are replaced needs a new runner. A capture failure
raises RuntimeError naming the bucket: graphs were asked for explicitly, so nothing falls back
silently. Batches larger than the largest bucket run eagerly (the plain forward + pool).

`capture=False` runs exactly the same padded static-buffer computation eagerly, on any device
and backend: the CPU tests use it to prove that bucket padding leaves the embeddings unchanged.

Memory: the static buffers (a few bytes per token of the largest bucket) plus the shared pool,
which holds about one forward pass's activations at the largest captured bucket (for a 7B model
at 2048 tokens, a few hundred MB) plus each graph's small [B_b + 1, D] output.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from l2v_kernels.reference import positions_from_cu_seqlens
from l2v_models.model import POOL_MODES
from l2v_models.packing import PackedBatch

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2048
DEFAULT_MAX_SEQS = 64
DEFAULT_MIN_TOKENS = 16


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def _smallest_at_least(buckets: tuple[int, ...], n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class _Inputs:
    """Static inputs of one (T_b, B_b): what a replay reads."""

    tokens: int  # T_b
    seqs: int  # B_b (the buffers hold B_b + 1 sequence slots)
    input_ids: torch.Tensor  # int32 [T_b]
    cu_seqlens: torch.Tensor  # int32 [B_b + 2]
    pool_mask: torch.Tensor  # uint8 [T_b]


@dataclass
class _Graph:
    key: tuple  # (T_b, B_b, mode, normalize)
    inputs: _Inputs
    out: torch.Tensor | None = None  # fp32 [B_b + 1, D], written by each replay
    graph: object | None = None  # torch.cuda.CUDAGraph (None when capture=False)
    keepalive: list = field(default_factory=list)  # tensors the graph reads besides weights


class BucketedGraphRunner:
    """Forward + pooling of small packed batches, replayed from CUDA graphs captured per bucket.

    model: an l2v_models.model.Transformer (triton backend on CUDA when capture=True).
    max_tokens / min_tokens: the token buckets (see the module doc); max_seqs: the largest
    sequence bucket. capture=False: the same padded computation run eagerly (any device).
    `calls` counts "replay", "capture", "padded_eager" and "eager" (over the largest bucket).
    """

    def __init__(
        self,
        model,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_seqs: int = DEFAULT_MAX_SEQS,
        min_tokens: int = DEFAULT_MIN_TOKENS,
        capture: bool = True,
    ):
        for name, value in (("max_tokens", max_tokens), ("max_seqs", max_seqs),
                            ("min_tokens", min_tokens)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if capture:
            problem = graph_support_error(model)
            if problem is not None:
                raise RuntimeError(f"CUDA graphs were requested but {problem}")
        self.model = model
        self.capture = capture
        window = model.config.sliding_window
        top = max_tokens if window is None else min(max_tokens, window)
        self.token_buckets = _pow2_buckets(min(min_tokens, top), top)
        self.seq_buckets = _pow2_buckets(1, max_seqs)
        self._inputs: dict[tuple[int, int], _Inputs] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.calls: Counter = Counter()

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1]

    @property
    def max_seqs(self) -> int:
        return self.seq_buckets[-1]

    @property
    def device(self) -> torch.device:
        return self.model.device

    def bucket(self, n_tokens: int, n_seqs: int) -> tuple[int, int] | None:
        """(T_b, B_b) a batch of n_tokens in n_seqs texts runs in; None = too large (eager)."""
        t = _smallest_at_least(self.token_buckets, max(n_tokens, 1))
        b = _smallest_at_least(self.seq_buckets, max(n_seqs, 1))
        return None if t is None or b is None else (t, b)

    def fits(self, n_tokens: int, n_seqs: int) -> bool:
        return self.bucket(n_tokens, n_seqs) is not None

    def graphs_captured(self) -> list[tuple]:
        """Keys (T_b, B_b, mode, normalize) of the buckets captured (or built) so far."""
        return sorted(self._graphs)

    # ------------------------------------------------------------------ running
    def __call__(
        self,
        batch: PackedBatch,
        mode: str = "mean",
        normalize: bool = False,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled fp32 [B, D] of one packed batch (l2v_models.packing.PackedBatch on the model's
        device), as Engine.forward computes it. Inputs are not validated on the device (as with
        check_inputs=False). out: an fp32 [B, D] tensor on the model's device to write into (else
        a new one is returned). The graph computes positions from cu_seqlens itself."""
        input_ids, cu_seqlens, pool_mask = batch.input_ids, batch.cu_seqlens, batch.pool_mask
        if mode not in POOL_MODES:
            raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
        if input_ids.ndim != 1 or cu_seqlens.ndim != 1 or pool_mask.shape != input_ids.shape:
            raise ValueError(
                f"expected input_ids [T], pool_mask [T] and cu_seqlens [B+1], got "
                f"{tuple(input_ids.shape)}, {tuple(pool_mask.shape)}, {tuple(cu_seqlens.shape)}"
            )
        T, B = input_ids.shape[0], cu_seqlens.shape[0] - 1
        if B < 1:
            raise ValueError(f"cu_seqlens must hold B+1 >= 2 offsets, got {B + 1}")
        bucket = self.bucket(T, B)
        if bucket is None:
            self.calls["eager"] += 1
            return self._eager(batch, mode, normalize, out)
        key = (*bucket, mode, bool(normalize))
        g = self._graphs.get(key)
        on_device = torch.cuda.device(self.device) if self.capture else contextlib.nullcontext()
        with on_device, torch.no_grad(), torch.inference_mode(False):
            inputs = g.inputs if g is not None else self._static_inputs(*bucket)
            self._load(inputs, input_ids, cu_seqlens, pool_mask)
            if g is None:
                g = self._build(key, inputs)  # runs the batch too (eagerly or by a replay)
            elif g.graph is not None:
                g.graph.replay()
                self.calls["replay"] += 1
            else:
                self._compute(g)
                self.calls["padded_eager"] += 1
        # Copied out before the next replay overwrites it (in the caller's inference mode).
        return g.out[:B].clone() if out is None else out.copy_(g.out[:B])

    def warmup(
        self,
        modes=("mean",),
        normalize=(False,),
        *,
        max_tokens: int | None = None,
        max_seqs: int | None = None,
    ) -> list[tuple]:
        """Capture every bucket up to (max_tokens, max_seqs) (default: all) for these pooling
        modes and normalize flags, so no later call pays a compile, autotune or capture.
        Returns the keys captured."""
        if isinstance(modes, str):
            modes = (modes,)
        if isinstance(normalize, bool):
            normalize = (normalize,)
        t_top = self.bucket(max_tokens or self.max_tokens, 1)
        b_top = self.bucket(1, max_seqs or self.max_seqs)
        if t_top is None or b_top is None:
            raise ValueError(
                f"warmup limits ({max_tokens}, {max_seqs}) exceed the largest bucket "
                f"({self.max_tokens} tokens, {self.max_seqs} texts)"
            )
        done = []
        for t in self.token_buckets:
            if t > t_top[0]:
                break
            for b in self.seq_buckets:
                if b > b_top[1]:
                    break
                # A valid batch of the bucket: b texts sharing the t tokens (the last takes the
                # rest; texts are empty when t < b), every token pooled.
                lengths = [t // b] * b
                lengths[-1] += t % b
                cu = torch.zeros(b + 1, dtype=torch.int32)
                cu[1:] = torch.tensor(lengths).cumsum(0)
                ids = torch.zeros(t, dtype=torch.int32, device=self.device)
                mask = torch.ones(t, dtype=torch.uint8, device=self.device)
                cu = cu.to(self.device)
                positions = positions_from_cu_seqlens(cu, t)
                batch = PackedBatch(ids, cu, positions, mask, max(lengths), np.arange(b))
                for m in modes:
                    for nz in normalize:
                        self(batch, m, nz)
                        done.append((t, b, m, bool(nz)))
        return done

    # ------------------------------------------------------------------ internals
    def _eager(self, batch: PackedBatch, mode, normalize, out):
        model = self.model
        hidden = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.positions,
                       check_inputs=False)  # fmt: skip
        pooled = model.pool(hidden, batch.pool_mask, batch.cu_seqlens, mode, normalize,
                            check_inputs=False)  # fmt: skip
        return pooled if out is None else out.copy_(pooled)

    def _static_inputs(self, tokens: int, seqs: int) -> _Inputs:
        inputs = self._inputs.get((tokens, seqs))
        if inputs is None:
            dev = self.device
            inputs = _Inputs(
                tokens=tokens,
                seqs=seqs,
                input_ids=torch.zeros(tokens, dtype=torch.int32, device=dev),
                cu_seqlens=torch.full((seqs + 2,), tokens, dtype=torch.int32, device=dev),
                pool_mask=torch.zeros(tokens, dtype=torch.uint8, device=dev),
            )
            inputs.cu_seqlens[0] = 0
            self._inputs[(tokens, seqs)] = inputs
        return inputs

    @staticmethod
    def _load(inputs: _Inputs, input_ids, cu_seqlens, pool_mask) -> None:
        """Copy a batch into the static buffers: texts first, then the dummy sequence of
        padding tokens (id 0, never pooled) up to T_b, then empty slots ending at T_b."""
        T, B = input_ids.shape[0], cu_seqlens.shape[0] - 1
        inputs.input_ids[:T].copy_(input_ids, non_blocking=True)
        inputs.input_ids[T:].zero_()
        if pool_mask.dtype == torch.bool:
            pool_mask = pool_mask.view(torch.uint8)
        inputs.pool_mask[:T].copy_(pool_mask, non_blocking=True)
        inputs.pool_mask[T:].zero_()
        inputs.cu_seqlens[: B + 1].copy_(cu_seqlens, non_blocking=True)
        inputs.cu_seqlens[B + 1 :].fill_(inputs.tokens)

    def _compute(self, g: _Graph) -> torch.Tensor:
        """The padded forward + pool on the static buffers (what the graph captures)."""
        i, model = g.inputs, self.model
        mode, normalize = g.key[2], g.key[3]
        hidden = model(i.input_ids, i.cu_seqlens, i.tokens, check_inputs=False)
        pooled = model.pool(hidden, i.pool_mask, i.cu_seqlens, mode, normalize,
                            check_inputs=False)  # fmt: skip
        if g.out is None:
            g.out = pooled
        else:
            g.out.copy_(pooled)
        return g.out

    def _build(self, key: tuple, inputs: _Inputs) -> _Graph:
        """Create the bucket's graph (the static buffers already hold the current batch) and
        leave this batch's result in its output."""
        g = _Graph(key, inputs)
        if not self.capture:
            self._compute(g)
            self._graphs[key] = g
            self.calls["padded_eager"] += 1
            return g
        T_b, B_b, mode, normalize = key
        where = f"bucket T={T_b} tokens, B={B_b} texts, mode={mode!r}, normalize={normalize}"
        with torch.cuda.device(self.device):
            try:
                # PyTorch's documented warm-up: run once on a side stream before capturing
                # (Triton compiles and autotunes here; the capture must not).
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._compute(_Graph(key, inputs))
                torch.cuda.current_stream().wait_stream(side)
            except Exception as e:
                raise RuntimeError(f"CUDA graphs: the eager warm-up of {where} failed: {e}") from e
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._compute(g)
            except Exception as e:
                raise RuntimeError(
                    f"CUDA graphs: capturing {where} failed: {type(e).__name__}: {e}"
                ) from e
            g.graph = graph
            # The graph reads the RoPE tables in place; a later longer text makes the model
            # build bigger ones, so keep these alive as long as the graph is.
            g.keepalive = self.model.rope_tables()
            self._graphs[key] = g
            self.calls["capture"] += 1
            graph.replay()  # the capture itself computed nothing: run the current batch
            self.calls["replay"] += 1
        logger.debug("l2v: captured a CUDA graph for %s", where)
        return g


def graph_support_error(model) -> str | None:
    """Why `model` cannot run captured CUDA graphs, or None when it can."""
    device = getattr(model, "device", None)
    backend = getattr(model, "backend", None)
    if device is None or torch.device(device).type != "cuda":
        return f"the model is on {device}, not a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if backend != "triton":
        return (
            f"the model runs the {backend!r} backend; CUDA graphs need the 'triton' backend "
            "(its ops are free of host syncs)"
        )
    return None
