"""Continuous token-budget batching: one queue, one model worker thread per engine replica.

    batcher = ContinuousBatcher(replicas, mode="mean", max_batch_tokens=4096, max_wait_s=0.002)
    batcher.start()
    job = batcher.submit(texts, model=None)  # a TokenizedTexts of one request (any thread);
                                             # model: an adapter name, None for the base model
    rows = job.future.result()               # float32 numpy [N, D], in the request's order
    batcher.cancel(job)                      # the client went away: drop its queued texts
    batcher.stop()                           # run what is queued, then end the workers

The queue holds requests in arrival order. A pass takes texts first in, first out
(packing.take_fifo: a request's texts in order, then the next request's) until the next text
would overflow `max_batch_tokens` (a text longer than the budget runs alone) or
`max_batch_texts` is reached. A pass holds one model's texts: it serves the model (base or
adapter) of the oldest queued request and takes only that model's requests, in order, so no
request waits behind newer ones of its own model. Since nothing is padded and every text attends
only to itself, the rows equal offline `engine.embed` of the same texts to fp32 rounding.

Each replica (l2v_models.serve.replicas) has a model worker thread; a worker with room takes the
next pass, so passes go to the least-busy engines. A worker pipelines host and device work: it
packs and launches pass N+1 (pinned host memory, asynchronous copy; Engine.run_batch waits for
nothing on CUDA) before it waits for pass N's rows (Engine.to_host), so the device runs N+1
while the host scatters N's rows. On the CPU a pass runs inside the launch.

When the queue holds less than a full budget and a worker has nothing in flight, it waits for
more work until the oldest queued text has waited `max_wait_s` (the small delay that lets
concurrent requests share a pass at low load); with a full budget queued, or the oldest text
already that old (the usual case under load), the pass starts at once.

Rows come back unnormalized (the pooled mean, as `encode`); the caller normalizes per request.
A failing pass fails the requests that had texts in it (their other texts are dropped), and
the worker carries on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time

import numpy as np
import torch

from l2v_models.packing import TokenizedTexts, take_fifo

logger = logging.getLogger("l2v.serve")


class ShuttingDown(RuntimeError):
    """submit() after stop(): the server is draining."""


class RequestDropped(RuntimeError):
    """The job was cancelled (its client went away) before all its rows were computed."""


class Job:
    """One request's texts in the queue. future: a concurrent.futures.Future of the float32
    [N, D] rows. model: the adapter name (None: the base model). Times (time.perf_counter):
    submitted, first_batch (its first pass began), done. Other fields are the batcher's."""

    def __init__(self, texts: TokenizedTexts, dimension: int, model: str | None = None):
        self.texts = texts
        self.model = model
        self.lengths = texts.lengths
        n = len(texts)
        self.out = np.zeros((n, dimension), dtype=np.float32)
        self.next = 0  # first text not yet taken by a worker
        self.remaining = int(np.count_nonzero(self.lengths))  # texts whose row is not back yet
        self.cancelled = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.perf_counter()
        self.first_batch: float | None = None
        self.done: float | None = None

    def queued_tokens(self) -> int:
        return int(self.lengths[self.next :].sum())

    def queued_texts(self) -> int:
        return int(np.count_nonzero(self.lengths[self.next :]))


