"""The user's own training data (tiny models, CPU): Parquet files, lists of hard negatives,
several files mixed with weights; errors name the file and the line (row); a run that fails
on its data leaves an earlier run in --output as it was.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from tiny import make_tiny_checkpoint

from l2v_models.cli import main
from l2v_models.train.data import DataError, DataIndex, Example, ExampleStream, TrainingBatcher
from l2v_models.train.mixing import MixedStream

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "the cat sat on a mat and dog was in text of passage which is for that".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) for _ in range(n)]


def all_examples(index: DataIndex) -> list[Example]:
    handles: dict = {}
    return [index.read(i, handles) for i in range(len(index))]


# ------------------------------------------------------------------------------ formats
def test_parquet_rows_are_examples(tmp_path):
    text = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": ["a cat", "a dog"], "id": [1, 2]}), text)
    triples = tmp_path / "triples.parquet"
    pq.write_table(pa.table({
        "query": ["q1", "q2", "q3"], "positive": ["p1", "p2", "p3"],
        "negatives": [["n1", "n2"], [], None], "instruction": ["find", None, "find"],
    }), triples)  # fmt: skip
    assert [e.text for e in all_examples(DataIndex.scan([text]))] == ["a cat", "a dog"]
    got = all_examples(DataIndex.scan([triples], "triplet"))
    assert [e.negatives for e in got] == [("n1", "n2"), (), ()]
    assert [e.instruction for e in got] == ["find", "", "find"]
    assert got[1].where == f"{triples} row 2"
    # Mixed with a JSONL file in one index.
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n")
    both = all_examples(DataIndex.scan([triples, jsonl], "triplet"))
    assert len(both) == 4 and both[-1].negatives == ("n",) and both[-1].where == f"{jsonl}:1"


def test_parquet_errors_name_the_file_and_row(tmp_path):
    def write(name, **columns):
        path = tmp_path / name
        pq.write_table(pa.table(columns), path)
        return path

    cases = [
        (write("a.parquet", query=["q", None], positive=["p", "p"]),
         r'a\.parquet row 2: "query" is null'),
        (write("b.parquet", query=["q"]), r"b\.parquet: no column 'positive'"),
        (write("c.parquet", query=["q"], positive=[3]), r'c\.parquet: column "positive" must '
         "hold strings"),
        (write("d.parquet", query=["q", "q"], positive=["p", "p"], negatives=[["x"], ["y", None]]),
         r'd\.parquet row 2: "negatives" holds a null'),
        (write("e.parquet", query=["q"], positive=["p"], negative=["n"], negatives=[["m"]]),
         r'e\.parquet: has both "negative" and "negatives"'),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            DataIndex.scan([path], "triplet")
    bad = tmp_path / "f.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=r"f\.parquet: not a readable Parquet file"):
        DataIndex.scan([bad])


def test_jsonl_negatives_lists(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q", "positive": "p", "negatives": ["a", "b", "c"]},
        {"query": "q", "positive": "p", "negatives": []},
        {"query": "q", "positive": "p"},
    ]) + "\n")  # fmt: skip
    assert [e.negatives for e in all_examples(DataIndex.scan([path], "triplet"))] == [
        ("a", "b", "c"), (), ()]
    for row, message in (
        ({"query": "q", "positive": "p", "negatives": "a"}, r'x\.jsonl:2: "negatives" must be a '
         "list of strings, got str"),
        ({"query": "q", "positive": "p", "negatives": ["a", 1]}, r'x\.jsonl:2: "negatives"\[1\] '
         "must be a string, got int"),
        ({"query": "q", "positive": "p", "negative": "a", "negatives": ["b"]}, r'x\.jsonl:2: has '
         'both "negative" and "negatives"'),
    ):  # fmt: skip
        bad = tmp_path / "x.jsonl"
        bad.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            DataIndex.scan([bad], "triplet")


# ------------------------------------------------------------------------------ mixing
def test_weighted_mixing_draws_by_weight_and_resumes(tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("".join(f"small {i}\n" for i in range(5)))
    large.write_text("".join(f"large {i}\n" for i in range(50)))
    index = DataIndex.scan([small, large])
    stream = MixedStream(index, [3, 1], seed=0)
    drawn = [stream.next().text for _ in range(4000)]
    share = sum(t.startswith("small") for t in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.03  # the weights, not the sizes (5 vs 50 lines)
    smalls = [t for t in drawn if t.startswith("small")]
    for epoch in range(5):  # each file in its own shuffled order, every example once per epoch
        assert sorted(smalls[5 * epoch : 5 * epoch + 5]) == [f"small {i}" for i in range(5)]
    assert smalls[:5] != smalls[5:10]  # a new permutation each epoch
    # A batcher over it resumes on exactly the next example.
    batcher = TrainingBatcher(MixedStream(index, [3, 1], seed=0), lambda e: [(e.text, 1)],
                      batch_size=7, batch_tokens=None)  # fmt: skip
    first = [batcher.next_batch() for _ in range(3)]
    state = batcher.state()
    after = [x for _, x in batcher.next_batch()]
    again = TrainingBatcher(MixedStream(index, [3, 1], seed=0), lambda e: [(e.text, 1)],
                            batch_size=7, batch_tokens=None)  # fmt: skip
    again.restore(json.loads(json.dumps(state)))
    assert [x for _, x in again.next_batch()] == after
    assert [x for _, x in first[0]] == drawn[:7]
    # Other weights, or none, cannot continue that position.
    with pytest.raises(DataError, match=r"--data-weights \[3\.0, 1\.0\], this run gives \[1\.0, "
                       r"1\.0\]"):  # fmt: skip
        MixedStream(index, [1, 1], seed=0).restore(state["anchor"])
    with pytest.raises(DataError, match="mixed with --data-weights"):
        ExampleStream(index).restore(state["anchor"])
    with pytest.raises(DataError, match="2 weights for 1 data files"):
        MixedStream(DataIndex.scan([small]), [1, 2])
    with pytest.raises(DataError, match="must be a positive number"):
        MixedStream(index, [1, 0])


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("data_cli"), "llama")


def test_supervised_trains_on_parquet_mixed_with_jsonl(base, tmp_path, capsys):
    triples = tmp_path / "triples.parquet"
    qs, ps, ns = sentences(12, 1), sentences(12, 2), sentences(12, 3)
    pq.write_table(pa.table({"query": qs, "positive": ps,
                             "negatives": [ns[i : i + i % 3] for i in range(12)]}), triples)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"query": q, "positive": p, "negative": n}) + "\n"
                             for q, p, n in zip(qs, ns, ps, strict=True)))  # fmt: skip
    out = tmp_path / "out"
    args = ["train", "supervised", "--model", str(base), "--data", str(triples), str(extra),
            "--data-weights", "2", "1", "--output", str(out), "--steps", "3", "--batch-size",
            "4", "--symmetric", "--false-negative-margin", "0.5", "--grad-cache-chunk", "3",
            "-q"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert main([*args[:8], "1", "--output", str(tmp_path / "o2")]) == 2
    assert "gives 1 weights for 2 data files" in capsys.readouterr().err


def test_a_failed_overwrite_leaves_the_earlier_run(base, tmp_path, capsys):
    """--overwrite keeps the earlier run until the new one has finished: a data error half-way
    (an over-long line at step 3, --long-lines error) puts it back as it was; with checkpoints
    of the new run written, both stay and the message says where the earlier one is."""
    good = tmp_path / "good.txt"
    good.write_text("\n".join(sentences(8, 0)) + "\n")
    out = tmp_path / "out"
    common = ["train", "simcse", "--model", str(base), "--output", str(out), "--batch-size",
              "2", "--max-length", "12", "-q"]  # fmt: skip
    assert main([*common, "--data", str(good), "--steps", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(sentences(4, 1) + [" ".join(["cat"] * 40)] + sentences(3, 2)) + "\n")
    args = [*common, "--data", str(bad), "--steps", "4", "--no-shuffle", "--long-lines", "error",
            "--overwrite", "--seed", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:5: more than 12 tokens" in err
    assert f"the earlier run in {out} was put back as it was" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no backup folder left

    assert main([*args, "--save-every", "1"]) == 2  # steps 1 and 2 checkpointed, then the error
    err = capsys.readouterr().err
    assert f"the run you replaced is kept in {out / '.replaced-run'}" in err
    assert (out / ".replaced-run" / "adapter_model.safetensors").read_bytes() == before[
        "adapter_model.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001",
                                                                       "step-000002"]
    counts = Counter(p.name for p in out.iterdir())
    assert counts["train_log.jsonl"] == 1 and "adapter_model.safetensors" not in counts
