"""MTEB v2: l2v's encoder (L2VMtebEncoder) under mteb.evaluate, on a small retrieval task and a
small STS task built here (nothing from the hub), and `l2v eval --mteb`.

Scores are checked against the same metric computed here from l2v's own embeddings of the texts
with the instructions LLM2Vec's evaluation gives them (queries and STS texts: the task's
instruction; documents: none), so a text given the wrong instruction, side or order fails.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from st_folders import make_st_folder
from tiny import make_tiny_checkpoint

from l2v_models import cli
from l2v_models.eval.mteb_instructions import instruction_for, llm2vec_format, named_prompts

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from l2v_models.eval.mteb_model import L2VMtebEncoder  # noqa: E402

COMMON = dict(
    description="a small task built by l2v's tests", reference=None,
    dataset={"path": "l2v-tests/none", "revision": "0"}, category="t2t", eval_splits=["test"],
    eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=[], domains=[],
    task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
    modalities=["text"], sample_creation="found", bibtex_citation="",
)  # fmt: skip
S1 = ["a cat sat on the mat", "the dog ran", "the mat is red", "this text is a query",
      "passages retrieve the text"]  # fmt: skip
S2 = ["the cat sat", "a passage of text", "a red mat", "a query", "the text of a passage"]
GOLD = [5.0, 1.0, 4.0, 3.0, 2.5]
QUERIES = {"q1": "cat on a mat", "q2": "dog ran away", "q3": "which text", "q4": "red"}
CORPUS = {"d1": "the cat sat on the mat", "d2": "the dog ran away from the cat",
          "d3": "a text is a document", "d4": "the mat is red", "d5": "query and passage"}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1, "d5": 1}, "q4": {"d4": 1}}
QUERY_PROMPT = "Given a claim, find documents that refute the claim"


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="LocalSTS", main_score="cosine_spearman", **COMMON)
    min_score = 0
    max_score = 5

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": S1, "sentence2": S2, "score": GOLD})})  # fmt: skip
        self.data_loaded = True


class LocalRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="LocalRetrieval", main_score="ndcg_at_10",
                            prompt={"query": QUERY_PROMPT}, **COMMON)  # fmt: skip

    def load_data(self, num_proc=None, **kwargs):
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items()]),
            corpus=Dataset.from_list([{"id": k, "text": v, "title": ""}
                                      for k, v in CORPUS.items()]),  # fmt: skip
            relevant_docs=QRELS, top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mteb"), "llama")


def spied(encoder):
    """Record every Embedder.encode call (items and keywords) of an L2VMtebEncoder."""
    calls = []
    real = encoder.model.encode

    def encode(items, **kwargs):
        calls.append((list(items), kwargs))
        return real(items, **kwargs)

    encoder.model.encode = encode
    return calls


def main_score(result, task: str) -> float:
    (task_result,) = [r for r in result.task_results if r.task_name == task]
    return float(task_result.scores["test"][0]["main_score"])


def spearman(x, y) -> float:
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def ndcg_at_10(scores: dict[str, dict[str, float]]) -> float:
    values = []
    for qid, rels in QRELS.items():
        ranked = sorted(scores[qid], key=lambda d: -scores[qid][d])[:10]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked))
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rels), 10)))
        values.append(dcg / ideal)
    return float(np.mean(values))


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------ instructions
def test_instruction_table():
    """LLM2Vec's choices: the task's own entry, its type's, else MTEB's prompt; documents none;
    written as llm2vec writes them (a colon at the end)."""
    assert instruction_for("SciFact", "Retrieval", {"query": "other"}, "query") == (
        "Given a scientific claim, retrieve documents that support or refute the claim:")
    assert instruction_for("SciFact", "Retrieval", None, "document") == ""
    assert instruction_for("STS12", "STS", None, None) == "Retrieve semantically similar text:"
    assert instruction_for("CQADupstackTexRetrieval", "Retrieval", None, "query").startswith(
        "Given a question, retrieve detailed question descriptions from Stackexchange")
    assert instruction_for("Banking77Classification", "Classification",
                           "Given a online banking query, find the corresponding intents",
                           None) == (
        "Given a online banking query, find the corresponding intents:")  # fmt: skip
    assert instruction_for("X", "Retrieval", {"query": "Find it."}, "query") == "Find it:"
    assert instruction_for("X", "Clustering", None, None) == ""
    assert llm2vec_format(" Retrieve text. ") == "Retrieve text:"
    assert llm2vec_format("Ends with colon:") == "Ends with colon:"
    prompts = named_prompts()
    assert prompts["SciFact-query"].endswith("the claim:") and "STS" in prompts
    assert mteb.models.abs_encoder.AbsEncoder.validate_task_to_prompt_name(prompts)


# ------------------------------------------------------------------------------ mteb.evaluate
def test_llm2vec_model_under_mteb(tiny_dir):
    """STS and retrieval scores equal the metric computed from l2v's embeddings with LLM2Vec's
    instructions; each side is one packed encode call."""
    model = L2VMtebEncoder(str(tiny_dir), device="cpu", dtype="float32")
    assert isinstance(model, mteb.models.models_protocols.EncoderProtocol)
    calls = spied(model)
    result = mteb.evaluate(model, [LocalSTS(), LocalRetrieval()], cache=None,
                           show_progress_bar=False, encode_kwargs={"batch_size": 2})  # fmt: skip
    calls = list(calls)  # what mteb asked for (the encodes below are ours)
    emb = model.model
    sts = "Retrieve semantically similar text:"
    e1 = unit(emb.encode([[sts, s] for s in S1], show_progress_bar=False))
    e2 = unit(emb.encode([[sts, s] for s in S2], show_progress_bar=False))
    want = spearman((e1 * e2).sum(dim=1).numpy(), np.array(GOLD))
    assert main_score(result, "LocalSTS") == pytest.approx(want, abs=1e-6)

    instruction = llm2vec_format(QUERY_PROMPT)
    q = unit(emb.encode([[instruction, t] for t in QUERIES.values()], show_progress_bar=False))
    d = unit(emb.encode(list(CORPUS.values()), show_progress_bar=False))
    sims = (q @ d.T).numpy()
    scores = {qid: {did: float(sims[i, j]) for j, did in enumerate(CORPUS)}
              for i, qid in enumerate(QUERIES)}  # fmt: skip
    assert main_score(result, "LocalRetrieval") == pytest.approx(ndcg_at_10(scores), abs=1e-4)

    sent = [items for items, _ in calls]
    assert [[sts, s] for s in S1] in sent and [[sts, s] for s in S2] in sent
    assert [[instruction, t] for t in QUERIES.values()] in sent
    assert list(CORPUS.values()) in sent  # documents: no instruction
    assert len(calls) == 4  # one call per side of each task, whatever MTEB's batch_size


def test_sentence_transformers_folder_under_mteb(tmp_path):
    """A sentence-transformers folder gets the prompt MTEB picks from its own prompts."""
    folder = make_st_folder(tmp_path, "llama", include_prompt=False,
                            prompts={"query": "query: ", "LocalSTS": "sts: "})  # fmt: skip
    model = L2VMtebEncoder(str(folder), device="cpu", dtype="float32")
    calls = spied(model)
    mteb.evaluate(model, [LocalSTS(), LocalRetrieval()], cache=None, show_progress_bar=False)
    names = {tuple(items): kwargs.get("prompt_name") for items, kwargs in calls}
    assert names[tuple(S1)] == "LocalSTS" and names[tuple(QUERIES.values())] == "query"
    assert names[tuple(CORPUS.values())] is None


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face caches at an empty folder (no data is found locally)."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    return cache


def test_eval_mteb_names_unknown_and_missing_tasks(empty_hf_cache, capsys):
    assert cli.main(["eval", "--mteb", "NoSuchTaskAnywhere", "-q"]) == 2
    assert "unknown MTEB task 'NoSuchTaskAnywhere'" in capsys.readouterr().err
    # Real MTEB tasks whose data is not here: named, with how to fetch it, before any model
    # loads (the model named here does not exist).
    assert cli.main(["eval", "--mteb", "STS12", "SciFact", "-q", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "MTEB task STS12 not run: dataset mteb/sts12-sts is not in the local" in err
    assert "no MTEB task could run: the data of STS12, SciFact is not on this machine" in err
    assert "mteb.get_tasks(tasks=['STS12', 'SciFact'])" in err


def test_eval_mteb_runs_local_tasks(tiny_dir, tmp_path, empty_hf_cache, monkeypatch, capsys):
    """Tasks with local data run (here: built in the test, as mteb.get_task returns them) and
    the others are named; the scores go to --output."""
    real_get_task = mteb.get_task
    local = {"LocalSTS": LocalSTS, "LocalRetrieval": LocalRetrieval}
    monkeypatch.setattr(mteb, "get_task", lambda name, *a, **k: local[name]()
                        if name in local else real_get_task(name, *a, **k))  # fmt: skip
    out = tmp_path / "scores.json"
    code = cli.main(["eval", "--mteb", "LocalSTS", "LocalRetrieval", "STS12", "--model",
                     str(tiny_dir), "--device", "cpu", "--dtype", "float32", "-q",
                     "--output", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "| LocalSTS | STS | test | default | cosine_spearman |" in captured.out
    assert "| LocalRetrieval | Retrieval | test | default | ndcg_at_10 |" in captured.out
    assert "1 of 3 MTEB tasks not run, their data is not on this machine: STS12" in captured.err
    rows = json.loads(out.read_text())
    assert [r["task"] for r in rows] == ["LocalSTS", "LocalRetrieval"]
    direct = mteb.evaluate(L2VMtebEncoder(str(tiny_dir), device="cpu", dtype="float32"),
                           LocalSTS(), cache=None, show_progress_bar=False)  # fmt: skip
    assert rows[0]["value"] == pytest.approx(main_score(direct, "LocalSTS"), abs=1e-9)