class ContinuousBatcher:
    """The queue and the model workers (see the module docstring).

    replicas: l2v_models.serve.replicas.Replica (one worker thread each). mode: the pooling mode
    ("mean", "weighted_mean", "last", "max"). max_batch_tokens: real tokens per pass (>= 1).
    max_batch_texts: texts per pass (None = no limit). max_wait_s: the idle wait for more work
    (>= 0). metrics: a ServerMetrics or None.
    """

    def __init__(
        self,
        replicas,
        *,
        mode: str,
        max_batch_tokens: int,
        max_batch_texts: int | None = None,
        max_wait_s: float = 0.002,
        metrics=None,
    ):
        if not replicas:
            raise ValueError("the batcher needs at least one engine replica")
        if max_batch_tokens < 1 or (max_batch_texts is not None and max_batch_texts < 1):
            raise ValueError(
                f"batch budgets must be >= 1, got {max_batch_tokens} tokens, "
                f"{max_batch_texts} texts"
            )
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.replicas = list(replicas)
        self.dimension = self.replicas[0].engine.dimension
        self.mode = mode
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = float(max_wait_s)
        self.metrics = metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_tokens = 0
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self.batches_run = 0
        self.passes_by_replica = {r.name: 0 for r in self.replicas}

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        if self._workers:
            raise RuntimeError("ContinuousBatcher.start() called twice")
        for replica in self.replicas:
            worker = ModelWorker(self, replica)
            t = threading.Thread(target=worker.run, name=f"l2v-model-worker-{replica.name}",
                                 daemon=True)  # fmt: skip
            self._workers.append(t)
            t.start()

    def submit(self, texts: TokenizedTexts, model: str | None = None) -> Job:
        """Queue one request's texts for `model` (an adapter name; None: the base); returns
        its Job (the rows arrive in job.future). ShuttingDown after stop()."""
        if model is not None and model not in self.replicas[0].adapter_ops:
            raise ValueError(f"no adapter named {model!r} is loaded")
        job = Job(texts, self.dimension, model)
        if job.remaining == 0:  # nothing to run (every text empty): zero rows
            job.first_batch = job.done = time.perf_counter()
            job.future.set_result(job.out)
            return job
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._queue.append(job)
            self._queued_tokens += job.queued_tokens()
            self._queued_texts += job.queued_texts()
            self._gauges()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> int:
        """Drop the job's texts that no pass has taken yet; returns how many were dropped.
        Texts already in a running pass finish (their rows are discarded)."""
        with self._cond:
            if job.cancelled or job.future.done():
                return 0
            dropped = self._unqueue(job)
        if self.metrics is not None and dropped:
            self.metrics.dropped_texts.inc(dropped)
        _set_exception(job, RequestDropped("the request was cancelled"))
        return dropped

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new work, let the workers run what is queued, wait for them (up to `timeout`
        seconds in all). Returns True when every worker ended; jobs still queued then fail."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._workers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._workers):
            with self._cond:
                left = list(self._queue)
            for job in left:
                _set_exception(job, ShuttingDown("the server stopped before this request ran"))
            return False
        return True

    @property
    def queued_texts(self) -> int:
        """Texts waiting for the model."""
        return self._queued_texts

    @property
    def queued_requests(self) -> int:
        """Requests with texts waiting for the model."""
        with self._cond:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and any(t.is_alive() for t in self._workers)

    # ------------------------------------------------------------------ for the workers
    def take(self, block: bool) -> list[tuple[Job, int, int]] | None:
        """Texts for one pass: [(job, start, stop)]. block: wait for work (and, below a full
        budget, up to max_wait_s for more); else take what is queued now ([] if nothing).
        None once stopping and the queue is empty."""
        with self._cond:
            while not self._queue and not self._stopping:
                if not block:
                    return []
                self._cond.wait()
            if not self._queue:
                return None
            if block:
                self._wait_for_more()
            taken = self._take()
            self._gauges()
            return taken

    def _wait_for_more(self) -> None:
        """(Lock held.) Less than a full budget queued: wait until the oldest queued text has
        waited max_wait_s, or a full budget is queued, or stop() is called."""
        if self.max_wait_s <= 0:
            return
        while (
            self._queue
            and not self._stopping
            and self._queued_tokens < self.max_batch_tokens
            and (self.max_batch_texts is None or self._queued_texts < self.max_batch_texts)
        ):
            left = self._queue[0].submitted + self.max_wait_s - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take(self) -> list[tuple[Job, int, int]]:
        """(Lock held.) Texts of one model for one pass, first in first out."""
        if not self._queue:
            return []
        model = self._queue[0].model
        taken: list[tuple[Job, int, int]] = []
        tokens = count = 0
        finished: list[Job] = []
        for job in self._queue:
            if job.model != model:
                continue
            start = job.next
            stop, tokens, count = take_fifo(job.lengths, start, self.max_batch_tokens,
                                            self.max_batch_texts, tokens=tokens, texts=count)
            if stop > start:
                taken.append((job, start, stop))
                job.next = stop
            if stop == len(job.lengths):
                finished.append(job)
            else:
                break  # the pass is full
        for job in finished:
            self._queue.remove(job)
        self._queued_tokens -= tokens
        self._queued_texts -= count
        return taken

    def _unqueue(self, job: Job) -> int:
        """(Lock held.) Mark the job cancelled and drop its queued texts; their count."""
        job.cancelled = True
        dropped = job.queued_texts()
        self._queued_tokens -= job.queued_tokens()
        self._queued_texts -= dropped
        job.next = len(job.lengths)
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        self._gauges()
        return dropped

    def finish_pass(self, replica, slices, rows: np.ndarray, t0: float, n_tokens: int) -> None:
        """Scatter one pass's rows to its requests (slices: [(job, indices)]) and answer those
        that are complete."""
        t1 = time.perf_counter()
        offset = 0
        finished = []
        with self._cond:
            for job, idx in slices:
                k = idx.size
                job.out[idx] = rows[offset : offset + k]
                offset += k
                job.remaining -= k
                if k and job.remaining == 0 and not job.cancelled:
                    job.done = t1
                    finished.append(job)
            self.batches_run += 1
            self.passes_by_replica[replica.name] += 1
        for job in finished:
            _set_result(job, job.out)
        m = self.metrics
        if m is not None:
            n_texts = sum(idx.size for _, idx in slices)
            n_requests = len({id(job) for job, _ in slices})
            m.batch_seconds.observe(t1 - t0)
            m.batch_texts.observe(n_texts)
            m.batch_tokens.observe(n_tokens)
            m.batch_requests.observe(n_requests)
            if n_requests > 1:
                m.mixed_batches.inc()
            m.batches.inc()
            m.texts.inc(n_texts)
            m.tokens.inc(n_tokens)
            m.tokens_per_second.set(n_tokens / max(t1 - t0, 1e-9))
            for job in finished:
                m.queue_seconds.observe(job.first_batch - job.submitted)
                m.inference_seconds.observe(job.done - job.first_batch)

    def fail_pass(self, slices, error: Exception) -> None:
        """A pass failed: fail its requests (their queued texts are dropped)."""
        for job, _ in slices:
            with self._cond:
                if not job.cancelled:
                    self._unqueue(job)
            _set_exception(job, error)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_texts.set(self._queued_texts)
            self.metrics.queue_tokens.set(self._queued_tokens)


