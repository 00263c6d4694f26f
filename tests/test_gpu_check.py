"""bench/gpu_check.sh on the CPU: a dry run with a fake `python` that sleeps and writes files.

The fake stands in for every Python command the script runs (the build, pytest, bench.e2e, the
kernel benchmarks, bench.plots). At the start of each step it records what the output folder holds
at that moment, so the tests prove: the order of the steps; that after every step the folder
holds that step's results (inside results.tar.gz, with SUMMARY.md and the log beside it); the
device tool's 8-file limit; that a kill (SIGKILL of the whole process group, as at a time limit)
during any step leaves every earlier step's files; the time caps and their scaling with --budget;
--only / --tests / --case. Plus the real --case filter on a CPU smoke benchmark and setup.py's
nvcc look-up and L2V_REQUIRE_EXTENSION.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["build", "model", "e2e-mistral", "tests", "tests-compile", "kernel-attention",
         "kernel-gemm", "e2e-smollm2", "serve", "summary"]  # fmt: skip
# Files each step leaves in the results folder (what a kill must not lose once the step ended).
STEP_FILES = {
    "build": [],
    "model": ["pytest_model.txt"],
    "e2e-mistral": ["e2e_mistral-7b.json", "e2e_mistral-7b.md"],
    "tests": ["pytest_tests.txt"],
    "tests-compile": ["pytest_tests-compile.txt"],
    "kernel-attention": ["attention.json", "attention.md"],
    "kernel-gemm": ["gemm.json", "gemm.md"],
    "e2e-smollm2": ["e2e_smollm2-135m.json", "e2e_smollm2-135m.md"],
    "serve": ["serve_mistral-7b.json", "serve_mistral-7b.md"],
    "summary": ["e2e.md", "e2e_throughput.png", "attention_tflops.png"],
}

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Fake python for the gpu_check.sh dry run: FAKE_DIR gets calls.log and, per step, what $OUT
# held when the step started (seen_<step>.txt: archive members; ls_<step>.txt: the folder).
log() { echo "$*" >> "$FAKE_DIR/calls.log"; }
arg() {
  local want=$1; shift
  while (( $# )); do [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done
}
step="" out=""
case "$1" in
  -) cat > /dev/null; echo "torch 0.0+fake (CUDA 0.0), triton fake, device FAKE GPU"; exit 0 ;;
  setup.py) step=build ;;
  -c)
    case "$2" in
      *get_device_capability*) echo 90; exit 0 ;;
      "import torch, l2v_kernels._C"*)  # FAKE_EXT_RC: no extension until the build step
        log "ext-import"; [ -e "$FAKE_DIR/running_build" ] && exit 0; exit "${FAKE_EXT_RC:-0}" ;;
      *kernel_bench_main*) step=kernel-$3; log "case-filter $3 $4"; out=$(arg --out "$@") ;;
      *) exit 0 ;;
    esac ;;
  -m)
    case "$2" in
      pytest)
        marker=$(arg -m "${@:3}")
        case "$marker" in
          "gpu and not compile_heavy") step=tests ;;
          "gpu and compile_heavy") step=tests-compile ;;
          gpu) if [ "${*: -1}" = tests/test_model.py ]; then step=model; else step=tests; fi ;;
        esac
        log "pytest-args ${*:3}" ;;
      bench.e2e)
        step=e2e-smollm2; [ "$(arg --models "$@")" = mistral-7b ] && step=e2e-mistral
        out=$(arg --out "$@"); name=$(arg --name "$@")
        log "e2e-budget $(arg --time-budget "$@")" ;;
      bench.bench_*) step=kernel-${2#bench.bench_}; out=$(arg --out "$@") ;;
      bench.plots) step=summary; out=$3 ;;
      bench.serve) step=serve; out=$(arg --out "$@"); name=$(arg --name "$@") ;;
    esac ;;
esac
[ -n "$step" ] || { echo "fake python: unexpected call: $*" >&2; exit 3; }
var=${step//-/_}
log "start $step"
if [ -n "${FAKE_OUT:-}" ]; then
  ls "$FAKE_OUT" > "$FAKE_DIR/ls_$step.txt" 2>/dev/null
  tar -tzf "$FAKE_OUT/results.tar.gz" > "$FAKE_DIR/seen_$step.txt" 2>/dev/null
fi
case $step in
  e2e-*) echo '{"partial": true}' > "$out/$name.json" ;;  # e2e writes after every measurement
esac
echo $$ > "$FAKE_DIR/pid_$step"
touch "$FAKE_DIR/running_$step"
s=FAKE_SLEEP_$var
sleep "${!s:-${FAKE_SLEEP:-0.05}}"
case $step in
  build) echo "fake build done" ;;
  model|tests|tests-compile)
    echo "tests/test_fake.py::test_one PASSED"
    r=FAKE_RC_$var
    if [ "${!r:-0}" != 0 ]; then
      echo "FAILED tests/test_fake.py::test_two - boom"; echo "==== 1 failed, 1 passed in 0.1s ===="
    else
      echo "==== 2 passed in 0.1s ===="
    fi ;;
  e2e-*) echo '{"kind": "fake"}' > "$out/$name.json"; echo "# e2e $name" > "$out/$name.md" ;;
  serve) echo '{"kind": "fake"}' > "$out/$name.json"; echo "# serve" > "$out/$name.md" ;;
  kernel-*) op=${step#kernel-}; echo '{"rows": []}' > "$out/$op.json"
            echo "# $op" > "$out/$op.md" ;;
  summary)
    printf '# l2v GPU check: FAKE GPU\n\nfrom bench.plots\n' > "$out/SUMMARY.md"
    for f in e2e.md e2e.json e2e_throughput.png e2e_latency_b1.png attention_tflops.png \
             attention.png gemm.png; do
      echo fake > "$out/$f"
    done ;;
esac
log "end $step"
r=FAKE_RC_$var
exit "${!r:-0}"
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "L2V_"))}
    env.update(PYTHON=str(py), FAKE_DIR=str(fake_dir), FAKE_OUT=str(out), OUT=str(out),
               L2V_COMMIT="test", L2V_SNAPSHOT_S="1")  # fmt: skip
    return {"env": env, "dir": fake_dir, "out": out, "tmp": tmp_path}


def _run(fake, *args, timeout=60, **env):
    e = {**fake["env"], **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", str(SCRIPT), *args, str(fake["out"])], env=e, timeout=timeout,
                          capture_output=True, text=True)  # fmt: skip


def _calls(fake, what="start"):
    lines = (fake["dir"] / "calls.log").read_text().splitlines()
    return [ln.split(" ", 1)[1] for ln in lines if ln.startswith(what + " ")]


def _members(out: Path) -> set[str]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return {Path(n).name for n in tar.getnames()}


def _steps(out: Path) -> dict[str, list[str]]:
    with tarfile.open(out / "results.tar.gz") as tar:
        text = tar.extractfile("results/steps.tsv").read().decode()
    rows = [ln.split("\t") for ln in text.splitlines()[1:]]
    return {r[0]: r[1:] for r in rows}


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_full_dry_run_order_files_and_limit(fake):
    r = _run(fake)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _calls(fake) == STEPS
    out = fake["out"]
    names = {p.name for p in _files(out)}
    assert names == {"results.tar.gz", "SUMMARY.md", "gpu_check.log", "e2e.md",
                     "e2e_throughput.png", "e2e_latency_b1.png", "attention_tflops.png"}
    assert len(names) <= 7  # the 8th slot is for an archive being replaced
    # After every step, the archive in OUT holds that step's results: what step k+1 saw at its
    # start includes the files of steps 0..k.
    for k, step in enumerate(STEPS[1:], start=1):
        seen = {Path(n).name for n in (fake["dir"] / f"seen_{step}.txt").read_text().split()}
        for done in STEPS[:k]:
            assert set(STEP_FILES[done]) - {"e2e.md", "e2e_throughput.png",
                                            "attention_tflops.png"} <= seen, (step, done)
        listing = (fake["dir"] / f"ls_{step}.txt").read_text().split()
        assert {"results.tar.gz", "SUMMARY.md", "gpu_check.log"} <= set(listing)
        assert len(listing) <= 8
    members = _members(out)
    for files in STEP_FILES.values():
        assert set(files) <= members
    assert {"steps.tsv", "gpu_check.log", "SUMMARY.md"} <= members
    steps = _steps(out)
    assert list(steps) == STEPS and all(v[2] == "ok" for v in steps.values()), steps
    assert (out / "SUMMARY.md").read_text().startswith("# l2v GPU check: FAKE GPU")
    log = (out / "gpu_check.log").read_text()
    assert "== [summary] ok" in log and "== total" in log
    # Default caps: the build gets 90 s (+ the 5 s start-up slot), e2e leaves itself 20 s.
    assert 80 <= int(steps["build"][3]) <= 95
    # (the budget is computed a moment before the limit: a second may tick in between)
    assert int(_calls(fake, "e2e-budget")[0]) <= int(steps["e2e-mistral"][3]) - 19


@pytest.mark.parametrize("step", STEPS)
def test_kill_during_a_step_keeps_every_earlier_step(fake, step):
    env = {**fake["env"], f"FAKE_SLEEP_{step.replace('-', '_')}": "30"}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(fake["out"])], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (fake["dir"] / f"running_{step}").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "step never started"
            time.sleep(0.05)
        # e2e: long enough for one periodic snapshot (L2V_SNAPSHOT_S=1) of its partial report
        time.sleep(1.6 if step.startswith("e2e") else 0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its step, at once
        proc.wait()
        pid_file = fake["dir"] / f"pid_{step}"
        if pid_file.exists():  # the step runs in timeout's own process group: end it too
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    out = fake["out"]
    assert len(_files(out)) <= 8
    k = STEPS.index(step)
    members = _members(out)
    for done in STEPS[:k]:
        assert set(STEP_FILES[done]) <= members | {"e2e.md", "e2e_throughput.png",
                                                   "attention_tflops.png"}, done
    steps = _steps(out)
    assert [s for s in STEPS[:k]] == list(steps), steps
    summary = (out / "SUMMARY.md").read_text()
    for done in STEPS[:k]:
        assert f"| {done} | ok |" in summary
    assert f"running: {step}" in summary or step not in summary
    assert "== [" + step + "]" in (out / "gpu_check.log").read_text()
    if step.startswith("e2e"):  # the partial report written at the step's start is kept too
        name = "e2e_mistral-7b.json" if step == "e2e-mistral" else "e2e_smollm2-135m.json"
        assert name in members


def test_timeout_budget_scaling_and_failure(fake):
    r = _run(fake, "--budget", "40", FAKE_SLEEP_model=60, FAKE_RC_tests=1)
    assert r.returncode == 1, r.stdout + r.stderr
    steps = _steps(fake["out"])
    # --budget 40: (40 - 10 - 10) / 400 of every cap; the build's 90 s become 4 (+ 5 s slot).
    assert int(steps["build"][3]) <= 10
    assert steps["model"][0] in ("124", "137") and steps["model"][2].startswith("timed out")
    assert int(steps["model"][1]) <= 12
    assert steps["e2e-mistral"][2] == "ok"  # a step after the cut one still runs
    assert steps["tests"][2] == "failed (exit 1)"
    assert "summary" in steps and steps["summary"][2] == "ok"
    assert "FAILED tests/test_fake.py::test_two" in _pytest_log_from_archive(fake["out"])


def _pytest_log_from_archive(out: Path) -> str:
    with tarfile.open(out / "results.tar.gz") as tar:
        return tar.extractfile("results/pytest_tests.txt").read().decode()


def test_only_tests_case_and_scaling(fake):
    r = _run(fake, "--only", "e2e-mistral", "--budget", "150")
    assert r.returncode == 0, r.stderr
    assert _calls(fake) == ["e2e-mistral", "summary"]
    steps = _steps(fake["out"])
    assert 120 <= int(steps["e2e-mistral"][3]) <= 146  # 130 s scaled to the 130 s left

    (fake["dir"] / "calls.log").unlink()
    r = _run(fake, "--tests", "tests/test_gemm.py::test_gpu_opcheck tests/test_norm.py",
             "--budget", "120", FAKE_EXT_RC=1)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _calls(fake) == ["build", "tests", "summary"]  # no extension: build added
    args = _calls(fake, "pytest-args")[0]
    assert args.startswith("-m gpu ") and args.endswith(
        "tests/test_gemm.py::test_gpu_opcheck tests/test_norm.py")

    (fake["dir"] / "calls.log").unlink()
    r = _run(fake, "--case", "M128 .*l2v$", "--budget", "60")
    assert r.returncode == 0, r.stderr
    assert _calls(fake) == ["kernel-attention", "kernel-gemm", "summary"]
    assert _calls(fake, "case-filter") == ["attention M128 .*l2v$", "gemm M128 .*l2v$"]


@pytest.mark.parametrize("args,msg", [
    (["--budget", "abc"], "--budget takes whole seconds"),
    (["--only", "nope"], "unknown step 'nope'"),
    (["--frobnicate"], "unknown option"),
])
def test_bad_arguments(fake, args, msg):
    r = _run(fake, *args)
    assert r.returncode == 2 and msg in r.stderr


def test_case_filter_runs_only_matching_cases(tmp_path):
    """The script's --case runner, for real, on the CPU smoke gemm benchmark."""
    text = SCRIPT.read_text()
    runner = re.search(r"CASE_RUNNER='(.*?)'\n", text, re.S).group(1)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", runner, "gemm", r"M1 N160 K64 cublas_matmul$",
                        "--smoke", "--out", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "gemm_smoke.json").read_text())["rows"]
    assert rows and all(r["impl"] == "cublas_matmul" and r["M"] == 1 for r in rows)
    assert len(rows) == 1


