"""The end-to-end benchmark in smoke mode on the CPU: pipeline, timing, reports, plots, checks.

The smoke run is SmolLM2-shaped (widths, GQA 9/3) with 2 layers and a 512-token vocabulary, fp32,
our torch backend against the llm2vec-style transformers baseline, four texts per workload.
Its timings mean nothing; that the pipeline runs, agrees and reports does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import e2e, plots
from bench.workloads import (
    MODEL_SHAPES,
    Workload,
    forward_flops,
    linear_params,
    make_workload,
    model_shape,
    n_texts,
    weight_bytes,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    result = e2e.main(["--smoke", "--device", "cpu", "--out", str(out), "--name", "e2e"])
    return out, result


def test_smoke_run_measures_and_agrees(smoke):
    out, result = smoke
    assert not result["errors"], result["errors"]
    assert not result["skipped"], result["skipped"]
    ref = result["config"]["reference"]
    rows = {(r["workload"], r["impl"]): r for r in result["rows"]}
    for w in ("queries", "passages", "long"):
        mine, base = rows[(w, "l2v")], rows[(w, ref)]
        assert mine["texts"] == base["texts"] == 4
        assert mine["tokens"] == base["tokens"] > 0
        assert base["padded_tokens"] >= base["tokens"]
        for r in (mine, base):
            assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["MFU"] > 0
        # Same ids, same weights, fp32: our embeddings are the baseline's...
        assert mine["finite"] and mine["cos_min"] >= 0.9999, mine
        # ...and the check can tell texts apart (unrelated texts are far from cosine 1).
        assert mine["cos_other_texts"] < 0.9, mine
        assert mine["speedup_vs_ref"] == pytest.approx(mine["tokens_per_s"] / base["tokens_per_s"])
    lat = {(r["impl"], r["batch"]): r for r in result["latency"]}
    for key in (("l2v", 1), ("l2v", 8), (ref, 1), (ref, 8)):
        r = lat[key]
        assert r["calls"] == len(r["samples_ms"]) > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["floor_ms"] > 0


def test_smoke_reports_are_written_and_stamped(smoke):
    out, result = smoke
    data = json.loads((out / "e2e.json").read_text())
    assert data["kind"] == "l2v-e2e"
    for row in data["rows"] + data["latency"]:
        for key in ("device", "torch", "triton", "cuda", "commit", "date"):
            assert key in row
    md = (out / "e2e.md").read_text()
    assert "## Throughput" in md and "## Latency" in md and "## Embeddings vs" in md
    assert data["stamp"]["commit"] in md
    for png in ("e2e_throughput.png", "e2e_latency_b1.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_summary_merges_per_model_parts(smoke, tmp_path):
    """gpu_check.sh writes one e2e_<model>.json per process; plots merges them into e2e.*."""
    _, result = smoke
    for model in ("mistral-7b", "smollm2-135m"):
        part = json.loads(json.dumps(result))  # a deep copy
        part["config"]["smoke"] = False
        for key in ("rows", "latency"):
            for r in part[key]:
                r["model"] = model
        part["models"] = {model: result["models"]["smoke"]}
        e2e.write_result(part, tmp_path, f"e2e_{model}")
    # bench_attention's row format: L is the length, or "mixed" for a mixed-length batch.
    attention_rows = [
        {"group": f"attention B{4096 // n} L{n}", "impl": impl, "B": 4096 // n, "L": n,
         "max_len": n, "Hq": 32, "Hkv": hkv, "D": 128, "ms": 1.0, "TFLOP/s": tf * n / 512}
        for n in (128, 512) for hkv in (8, 32)
        for impl, tf in (("l2v", 400.0), ("sdpa_flash", 300.0))
    ] + [{"group": "attention mixed", "impl": "l2v", "B": 30, "L": "mixed", "max_len": 512,
          "Hq": 32, "Hkv": 8, "D": 128, "ms": 1.0, "TFLOP/s": 350.0}]  # fmt: skip
    (tmp_path / "attention.json").write_text(
        json.dumps({"stamp": result["stamp"], "rows": attention_rows})
    )
    steps = tmp_path / "steps.tsv"
    steps.write_text("step\trc\tseconds\tstatus\nbuild\t0\t50\tok\ntests\t1\t80\tfailed (exit 1)\n")
    (tmp_path / "pytest_gpu.txt").write_text(
        "FAILED tests/test_x.py::test_y\n== 1 failed, 9 passed in 3.2s ==\n"
    )
    summary = plots.main([str(tmp_path), "--steps", str(steps), "--failed", "1"])
    merged = json.loads((tmp_path / "e2e.json").read_text())
    assert {r["model"] for r in merged["rows"]} == {"mistral-7b", "smollm2-135m"}
    assert len(merged["rows"]) == 2 * len(result["rows"])
    text = summary.read_text()
    assert "FAILED" in text and "1 failed, 9 passed" in text and "failed (exit 1)" in text
    assert "## Targets" in text  # the Mistral-7B targets are evaluated (whatever they say)
    assert "![attention TFLOP/s](attention_tflops.png)" in text
    for png in (
        "e2e_throughput.png",
        "e2e_latency_b1.png",
        "attention_tflops.png",
        "attention.png",
    ):
        assert (tmp_path / png).exists(), png


def test_baseline_left_padding_matches_unpadded():
    """The llm2vec-style driver: a left-padded batch gives each text's unpadded embedding."""
    cfg = model_shape("smoke")
    device = torch.device("cpu")
    state = e2e.random_state_dict(cfg, device, torch.float32, seed=3)
    hf = e2e.build_hf(cfg, state, torch.float32, device)
    wl = make_workload("queries", 5, cfg, seed=3)
    pad = cfg["eos_token_id"]
    batched = e2e.hf_encode_fn(hf, 4, pad, device)(wl)
    alone = e2e.hf_encode_fn(hf, 1, pad, device)(wl)
    assert batched.shape == (5, cfg["hidden_size"])
    cos = e2e.cosines(batched, alone)
    assert cos["cos_min"] > 0.99999 and cos["finite"]
    # Pooling really skips the instruction: pooling every token gives something else.
    everything = Workload(wl.name, wl.ids, [len(t) for t in wl.ids])
    assert e2e.cosines(e2e.hf_encode_fn(hf, 4, pad, device)(everything), alone)["cos_min"] < 0.999