class ModelWorker:
    """The thread that drives one replica: takes passes from the batcher, one in flight ahead
    (see the module docstring)."""

    def __init__(self, batcher: ContinuousBatcher, replica):
        self.batcher = batcher
        self.replica = replica
        device = replica.device
        self.on_device = (lambda: torch.cuda.device(device)) if device.type == "cuda" else (
            contextlib.nullcontext)  # fmt: skip

    def run(self) -> None:
        inflight = None
        while True:
            taken = self.batcher.take(block=inflight is None)
            if taken is None:  # stopping and drained
                if inflight is not None:
                    self.finish(inflight)
                return
            current = self.launch(taken) if taken else None
            if inflight is not None:
                self.finish(inflight)
            inflight = current

    def launch(self, taken):
        """Pack and launch one pass; (slices, rows on their way to the host, t0, tokens), or
        None when it failed (its requests are failed)."""
        t0 = time.perf_counter()
        parts, slices = [], []  # per (job, start, stop): the non-empty texts and their indices
        for job, start, stop in taken:
            if job.first_batch is None:
                job.first_batch = t0
            idx = np.arange(start, stop)
            idx = idx[job.lengths[start:stop] > 0]
            parts.append(job.texts.select(idx))
            slices.append((job, idx))
        try:
            texts = TokenizedTexts.concat(parts)
            engine = self.replica.engine
            with self.on_device(), torch.inference_mode():
                self.replica.use(taken[0][0].model)
                pooled = engine.run_batch(texts, mode=self.batcher.mode)
                host = engine.to_host(pooled)
            return slices, host, t0, int(texts.lengths.sum())
        except Exception as e:  # a failed pass fails its requests, never the worker
            logger.exception("l2v serve: a forward pass on %s failed", self.replica.name)
            self.batcher.fail_pass(slices, e)
            return None

    def finish(self, inflight) -> None:
        if inflight is None:
            return
        slices, host, t0, n_tokens = inflight
        try:
            with self.on_device():
                rows = host.wait().numpy()
        except Exception as e:
            logger.exception("l2v serve: a forward pass on %s failed", self.replica.name)
            self.batcher.fail_pass(slices, e)
            return
        self.batcher.finish_pass(self.replica, slices, rows, t0, n_tokens)


def _set_result(job: Job, value) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        job.future.set_result(value)


def _set_exception(job: Job, error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        job.future.set_exception(error)
