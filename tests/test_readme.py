"""The README's Python examples marked `<!-- test: offline -->` run as written.

A marked block is the ```python fence that follows the marker line. Each runs in a fresh Python
process from the repository root (as a user pastes it into a file), with the embedded default
model and nothing from the network; the test fails on an exception or a failed assert in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import skip_unless_gguf_readable

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- test: offline -->"


def offline_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block right after a MARKER line (blank lines
    between them allowed). ValueError for a marker not followed by a python block."""
    lines = markdown.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise ValueError(f"README.md:{i + 1}: {MARKER} is not followed by a ```python block")
        end = next((k for k in range(j + 1, len(lines)) if lines[k].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{j + 1}: unterminated ```python block")
        blocks.append((j + 2, "\n".join(lines[j + 1 : end]) + "\n"))
    return blocks


def test_offline_blocks_are_found():
    text = "a\n<!-- test: offline -->\n\n```python\nx = 1\n```\n```python\nnot = marked\n```\n"
    assert offline_blocks(text) == [(5, "x = 1\n")]
    with pytest.raises(ValueError, match="not followed"):
        offline_blocks("<!-- test: offline -->\ntext\n```python\nx\n```\n")
    blocks = offline_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2  # the CPU example and the llm2vec-methods example
    assert any("LLM2Vec.from_pretrained()" in code for _, code in blocks)


@pytest.mark.slow
def test_readme_offline_examples_run(tmp_path):
    skip_unless_gguf_readable()
    blocks = offline_blocks((ROOT / "README.md").read_text())
    assert blocks, f"README.md has no {MARKER} block"
    scripts = []
    for lineno, code in blocks:
        script = tmp_path / f"README_line_{lineno}.py"
        script.write_text(code)
        scripts.append(str(script))
    # One process runs every block, each as its own script (runpy: a fresh namespace), from the
    # repository root; a failing block's traceback names its README line.
    driver = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    print(f'=== {path}', flush=True)\n"
        "    runpy.run_path(path, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env["HF_HUB_OFFLINE"] = "1"  # nothing may come from the network
    proc = subprocess.run(
        [sys.executable, "-c", driver, *scripts], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    outputs = proc.stdout.split("=== ")[1:]
    assert len(outputs) == len(blocks)
    for (lineno, code), out in zip(blocks, outputs, strict=True):
        # A documented output (`print(...)  # torch.Size([...]) ...`) is what the block prints.
        for shown in re.findall(r"print\(.*\)\s+#\s+(torch\.Size\(.*)$", code, re.M):
            assert shown.strip() in out, (lineno, shown, out)


# ------------------------------------------------------------------ documented outputs
def _fenced_blocks(markdown: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number of the opening fence) of every ``` block."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            blocks.append((lines[i][3:].strip(), "\n".join(lines[i + 1 : end]), i + 1))
            i = end
        i += 1
    return blocks


def test_it_prints_block_is_what_encode_prints():
    """The block after "It prints" is `l2v encode`'s output for the texts of the command above
    it: cli.similarity_table of embeddings with the block's own cosines (the numbers come from
    a real run; the layout, numbered texts first, from the code)."""
    import shlex

    import numpy as np

    from l2v_models.encode_cli import similarity_table

    text = (ROOT / "README.md").read_text()
    blocks = _fenced_blocks(text)
    at = next(i for i, (_, _, line) in enumerate(blocks)
              if text.splitlines()[line - 3].startswith("It prints"))  # fmt: skip
    command = next(line for line in blocks[at - 1][1].splitlines()
                   if line.startswith("./run.sh encode"))  # fmt: skip
    texts = shlex.split(command)[2:]
    shown = blocks[at][1]
    rows = [line.split()[1:] for line in shown.splitlines() if re.match(r"\[\d+\]\s+-?\d", line)]
    sim = np.array(rows, dtype=np.float64)
    assert sim.shape == (len(texts), len(texts))
    emb = np.linalg.cholesky(sim)  # rows with exactly these cosines (unit norm: diagonal 1)
    assert similarity_table(texts, emb) == shown


@pytest.mark.slow
def test_client_example_token_count():
    """The serving section's OpenAI client example prints (texts, dimension, prompt tokens):
    the server counts the tokens of the texts as the encoder prepares them with the instruction
    (tests/test_serve.py checks usage against prepare_texts)."""
    import ast

    skip_unless_gguf_readable()
    from l2v_models import LLM2Vec

    code = next(code for info, code, _ in _fenced_blocks((ROOT / "README.md").read_text())
                if info == "python" and "client.embeddings.create" in code)  # fmt: skip
    call = next(node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
                and ast.unparse(node.func) == "client.embeddings.create")  # fmt: skip
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "model"}
    texts, instruction = kwargs["input"], kwargs["extra_body"]["instruction"]
    shown = re.search(r"prompt_tokens\)\s+#\s+(\d+) (\d+) (\d+)$", code, re.M)
    assert shown, "the example's printed numbers are missing"
    encoder = LLM2Vec.from_pretrained(device_map="cpu")
    tokens = int(encoder.prepare_texts([[instruction, t] for t in texts]).lengths.sum())
    dimension = encoder.encode(texts[:1], show_progress_bar=False).shape[1]
    assert [int(n) for n in shown.groups()] == [len(texts), dimension, tokens]
