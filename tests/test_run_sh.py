"""./run.sh runs from any folder: set-up happens in the checkout, the `l2v` command in the
caller's folder (relative -i / -o / --output / globs mean what they mean there), `test` in the
checkout; a relative L2V_VENV is taken from the caller's folder.

Nothing is installed: L2V_VENV points at a fake virtual environment whose `bin/python` only
echoes its working directory and arguments (so run.sh's set-up steps run, do nothing and write
the set-up key) and whose `bin/l2v` prints its working directory and arguments.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "run.sh"

FAKE_PYTHON = '#!/bin/sh\necho "fake python in $(pwd): $*"\n'
FAKE_L2V = '#!/bin/sh\necho "cwd=$(pwd)"\nfor a in "$@"; do echo "arg=$a"; done\n'


def fake_venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("l2v", FAKE_L2V)):
        script = path / "bin" / name
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def run_sh(args, cwd: Path, venv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "L2V_TEST_WORKERS"}
    env = dict(base, L2V_VENV=venv, L2V_WORDNET_DIR="/nonexistent", **(env or {}))  # no apt-get
    return subprocess.run(["bash", str(RUN_SH), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def lines_of(proc: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in proc.stdout.splitlines()
            if line.startswith(prefix)]  # fmt: skip


def test_l2v_runs_in_the_callers_folder(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    had_venv = (ROOT / ".venv").exists()
    argv = ["encode", "-i", "texts.txt", "-o", "emb/out.npy"]
    proc = run_sh(argv, work, str(venv))
    assert proc.returncode == 0, proc.stderr
    # First run: the set-up ran (in the checkout) and wrote its key into the venv.
    assert f"fake python in {ROOT}: -m pip" in proc.stderr  # pip output goes to stderr
    assert (venv / ".l2v-setup").is_file()
    assert lines_of(proc, "cwd=") == [str(work)]
    assert lines_of(proc, "arg=") == argv  # passed through untouched
    assert (ROOT / ".venv").exists() == had_venv  # L2V_VENV given: nothing made in the checkout
    # Second run: the key matches, so no set-up; the command still runs where it was called.
    again = run_sh(["train", "mntp", "--data", "*.txt", "--output", "out"], work, str(venv))
    assert again.returncode == 0, again.stderr
    assert "fake python" not in again.stdout + again.stderr
    assert lines_of(again, "cwd=") == [str(work)]
    assert lines_of(again, "arg=") == ["train", "mntp", "--data", "*.txt", "--output", "out"]


def test_relative_l2v_venv_is_taken_from_the_callers_folder(tmp_path):
    fake_venv(tmp_path / "envs" / "l2v")
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    proc = run_sh(["info"], work, "../../envs/l2v")
    assert proc.returncode == 0, proc.stderr
    assert lines_of(proc, "cwd=") == [str(work)] and lines_of(proc, "arg=") == ["info"]
    assert (tmp_path / "envs" / "l2v" / ".l2v-setup").is_file()


def test_test_command_runs_in_the_checkout(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    proc = run_sh(["test", "-k", "nothing"], tmp_path, str(venv))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"fake python in {ROOT}: -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup "
        "-k nothing tests bench"
    )
    proc = run_sh(["test", "-k", "nothing"], tmp_path, str(venv), env={"L2V_TEST_WORKERS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"fake python in {ROOT}: -m pytest -q -p no:cacheprovider -k nothing tests bench"
    )
