"""The serving benchmark in smoke size on the CPU (default SmolLM2, a handful of requests):
both servers measured, every load level answered, reports written. Its timings mean nothing
on a shared CPU; that the pipeline runs and reports does."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("matplotlib")

from bench import serve  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_bench")
    threads = torch.get_num_threads()
    try:
        result = serve.main(["--smoke", "--device", "cpu", "--threads", "1", "--requests", "8",
                             "--batch1", "2", "--concurrency", "4", "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_smoke_measures_both_servers_at_every_rate(smoke):
    _, result = smoke
    assert set(result["servers"]) == {"l2v", "naive"}
    for s in result["servers"].values():
        assert s["batch1_p50_ms"] > 0
        assert s["max"]["ok"] == 8 and s["max"]["errors"] == 0 and s["max"]["tokens_per_s"] > 0
    rows = {(r["server"], r["load"]): r for r in result["rows"]}
    assert set(rows) == {(s, f) for s in ("l2v", "naive") for f in (0.5, 1.0)}
    for r in rows.values():
        assert r["ok"] == r["requests"] == 8 and r["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        for key in ("device", "torch", "commit", "date"):
            assert key in r
    # Same absolute rates for both servers.
    assert rows[("l2v", 0.5)]["offered_req_per_s"] == rows[("naive", 0.5)]["offered_req_per_s"]
    b = rows[("l2v", 1.0)]["batches"]
    assert (
        b["passes"] >= 1
        and b["mean_texts"] >= 1
        and sum(b["texts_histogram"].values()) == (b["passes"])
    )
    assert "batches" not in rows[("naive", 1.0)]
    assert result["offline"]["tokens"] == result["workload"]["tokens"] > 0
    assert [g["goal"][:3] for g in result["goals"]] == ["p99", "max"]


def test_smoke_reports_are_written(smoke):
    out, result = smoke
    data = json.loads((out / "serve.json").read_text())
    assert data["kind"] == "l2v-serve-bench" and data["rows"] == result["rows"]
    md = (out / "serve.md").read_text()
    for heading in ("## Summary", "## Latency under open-loop Poisson load",
                    "## l2v batches per load", "## Goals"):  # fmt: skip
        assert heading in md
    assert result["stamp"]["commit"] in md and "| naive | 1.00 |" in md
    assert (out / "serve_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_workload_is_seeded_and_mixed():
    a = serve.make_requests(200, tokens=False, cfg=None, seed=0, smoke=False)
    assert a == serve.make_requests(200, tokens=False, cfg=None, seed=0, smoke=False)
    queries = [b for b in a if "instruction" in b]
    assert 0.6 < len(queries) / len(a) < 0.8 and all(len(b["input"]) == 1 for b in queries)
    passages = [b for b in a if "instruction" not in b]
    assert max(len(b["input"]) for b in passages) == 4
    assert all(b["encoding_format"] == "base64" for b in a)
    from bench.workloads import model_shape

    cfg = model_shape("mistral-7b")
    t = serve.make_requests(50, tokens=True, cfg=cfg, seed=0, smoke=False)
    assert all(isinstance(x[0], int) for b in t for x in b["input"])
    assert all(0 <= i < cfg["vocab_size"] for b in t for x in b["input"] for i in x)


def test_random_weight_shape_with_token_ids_and_two_client_processes(tmp_path):
    """The GPU mode's path on the CPU: a random-weight shape (no tokenizer, token-id inputs),
    two load-generator processes."""
    threads = torch.get_num_threads()
    try:
        argv = [
            "--shape",
            "smoke",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--requests",
            "6",
            "--rates",
            "1.0",
            "--batch1",
            "2",
            "--concurrency",
            "4",
            "--client-procs",
            "2",
        ]
        result = serve.main(argv + ["--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert result["config"]["tokens_input"] and result["config"]["client_procs"] == 2
    for r in result["rows"]:
        assert r["ok"] == r["requests"] == 6 and r["errors"] == 0
    assert result["servers"]["l2v"]["max"]["ok"] == 6
    assert "load generator in 2 other process(es)" in (tmp_path / "serve.md").read_text()
