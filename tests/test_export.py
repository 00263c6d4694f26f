"""`l2v export`: an LLM2Vec model written as a sentence-transformers folder.

The folder is loaded by sentence-transformers itself (SentenceTransformer(folder), installed
6.x on transformers 5.x) and by l2v, and compared with l2v's embeddings of the original model
(fp32, CPU, cosine >= 0.99999) for tiny random Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma-3
models with LLM2Vec adapters and for the default model, with and without prompts. Where
llm2vec's rules cannot be written in that format (a chat template's suffix, weighted_mean,
eos_token's suffix, llm2vec's token count of an instruction's text), the exporter's own
measurement must say so, and must agree with what sentence-transformers gives.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import skip_unless_gguf_readable
from st_folders import make_st_folder
from tiny import make_lora_adapter, make_tiny_checkpoint

from l2v_models import cli
from l2v_models.embedder import Embedder
from l2v_models.encoder import LLM2Vec
from l2v_models.export import (
    EXPORT_FILE,
    JOIN,
    NO_INSTRUCTION,
    PROBE_TEXTS,
    ExportError,
    export_sentence_transformers,
)

pytest.importorskip("sentence_transformers")
COS = 0.99999
INSTRUCTION = "Retrieve the passage that answers the question"
TEXTS = ["the cat sat on the mat", "a dog", "query: which text is the passage?",
         "the mat " * 20 + "and that is all", "Z"]  # fmt: skip


def cosines(a, b) -> torch.Tensor:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def llm2vec_dirs(tmp_path, arch: str, **config):
    """A tiny LLM2Vec model: (-mntp folder with its adapter, a second adapter)."""
    base = make_tiny_checkpoint(tmp_path, arch, **config)
    mntp = make_lora_adapter(tmp_path, base, mntp=True, seed=1)
    second = make_lora_adapter(tmp_path, base, seed=2)
    return mntp, second


def load(mntp, second=None, **kwargs) -> LLM2Vec:
    return LLM2Vec.from_pretrained(str(mntp), str(second) if second else None, device_map="cpu",
                                   torch_dtype=torch.float32, **kwargs)  # fmt: skip


# ------------------------------------------------------------------------------ families
@pytest.mark.parametrize(
    "arch, attention, key",
    [("llama", None, ("is_causal", False)), ("mistral", None, ("is_causal", False)),
     ("qwen2", None, None), ("qwen2", "bidirectional", ("is_causal", False)),
     ("qwen3", None, ("is_causal", False)), ("gemma", None, ("is_causal", False)),
     ("gemma3", None, ("use_bidirectional_attention", True))],
)  # fmt: skip
def test_export_gives_l2v_embeddings_in_sentence_transformers(tmp_path, arch, attention, key):
    """SentenceTransformer(folder) and l2v on the folder give the original model's embeddings,
    with and without the instruction prompt; config.json says how the model attends (Qwen2 as
    llm2vec runs it: causal, so nothing; made bidirectional: is_causal false)."""
    mntp, second = llm2vec_dirs(tmp_path, arch)
    enc = load(mntp, second, attention=attention)
    out = tmp_path / "exported"
    report = export_sentence_transformers(enc, out, prompts={"query": INSTRUCTION},
                                          normalize=True)  # fmt: skip
    assert report.exact, report.lines()
    cfg = json.loads((out / "config.json").read_text())
    written = {k: cfg[k] for k in ("is_causal", "use_bidirectional_attention") if k in cfg}
    assert written == (dict([key]) if key else {})

    docs = enc.encode(TEXTS, show_progress_bar=False)
    queries = enc.encode([[INSTRUCTION, t] for t in TEXTS], show_progress_bar=False)
    model = sentence_transformer(out)
    for got, want in [(model.encode(TEXTS), docs), (model.encode_document(TEXTS), docs),
                      (model.encode(TEXTS, prompt_name="document"), docs),
                      (model.encode_query(TEXTS), queries),
                      (model.encode(TEXTS, prompt_name="query"), queries)]:  # fmt: skip
        assert cosines(got, want).min() >= COS
    unit = model.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(unit.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)  # Normalize

    back = Embedder.from_pretrained(str(out), device="cpu", dtype="float32")
    assert cosines(back.encode(TEXTS, show_progress_bar=False), docs).min() >= COS
    assert cosines(back.encode_query(TEXTS, show_progress_bar=False), queries).min() >= COS
    assert back.normalizes


def test_gemma2_bidirectional_is_refused(tmp_path):
    """transformers' Gemma-2 with is_causal false attends its local layers otherwise than l2v
    (measured: cosine 0.987 on a tiny model), so the exporter refuses rather than write it."""
    enc = load(make_tiny_checkpoint(tmp_path, "gemma2"))
    with pytest.raises(ExportError, match="bidirectional gemma2 model cannot be exported"):
        export_sentence_transformers(enc, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------ rules
@pytest.mark.parametrize(
    "pooling, name_or_path",
    [("mean", None), ("last_token", None), ("bos_token", None), ("weighted_mean", None),
     ("eos_token", None), ("mean", "mistralai/Mistral-7B-Instruct-v0.2")],
)  # fmt: skip
def test_measured_difference_is_what_sentence_transformers_gives(tmp_path, pooling,
                                                                 name_or_path):  # fmt: skip
    """For every pooling mode and a chat template, the exporter's report (exact or not, and
    its cosines) is what SentenceTransformer(folder) gives against the original model."""
    base = make_tiny_checkpoint(tmp_path, "llama", name_or_path=name_or_path)
    enc = load(base, pooling_mode=pooling)
    report = export_sentence_transformers(enc, tmp_path / "out", prompts={"query": INSTRUCTION})
    model = sentence_transformer(tmp_path / "out")
    assert len(report.checks) == 2
    for check in report.checks:
        instruction = check.instruction
        want = enc.encode([[instruction, t] if instruction else t for t in PROBE_TEXTS],
                          show_progress_bar=False)  # fmt: skip
        got = model.encode(list(PROBE_TEXTS), prompt_name=check.name)
        cos = cosines(got, want)
        assert check.exact == bool(cos.min() >= COS), (check, cos)
        assert abs(float(cos.min()) - check.min_cosine) < 1e-4
        assert abs(float(cos.mean()) - check.mean_cosine) < 1e-4
    expected_exact = pooling in ("mean", "last_token", "bos_token") and name_or_path is None
    assert report.exact == expected_exact, report.lines()


def test_inexact_export_warns_and_strict_refuses(tmp_path, caplog):
    """A chat template's suffix cannot be written: the export warns with the measured cosines;
    with strict it refuses and leaves nothing behind."""
    base = make_tiny_checkpoint(tmp_path, "llama", name_or_path="meta-llama/Llama-2-7b-chat-hf")
    enc = load(base)
    with caplog.at_level(logging.WARNING, logger="l2v_models.export"):
        report = export_sentence_transformers(enc, tmp_path / "loose")
    assert not report.exact
    assert any("[/INST]" in n for n in report.notes)
    warned = [r.getMessage() for r in caplog.records if r.name == "l2v_models.export"]
    assert warned and "differs from l2v's embeddings" in warned[0] and "cosine min" in warned[0]
    saved = json.loads((tmp_path / "loose" / EXPORT_FILE).read_text())
    assert saved["exact"] is False and saved["checks"][0]["min_cosine"] < COS

    with pytest.raises(ExportError, match="would not give l2v's embeddings exactly.*nothing was"):
        export_sentence_transformers(enc, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".strict")] == []


def test_exported_tokenizer_marks(tmp_path):
    """The two marks: U+FDD0 is deleted (the BOS stays first and is no special token), U+FDD1 is
    a space before a text and nothing at the end; every other text keeps its ids."""
    from transformers import AutoTokenizer

    enc = load(make_tiny_checkpoint(tmp_path, "llama"))
    export_sentence_transformers(enc, tmp_path / "out", prompts={"q": INSTRUCTION})
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    prompts = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert prompts["prompts"]["document"] == NO_INSTRUCTION
    assert prompts["default_prompt_name"] == "document"
    bos = enc.tokenizer.bos_token_id
    assert tok(NO_INSTRUCTION)["input_ids"] == [bos] and bos not in tok.all_special_ids
    for text in TEXTS + list(PROBE_TEXTS):
        assert tok(text)["input_ids"] == enc.tokenizer(text)["input_ids"]
        assert tok(NO_INSTRUCTION + text)["input_ids"] == enc.tokenizer(text)["input_ids"]
    # The tiny WordPiece tokenizer drops spaces, so the instruction keeps llm2vec's plain space.
    assert prompts["prompts"]["q"] == INSTRUCTION + " "


@pytest.mark.parametrize("skip_instruction", [True, False])
def test_no_marks_where_the_prompt_is_pooled(tmp_path, skip_instruction):
    """Without skip_instruction llm2vec pools every token, the BOS included: the folder pools the
    prompt too and its tokenizer is left as it was."""
    enc = load(make_tiny_checkpoint(tmp_path, "llama"), skip_instruction=skip_instruction)
    report = export_sentence_transformers(enc, tmp_path / "out", prompts={"q": INSTRUCTION})
    assert report.exact
    pooling = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is (not skip_instruction)
    assert ("document" in report.prompts) is skip_instruction


# ------------------------------------------------------------------------------ the default model
@pytest.fixture(scope="module")
def default_encoder():
    skip_unless_gguf_readable()
    return LLM2Vec.from_pretrained(device_map="cpu", torch_dtype=torch.float32)


@pytest.mark.slow
def test_default_model_export(tmp_path, default_encoder):
    """The default smollm2-llm2vec (byte-level BPE, a BOS that llm2vec does not pool): exact
    without an instruction; with one, both marks are used, and sentence-transformers, l2v on
    the folder and the exporter's measurement agree."""
    enc = default_encoder
    out = tmp_path / "smollm2-st"
    report = export_sentence_transformers(enc, out, prompts={"query": INSTRUCTION})
    st_prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert st_prompts["query"] == INSTRUCTION + JOIN
    assert st_prompts["document"] == NO_INSTRUCTION
    texts = list(PROBE_TEXTS) + ["cat", "Stock", "abdomen", "The kitten purred."]
    model = sentence_transformer(out)
    back = Embedder.from_pretrained(str(out), device="cpu", dtype="float32")

    docs = enc.encode(texts, show_progress_bar=False)
    assert report.checks[0].exact
    assert cosines(model.encode(texts), docs).min() >= COS
    assert cosines(model.encode_document(texts), docs).min() >= COS
    assert cosines(back.encode(texts, show_progress_bar=False), docs).min() >= COS

    st_q = model.encode(texts, prompt_name="query")
    assert cosines(back.encode(texts, prompt_name="query", show_progress_bar=False),
                   st_q).min() >= COS  # fmt: skip
    queries = enc.encode([[INSTRUCTION, t] for t in texts], show_progress_bar=False)
    cos = cosines(st_q, queries)
    # The instruction's space is counted as llm2vec splits the sequence: every probe text whose
    # first word tokenizes alike alone and after a space is exact.
    assert cos[: len(PROBE_TEXTS)].min() >= COS and report.checks[1].exact
    assert cos.mean() > 0.95


