"""The engine: a loaded model + pooling. Tokenized texts in, pooled fp32 rows out.

    engine = Engine(model)                                   # an l2v_models.model.Transformer
    rows = engine.embed(texts, mode="mean")                  # TokenizedTexts -> fp32 [N, D], CPU
    pooled = engine.run_batch(texts, idx, mode="mean")       # or one pass: fp32 [B, D] on device
    host = engine.to_host(pooled)                            # async copy; host.wait() -> CPU rows

`run_batch` is the one way a packed batch runs (the encoder's `embed`, the server's model
workers and the trainer's `embed` call it): `stage` packs the texts and copies them to the
device (pinned host memory, one non-blocking copy), `forward` runs the model, pooling and
head. On CUDA nothing in it waits for the device, so a caller can pack and launch pass N+1
while pass N runs, and fetch N's rows with `to_host` without stalling the device.

The embedder (text rules), the server (continuous batching), the corpus runner (Ray actors) and
the trainer call this; it knows nothing about instructions, prompts or chat templates.

After pooling: the model's head (l2v_models.head: Dense layers, Normalize; none for LLM2Vec
models), then Matryoshka truncation (`truncate_dim`) and L2 normalization when asked. Without a
head or truncation, normalization runs inside the pooling kernel.

Contract:
- `embed` returns rows in the caller's order, whatever the batching: texts are planned into
  token-budget batches (l2v_models.packing.plan_batches, longest first), run, and scattered
  back. Results do not depend on the budget or on which other texts share a batch (no padding
  is ever computed; tests check this to fp32 rounding).
- A text with an empty pool span (or no token at all) gives a zero row.
- Token ids are checked against the vocabulary on the host before any batch runs: one bad id
  raises ValueError naming the text, and nothing runs.
- `forward` on the hot path does no validation and no host sync (the batch was built on the
  host); with `cuda_graphs=True`, batches up to 2048 tokens / 64 texts replay a captured CUDA
  graph (l2v_models.cuda_graphs).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from l2v_models.head import Head, check_truncate_dim, finish_rows
from l2v_models.packing import PackedBatch, TokenizedTexts, pack, plan_batches

logger = logging.getLogger(__name__)

POOL_MODES = ("mean", "weighted_mean", "last", "max")
# Token budget per forward pass when the caller gives none: large enough to keep an H100 busy on
# short queries, small enough that activations stay far below the weights of a 7B model.
DEFAULT_TOKENS_PER_BATCH = {"cuda": 16384, "cpu": 4096}
# Pooled rows are kept on the GPU and copied to the host in chunks of about this many bytes:
# one sync per chunk instead of one per batch, and bounded GPU memory for any input size.
_FLUSH_BYTES = 64 << 20


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = True) -> int | None:
    """An int >= minimum (numpy ints accepted) or None; ValueError naming the setting otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Engine:
    """Runs packed batches through a model and pools them.

    model: an l2v_models.model.Transformer. max_tokens_per_batch: real tokens per forward pass
    (default 16384 on CUDA, 4096 on CPU; a longer text runs alone). max_texts_per_batch: at most
    this many texts per pass (default: no limit). cuda_graphs: replay small batches from captured
    CUDA graphs (CUDA + triton backend only; ValueError elsewhere). head: what runs after pooling
    (l2v_models.head.Head; default none).
    """

    def __init__(
        self,
        model,
        *,
        max_tokens_per_batch: int | None = None,
        max_texts_per_batch: int | None = None,
        cuda_graphs: bool = False,
        head: Head | None = None,
    ):
        if not (hasattr(model, "pool") and hasattr(model, "config") and callable(model)):
            raise TypeError(
                f"Engine runs an l2v_models.model.Transformer, got {type(model).__name__}"
            )
        self.model = model
        self.max_tokens_per_batch = check_int("max_tokens_per_batch", max_tokens_per_batch)
        self.max_texts_per_batch = check_int("max_texts_per_batch", max_texts_per_batch)
        if not isinstance(cuda_graphs, (bool, np.bool_)):
            raise ValueError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        self.cuda_graphs = bool(cuda_graphs)
        self.head = head if head is not None else Head.identity(model.config.hidden_size)
        if self.head.in_dim != model.config.hidden_size:
            raise ValueError(
                f"the head takes {self.head.in_dim} features but the model gives "
                f"{model.config.hidden_size}"
            )
        self._graphs = None
        if self.cuda_graphs:
            self.graph_runner()  # fail now, not at the first batch

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dimension(self) -> int:
        """Features per output row (after the head, before any truncation)."""
        return self.head.out_dim

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def token_budget(self) -> int:
        """Tokens per forward pass: the setting, else the device default."""
        return self.max_tokens_per_batch or DEFAULT_TOKENS_PER_BATCH.get(self.device.type, 4096)

    def graph_runner(self):
        """The BucketedGraphRunner of this engine's model (built on first use, rebuilt when the
        model was replaced); ValueError where graphs cannot run. Its warmup() captures buckets
        ahead of time."""
        from l2v_models.cuda_graphs import BucketedGraphRunner, graph_support_error

        if self._graphs is None or self._graphs.model is not self.model:
            problem = graph_support_error(self.model)
            if problem is not None:
                raise ValueError(
                    f"cuda_graphs=True needs the model on a CUDA device with the triton "
                    f"backend, but {problem}; pass cuda_graphs=False (the default)"
                )
            self._graphs = BucketedGraphRunner(self.model)
        return self._graphs

    # ------------------------------------------------------------------ batches
    def check_token_ids(self, texts: TokenizedTexts) -> None:
        """ValueError naming the first text with a token id outside [0, vocab_size)."""
        vocab = self.vocab_size
        for i, ids in enumerate(texts.input_ids):
            if len(ids) == 0:
                continue
            arr = np.asarray(ids)
            if arr.dtype.kind not in "iu":
                raise ValueError(f"text {i}: token ids must be integers, got {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"text {i}: token ids must lie in [0, {vocab}), got {lo} ... {hi}"
                )

    def plan(
        self, texts: TokenizedTexts, *, max_tokens: int | None = None, max_texts: int | None = None
    ) -> list[np.ndarray]:
        """The caller's indices of the texts in each forward pass (see packing.plan_batches)."""
        max_tokens = check_int("max_tokens_per_batch", max_tokens) or self.token_budget
        max_texts = check_int("batch_size", max_texts) or self.max_texts_per_batch
        return plan_batches(texts.lengths, max_tokens, max_texts)

    def stage(self, texts: TokenizedTexts, rows=None) -> PackedBatch:
        """texts[rows] (all texts when rows is None) packed on the host and copied to the
        engine's device (to CUDA: pinned memory, one non-blocking copy; no sync)."""
        if rows is None:
            rows = np.arange(len(texts))
        return pack(texts, rows).to(self.device)

    def run_batch(
        self, texts: TokenizedTexts, rows=None, *, mode: str = "mean", normalize: bool = False,
        truncate_dim: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Run one forward pass over texts[rows] (all texts when rows is None; checked texts,
        see check_token_ids): output rows fp32 [B, D] on the device, in the order of rows.
        Launches without waiting for the device (CUDA); run it under torch.inference_mode()
        (or no_grad) and, on CUDA, with the model's device current."""
        return self.forward(self.stage(texts, rows), mode, normalize, truncate_dim)

    def to_host(self, rows: torch.Tensor) -> HostRows:
        """Start copying device rows to the host: on CUDA into pinned memory without waiting
        (HostRows.wait() waits for that copy only); elsewhere the rows themselves."""
        if rows.device.type != "cuda":
            return HostRows(rows, None)
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostRows(host, event)

    def forward(
        self, batch: PackedBatch, mode: str = "mean", normalize: bool = False,
        truncate_dim: int | None = None,
    ):  # fmt: skip
        """Output rows fp32 [B, D] of one packed batch on the model's device: pooled, through the
        head, truncated to truncate_dim features and L2-normalized when asked (no validation, no
        host sync: build the batch with packing.pack from checked texts)."""
        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
        model = self.model
        if batch.device != self.device:
            batch = batch.to(self.device)
        after = not self.head.is_identity or truncate_dim is not None
        in_kernel = normalize and not after
        graphs = self.graph_runner() if self.cuda_graphs else None
        if graphs is not None and graphs.fits(batch.num_tokens, batch.num_texts):
            pooled = graphs(batch, mode, in_kernel)
        else:
            hidden = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.positions,
                           check_inputs=False)  # fmt: skip
            pooled = model.pool(hidden, batch.pool_mask, batch.cu_seqlens, mode, in_kernel,
                                check_inputs=False)  # fmt: skip
        if not after:
            return pooled
        return finish_rows(self.head(pooled), truncate_dim=truncate_dim, normalize=normalize)

    def embed(
        self,
        texts: TokenizedTexts,
        *,
        mode: str = "mean",
        normalize: bool = False,
        truncate_dim: int | None = None,
        max_tokens: int | None = None,
        max_texts: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Output float32 [N, D] CPU rows of all texts, in their order (D = truncate_dim, else
        the head's output dimension).

        mode: "mean", "weighted_mean", "max" or "last" over each text's pool span. normalize:
        L2-normalize each row (after truncation). truncate_dim: keep the first this many
        features (Matryoshka). max_tokens / max_texts: this call's budgets (default: the
        engine's). progress: a tqdm bar over the forward passes.
        """
        from tqdm.auto import tqdm

        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
        truncate_dim = check_truncate_dim(truncate_dim, self.dimension)
        n = len(texts)
        out = torch.zeros(n, truncate_dim or self.dimension, dtype=torch.float32)
        if n == 0:
            return out
        self.check_token_ids(texts)
        batches = self.plan(texts, max_tokens=max_tokens, max_texts=max_texts)
        if not batches:
            return out
        device = self.device
        cuda = device.type == "cuda"
        done: list[tuple[np.ndarray, torch.Tensor]] = []  # (rows, pooled on the host)
        pending: list[tuple[np.ndarray, torch.Tensor]] = []  # pooled rows still on the device
        pending_bytes = 0

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                host = torch.cat([p for _, p in pending]).cpu()
                done.append((np.concatenate([r for r, _ in pending]), host))
                pending, pending_bytes = [], 0

        # Kernels launch on the current CUDA device: make it the model's.
        on_device = torch.cuda.device(device) if cuda else contextlib.nullcontext()
        with (
            on_device,
            torch.inference_mode(),
            tqdm(total=len(batches), desc="Batches", disable=not progress) as bar,
        ):
            for rows in batches:
                pooled = self.run_batch(texts, rows, mode=mode, normalize=normalize,
                                        truncate_dim=truncate_dim)  # fmt: skip
                pending.append((rows, pooled))
                pending_bytes += pooled.numel() * 4
                if not cuda or pending_bytes >= _FLUSH_BYTES:
                    flush()
                bar.update(1)
            flush()
        # Outside inference mode, so the caller gets an ordinary tensor it may modify in place.
        for rows, pooled in done:
            out[torch.from_numpy(rows)] = pooled.float()
        return out


class HostRows:
    """Rows on their way to the host (Engine.to_host): wait() -> float32 CPU tensor."""

    def __init__(self, rows: torch.Tensor, event):
        self._rows, self._event = rows, event

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # this copy only: later passes keep the device busy
        return self._rows.float()