def _load_setup():
    spec = importlib.util.spec_from_file_location("l2v_setup_under_test", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_finds_nvcc_on_path(tmp_path, monkeypatch):
    setup = _load_setup()
    home = tmp_path / "toolkit"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.0'\n")
    nvcc.chmod(0o755)
    link_dir = tmp_path / "path_bin"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(nvcc)  # e.g. /usr/bin/nvcc -> the toolkit's
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(link_dir))
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile",
                        lambda p: False if str(p).startswith("/usr/local/cuda") else real_isfile(p))
    assert setup._find_cuda_home() == str(home)
    assert setup._nvcc_major(str(home)) == "13"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert setup._find_cuda_home() is None


def test_setup_require_extension_turns_a_skip_into_an_error(tmp_path):
    env = {**os.environ, "L2V_SKIP_CUDA_BUILD": "1"}
    ok = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0 and "not building the C++/CUDA extension" in ok.stderr
    env["L2V_REQUIRE_EXTENSION"] = "1"
    bad = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 1
    assert "L2V_REQUIRE_EXTENSION=1 and the extension cannot be built" in bad.stderr


def _marks(fn) -> set[str]:
    import ast

    names = set()
    for d in fn.decorator_list:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "mark":
            names.add(node.attr)
    return names


def test_compile_heavy_gpu_tests_carry_the_marker():
    """gpu_check.sh runs `gpu and compile_heavy` last: every GPU test that calls torch.compile or
    torch.library.opcheck must carry the marker, and the marker is registered."""
    import ast

    assert "compile_heavy:" in (REPO / "pyproject.toml").read_text()
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test"):
                continue
            body = ast.unparse(fn)
            if "gpu" in _marks(fn) and ("torch.compile(" in body or "opcheck(" in body):
                found.append(f"{path.name}::{fn.name}")
                assert "compile_heavy" in _marks(fn), f"{path.name}::{fn.name}"
    assert "test_gemm.py::test_gpu_torch_compile" in found
