"""Continuous token-budget batching: one queue, one model worker thread.

    batcher = Batcher(engine, mode="mean", max_batch_tokens=4096, max_wait_s=0.002)
    batcher.start()
    job = batcher.submit(texts)          # a TokenizedTexts of one request (any thread)
    rows = job.future.result()           # float32 numpy [N, D], in the request's order
    batcher.cancel(job)                  # the client went away: drop its queued texts
    batcher.stop()                       # run what is queued, then end the worker

The worker owns the engine. It takes texts first in, first out (a request's texts in order,
then the next request's) until the next text would overflow `max_batch_tokens` (a text longer
than the budget runs alone) or `max_batch_texts` is reached, packs them into one batch (no
padding), runs `engine.forward` and scatters each pooled row to its request. So one request's
texts may span several passes and share a pass with other requests' texts; since nothing is
padded and every text attends only to itself, the rows equal offline `engine.embed` of the
same texts to fp32 rounding.

When the worker finds less than a full budget queued, it waits for more work until the oldest
queued text has waited `max_wait_s` (the small delay that lets concurrent requests share a pass
at low load); when the queue holds a full budget, or the oldest text has already waited that
long (the usual case right after a pass under load), the next pass starts at once.

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

from l2v_models.packing import TokenizedTexts, pack

logger = logging.getLogger("l2v.serve")


class ShuttingDown(RuntimeError):
    """submit() after stop(): the server is draining."""


class RequestDropped(RuntimeError):
    """The job was cancelled (its client went away) before all its rows were computed."""


class Job:
    """One request's texts in the queue. future: a concurrent.futures.Future of the float32
    [N, D] rows. Times (time.perf_counter): submitted, first_batch (its first pass began),
    done. Fields other than these are the batcher's."""

    def __init__(self, texts: TokenizedTexts, dimension: int):
        self.texts = texts
        self.lengths = texts.lengths
        n = len(texts)
        self.out = np.zeros((n, dimension), dtype=np.float32)
        self.next = 0  # first text not yet taken by the worker
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


