"""`l2v encode-corpus` on Ray Data: completeness, equality with offline encode, resume after a
killed driver, a worker killed mid-run, bad inputs, embed_dataset, the CLI.

One local Ray instance (2 CPUs, small object store) serves the whole module; the driver that is
killed runs in a subprocess joined to it with --ray-address semantics (ray_address=<gcs>).
The equality test runs the embedded default model (SmolLM2-135M-Instruct, fp32 on CPU) on 96
real sentences from gensim's Lee corpus; the other tests use a tiny random model (tests/tiny.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_checkpoint

from l2v_models import cli

# Under pytest-xdist every test that starts a local Ray cluster runs on the same worker.
pytestmark = pytest.mark.xdist_group("ray")
ray = pytest.importorskip("ray", reason="the corpus runner needs the [ray] extra")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pafs = pytest.importorskip("pyarrow.fs")

from l2v_models.corpus import inputs as corpus_inputs  # noqa: E402
from l2v_models.corpus import runner  # noqa: E402
from l2v_models.corpus.runner import CorpusEmbedder, embeddings_to_numpy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module: 2 CPUs, a 200 MiB object store. Classes defined
    in this file are pickled by value so the workers need not import this module."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        configure_logging=False,
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("corpus-model"), "llama"))


@pytest.fixture(scope="module")
def tiny_encoder(tiny_dir):
    from l2v_models.encoder import LLM2Vec

    return LLM2Vec.from_pretrained(tiny_dir, device="cpu")


def lee_sentences(n: int) -> list[str]:
    """n real sentences (6-14 words) from the Lee background corpus in the gensim wheel."""
    gensim = pytest.importorskip("gensim")
    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    sentences = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for s in re.split(r"(?<=[.!?])\s+", line.strip()):
            if 6 <= len(s.split()) <= 14:
                sentences.append(s)
    assert len(sentences) >= n
    return sentences[:n]


def write_jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row) + "\n")
            if blank_lines and i % 5 == 0:
                f.write("\n")
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 7, **types) -> Path:
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_corpus(directory: Path, texts: list[str], *, int_ids: bool = False,
                instructions: bool = True) -> tuple[list[Path], list[dict]]:  # fmt: skip
    """Texts spread over 4 files (2 JSONL, 2 Parquet with several row groups); some rows carry
    an instruction. Returns the files and every row, in file order."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, t in enumerate(texts):
        row = {"id": i * 7 + 3 if int_ids else f"doc-{i:04d}", "text": t}
        if instructions and i % 3 == 0:
            row["instruction"] = "Retrieve the news story that contains this sentence"
        rows.append(row)
    q = len(rows) // 4
    parts = [rows[:q], rows[q : 2 * q], rows[2 * q : 3 * q + 5], rows[3 * q + 5 :]]
    files = [
        write_jsonl(directory / "part-a.jsonl", parts[0], blank_lines=True),
        write_parquet(directory / "part-b.parquet", [dict(r, instruction=r.get("instruction"))
                                                      for r in parts[1]]),
        write_jsonl(directory / "part-c.jsonl", parts[2]),
        write_parquet(directory / "part-d.parquet", [dict(r, instruction=r.get("instruction"))
                                                      for r in parts[3]], row_group_size=11),
    ]  # fmt: skip
    return files, rows


def items_of(rows: list[dict]) -> list:
    return [[r["instruction"], r["text"]] if r.get("instruction") else r["text"] for r in rows]


def read_outputs(out: Path, files: list[Path]) -> tuple[list, np.ndarray]:
    ids, embs = [], []
    for f in files:
        stem = f.name.rsplit(".", 1)[0]
        table = pq.read_table(out / f"{stem}.parquet")
        ids += table.column("id").to_pylist()
        embs.append(embeddings_to_numpy(table.column("embedding")))
    return ids, np.concatenate(embs)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# ------------------------------------------------------------------------------ tests
