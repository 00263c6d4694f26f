"""`l2v eval`: metrics on toy data with known answers, the bootstrap, the WordNet held-out split,
the data readers on the real installed files (gensim wheel, Debian wordnet-base), TF-IDF on the
real Lee data, the runner's comparisons and cache, and the CLI on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny import make_lora_adapter, make_tiny_checkpoint

from l2v_models import cli
from l2v_models.eval import data, encoders, metrics, runner, tasks
from l2v_models.eval import wordnet as wn


# ------------------------------------------------------------------------------ metrics
def test_pearson_spearman_known_values():
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert metrics.pearson(x, y) == pytest.approx(0.8)  # sum dxdy 4 / sqrt(5 * 5)
    assert metrics.spearman(x, y) == pytest.approx(0.8)  # ranks equal the values
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    x = np.linspace(0.0, 5.0, 30)
    assert metrics.spearman(x, np.exp(x)) == pytest.approx(1.0)  # rank-invariant
    assert metrics.pearson(x, np.exp(x)) < 0.9  # not linear
    assert metrics.pearson([1.0, 1.0, 1.0], [1, 2, 3]) == 0.0  # a constant model scores 0
    with pytest.raises(ValueError):
        metrics.pearson([1, 2, 3], [1, 2])


def test_rankdata_and_spearman_with_ties_match_scipy():
    stats = pytest.importorskip("scipy.stats")  # the independent reference (in the [eval] extra)
    np.testing.assert_allclose(metrics.rankdata([3, 1, 2, 2, 5, 1]), [5, 1.5, 3.5, 3.5, 6, 1.5])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x))
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_target_ranks_recall_mrr_known_values():
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # target 0 first -> rank 1
            [0.2, 0.2, 0.2],  # all tied: ties count against -> rank 3
            [0.1, 0.8, 0.3],
        ]
    )  # target 2 second -> rank 2
    ranks = metrics.target_ranks(scores, [0, 1, 2])
    np.testing.assert_array_equal(ranks, [1, 3, 2])
    assert metrics.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    assert metrics.mrr_at_k(ranks, 10) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert metrics.mrr_at_k(ranks, 2) == pytest.approx((1 + 0 + 1 / 2) / 3)  # rank 3 > k counts 0
    with pytest.raises(ValueError):
        metrics.target_ranks(scores, [0, 1, 3])


def test_bootstrap_interval_of_a_mean_matches_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(size=4000)
    mean = lambda v: float(v.mean())
    low, high = metrics.bootstrap_ci(mean, (x,), n_resamples=500)
    assert low < x.mean() < high
    half = 1.96 * x.std() / np.sqrt(x.size)  # the normal-theory half-width
    assert (high - low) / 2 == pytest.approx(half, rel=0.2)
    assert metrics.bootstrap_ci(mean, (x,), n_resamples=200) == metrics.bootstrap_ci(
        mean, (x,), n_resamples=200
    )  # deterministic
    small = metrics.bootstrap_ci(mean, (x[:100],), n_resamples=200)
    assert small[1] - small[0] > 4 * (high - low)  # 40x fewer items: ~6x wider


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(2)
    gold = rng.normal(size=300)
    a = gold + rng.normal(size=300)
    corr = lambda pred, g: metrics.pearson(pred, g)
    # identical systems: every resample differs by exactly 0
    assert metrics.bootstrap_ci(corr, (a, gold), (a, gold), n_resamples=100) == (0.0, 0.0)
    # a much noisier system: the paired interval lies above 0 and holds the point difference
    b = gold + 4 * rng.normal(size=300)
    diff = corr(a, gold) - corr(b, gold)
    low, high = metrics.bootstrap_ci(corr, (a, gold), (b, gold), n_resamples=300)
    assert 0 < low < diff < high


def test_document_resampler_keeps_whole_documents():
    a, b = np.triu_indices(5, k=1)  # 10 pairs of 5 documents
    resample = metrics.document_pair_resampler(a, b, 5)
    rng = np.random.default_rng(3)
    for _ in range(20):
        idx = resample(rng)
        drawn = set(a[idx]) | set(b[idx])
        # every pair among the drawn documents is present (a document brings all its pairs)
        want = {k for k in range(10) if a[k] in drawn and b[k] in drawn}
        assert set(idx.tolist()) == want and idx.size >= 2


def test_lee_document_bootstrap_is_wider_than_pairs():
    task = tasks.get_task("lee").load()
    pred = task.predict(encoders.TfidfEncoder().encode(task.items()))
    corr = task.metrics["pearson"]
    value = corr(pred, task.gold)
    pairs = metrics.bootstrap_ci(corr, (pred, task.gold), n_resamples=300)
    docs = metrics.bootstrap_ci(corr, (pred, task.gold), n_resamples=300, resample=task.resampler())
    assert docs[0] < value < docs[1]
    assert docs[1] - docs[0] > 1.3 * (pairs[1] - pairs[0])  # 1.8x measured for TF-IDF


# ------------------------------------------------------------------------------ WordNet split
def test_heldout_split_is_stable_and_deterministic():
    # Pinned: these answers must never change (training and evaluation rely on the same split).
    pinned = {
        "02084071-n": False,
        "00001740-n": False,
        "00003553-n": True,
        "00039990-n": True,
        "01999816-v": False,
        "00001740-a": False,
    }
    assert {sid: wn.is_heldout(sid) for sid in pinned} == pinned
    ids = [wn.synset_id(offset, "n") for offset in range(1000, 21000)]
    first = [wn.is_heldout(i) for i in ids]
    assert first == [wn.is_heldout(i) for i in reversed(ids)][::-1]  # order-independent
    assert 0.09 < np.mean(first) < 0.11  # ~10%
    assert wn.synset_id(2084071, "s") == "02084071-a"  # satellites live in data.adj


def test_heldout_split_on_real_wordnet_is_disjoint():
    synsets = wn.read_wordnet()
    held = {s.id for s in synsets if wn.is_heldout(s)}
    train = {s.id for s in synsets if not wn.is_heldout(s)}
    assert not held & train and len(held) + len(train) == len(synsets) == len(
        {s.id for s in synsets}
    )
    assert 0.09 < len(held) / len(synsets) < 0.11
    assert all(wn.is_heldout(s.id) == wn.is_heldout(s) for s in synsets[:500])


# ------------------------------------------------------------------------------ data readers
def test_parse_wordnet_line_and_gloss():
    line = (
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 "
        '~ 01322604 n 0000 | a member of the genus Canis; occurs in many breeds; "the dog '
        'barked all night"; "a dog\'s life"  \n'
    )
    s = wn.parse_data_line(line)
    assert s.id == "02084071-n" and s.ss_type == "n" and s.lex_filenum == 5
    assert s.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert s.definition == "a member of the genus Canis; occurs in many breeds"
    assert s.examples == ("the dog barked all night", "a dog's life")
    assert s.pointers == (("@", "02083346-n"), ("~", "01322604-n"))
    # adjective markers like (p) are stripped from lemmas; hex word counts
    s = wn.parse_data_line(
        "00001740 00 a 01 able(p) 0 000 | (usually followed by `to') having the necessary means  \n"
    )
    assert s.lemmas == ("able",) and s.examples == () and s.definition.startswith("(usually")


def test_wordnet_real_files():
    synsets = wn.read_wordnet()
    by_pos = {p: sum(s.id.endswith("-" + p) for s in synsets) for p in "nvar"}
    assert by_pos == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}  # WordNet 3.0's counts
    dog = next(s for s in synsets if s.id == "02084071-n")
    assert dog.lemmas[:2] == ("dog", "domestic dog") and dog.examples == (
        "the dog barked all night",
    )
    task = tasks.get_task("wordnet").load()
    assert 3000 < task.n_items < 3500 and task.n_texts == 2 * task.n_items
    assert len(set(task.queries)) == len(task.queries) and len(set(task.docs)) == len(task.docs)


def test_wordnet_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(wn.WORDNET_ENV, str(tmp_path))
    with pytest.raises(wn.DataMissing, match="apt-get install wordnet-base"):
        wn.read_wordnet()


def test_gensim_readers_real_files():
    docs = data.lee_documents()
    assert len(docs) == 50 and all(len(d.split()) > 40 for d in docs)
    i, j, human = data.lee_pairs()
    assert len(human) == 1225 and (i < j).all()
    assert 0.2 <= human.min() and human.max() <= 1.0
    assert len(data.lee_background_documents()) == 300
    assert len(data.word_pairs("simlex999.txt")) == 999
    assert len(data.word_pairs("wordsim353.tsv")) == 353
    assert ("tiger", "cat", 7.35) in data.word_pairs("wordsim353.tsv")
    with pytest.raises(data.DataMissing, match="pip install gensim"):
        data.gensim_file("no-such-file.txt")


def test_polarity_reader_and_knn_known_answer():
    texts, labels = data.polarity_sentences()
    assert len(texts) == 200 and labels.sum() == 100 and set(labels.tolist()) == {0, 1}
    assert any("\u2014" in t for t in texts)  # Windows-1252 0x97 read as an em dash
    task = tasks.get_task("polarity")
    task.texts, task.labels = ["a", "b", "c", "d"], np.array([0, 0, 1, 1])
    task.gold, task.k = task.labels.astype(float), 1
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
    # nearest other: 0->1 (right), 1->0 (right), 2->3 (right), 3->1 (label 0: wrong)
    np.testing.assert_array_equal(task.predict(emb), [1, 1, 1, 0])
    assert task.score(task.predict(emb)) == {"accuracy@9nn": 0.75}
    full = tasks.get_task("polarity").load()
    assert 0.5 <= full.score(full.predict(encoders.TfidfEncoder().encode(full.items())))[
        "accuracy@9nn"] < 0.7  # 0.55 measured: bag of words is near chance here  # fmt: skip


def test_evaluation_texts_hold_the_eval_data():
    texts = tasks.evaluation_texts()
    assert set(data.lee_documents()) <= texts
    assert "the dog barked all night" not in texts  # 02084071-n is a training synset


# ------------------------------------------------------------------------------ references
def test_tfidf_on_real_lee():
    task = tasks.get_task("lee").load()
    pred = task.predict(encoders.TfidfEncoder().encode(task.items()))
    scores = task.score(pred)
    assert 0.40 < scores["pearson"] < 0.50  # 0.445 measured; LSI in Lee et al. is ~0.6
    assert 0.15 < scores["spearman"] < 0.35


def test_task_predictions_toy_and_sparse_dense_agree():
    task = tasks.PairTask()
    task._set(["a", "b", "c"], [0, 0, 1], [1, 2, 2], [1.0, 0.0, 0.5])
    emb = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(task.predict(emb), [2**-0.5, 0.0, 2**-0.5], atol=1e-7)
    # the same TF-IDF vectors, sparse and dense, give the same predictions on both task kinds
    for name, limit in (("lee", 12), ("wordnet", 60)):
        t = tasks.get_task(name).load(limit=limit)
        sparse = encoders.TfidfEncoder().encode(t.items())
        np.testing.assert_allclose(t.predict(sparse), t.predict(sparse.toarray()), atol=1e-9)
    ranks = t.predict(np.eye(2 * 60)[list(range(60)) * 2])  # query k and doc k: the same vector
    np.testing.assert_array_equal(ranks, np.ones(60))


def test_instructions_go_to_queries_only():
    wordnet = tasks.get_task("wordnet").load(limit=5)
    items = wordnet.items(instructions=True)
    assert all(isinstance(i, list) and i[0] == wordnet.instruction for i in items[:5])
    assert items[5:] == wordnet.docs  # the examples are documents: no instruction
    assert wordnet.items() == wordnet.queries + wordnet.docs
    lee = tasks.get_task("lee").load(limit=3)  # symmetric task: every text gets it
    assert [i[1] for i in lee.items(instructions=True)] == lee.texts


class _RandomEncoder:
    """Random vectors: correlation with humans ~0 (the floor a real encoder must clear)."""

    kind = "reference"
    info = {"model": "random"}

    def __init__(self, name="random"):
        self.name = name
        self.calls = 0

    def cache_key(self):
        return ["random-v1"]

    def encode(self, items):
        self.calls += 1
        return np.random.default_rng(0).normal(size=(len(items), 16)).astype(np.float32)


def test_runner_comparisons_and_cache(tmp_path):
    lee = tasks.get_task("lee").load()
    wordnet = tasks.get_task("wordnet").load(limit=200)
    rand = _RandomEncoder()
    report = runner.evaluate(
        [encoders.TfidfEncoder(), rand], [lee, wordnet], n_resamples=200, cache=tmp_path
    )
    rows = {(r.model, r.task, r.metric): r for r in report.rows}
    assert abs(rows["random", "lee", "pearson"].value) < 0.1
    assert rows["tfidf", "lee", "pearson"].n == 1225 and rows["tfidf", "wordnet", "mrr@10"].n == 200
    for r in report.rows:
        assert r.ci_low <= r.value <= r.ci_high
    verdicts = {(c.task, c.metric): c.verdict for c in report.comparisons}
    assert verdicts["lee", "pearson"] == "better"  # TF-IDF beats random beyond the noise
    assert verdicts["wordnet", "recall@1"] == "better"
    table = runner.format_table(report)
    assert "| lee | pearson | 1225 |" in table and "better" in table
    # second run: the random encoder's predictions come from the cache, identical
    again = runner.evaluate(
        [encoders.TfidfEncoder(), rand], [lee, wordnet], n_resamples=200, cache=tmp_path
    )
    assert rand.calls == 2 and all(r.cached for r in again.rows if r.model == "random")
    assert [r.value for r in again.rows] == [r.value for r in report.rows]
    # a cache entry from before CPU seconds were recorded: "n/a" in the table, null in JSON
    for path in tmp_path.glob("random-lee-*.npz"):
        with np.load(path) as f:
            np.savez(path, pred=f["pred"], seconds=f["seconds"])
    old = runner.evaluate([rand], [lee], n_resamples=20, cache=tmp_path)
    assert "(n/a) cached" in runner.format_table(old)
    runner.write_json(old, tmp_path / "old.json")  # strict JSON: no NaN
    assert json.loads((tmp_path / "old.json").read_text())["rows"][0]["cpu_seconds"] is None


def test_only_the_packaged_models_are_cached():
    default, untrained = encoders.L2VEncoder("d"), encoders.L2VEncoder("u", model="smollm2")
    assert default.cache_key() is not None and untrained.cache_key() is not None
    assert default.cache_key() != untrained.cache_key()  # two models, two cache entries
    assert untrained.is_untrained() and not default.is_untrained()
    assert encoders.L2VEncoder("d", model="SmolLM2-LLM2Vec").cache_key() == default.cache_key()
    assert encoders.L2VEncoder("x", peft="some/adapter").cache_key() is None  # may be retrained
    assert not encoders.L2VEncoder("x", peft="some/adapter").is_untrained()  # smollm2 + adapter
    assert encoders.L2VEncoder("x", model="some/dir").cache_key() is None
    assert encoders.L2VEncoder("x", pooling_mode="eos_token").cache_key() is None


def test_minilm_reference_is_a_real_sentence_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("L2V_CACHE_DIR", str(tmp_path))
    path = encoders.minilm_dir()
    assert path.parent == tmp_path and (path / "model.safetensors").is_file()
    emb = encoders.MiniLMEncoder(device="cpu").encode(
        ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply."]
    )
    assert emb.shape == (3, 384)
    cos = metrics.cosine_matrix(emb, emb)
    assert cos[0, 1] > cos[0, 2] + 0.2  # cat~kitten, not cat~stocks


# ------------------------------------------------------------------------------ CLI
def test_cli_module_imports_lightly():
    code = (
        "import sys, l2v_models.eval.cli; "
        "print(sorted(m for m in ('numpy', 'torch', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("eval"), "llama"))


def test_cli_eval_tiny_model(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("L2V_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "results.json"
    rc = cli.main(
        [
            "eval",
            "-q",
            "--model",
            tiny_model,
            "--device",
            "cpu",
            "--tasks",
            "lee,wordnet,wordsim,polarity",
            "--limit",
            "8",
            "--references",
            "tfidf",
            "--bootstrap",
            "50",
            "--instructions",
            "--output",
            str(out_json),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| task | metric | n |" in out and "| lee | pearson | 28 |" in out  # 8 docs: 28 pairs
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert {(r["model"], r["task"]) for r in rows} == {
        (m, t)
        for m in (tiny_model.rstrip("/").split("/")[-1], "tfidf")
        for t in ("lee", "wordnet", "wordsim", "polarity")
    }
    for r in rows:
        assert {
            "task",
            "metric",
            "value",
            "ci_low",
            "ci_high",
            "model",
            "data_source",
            "n",
            "seconds",
            "versions",
        } <= set(r)
        assert np.isfinite(r["value"]) and r["seconds"] >= 0 and r["cpu_seconds"] >= 0
    assert rows[0]["model_info"]["device"] == "cpu" and rows[0]["versions"]["torch"]
    units = {r["task"]: r["bootstrap_unit"] for r in rows}
    assert units == {"lee": "document", "wordnet": "item", "wordsim": "item", "polarity": "item"}
    assert len(result["comparisons"]) == 7  # 3 tasks x 2 metrics + polarity, model - tfidf
    assert result["settings"]["instructions"] is True


def test_cli_eval_adapter_against_its_base(tiny_model, tmp_path, capsys, monkeypatch):
    """The comparison after `l2v train`: base + adapter is the model row; --name labels it."""
    monkeypatch.setenv("L2V_CACHE_DIR", str(tmp_path / "cache"))
    adapter = make_lora_adapter(tmp_path, tiny_model)
    argv = ["eval", "-q", "--model", tiny_model, "--device", "cpu", "--tasks", "lee"]
    argv += ["--limit", "6", "--bootstrap", "20", "--references", "none"]
    assert cli.main(argv + ["--output", str(tmp_path / "base.json")]) == 0
    assert cli.main(argv + ["--peft", str(adapter), "--name", "trained", "--output",
                            str(tmp_path / "adapter.json")]) == 0  # fmt: skip
    capsys.readouterr()
    base = json.loads((tmp_path / "base.json").read_text())["rows"]
    tuned = json.loads((tmp_path / "adapter.json").read_text())["rows"]
    assert tuned[0]["model"] == "trained" and tuned[0]["model_info"]["peft"] == str(adapter)
    assert tuned[0]["value"] != base[0]["value"]  # the adapter changed the embeddings


def test_cli_eval_errors(capsys, monkeypatch, tmp_path):
    rc = cli.main(["eval", "--tasks", "lee,nope"])
    assert rc == 2 and "unknown task nope" in capsys.readouterr().err
    rc = cli.main(["eval", "--limit", "2"])
    assert rc == 2 and "--limit at least 3" in capsys.readouterr().err
    rc = cli.main(["eval", "--references", "bm25"])
    assert rc == 2 and "unknown reference bm25" in capsys.readouterr().err
    monkeypatch.setenv(wn.WORDNET_ENV, str(tmp_path))
    rc = cli.main(["eval", "--tasks", "wordnet"])
    err = capsys.readouterr().err
    assert rc == 2 and "apt-get install wordnet-base" in err and "Traceback" not in err
    rc = cli.main(["eval", "--list"])
    out = capsys.readouterr().out
    assert rc == 0 and "licence" in out and "wordnet" in out
