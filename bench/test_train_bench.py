"""bench/train.py in smoke mode on the CPU: both sides run, agree, and the report is written.

The smoke model is SmolLM2-shaped with 2 layers and a 512-token vocabulary (fp32); its timings
mean nothing, that the comparison runs and compares like with like does.
"""

from __future__ import annotations

import json

import pytest

from bench import train


@pytest.mark.parametrize("stage", ["simcse", "mntp", "supervised"])
def test_train_bench_smoke(tmp_path, stage):
    result = train.main(["--smoke", "--stage", stage, "--out", str(tmp_path),
                         "--name", f"train-{stage}"])  # fmt: skip
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"l2v", "hf-peft"}
    ours, base = rows["l2v"], rows["hf-peft"]
    assert ours["same_result"] and base["same_result"]  # same weights, data and loss
    assert ours["real_tokens"] == base["real_tokens"] > 0
    assert ours["padded_tokens"] == ours["real_tokens"] < base["padded_tokens"]
    for r in (ours, base):
        assert r["real_tokens_per_s"] > 0 and r["real_tokens_per_cpu_s"] > 0
        assert r["peak_mem_MiB"] >= 0 and r["s_per_step"] > 0
    assert ours["speedup"] == pytest.approx(ours["real_tokens_per_s"] / base["real_tokens_per_s"])
    report = json.loads((tmp_path / f"train-{stage}.json").read_text())
    assert [r["impl"] for r in report["rows"]] == ["l2v", "hf-peft"]
    assert (tmp_path / f"train-{stage}.md").read_text().startswith("# Training step")
