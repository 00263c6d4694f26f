"""`l2v train` output safety and the base-model check of a second adapter (tiny models, CPU):
a non-empty --output is refused unless --overwrite (or --resume), and --overwrite leaves only
the new run; a contrastive batch of one example (no negative) is refused; an adapter trained on
top of an -mntp model names it, and putting it on another base warns.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from tiny import make_tiny_checkpoint

from l2v_models.checkpoint.load import warn_if_other_base
from l2v_models.cli import main
from l2v_models.train import trainer as trainer_module
from l2v_models.train.data import DataError, Example
from l2v_models.train.trainer import TrainConfig, Trainer, load_for_training

WORDS = "the cat sat on a mat and dog was in text of passage which is for that".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train_output"), "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(sentences(24, 0)) + "\n")
    return path


@pytest.fixture(scope="module")
def triples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "triples.jsonl"
    rows = zip(sentences(8, 1), sentences(8, 2), strict=True)
    path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in rows))
    return path


@pytest.fixture
def loads(monkeypatch):
    """The model loads of `l2v train` (a list of their arguments) without stopping them."""
    calls = []
    real = trainer_module.load_for_training

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_for_training", counting)
    return calls


def log_steps(folder) -> list[int]:
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


# ------------------------------------------------------------------------------ --overwrite
def test_existing_output_is_refused_unless_overwrite(base, text_file, tmp_path, capsys, loads):
    out = tmp_path / "simcse"
    args = ["train", "simcse", "--model", str(base), "--data", str(text_file), "--output",
            str(out), "--steps", "2", "--batch-size", "4", "-q"]  # fmt: skip
    assert main(args) == 0 and log_steps(out) == [1, 2] and len(loads) == 1
    capsys.readouterr()
    first = (out / "adapter_model.safetensors").read_bytes()

    # Again into the same folder: refused before the model loads, the earlier run untouched.
    assert main([*args, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"l2v: error: --output {out} is not empty")
    assert "--overwrite" in err and len(loads) == 1
    assert log_steps(out) == [1, 2] and (out / "adapter_model.safetensors").read_bytes() == first

    # --overwrite: the old adapter files, log and summary go (a stale -mntp tokenizer too);
    # a file of the user's stays; the log then describes only the new run.
    (out / "tokenizer.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--steps", "3", "--seed", "1", "--overwrite"]) == 0
    assert "--overwrite: removed the earlier run" in capsys.readouterr().out
    assert log_steps(out) == [1, 2, 3]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert not (out / "tokenizer.json").exists() and (out / "notes.txt").read_text() == "mine"

    assert main([*args, "--overwrite", "--resume"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_output_with_checkpoints_names_resume_and_overwrite(base, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "simcse", "--model", str(base), "--data", str(text_file), "--output",
            str(out), "--steps", "2", "--batch-size", "4", "--save-every", "1", "-q"]  # fmt: skip
    assert main(args) == 0 and (out / "checkpoints").is_dir()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    assert log_steps(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


# ------------------------------------------------------------------------------ batch size
@pytest.mark.parametrize("stage", ["simcse", "supervised"])
def test_contrastive_batch_of_one_is_refused(base, text_file, triples_file, stage, tmp_path,
                                             capsys, loads):  # fmt: skip
    data = triples_file if stage == "supervised" else text_file
    out = tmp_path / stage
    args = ["train", stage, "--model", str(base), "--data", str(data), "--output", str(out),
            "--steps", "2", "-q"]  # fmt: skip
    assert main([*args, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"l2v: error: {stage}: the batch size must be at least 2, got 1 (contrastive "
                   "training compares each example with the others of its batch)\n")
    assert loads == [] and not out.exists()
    with pytest.raises(ValueError, match="at least 2"):
        TrainConfig(stage, batch_size=1).resolved()
    TrainConfig("mntp", batch_size=1).resolved()  # MNTP has no negatives: 1 is fine


def test_token_budget_of_one_example_is_refused(base):
    """--batch-tokens alone can still make a step of one example: refused, not trained at 0."""
    loaded = load_for_training(str(base), dtype=torch.float32, device="cpu")
    trainer = Trainer(loaded, TrainConfig("simcse", batch_tokens=8, max_length=16),
                      model_arg=str(base))  # fmt: skip
    (item, _), = trainer.encode(Example("x:1", text="the cat sat on the mat"))
    with pytest.raises(DataError, match="got 1 example, so no negative.*--batch-tokens"):
        trainer.collate([item])
    assert trainer.collate([item, item]).n == 2


# ------------------------------------------------------------------------------ stray brace
def test_supervised_data_errors_quote_the_fields_once(base, tmp_path, capsys):
    plain = tmp_path / "triples.txt"
    plain.write_text("a query\n")
    args = ["train", "supervised", "--model", str(base), "--output", str(tmp_path / "o"), "-q"]
    assert main([*args, "--data", str(plain)]) == 2
    err = capsys.readouterr().err
    assert '({"query", "positive", "negatives", "instruction"} per line)' in err and "}}" not in err
    loaded = load_for_training(str(base), dtype=torch.float32, device="cpu")
    trainer = Trainer(loaded, TrainConfig("supervised", batch_size=2), model_arg=str(base))
    with pytest.raises(DataError) as info:
        trainer.encode(Example("f:1", text="not a triple"))
    assert str(info.value) == ('f:1: supervised training reads {"query", "positive", "negatives", '
                               '"instruction"} objects')


# ------------------------------------------------------------------------------ base warning
def test_adapter_on_another_base_warns(base, text_file, tmp_path, capsys):
    """SimCSE trained on top of an MNTP folder names it as its base; encoding with that
    adapter on the bare base warns (the MNTP stage is missing), on the MNTP folder it does not."""
    mntp, simcse = tmp_path / "mntp", tmp_path / "simcse"
    common = ["--data", str(text_file), "--steps", "2", "--batch-size", "4", "-q"]
    assert main(["train", "mntp", "--model", str(base), "--output", str(mntp), *common]) == 0
    assert main(["train", "simcse", "--model", str(base), "--peft", str(mntp), "--output",
                 str(simcse), *common]) == 0  # fmt: skip
    config = json.loads((simcse / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(mntp.resolve())
    capsys.readouterr()

    encode = ["encode", "-q", "--device", "cpu", "--backend", "torch", "the cat", "a dog"]
    assert main([*encode, "--model", str(base), "--peft", str(simcse)]) == 0
    err = capsys.readouterr().err
    assert err == (f"l2v: warning: the adapter {simcse} was trained on top of the LLM2Vec -mntp "
                   f"model {mntp.resolve()} (its adapter_config.json's base_model_name_or_path), "
                   f"but {base} has no MNTP adapter: pass that -mntp model as the base (--model "
                   f"{mntp.resolve()})\n")
    assert main([*encode, "--model", str(mntp), "--peft", str(simcse)]) == 0
    assert capsys.readouterr().err == ""
    assert main([*encode, "--model", str(base), "--peft", str(mntp)]) == 0  # MNTP on its base
    assert capsys.readouterr().err == ""


MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
MISTRAL_MNTP = "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"
LLAMA3_MNTP = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"


@pytest.mark.parametrize("named, put_on, mntp_base, warns", [
    # McGill's pair: the -supervised adapter names the -mntp model it goes on.
    (MISTRAL_MNTP, MISTRAL_MNTP, MISTRAL, False),
    (MISTRAL_MNTP.lower(), MISTRAL_MNTP, MISTRAL, False),  # hub ids ignore case
    # A second adapter that names the bare model its -mntp base's adapter names (llm2vec
    # scripts; l2v adapters before it named the -mntp folder; the packaged default).
    (MISTRAL, MISTRAL_MNTP, MISTRAL, False),
    ("smollm2", "smollm2", None, False),  # an older l2v adapter on the bare base: can't tell
    # The MNTP stage is missing: an adapter for an -mntp model on a bare base.
    (MISTRAL_MNTP, MISTRAL, None, True),
    ("/somewhere/else/mntp", "smollm2", None, True),
    # Another model altogether (hub ids / packaged names on both sides).
    (LLAMA3_MNTP, MISTRAL_MNTP, MISTRAL, True),
    ("gemma3-270m", "smollm2", None, True),
    # A local path may be a copy of the named model: no warning.
    ("/models/Mistral-7B-Instruct-v0.2", MISTRAL, None, False),
    (MISTRAL, "/models/Mistral-7B-Instruct-v0.2", None, False),
    (None, "smollm2", None, False),  # the adapter names no base
])  # fmt: skip
def test_base_name_rule(named, put_on, mntp_base, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="l2v_models"):
        got = warn_if_other_base("ADAPTER", named, put_on, has_mntp=mntp_base is not None,
                                 mntp_bases=[mntp_base] if mntp_base else [])  # fmt: skip
    assert got == warns and len(caplog.records) == int(warns)
    if warns:
        assert "ADAPTER" in caplog.text and named in caplog.text


def test_the_default_pair_does_not_warn(caplog):
    """The packaged encoder's two adapters, as load_model pairs them."""
    from l2v_models.checkpoint import default_encoder_dirs, read_lora_adapter

    mntp, second = default_encoder_dirs()
    with caplog.at_level(logging.WARNING, logger="l2v_models"):
        warned = warn_if_other_base(
            str(second), read_lora_adapter(second).base_model_name_or_path, str(mntp),
            mntp_bases=[read_lora_adapter(mntp).base_model_name_or_path], has_mntp=True,
        )  # fmt: skip
    assert not warned and caplog.records == []