def test_default_model_on_ray_equals_offline_encode(ray_cluster, tmp_path):
    """96 real sentences in 4 files of both formats, 2 CPU workers, the default model: one
    output row per input row, same ids and order, embeddings equal to LLM2Vec.encode."""
    from l2v_models.encoder import LLM2Vec

    files, rows = make_corpus(tmp_path / "in", lee_sentences(96))
    out = tmp_path / "out"
    result = runner.encode_corpus(
        [str(f) for f in files], str(out), None, fields=corpus_inputs.Fields(
            instruction="instruction"), num_workers=2, batch_texts=16, progress=False,
    )  # fmt: skip
    assert result.rows == result.embedded_rows == 96
    assert result.embedded_files == 4 and result.skipped_files == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS.json", "part-a.parquet", "part-b.parquet", "part-c.parquet", "part-d.parquet",
    ]  # fmt: skip
    ids, emb = read_outputs(out, files)
    assert ids == [r["id"] for r in rows]
    encoder = LLM2Vec.from_pretrained()
    ref = encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert emb.shape == ref.shape == (96, 576) and emb.dtype == np.float32
    cos = cosines(emb, ref)
    assert cos.min() >= 0.99999, (cos.argmin(), cos.min())
    # The instruction mattered (so equality above covers pairs, not only bare texts).
    bare = encoder.encode([rows[0]["text"]], show_progress_bar=False).numpy()
    assert cosines(emb[:1], bare)[0] < 0.9999
    meta = pq.read_schema(out / "part-c.parquet").metadata
    assert meta[b"l2v.dimension"] == b"576" and meta[b"l2v.model"] == b"smollm2-llm2vec"
    info = json.loads(meta[b"l2v.info"])
    assert info["rows"] == 29 and info["source"] == str(files[2])
    assert pq.read_schema(out / "part-c.parquet").field("embedding").type == pa.list_(
        pa.float32(), 576
    )
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    assert manifest["rows"] == 96 and manifest["files"] == 4 and manifest["dimension"] == 576
    assert [e["rows"] for e in manifest["inputs"]] == [24, 24, 29, 19]
    assert manifest["model"]["model"] == "smollm2-llm2vec" and manifest["seconds"] > 0
    assert manifest["ray"]["workers"] == 2 and manifest["l2v_version"]


def test_cli_int_ids_globs_uris_and_rerun_skips(ray_cluster, tiny_dir, tiny_encoder, tmp_path,
                                                capsys):  # fmt: skip
    """The CLI on a glob and a file:// URI with integer ids; a rerun skips complete outputs."""
    files, rows = make_corpus(tmp_path / "in", lee_sentences(60), int_ids=True)
    out = tmp_path / "out"
    argv = ["encode-corpus", str(tmp_path / "in" / "part-[ab].*"), f"file://{files[2]}",
            str(files[3]), "-o", str(out), "--model", tiny_dir, "--num-workers", "2",
            "--batch-texts", "4", "--instruction-field", "instruction", "-q"]  # fmt: skip
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "encoded 60 rows in 4 files" in captured.out
    assert "verified one row per input row" in captured.out and "rows/s" in captured.out
    ids, emb = read_outputs(out, files)
    assert ids == [r["id"] for r in rows]
    assert pq.read_schema(out / "part-a.parquet").field("id").type == pa.int64()
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0 and "encoded 0 rows in 0 files" in captured.out
    assert "4 complete files skipped" in captured.out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    # Other settings into the same directory: refused before any work, nothing touched.
    rc = cli.main(argv + ["--normalize"])
    err = capsys.readouterr().err
    assert rc == 2 and "other settings (normalize differ)" in err and len(err.splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    # An output made from another version of its input is redone (and says so), not skipped.
    with open(files[2], "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": 10**6, "text": "one more row"}) + "\n")
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "encoded 21 rows in 1 files" in captured.out, captured.out
    assert "3 complete files skipped, part-c.parquet redone (its input changed)" in captured.out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert after["part-c.parquet"] != before.pop("part-c.parquet")
    assert {k: v for k, v in after.items() if k != "part-c.parquet"} == before
    ids, emb = read_outputs(out, files)
    rows.insert(50, {"id": 10**6, "text": "one more row"})  # part-c holds rows 30 ... 49
    assert ids == [r["id"] for r in rows]
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999


