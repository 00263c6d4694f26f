"""`l2v` command line: encode (arguments, text files, JSONL, .npy/.jsonl output), errors, info,
bench delegation. Run in-process through main(argv), plus one real `l2v encode` subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_checkpoint

from l2v_models import cli
from l2v_models.encoder import LLM2Vec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "llama"))


@pytest.fixture(scope="module")
def encoder(model_dir):
    return LLM2Vec.from_pretrained(model_dir, device="cpu")


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_encode_arguments_prints_similarity_table(model_dir, capsys):
    rc, out, _ = run(["encode", "-q", "--model", model_dir, "the cat sat", "a dog", "the mat"],
                     capsys)  # fmt: skip
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "[1] the cat sat" and "cosine similarity" in out
    row1 = lines[-3].split()
    assert row1[0] == "[1]" and row1[1] == "1.000" and len(row1) == 4


def test_encode_text_file_to_npy(model_dir, encoder, tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("the cat sat\n\n  \na dog is in the text\r\nthe mat\n")
    dst = tmp_path / "emb.npy"
    argv = ["encode", "-q", "--model", model_dir, "-i", str(src), "-o", str(dst),
            "--batch-tokens", "5"]  # fmt: skip
    # default: one row per line, a blank line is an empty text (with a warning)
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "encoded 5 texts" in out and str(dst) in out
    assert err.count("\n") == 1 and err.startswith("l2v: warning: 2 empty texts at sentences[1, 2]")
    emb = np.load(dst)
    assert emb.shape == (5, 96) and emb.dtype == np.float32
    lines = ["the cat sat", "", "", "a dog is in the text", "the mat"]
    ref = encoder.encode(lines, show_progress_bar=False)
    np.testing.assert_allclose(emb, ref.numpy(), rtol=1e-5, atol=1e-6)
    # --skip-blank: blank lines dropped, no warning
    rc, out, err = run([*argv, "--skip-blank"], capsys)
    assert rc == 0 and "encoded 3 texts" in out and err == ""
    np.testing.assert_allclose(np.load(dst), ref.numpy()[[0, 3, 4]], rtol=1e-5, atol=1e-6)


def test_one_text_is_singular_and_blank_lines_are_documented(model_dir, tmp_path, capsys):
    src = tmp_path / "one.txt"
    src.write_text("the cat sat\n")
    rc, out, _ = run(["encode", "-q", "--model", model_dir, "-i", str(src)], capsys)
    assert rc == 0 and out.startswith("encoded 1 text into [1, 96]"), out
    with pytest.raises(SystemExit):
        cli.main(["encode", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--skip-blank" in help_text and "a blank line being an empty text" in help_text


def test_non_utf8_input_names_the_file_and_line(model_dir, tmp_path, capsys):
    for name in ("latin1.txt", "latin1.jsonl"):
        src = tmp_path / name
        src.write_bytes(b'"ok"\n"caf\xe9"\n' if name.endswith("jsonl") else b"ok\ncaf\xe9\n")
        rc, out, err = run(["encode", "-q", "--model", model_dir, "-i", str(src)], capsys)
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert f"l2v: error: {src}:2: not UTF-8 text (byte 0xe9 at column" in err


def test_stdin_lines(model_dir, encoder, monkeypatch, capsys):
    import io

    stdin = io.TextIOWrapper(io.BytesIO("\ufeffthe cat\n\na dog\n".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    dst = Path(os.environ.get("TMPDIR", "/tmp")) / f"l2v-stdin-{os.getpid()}.npy"
    try:
        rc, _, _ = run(["encode", "-q", "--model", model_dir, "-i", "-", "-o", str(dst)], capsys)
        assert rc == 0
        ref = encoder.encode(["the cat", "", "a dog"], show_progress_bar=False)
        np.testing.assert_allclose(np.load(dst), ref.numpy(), rtol=1e-5, atol=1e-6)
    finally:
        dst.unlink(missing_ok=True)


def test_lone_surrogate_in_jsonl_names_the_item(model_dir, tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    rc, _, err = run(["encode", "-q", "--model", model_dir, "-i", str(src)], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "sentences[1]" in err and "U+D800" in err and "Traceback" not in err


def test_encode_jsonl_to_jsonl_with_instructions(model_dir, encoder, tmp_path, capsys):
    src = tmp_path / "items.jsonl"
    src.write_text(
        '{"text": "the cat sat", "instruction": "Retrieve the passage"}\n'
        '{"text": "a dog"}\n\n"the mat"\n'
    )
    dst = tmp_path / "emb.jsonl"
    rc, _, _ = run(["encode", "-q", "--model", model_dir, "-i", str(src), "-o", str(dst),
                    "--instruction", "query:", "--normalize"], capsys)  # fmt: skip
    assert rc == 0
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["text"] for r in records] == ["the cat sat", "a dog", "the mat"]
    assert [r.get("instruction") for r in records] == ["Retrieve the passage", "query:", "query:"]
    got = np.array([r["embedding"] for r in records], dtype=np.float32)
    ref = encoder.encode([["Retrieve the passage", "the cat sat"], ["query:", "a dog"],
                          ["query:", "the mat"]], show_progress_bar=False,
                         normalize_embeddings=True)  # fmt: skip
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_many_arguments_print_a_summary(model_dir, capsys):
    texts = [f"text {i}" for i in range(9)]
    rc, out, _ = run(["encode", "-q", "--model", model_dir, "--pooling", "last_token", *texts],
                     capsys)  # fmt: skip
    assert rc == 0 and out.startswith("encoded 9 texts into [9, 96]") and "--output" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-i", "/nonexistent/texts.txt"], "input file not found: /nonexistent/texts.txt"),
        (["-i", "{bad}"], ":2: invalid JSON"),
        (["-i", "{missing}"], ':1: expected an object with a string "text" field'),
        (["-o", "out.csv", "x"], "--output must end in .npy or .jsonl"),
        (["-o", "/nonexistent/dir/out.npy", "x"], "output directory /nonexistent/dir"),
        ([], "no texts"),
        (["--dtype", "float64", "x"], "invalid dtype"),
        (["--device", "tpu", "x"], "device"),
        (["--batch-tokens", "0", "x"], "max_tokens_per_batch"),
    ],
)
def test_encode_errors_are_one_line(model_dir, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"txt": "no text field"}\n')
    argv = [a.replace("{bad}", str(bad)).replace("{missing}", str(missing)) for a in argv]
    rc, out, err = run(["encode", "-q", "--model", model_dir, *argv], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("l2v: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_unknown_model_path(capsys):
    rc, _, err = run(["encode", "--model", "/nonexistent/model", "x"], capsys)
    assert rc == 2 and "/nonexistent/model" in err and err.count("\n") == 1


def test_default_model_needs_a_recent_transformers(monkeypatch, capsys):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.44.2")
    rc, _, err = run(["encode", "x"], capsys)
    assert rc == 2 and "needs transformers >=" in err and "4.44.2" in err


def test_info(capsys):
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    assert "torch" in out and "transformers" in out and "C++/CUDA extension" in out
    assert ("cuda:0" in out) == torch.cuda.is_available()


def test_the_package_never_imports_bench_or_tests():
    """No back-arrow: `l2v bench` is gone (run bench/ from the checkout), and no module of the
    package imports bench/ or tests/ or puts the repository on sys.path."""
    import re

    root = Path(__file__).resolve().parent.parent
    bad = re.compile(r"^\s*(from|import)\s+(bench|tests)\b|sys\.path\.(insert|append)", re.M)
    for package in ("l2v_models", "l2v_kernels"):
        for path in (root / package).rglob("*.py"):
            found = bad.search(path.read_text())
            assert found is None, f"{path.relative_to(root)}: {found.group(0)!r}"
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a command
        cli.main(["bench"])
    assert exit_info.value.code == 2


def test_l2v_encode_subprocess(model_dir):
    exe = Path(sys.executable).parent / "l2v"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "l2v_models.cli"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [*cmd, "encode", "--model", model_dir, "--device", "cpu", "the cat sat", "a dog"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["[1] the cat sat", "[2] a dog"]
    assert "Batches" in proc.stderr  # the progress bar goes to stderr


# ------------------------------------------------------------------ load errors: one line
def _damaged_models(tmp_path, model_dir):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(model_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"x": torch.ones(2), "p": Payload()}, evil / "pytorch_model.bin")
    bad_json = tmp_path / "bad-json"
    shutil.copytree(model_dir, bad_json)
    (bad_json / "config.json").write_text('{"model_type": ')
    return [
        (cut, str(cut / "model.safetensors"), "not a readable safetensors file"),
        (evil, str(evil / "pytorch_model.bin"), "refused"),
        (bad_json, str(bad_json / "config.json"), "not valid JSON"),
    ]


def test_load_errors_are_one_line_naming_the_file(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("L2V_DEBUG", raising=False)
    for path, file, message in _damaged_models(tmp_path, model_dir):
        rc, out, err = run(["encode", "-q", "--model", str(path), "x"], capsys)
        assert rc == 2 and out == "", err
        assert err.startswith("l2v: error: ") and err.count("\n") == 1, err
        assert file in err and message in err, err
        assert "Traceback" not in err and "weights_only" not in err and "\x1b" not in err


def test_debug_shows_the_traceback(model_dir, tmp_path, capsys, monkeypatch):
    from l2v_models.checkpoint import CheckpointError

    monkeypatch.delenv("L2V_DEBUG", raising=False)
    path = _damaged_models(tmp_path, model_dir)[0][0]
    for argv in (["--debug", "encode", "--model", str(path), "x"],
                 ["encode", "--debug", "--model", str(path), "x"]):  # fmt: skip
        with pytest.raises(CheckpointError):
            cli.main(argv)
    monkeypatch.setenv("L2V_DEBUG", "1")
    with pytest.raises(CheckpointError):
        cli.main(["encode", "--model", str(path), "x"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_unexpected_errors_are_one_line_too(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("L2V_DEBUG", raising=False)

    def boom(args):
        raise KeyError("some_key")

    from l2v_models import info_cli

    monkeypatch.setattr(info_cli, "cmd_info", boom)
    rc, out, err = run(["info"], capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("l2v: error: internal error (KeyError") and "--debug" in err


# ------------------------------------------------------------------ set-up noise (./run.sh)
ROOT = Path(__file__).resolve().parent.parent


def test_run_sh_help_prints_the_usage_only():
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), "help"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == ""
    assert "./run.sh encode" in proc.stdout and "./run.sh test" in proc.stdout
    assert "set -euo" not in proc.stdout and "#" not in proc.stdout.splitlines()[0]


def test_run_sh_installs_numpy_before_the_build():
    """setup.py imports torch, which warns "Failed to initialize NumPy" without numpy."""
    lines = (ROOT / "run.sh").read_text().splitlines()
    build = next(i for i, line in enumerate(lines) if "--no-build-isolation -e" in line)
    numpy = [i for i, line in enumerate(lines) if re.search(r"pip install[^#]*\bnumpy\b", line)]
    assert numpy and min(numpy) < build


def test_pyproject_license_is_an_spdx_string():
    """A TOML-table license makes setuptools print a deprecation warning at every install."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', text, re.M), "license must be an SPDX string"