def test_cosines_flags_a_wrong_embedding():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 32, generator=g)
    good = ref + 1e-4 * torch.randn(6, 32, generator=g)
    bad = good.clone()
    bad[2] = torch.randn(32, generator=g)
    assert e2e.cosines(good, ref)["cos_min"] > 0.9999
    assert e2e.cosines(bad, ref)["cos_min"] < 0.9
    nan = good.clone()
    nan[0, 0] = float("nan")
    assert not e2e.cosines(nan, ref)["finite"]


def test_workloads_are_seeded_and_shaped():
    cfg = model_shape("mistral-7b")
    q1, q2 = make_workload("queries", 50, cfg), make_workload("queries", 50, cfg)
    assert q1.ids == q2.ids and q1.n_pool == q2.n_pool
    assert make_workload("queries", 50, cfg, seed=1).ids != q1.ids
    bos, vocab = cfg["bos_token_id"], cfg["vocab_size"]
    for ids, n in zip(q1.ids, q1.n_pool, strict=True):
        assert ids[0] == bos and 10 <= n <= 40 and len(ids) == 1 + 16 + n
        assert all(3 <= t < vocab for t in ids[1:])
    instruction = {tuple(ids[1:17]) for ids in q1.ids}
    assert len(instruction) == 1  # one instruction shared by all queries
    passages = make_workload("passages", 2000, cfg)
    lengths = sorted(passages.lengths)
    assert 9 <= lengths[0] and lengths[-1] <= 512
    assert 100 <= lengths[len(lengths) // 2] <= 140  # median ~120 (+ BOS)
    assert passages.n_pool == [n - 1 for n in passages.lengths]  # all but BOS
    long = make_workload("long", 100, cfg)
    assert all(400 <= n <= 512 for n in long.lengths)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("tweets", 3, cfg)
    assert n_texts("passages", "smollm2-135m") == 4 * n_texts("passages", "mistral-7b")
    assert n_texts("passages", "mistral-7b", quick=True) < n_texts("passages", "mistral-7b")


def test_flop_and_byte_counts():
    cfg = model_shape("mistral-7b")
    # Mistral-7B: 7.24e9 parameters, of which 0.13e9 embedding and 0.13e9 LM head.
    assert linear_params(cfg) == 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    assert 6.9e9 < linear_params(cfg) < 7.0e9
    assert weight_bytes(cfg) == 2 * (linear_params(cfg) + 65 * 4096)
    one = forward_flops(cfg, [100])
    assert one == pytest.approx(2 * linear_params(cfg) * 100 + 4 * 32 * 32 * 128 * 100**2)
    assert forward_flops(cfg, [100, 50]) == pytest.approx(one + forward_flops(cfg, [50]))
    smol = model_shape("smollm2-135m")
    assert 1.0e8 < linear_params(smol) < 1.35e8  # 135M with the 28M tied embedding
    assert set(MODEL_SHAPES) == {"mistral-7b", "llama-2-7b", "sheared-llama-1.3b", "smollm2-135m"}


def test_cli_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown model"):
        e2e.main(["--smoke", "--models", "gpt-5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown workload"):
        e2e.main(["--smoke", "--workloads", "tweets", "--out", str(tmp_path)])


def test_gpu_check_script_parses():
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--quick" in help_text.stdout
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_warmup_runs_the_timed_batches_first():
    """The timed pass and every timed latency call run only batches already run untimed (so no
    Triton compile or autotuning lands in a measurement)."""
    cfg = model_shape("smollm2-135m")
    wl = make_workload("queries", 10, cfg, seed=0)
    seen: list[tuple] = []

    def fn(w):
        seen.append(tuple(map(tuple, w.ids)))
        return torch.zeros(len(w), 2)

    e2e.timed(fn, wl, torch.device("cpu"), [wl, wl])
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    seen.clear()
    samples = e2e.latencies_ms(fn, wl, 3, 5, torch.device("cpu"), warm=1)
    assert len(samples) == 5 and len(seen) == 10
    assert seen[:5] == seen[5:]  # every timed call's batch was run once before timing began


def test_graph_latency_rows_render(smoke, tmp_path):
    """The cuda_graphs rows only exist on a GPU: a measured one and a failed capture must still
    render (markdown, targets, plots) and say what happened."""
    _, result = smoke
    part = json.loads(json.dumps(result))  # a deep copy
    assert "not applicable" in part["models"]["smoke"]["cuda_graphs"]  # CPU: no graphs rows
    measured = next(r for r in part["latency"] if r["impl"] == "l2v" and r["batch"] == 1)
    part["latency"] += [
        {**measured, "impl": e2e.OURS_GRAPHS, "model": "mistral-7b"},
        {**measured, "model": "mistral-7b"},
        {"model": "mistral-7b", "impl": e2e.OURS_GRAPHS, "batch": 8, "calls": 0,
         "floor_ms": 1.0, "error": "RuntimeError: CUDA graphs: capturing bucket T=512 ..."},
    ]  # fmt: skip
    part["models"]["mistral-7b"] = part["models"]["smoke"]
    path = e2e.write_result(part, tmp_path, "e2e")
    md = path.with_suffix(".md").read_text()
    assert "capturing bucket T=512" in md and "| error |" in md
    assert "batch-1 query p50 with cuda_graphs=True" in md  # its own target row
    assert "cuda_graphs=True" in e2e.describe(e2e.OURS_GRAPHS)
    plots.plot_e2e(part, tmp_path, prefix="e2e")
    assert (tmp_path / "e2e_latency_b1.png").exists()