def _two_files(directory: Path, texts: list[str]) -> tuple[list[Path], list[list[dict]]]:
    """a.jsonl and b.parquet, half of the texts each; every third row has an instruction."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"doc-{i}", "text": t, "instruction": "Represent the news" if i % 3 == 0 else None}
        for i, t in enumerate(texts)
    ]
    half = len(rows) // 2
    parts = [rows[:half], rows[half:]]
    files = [
        write_jsonl(directory / "a.jsonl", [{k: v for k, v in r.items() if v} for r in parts[0]]),
        write_parquet(directory / "b.parquet", parts[1], row_group_size=3),
    ]
    return files, parts


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}


def test_a_sentence_transformers_folder_with_a_prompt_name_and_truncate_dim(ray_cluster,
                                                                           tmp_path, capsys):
    """Any model l2v runs, the corpus way: a sentence-transformers folder (Dense + Normalize),
    its named prompt for rows without an instruction, Matryoshka truncation; rows equal the
    embedder's encode of the same items, and the settings are recorded for resume."""
    from st_folders import make_st_folder

    from l2v_models.embedder import Embedder

    folder = make_st_folder(tmp_path / "model", "llama", dense=[(96, 48)], normalize=True,
                            prompts={"query": "query: "}, config={"is_causal": False})  # fmt: skip
    # 24 rows: the last Parquet file's instructions are all null (a column of type null)
    files, rows = make_corpus(tmp_path / "in", lee_sentences(24))
    out = tmp_path / "out"
    argv = ["encode-corpus", *map(str, files), "-o", str(out), "--model", str(folder),
            "--instruction-field", "instruction", "--prompt-name", "query", "--truncate-dim",
            "16", "-q"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    ids, emb = read_outputs(out, files)
    assert ids == [r["id"] for r in rows] and emb.shape == (24, 16)
    embedder = Embedder.from_pretrained(str(folder), device="cpu")
    ref = embedder.encode(items_of(rows), prompt_name="query", truncate_dim=16,
                          show_progress_bar=False).numpy()  # fmt: skip
    assert cosines(emb, ref).min() >= 0.99999
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    capsys.readouterr()
    rc = cli.main([a if a != "16" else "32" for a in argv])
    assert rc == 2 and "truncate_dim" in capsys.readouterr().err


def test_rerun_redoes_a_file_whose_text_changed(ray_cluster, tiny_dir, tiny_encoder, tmp_path,
                                                capsys):  # fmt: skip
    """Issue 25.1: one text of an embedded input changes, its id stays. The rerun redoes that
    file (and says why), its new embedding equals a fresh encode of the new text, the other
    file is skipped; a third run skips both."""
    files, parts = _two_files(tmp_path / "in", lee_sentences(16))
    out = tmp_path / "out"
    argv = ["encode-corpus", *map(str, files), "-o", str(out), "--model", tiny_dir,
            "--num-workers", "1", "--batch-texts", "4", "--instruction-field", "instruction",
            "-q"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    old = read_outputs(out, files)[1]
    before = _mtimes(out)

    parts[0][5]["text"] = "The harbour froze for the first time in a century."
    write_jsonl(files[0], [{k: v for k, v in r.items() if v} for r in parts[0]])
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "encoded 8 rows in 1 files" in captured.out, captured.out
    assert "1 complete files skipped, a.parquet redone (its input changed)" in captured.out
    after = _mtimes(out)
    assert after["b.parquet"] == before["b.parquet"] and after["a.parquet"] != before["a.parquet"]
    ids, emb = read_outputs(out, files)
    rows = parts[0] + parts[1]
    assert ids == [r["id"] for r in rows]
    fresh = tiny_encoder.encode([parts[0][5]["text"]], show_progress_bar=False).numpy()
    assert cosines(emb[5:6], fresh)[0] >= 0.99999
    assert cosines(emb[5:6], old[5:6])[0] < 0.9999  # the stale embedding is gone
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    assert [e["status"] for e in manifest["inputs"]] == [runner.REDONE_CHANGED, runner.SKIPPED]
    assert manifest["redone_files"] == 1 and manifest["skipped_files"] == 1

    # Nothing changed since: both outputs are skipped.
    assert cli.main(argv) == 0
    assert "encoded 0 rows in 0 files" in capsys.readouterr().out
    assert _mtimes(out) == after


def test_rerun_redoes_a_file_whose_instruction_changed(ray_cluster, tiny_dir, tiny_encoder,
                                                       tmp_path):  # fmt: skip
    """Only a row's instruction changes (Parquet input; ids and texts stay): that file is
    redone with the new instruction, the other one is skipped."""
    files, parts = _two_files(tmp_path / "in", lee_sentences(12))
    out = tmp_path / "out"
    kwargs = dict(fields=corpus_inputs.Fields(instruction="instruction"), num_workers=1,
                  batch_texts=4, progress=False)  # fmt: skip
    runner.encode_corpus([str(f) for f in files], str(out), tiny_dir, **kwargs)
    before = _mtimes(out)
    parts[1][2]["instruction"] = "Retrieve a sentence that contradicts this one"
    write_parquet(files[1], parts[1], row_group_size=3)
    result = runner.encode_corpus([str(f) for f in files], str(out), tiny_dir, **kwargs)
    assert result.embedded_rows == 6 and result.skipped_files == 1
    assert _mtimes(out)["a.parquet"] == before["a.parquet"]
    ids, emb = read_outputs(out, files)
    rows = parts[0] + parts[1]
    assert ids == [r["id"] for r in rows]
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999
    assert [e["status"] for e in result.files] == [runner.SKIPPED, runner.REDONE_CHANGED]
    assert result.redone_files == 1


def test_an_output_without_a_content_digest_is_redone(ray_cluster, tiny_dir, tiny_encoder,
                                                      tmp_path):  # fmt: skip
    """An output written before l2v recorded its input's content SHA-256 cannot be checked
    against the input's texts: the rerun redoes it (and says why) rather than trust it."""
    files, parts = _two_files(tmp_path / "in", lee_sentences(12))
    out = tmp_path / "out"
    kwargs = dict(fields=corpus_inputs.Fields(instruction="instruction"), num_workers=1,
                  batch_texts=4, progress=False)  # fmt: skip
    runner.encode_corpus([str(f) for f in files], str(out), tiny_dir, **kwargs)
    # What an older l2v wrote: the same file without content_sha256 in l2v.info.
    table = pq.read_table(out / "a.parquet")
    meta = dict(table.schema.metadata)
    info = json.loads(meta[b"l2v.info"])
    info.pop("content_sha256", None)
    meta[b"l2v.info"] = json.dumps(info).encode()
    pq.write_table(table.replace_schema_metadata(meta), out / "a.parquet")
    before = _mtimes(out)
    result = runner.encode_corpus([str(f) for f in files], str(out), tiny_dir, **kwargs)
    assert result.embedded_rows == 6 and result.skipped_files == 1
    assert _mtimes(out)["b.parquet"] == before["b.parquet"]
    assert [e["status"] for e in result.files] == [runner.REDONE_UNCHECKABLE, runner.SKIPPED]
    assert result.redone_files == 1
    info = json.loads(pq.read_schema(out / "a.parquet").metadata[b"l2v.info"])
    assert info["content_sha256"] == corpus_inputs.scan_inputs(
        [str(files[0])], kwargs["fields"])[0].content_sha256  # fmt: skip
    ids, emb = read_outputs(out, files)
    rows = parts[0] + parts[1]
    assert ids == [r["id"] for r in rows]
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999


_SLOW_DRIVER = """
import sys, time
from l2v_models.corpus import runner
from l2v_models.corpus.inputs import Fields

class SlowEmbedder(runner.CorpusEmbedder):  # pickled by value: defined in __main__
    def __call__(self, batch):
        time.sleep(0.7)
        return super().__call__(batch)

address, model, out, *files = sys.argv[1:]
runner.encode_corpus(files, out, model, num_workers=1, batch_texts=4, ray_address=address,
                     progress=False, embedder_cls=SlowEmbedder)
"""


def test_resume_after_the_driver_is_killed(ray_cluster, tiny_dir, tiny_encoder, tmp_path):
    """Kill the driver (SIGKILL) once its first file is complete: the complete file stays, no
    partial file has a final name, no manifest; the rerun skips it and completes the rest."""
    files, rows = make_corpus(tmp_path / "in", lee_sentences(48), instructions=False)
    out = tmp_path / "out"
    script = tmp_path / "slow_driver.py"
    script.write_text(textwrap.dedent(_SLOW_DRIVER))
    # The driver imports this checkout's l2v_models (not an installed copy elsewhere): the
    # outputs it writes must be the ones the rerun below recognizes.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script), ray_cluster, tiny_dir, str(out)] + [str(f) for f in files],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    first = out / "part-a.parquet"
    deadline = time.monotonic() + 90
    try:
        while not first.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first file never completed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    names = sorted(p.name for p in out.iterdir())
    assert "part-a.parquet" in names and "_SUCCESS.json" not in names
    assert "part-d.parquet" not in names  # the run was really cut short
    finals = [n for n in names if n.endswith(".parquet") and not n.startswith(".")]
    for name in finals:  # whatever has a final name is complete
        assert pq.read_metadata(out / name).num_rows == 12
    mtime = first.stat().st_mtime_ns

    result = runner.encode_corpus(
        [str(f) for f in files], str(out), tiny_dir, num_workers=1, batch_texts=4,
        progress=False,
    )  # fmt: skip
    assert result.skipped_files == len(finals) >= 1
    assert result.embedded_files == 4 - len(finals)
    assert result.embedded_rows == 12 * (4 - len(finals))
    assert first.stat().st_mtime_ns == mtime
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # stale partials removed
    ids, emb = read_outputs(out, files)
    assert ids == [r["id"] for r in rows]
    ref = tiny_encoder.encode(items_of(rows), show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999
    assert json.loads((out / "_SUCCESS.json").read_text())["skipped_files"] == len(finals)


class KillOnceEmbedder(CorpusEmbedder):
    """Kills its own worker process (SIGKILL) in the middle of the run, once: the first call
    that sees row 20 of a file, when the marker file does not exist yet (it creates it)."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker

    def __call__(self, batch):
        if 20 in batch.column("_row").to_pylist() and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_worker_killed_mid_run_is_retried(ray_cluster, tiny_dir, tiny_encoder, tmp_path):
    """A worker process dies (SIGKILL) in the middle of a batch: Ray restarts it and retries
    the batch; the output is still complete, in order and exact."""
    files, rows = make_corpus(tmp_path / "in", lee_sentences(96))
    marker = tmp_path / "killed"

    class Embedder(KillOnceEmbedder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, marker=str(marker), **kwargs)

    result = runner.encode_corpus(
        [str(f) for f in files], str(tmp_path / "out"), tiny_dir,
        fields=corpus_inputs.Fields(instruction="instruction"), instruction="Represent it",
        num_workers=2, batch_texts=4, progress=False, embedder_cls=Embedder,
    )  # fmt: skip
    assert marker.exists(), "no worker was killed"
    assert result.embedded_rows == 96
    ids, emb = read_outputs(tmp_path / "out", files)
    assert ids == [r["id"] for r in rows]
    # Rows without an instruction of their own take the run's instruction.
    items = [[r.get("instruction") or "Represent it", r["text"]] for r in rows]
    ref = tiny_encoder.encode(items, show_progress_bar=False).numpy()
    assert cosines(emb, ref).min() >= 0.99999


def test_embed_dataset_keeps_other_columns(ray_cluster, tiny_dir, tiny_encoder):
    texts = lee_sentences(20)
    ds = ray.data.from_items([{"key": i, "body": t, "lang": "en"} for i, t in enumerate(texts)])
    out = runner.embed_dataset(ds, tiny_dir, text_column="body", instruction="Represent it",
                               batch_texts=6, num_workers=1)  # fmt: skip
    table = pa.concat_tables(list(out.iter_batches(batch_format="pyarrow", batch_size=None)))
    table = table.sort_by("key")
    assert table.column_names == ["key", "lang", "embedding"]
    assert table.column("key").to_pylist() == list(range(20))
    ref = tiny_encoder.encode([["Represent it", t] for t in texts], show_progress_bar=False)
    assert cosines(embeddings_to_numpy(table.column("embedding")), ref.numpy()).min() >= 0.99999


# ------------------------------------------------------------------------------ bad inputs
def _rows(n=4, **over):
    return [dict({"id": f"r{i}", "text": f"text number {i}"}, **over) for i in range(n)]


BAD_INPUTS = {
    "duplicate id in a file": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows() + [{"id": "r2", "text": "again"}])],
        "duplicate id 'r2'",
    ),
    "duplicate id across files": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows()),
                   write_parquet(d / "b.parquet", [{"id": "r1", "text": "x"}])],
        "duplicate id 'r1' ('id') in",
    ),
    "missing text field": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows() + [{"id": "r9", "body": "x"}])],
        "a.jsonl:5: no 'text' field",
    ),
    "missing id field": (
        lambda d: [write_jsonl(d / "a.jsonl", [{"text": "x"}])],
        "a.jsonl:1: no 'id' field",
    ),
    "non-string text (JSONL)": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows() + [{"id": "r9", "text": 17}])],
        "a.jsonl:5: text 'text' must be a string, got int",
    ),
    "non-string texts (Parquet)": (
        lambda d: [write_parquet(d / "a.parquet", [{"id": "a", "text": 1},
                                                   {"id": "b", "text": 2}])],
        "text column 'text' must hold strings, it is int64",
    ),
    "null text (Parquet)": (
        lambda d: [write_parquet(d / "a.parquet", [{"id": "a", "text": "x"},
                                                   {"id": "b", "text": None}])],
        "a.parquet (row 1): the text 'text' is null",
    ),
    "missing text column (Parquet)": (
        lambda d: [write_parquet(d / "a.parquet", [{"id": "a", "body": "x"}])],
        "no 'text' column for the text (columns: id, body); pass --text-field",
    ),
    "empty JSONL file": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows()), (d / "b.jsonl").write_text("\n\n") and
                   d / "b.jsonl"],
        "b.jsonl is empty",
    ),
    "empty Parquet file": (
        lambda d: [pq.write_table(pa.table({"id": pa.array([], pa.string()),
                                            "text": pa.array([], pa.string())}),
                                  d / "a.parquet") or d / "a.parquet"],
        "a.parquet is empty",
    ),
    "invalid JSON": (
        lambda d: [(d / "a.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", tex\n') and
                   d / "a.jsonl"],
        "a.jsonl:2: invalid JSON",
    ),
    "mixed id kinds": (
        lambda d: [write_jsonl(d / "a.jsonl", [{"id": 1, "text": "x"}, {"id": "2", "text": "y"}])],
        "a.jsonl:2: id '2' is not like the earlier ids of this file (integers)",
    ),
    "same stem twice": (
        lambda d: [write_jsonl(d / "a.jsonl", _rows()),
                   write_parquet(d / "a.parquet", [{"id": "z", "text": "x"}])],
        "would both write a.parquet",
    ),
    "lone surrogate in a text (JSONL)": (
        lambda d: [(d / "a.jsonl").write_text('{"id": "a", "text": "x"}\n'
                                              '{"id": "b", "text": "bad \\ud800"}\n') and
                   d / "a.jsonl"],
        "a.jsonl:2: the text is not valid Unicode",
    ),
    "glob matches nothing": (lambda d: [d / "nothing-*.jsonl"], "no file matches this pattern"),
    "unknown extension": (
        lambda d: [(d / "a.csv").write_text("id,text\n") and d / "a.csv"],
        "unknown input format",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_any_work(case, tmp_path, capsys, monkeypatch):
    """Each bad input: exit code 2, one `l2v: error:` line naming the problem, no Ray started,
    no model loaded, no output written."""
    make, expected = BAD_INPUTS[case]
    paths = [str(p) for p in make(tmp_path)]

    def no_work(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(runner, "_start_ray", no_work)
    monkeypatch.setattr("l2v_models.encoder.LLM2Vec.from_pretrained", no_work)
    out = tmp_path / "out"
    rc = cli.main(["encode-corpus", *paths, "-o", str(out), "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("l2v: error: "), err
    assert expected in err, err
    assert not out.exists()


def test_instruction_options_exclusive_and_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["encode-corpus", "a.jsonl", "-o", "x", "--instruction", "i",
                  "--instruction-field", "f"])  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["encode-corpus", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--id-field", "--text-field", "--instruction-field", "--instruction",
                   "--num-workers", "--gpus-per-worker", "--ray-address", "--batch-texts",
                   "--model", "--peft", "--pooling", "--dtype", "--batch-tokens"):  # fmt: skip
        assert option in help_text


@pytest.mark.parametrize(
    "option, message",
    [
        (["--num-workers", "0"], "num_workers must be an int >= 1, got 0"),
        (["--gpus-per-worker", "2"], "gpus_per_worker must be between 0 and 1"),
        (["--batch-texts", "0"], "batch_texts must be an int >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused_before_ray(option, message, tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", _rows())
    monkeypatch.setattr(runner, "_start_ray", lambda *a, **k: pytest.fail("Ray started"))
    rc = cli.main(["encode-corpus", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "o"),
                   "--model", str(tmp_path), *option])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_model_path_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", _rows())
    monkeypatch.setattr(runner, "_start_ray", lambda *a, **k: pytest.fail("Ray started"))
    rc = cli.main(["encode-corpus", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "o"),
                   "--model", str(tmp_path / "no-such-model")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-model: no such file or directory" in err


def test_ids_digest_does_not_depend_on_chunking():
    ids = pa.array([f"id{i}" * (i % 4) for i in range(50)])
    whole = corpus_inputs.ids_sha256(ids)
    assert corpus_inputs.ids_sha256(pa.chunked_array([ids[:7], ids[7:30], ids[30:]])) == whole
    assert corpus_inputs.ids_sha256(ids[1:]) != whole
    swapped = pa.array(ids.to_pylist()[1:2] + ids.to_pylist()[:1] + ids.to_pylist()[2:])
    assert corpus_inputs.ids_sha256(swapped) != whole
    ints = pa.array(np.arange(10, dtype=np.int64))
    assert corpus_inputs.ids_sha256(pa.chunked_array([ints[:3], ints[3:]])) == (
        corpus_inputs.ids_sha256(ints)
    )


def test_content_digest_covers_texts_and_instructions(tmp_path, monkeypatch):
    """The content SHA-256 of a file: the same for the same rows in JSONL and Parquet and
    whatever the batching; different when any text or instruction changes, when a null
    instruction becomes an empty one, or when two texts swap rows (ids unchanged)."""
    fields = corpus_inputs.Fields(instruction="instruction")
    rows = [{"id": f"r{i}", "text": f"text number {i} é", "instruction": "ask" if i % 3 else None}
            for i in range(23)]  # fmt: skip

    def digest(rows, name="a.jsonl"):
        path = tmp_path / name
        if name.endswith(".jsonl"):
            write_jsonl(path, [{k: v for k, v in r.items() if v is not None} for r in rows])
        else:
            write_parquet(path, rows, row_group_size=5)
        scanned = corpus_inputs.scan_inputs([str(path)], fields)[0]
        path.unlink()
        return scanned.ids_sha256, scanned.content_sha256

    ids, whole = digest(rows)
    assert digest(rows, "a.parquet") == (ids, whole)
    monkeypatch.setattr(corpus_inputs, "_DIGEST_ROWS", 4)  # the JSONL scan hashes 6 batches
    assert digest(rows) == (ids, whole)
    monkeypatch.undo()
    changed = {
        "text": [dict(r, text="other") if i == 7 else r for i, r in enumerate(rows)],
        "instruction": [dict(r, instruction="tell") if i == 7 else r for i, r in enumerate(rows)],
        "empty instruction": [dict(r, instruction="") if i == 0 else r for i, r in enumerate(rows)],
        "swapped texts": [dict(r, text=rows[1 - i]["text"]) if i < 2 else r
                          for i, r in enumerate(rows)],
    }  # fmt: skip
    for case, other in changed.items():
        for name in ("a.jsonl", "a.parquet"):
            other_ids, other_content = digest(other, name)
            assert other_ids == ids and other_content != whole, (case, name)
    # Without an instruction field the instructions are not part of the rows.
    plain = corpus_inputs.ContentDigest()
    plain.update(pa.array([r["id"] for r in rows]), pa.array([r["text"] for r in rows]))
    write_jsonl(tmp_path / "a.jsonl", rows)
    assert corpus_inputs.scan_inputs([str(tmp_path / "a.jsonl")])[0].content_sha256 == (
        plain.hexdigest()
    )


def test_existing_output_statuses(tmp_path):
    """What a rerun does with an output already there, by its metadata (no Ray)."""
    write_jsonl(tmp_path / "a.jsonl", _rows())
    inp = corpus_inputs.scan_inputs([str(tmp_path / "a.jsonl")])[0]
    settings = {"model": "m", "normalize": False}
    path = tmp_path / "a.parquet"

    def status(rows=4, **info):
        full = dict(settings=settings, rows=4, ids_sha256=inp.ids_sha256,
                    content_sha256=inp.content_sha256)  # fmt: skip
        full.update(info)
        full = {k: v for k, v in full.items() if v is not None}
        table = pa.table({"id": [f"r{i}" for i in range(rows)]})
        pq.write_table(table.replace_schema_metadata({"l2v.info": json.dumps(full)}), path)
        return runner._existing_output(pafs.LocalFileSystem(), str(path), "out/a.parquet", inp,
                                       settings)  # fmt: skip

    assert status() == runner.SKIPPED
    assert status(content_sha256="0" * 64) == runner.REDONE_CHANGED
    assert status(rows=5, content_sha256="0" * 64) == runner.REDONE_CHANGED
    assert status(content_sha256=None) == runner.REDONE_UNCHECKABLE
    assert status(rows=3) == runner.REDONE_DAMAGED
    with pytest.raises(corpus_inputs.CorpusInputError, match="other settings"):
        status(content_sha256=None, settings={"model": "other", "normalize": False})
    path.write_bytes(b"not parquet")
    with pytest.raises(corpus_inputs.CorpusInputError, match="not written by l2v"):
        runner._existing_output(pafs.LocalFileSystem(), str(path), "out/a.parquet", inp,
                                settings)  # fmt: skip
    path.unlink()
    assert runner._existing_output(pafs.LocalFileSystem(), str(path), "o", inp, settings) == (
        runner.EMBEDDED
    )


def test_cli_module_imports_lightly():
    code = ("import sys, l2v_models.corpus.cli, l2v_models.corpus; "
            "heavy = [m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules]; "
            "assert not heavy, heavy")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_ray_errors_become_one_line():
    """A worker's failure reaches the driver as a Ray error whose text holds the worker's
    traceback: the user sees its last 'SomeError: message' line only."""

    class FakeActorDied(Exception):  # what Ray raises: the worker traceback as text
        pass

    inner = FakeActorDied(
        "The actor died because of an error raised in its creation task\n"
        "Traceback (most recent call last):\n"
        '  File "runner.py", line 128, in __init__\n'
        "ray.exceptions.RayTaskError: wrapped\n"
        "FileNotFoundError: base model 'x': config.json not found in x\n"
    )
    outer = RuntimeError("execution failed")
    outer.__cause__ = inner
    assert runner.describe_ray_error(outer) == (
        "FileNotFoundError: base model 'x': config.json not found in x"
    )
    assert runner.describe_ray_error(ValueError("bad\nmore")) == "ValueError: bad"
