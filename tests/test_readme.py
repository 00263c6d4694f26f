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