# ------------------------------------------------------------------------------ bad input
def test_output_folder_is_never_overwritten_without_force(tmp_path):
    enc = load(make_tiny_checkpoint(tmp_path, "llama"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty; pass --force"):
        export_sentence_transformers(enc, taken)
    with pytest.raises(ExportError, match="not an earlier export.*--force will not replace"):
        export_sentence_transformers(enc, taken, force=True)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_sentence_transformers(enc, tmp_path / "file", force=True)

    out = tmp_path / "out"
    export_sentence_transformers(enc, out, prompts={"a": INSTRUCTION})
    with pytest.raises(ExportError, match="pass --force"):
        export_sentence_transformers(enc, out, prompts={"b": INSTRUCTION})
    assert "a" in json.loads((out / EXPORT_FILE).read_text())["prompts"]
    export_sentence_transformers(enc, out, prompts={"b": INSTRUCTION}, force=True)
    prompts = json.loads((out / EXPORT_FILE).read_text())["prompts"]
    assert "b" in prompts and "a" not in prompts
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_prompts_and_sources_are_refused(tmp_path):
    enc = load(make_tiny_checkpoint(tmp_path, "llama"))
    with pytest.raises(ExportError, match="the instruction is empty"):
        export_sentence_transformers(enc, tmp_path / "a", prompts={"q": "  "})
    with pytest.raises(ExportError, match="default prompt 'x' is not one of the prompts"):
        export_sentence_transformers(enc, tmp_path / "b", default_prompt_name="x")
    folder = make_st_folder(tmp_path, "llama")
    st_model = LLM2Vec.from_pretrained(str(folder), device_map="cpu")
    with pytest.raises(ExportError, match="already a sentence-transformers folder"):
        export_sentence_transformers(st_model, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_cli_export(tmp_path, capsys):
    """`l2v export`: adapters merged, named prompts and LLM2Vec's MTEB instructions written,
    the summary printed; an existing folder is refused before the model loads."""
    mntp, second = llm2vec_dirs(tmp_path, "llama")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\n\na query text\n")
    out = tmp_path / "exported"
    code = cli.main(["export", "--model", str(mntp), "--peft", str(second), "--output", str(out),
                     "--device", "cpu", "--dtype", "float32", "--prompt", f"query={INSTRUCTION}",
                     "--mteb-prompts", "--check-texts", str(texts), "--normalize", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "check: no prompt: exact: 18/18 texts with identical tokens" in captured.out
    assert "prompts: query, " in captured.out
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["SciFact-query"].startswith("Given a scientific claim")
    assert prompts["STS"] == "Retrieve semantically similar text: "
    model = sentence_transformer(out)
    want = load(mntp, second).encode([["Retrieve semantically similar text:", t]
                                      for t in TEXTS], show_progress_bar=False)  # fmt: skip
    assert cosines(model.encode(TEXTS, prompt_name="STS"), want).min() >= COS

    assert cli.main(["export", "--model", "/nonexistent", "--output", str(out)]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert cli.main(["export", "--output", str(tmp_path / "x"), "--prompt", "noequals"]) == 2
    assert "--prompt takes NAME=INSTRUCTION" in capsys.readouterr().err
