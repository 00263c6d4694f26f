"""Prometheus metrics of one server, in their own registry (several apps can share a process).

Names (all prefixed l2v_):
- requests_total{endpoint, status}          counter, every answered request
- request_seconds{endpoint}                 histogram, arrival -> response ready
- tokenization_seconds                      histogram, per request, in the tokenizer thread
- queue_seconds                             histogram, per request: enqueued -> its first batch
- inference_seconds                         histogram, per request: first batch -> last row back
- batch_seconds                             histogram, per forward pass (pack + forward + copy)
- batch_texts / batch_tokens / batch_requests  histograms, per forward pass; batch_requests > 1
                                            means texts of several requests shared a pass
- mixed_batches_total                       counter, passes with texts of >= 2 requests
- batches_total, texts_total, tokens_total  counters of what the model ran
- tokens_per_second                         gauge, tokens / seconds of the last forward pass
- queue_texts, queue_tokens                 gauges, texts waiting for the model
- requests_in_flight                        gauge, admitted requests not yet answered
- dropped_texts_total                       counter, queued texts dropped (client went away)
- truncated_inputs_total                    counter, inputs cut at --max-input-tokens
- resent_requests_total                     counter, requests sent again to another model
                                            replica after theirs died (`l2v serve --ray`)
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# Up to 10 minutes: a request queued behind a long backlog (or a client with a long timeout)
# can wait minutes, and a histogram whose top bucket is 60 s hides how long.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # fmt: skip
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServerMetrics:
    """The server's metrics (see the module docstring); `render()` gives the exposition text."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "l2v_requests", "Answered requests by endpoint and HTTP status",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "l2v_request_seconds", "Request latency, arrival to response", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenization_seconds = Histogram(
            "l2v_tokenization_seconds", "Tokenization time per request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "l2v_queue_seconds", "Per request: enqueued until its first batch starts",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "l2v_inference_seconds", "Per request: first batch start until its last row is back",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "l2v_batch_seconds", "Per forward pass: pack + forward + copy to the host",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_texts = Histogram(
            "l2v_batch_texts", "Texts per forward pass", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "l2v_batch_tokens", "Tokens per forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "l2v_batch_requests", "Requests with texts in a forward pass",
            buckets=_COUNT_BUCKETS, registry=r,
        )  # fmt: skip
        self.mixed_batches = Counter(
            "l2v_mixed_batches", "Forward passes holding texts of two or more requests",
            registry=r,
        )  # fmt: skip
        self.batches = Counter("l2v_batches", "Forward passes run", registry=r)
        self.texts = Counter("l2v_texts", "Texts run through the model", registry=r)
        self.tokens = Counter("l2v_tokens", "Tokens run through the model", registry=r)
        self.tokens_per_second = Gauge(
            "l2v_tokens_per_second", "Tokens per second of the last forward pass", registry=r
        )
        self.queue_texts = Gauge("l2v_queue_texts", "Texts waiting for the model", registry=r)
        self.queue_tokens = Gauge("l2v_queue_tokens", "Tokens waiting for the model", registry=r)
        self.in_flight = Gauge(
            "l2v_requests_in_flight", "Admitted requests not yet answered", registry=r
        )
        self.dropped_texts = Counter(
            "l2v_dropped_texts", "Queued texts dropped because their client disconnected",
            registry=r,
        )  # fmt: skip
        self.truncated_inputs = Counter(
            "l2v_truncated_inputs", "Inputs truncated at --max-input-tokens", registry=r
        )
        self.resent_requests = Counter(
            "l2v_resent_requests", "Requests sent again after their model replica died",
            registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
