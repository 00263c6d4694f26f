"""bench/corpus.py in smoke mode on the CPU: both runs (1 and 2 workers) complete, every row is
measured and the scaling ratio is computed and reported. Its timings mean nothing."""

from __future__ import annotations

import json

import pytest

# Under pytest-xdist every test that starts a local Ray cluster runs on the same worker.
pytestmark = pytest.mark.xdist_group("ray")
pytest.importorskip("ray", reason="the corpus benchmark needs the [ray] extra")

from bench import corpus  # noqa: E402


def test_smoke_run_measures_one_and_two_workers(tmp_path):
    result = corpus.main(["--smoke", "--out", str(tmp_path), "--name", "corpus"])
    one, two = result["rows"]
    assert (one["workers"], two["workers"]) == (1, 2)
    for row in (one, two):
        assert row["rows"] == 24
        assert row["seconds"] > 0 and row["rows_per_s"] > 0 and row["steady_rows_per_s"] > 0
        assert 0 < row["first_output_s"] < row["seconds"]
    assert two["rows_per_s_vs_1_worker"] == pytest.approx(two["rows_per_s"] / one["rows_per_s"])
    assert two["steady_rows_per_s_vs_1_worker"] == pytest.approx(
        two["steady_rows_per_s"] / one["steady_rows_per_s"]
    )
    data = json.loads((tmp_path / "corpus.json").read_text())
    assert len(data["rows"]) == 2 and all("commit" in r and "device" in r for r in data["rows"])
    md = (tmp_path / "corpus.md").read_text()
    assert "SMOKE RUN" in md and "steady_rows_per_s_vs_1_worker" in md


def test_texts_are_real_and_sized():
    sentences = corpus.lee_texts("sentences", 50)
    assert len(sentences) == 50 and all(6 <= len(s.split()) <= 14 for s in sentences)
    passages = corpus.lee_texts("passages", 2000)
    assert len(passages) == 2000 and len(set(passages)) > 500  # repeated only past the pool
    lengths = sorted(len(p.split()) for p in passages)
    assert lengths[len(lengths) // 2] == 90
    with pytest.raises(SystemExit, match="unknown text kind"):
        corpus.lee_texts("tweets", 3)