class Batcher:
    """The queue and the model worker (see the module docstring).

    engine: an l2v_models.engine.Engine. mode: its pooling mode ("mean", "weighted_mean",
    "last"). max_batch_tokens: real tokens per pass (>= 1). max_batch_texts: texts per pass
    (None = no limit). max_wait_s: the idle wait for more work (>= 0). metrics: a
    ServerMetrics or None.
    """

    def __init__(
        self,
        engine,
        *,
        mode: str,
        max_batch_tokens: int,
        max_batch_texts: int | None = None,
        max_wait_s: float = 0.002,
        metrics=None,
    ):
        if max_batch_tokens < 1 or (max_batch_texts is not None and max_batch_texts < 1):
            raise ValueError(
                f"batch budgets must be >= 1, got {max_batch_tokens} tokens, "
                f"{max_batch_texts} texts"
            )
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.engine = engine
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
        self._thread: threading.Thread | None = None
        self.batches_run = 0

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Batcher.start() called twice")
        self._thread = threading.Thread(target=self._run, name="l2v-model-worker", daemon=True)
        self._thread.start()

    def submit(self, texts: TokenizedTexts) -> Job:
        """Queue one request's texts; returns its Job (the rows arrive in job.future).
        ShuttingDown after stop()."""
        job = Job(texts, self.engine.dimension)
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
            job.cancelled = True
            dropped = job.queued_texts()
            self._queued_tokens -= job.queued_tokens()
            self._queued_texts -= dropped
            job.next = len(job.lengths)
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._gauges()
        if self.metrics is not None and dropped:
            self.metrics.dropped_texts.inc(dropped)
        _set_exception(job, RequestDropped("the request was cancelled"))
        return dropped

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new work, let the worker run what is queued, wait for it (up to `timeout`
        seconds). Returns True when the worker ended; jobs still queued then are failed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
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
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:  # stopping and drained
                    return
                self._wait_for_more()
                taken = self._take()
                self._gauges()
            if taken:
                try:
                    self._run_batch(taken)
                except Exception as e:  # never let the worker die: fail this pass's requests
                    logger.exception("l2v serve: the model worker failed on a pass")
                    for job, _, _ in taken:
                        self.cancel_for_error(job, e)

    def _wait_for_more(self) -> None:
        """(Lock held.) Less than a full budget queued: wait until the oldest queued text has
        waited max_wait_s, or a full budget is queued, or stop() is called."""
        if self.max_wait_s <= 0:
            return
        deadline = self._queue[0].submitted + self.max_wait_s
        while (
            self._queue
            and not self._stopping
            and self._queued_tokens < self.max_batch_tokens
            and (self.max_batch_texts is None or self._queued_texts < self.max_batch_texts)
        ):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take(self) -> list[tuple[Job, int, int]]:
        """(Lock held.) Texts for one pass, first in first out: [(job, start, stop)]."""
        taken: list[tuple[Job, int, int]] = []
        tokens = count = 0
        budget, max_texts = self.max_batch_tokens, self.max_batch_texts
        full = False
        while self._queue and not full:
            job = self._queue[0]
            start = i = job.next
            lengths = job.lengths
            n_texts = len(lengths)
            while i < n_texts:
                n = int(lengths[i])
                if n and count and (tokens + n > budget or (max_texts and count >= max_texts)):
                    full = True
                    break
                tokens += n
                count += n > 0
                i += 1
            if i > start:
                taken.append((job, start, i))
                job.next = i
            if i == n_texts:
                self._queue.popleft()
        self._queued_tokens -= tokens
        self._queued_texts -= count
        return taken

    def _run_batch(self, taken: list[tuple[Job, int, int]]) -> None:
        t0 = time.perf_counter()
        parts, slices = [], []  # per (job, start, stop): the non-empty texts and their indices
        for job, start, stop in taken:
            if job.first_batch is None:
                job.first_batch = t0
            idx = np.arange(start, stop)
            idx = idx[job.lengths[start:stop] > 0]
            parts.append(job.texts.select(idx))
            slices.append((job, idx))
        texts = TokenizedTexts.concat(parts)
        try:
            rows = self._forward(texts)
        except Exception as e:  # a failed pass fails its requests, never the worker
            logger.exception("l2v serve: a forward pass of %d texts failed", len(texts))
            for job, _ in slices:
                self.cancel_for_error(job, e)
            return
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
        for job in finished:
            _set_result(job, job.out)
        self.batches_run += 1
        m = self.metrics
        if m is not None:
            n_tokens = int(texts.lengths.sum())
            n_requests = len({id(job) for job, _ in slices})
            m.batch_seconds.observe(t1 - t0)
            m.batch_texts.observe(len(texts))
            m.batch_tokens.observe(n_tokens)
            m.batch_requests.observe(n_requests)
            if n_requests > 1:
                m.mixed_batches.inc()
            m.batches.inc()
            m.texts.inc(len(texts))
            m.tokens.inc(n_tokens)
            m.tokens_per_second.set(n_tokens / max(t1 - t0, 1e-9))
            for job in finished:
                m.queue_seconds.observe(job.first_batch - job.submitted)
                m.inference_seconds.observe(job.done - job.first_batch)

    def cancel_for_error(self, job: Job, error: Exception) -> None:
        with self._cond:
            if not job.cancelled:
                job.cancelled = True
                self._queued_tokens -= job.queued_tokens()
                self._queued_texts -= job.queued_texts()
                job.next = len(job.lengths)
                with contextlib.suppress(ValueError):
                    self._queue.remove(job)
                self._gauges()
        _set_exception(job, error)

    def _forward(self, texts: TokenizedTexts) -> np.ndarray:
        """Pooled float32 [n, D] numpy rows of texts (all non-empty), in their order."""
        engine = self.engine
        device = engine.device
        batch = pack(texts, np.arange(len(texts))).to(device)
        cuda = device.type == "cuda"
        on_device = torch.cuda.device(device) if cuda else contextlib.nullcontext()
        with on_device, torch.inference_mode():
            pooled = engine.forward(batch, self.mode, False)
            return pooled.float().cpu().numpy()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_texts.set(self._queued_texts)
            self.metrics.queue_tokens.set(self._queued_tokens)


def _set_result(job: Job, value) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        job.future.set_result(value)


def _set_exception(job: Job, error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        job.future.set_exception(error)