# ------------------------------------------------------------------ sentence-transformers models
@pytest.fixture(scope="module")
def st_model_dir(tmp_path_factory):
    from st_folders import make_st_folder

    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    return str(make_st_folder(tmp_path_factory.mktemp("cli-st"), "gemma3", dense=[(96, 48)],
                              normalize=True, prompts=prompts,
                              config={"use_bidirectional_attention": True}))  # fmt: skip


def test_encode_a_sentence_transformers_folder_with_prompts_and_truncate_dim(
    st_model_dir, tmp_path, capsys
):
    from st_folders import st_encode

    texts = ["the cat sat", "a dog"]
    dst = tmp_path / "q.npy"
    rc, out, err = run(["encode", "-q", "--model", st_model_dir, "--prompt-name", "query",
                        "--truncate-dim", "16", "-o", str(dst), *texts], capsys)  # fmt: skip
    assert rc == 0, err
    got = torch.from_numpy(np.load(dst)).double()
    want = st_encode(st_model_dir, texts, prompt_name="query", truncate_dim=16,
                     normalize_embeddings=True)  # fmt: skip
    assert got.shape == (2, 16)
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999
    rc, _, err = run(["encode", "-q", "--model", st_model_dir, "--prompt-name", "search", "x"],
                     capsys)  # fmt: skip
    last = err.splitlines()[-1]  # (sentence-transformers' own progress bars come before)
    assert rc == 2 and last.startswith("l2v: error: unknown prompt name 'search'")
    assert "'query', 'document'" in last
    rc, _, err = run(["encode", "-q", "--model", st_model_dir, "--truncate-dim", "49", "x"],
                     capsys)  # fmt: skip
    assert rc == 2 and "larger than the model's embedding dimension 48" in err
    rc, _, err = run(["encode", "-q", "--model", st_model_dir, "--pooling", "mean", "x"], capsys)
    assert rc == 2 and "pooling_mode is a setting of llm2vec models" in err


def test_info_model_says_what_a_model_runs_with(st_model_dir, model_dir, capsys):
    rc, out, err = run(["info", "--model", st_model_dir], capsys)
    assert rc == 0, err
    rows = dict(line.split(None, 1) if "  " not in line else
                [s.strip() for s in line.split("  ", 1)] for line in out.splitlines())
    assert rows["attention"].startswith("bidirectional (config)")
    assert rows["text rules"].startswith("sentence-transformers")
    assert rows["pooling"] == "mean" and rows["dimension"] == "48 (normalized)"
    assert "Dense(96->48, identity) -> Normalize" in rows["modules"]
    assert "query='task: search result | query: '" in rows["prompts"]
    rc, out, _ = run(["info", "--model", model_dir], capsys)
    assert rc == 0 and "llm2vec" in out and "bidirectional (llm2vec)" in out
