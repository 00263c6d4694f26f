#!/usr/bin/env bash
# bench/gpu_check.sh: the one command for a fresh, offline GPU machine with a copy of the checkout.
# Evidence first, and every finished step is in the output folder the moment it ends.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--only STEP[,STEP...]] [--tests "NODEID ..."]
#                           [--case REGEX] [--e2e-workloads LIST] [--pack | --no-pack] [OUT_DIR]
#
# Steps, in this order, with their time caps at the default --budget 420 (7 minutes):
#   build             90  setup.py build_ext --inplace with L2V_REQUIRE_EXTENSION=1 (the extension
#                         against this machine's torch); fails unless l2v_kernels._C imports
#   model             40  pytest -m gpu tests/test_model.py: the model against Hugging Face, bf16
#   e2e-mistral      130  bench.e2e, Mistral-7B shape: passages ours vs HF, then latency at
#                         batch 1 and 8 (eager, CUDA graphs, HF), then queries and long documents
#   tests             55  pytest -m "gpu and not compile_heavy": attention, cuda_graphs, norm, rope,
#                         pooling, activation, gemm, then any other file with GPU tests
#   tests-compile     25  pytest -m "gpu and compile_heavy": the torch.compile / opcheck tests
#   kernel-attention  20  bench.bench_attention
#   kernel-gemm       20  bench.bench_gemm
#   e2e-smollm2       20  bench.e2e --quick, SmolLM2-135M shape
#   serve             60  bench.serve, Mistral-7B shape: l2v serve vs a naive per-request server
#                         under open-loop load (needs the serve extra: carry its wheels)
#   summary           10  bench.plots: merged e2e report, PNG plots, SUMMARY.md
# Every cap but the summary's scales with --budget (10 s of it are kept for start-up and packing).
# Steps run on a schedule: step i must end by start + 5 + the sum of the caps up to i, so time an
# early step does not use goes to the later ones and no step eats into a later step's share; a step
# left with under 3 s is skipped. A failing step never stops the next one.
#
#   --only STEP[,...]   run only these steps (aliases: e2e, kernels, all-tests), in the order above;
#                       build is added when l2v_kernels._C does not import; summary always runs
#   --tests "IDS"       the tests step runs exactly these pytest node ids / files (-m gpu, no
#                       marker filter); implies --only tests unless --only is given
#   --case REGEX        the kernel steps time only the cases whose "group impl" matches REGEX;
#                       implies --only kernels unless --only is given
#   --e2e-workloads L   workloads of the e2e steps (comma list of passages,queries,long)
#   --budget SECONDS    the whole run, start-up and packing included (default 420; --quick: 240)
#
# Output: OUT_DIR (the argument, else $L2V_BENCH_OUT, else bench/results/). --pack (automatic when
# OUT_DIR is the device tool's $OUT, which returns at most 8 files): the results are collected in a
# scratch folder and, after every step (and every L2V_SNAPSHOT_S seconds, default 20, while a step
# runs), OUT_DIR/results.tar.gz is replaced atomically by a new archive of all of it, next to
# SUMMARY.md (PROGRESS.md: the steps so far and their results, until bench.plots' SUMMARY.md
# exists) and gpu_check.log (the log, written as it goes).
# At the end e2e.md and three PNGs join them: 7 files, 8 while an archive is being replaced. A kill
# at any moment leaves every step that had finished in OUT_DIR.
#
# Exit status: 0 when the build and the GPU tests that ran passed, 1 otherwise (benchmark failures
# are in SUMMARY.md without changing it), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

STEPS_ALL="build model e2e-mistral tests tests-compile kernel-attention kernel-gemm e2e-smollm2 serve summary"
declare -A CAP=([build]=90 [model]=40 [e2e-mistral]=130 [tests]=55 [tests-compile]=25
                [kernel-attention]=20 [kernel-gemm]=20 [e2e-smollm2]=20 [serve]=60 [summary]=10)
RESERVE=10  # start-up (5) and the final packing (5)

usage() { sed -n '2,/^set -uo pipefail/{/^#/p}' "$0" | sed -e 's/^# //' -e 's/^#$//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

BUDGET=420 ONLY="" TESTS="" CASE="" E2E_WORKLOADS="" PACK=auto OUT_ARG=""
while (( $# )); do
  case "$1" in
    --budget) BUDGET=${2:-}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --tests) TESTS=${2:-}; shift ;;
    --tests=*) TESTS=${1#*=} ;;
    --case) CASE=${2:-}; shift ;;
    --case=*) CASE=${1#*=} ;;
    --e2e-workloads) E2E_WORKLOADS=${2:-}; shift ;;
    --e2e-workloads=*) E2E_WORKLOADS=${1#*=} ;;
    --quick) BUDGET=240 ;;  # the old name of a short run (./run.sh bench --quick)
    --pack) PACK=1 ;;
    --no-pack) PACK=0 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) OUT_ARG=$1 ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] && (( BUDGET >= 30 )) || die "--budget takes whole seconds >= 30, got '$BUDGET'"
[ -n "$TESTS" ] && [ -z "$ONLY" ] && ONLY=tests
[ -n "$CASE" ] && [ -z "$ONLY" ] && ONLY=kernels

# The selected steps, in the fixed order.
declare -A WANT=()
if [ -z "$ONLY" ]; then
  for s in $STEPS_ALL; do WANT[$s]=1; done
else
  for s in ${ONLY//,/ }; do
    case "$s" in
      e2e) WANT[e2e-mistral]=1; WANT[e2e-smollm2]=1 ;;
      kernels) WANT[kernel-attention]=1; WANT[kernel-gemm]=1 ;;
      all-tests) WANT[model]=1; WANT[tests]=1; WANT[tests-compile]=1 ;;
      *) [ -n "${CAP[$s]:-}" ] || die "--only: unknown step '$s' (steps: $STEPS_ALL; aliases: e2e, kernels, all-tests)"
         WANT[$s]=1 ;;
    esac
  done
  WANT[summary]=1
fi

OUT_DIR=${OUT_ARG:-${L2V_BENCH_OUT:-$REPO/bench/results}}
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ "$PACK" = auto ]; then
  PACK=0
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" = "$OUT_DIR" ]; then PACK=1; fi
fi
if [ "$PACK" = 1 ]; then
  SCRATCH=$(mktemp -d)
  RES=$SCRATCH/results
  LOG=$OUT_DIR/gpu_check.log  # the log lives in OUT_DIR from the first line on
else
  RES=$OUT_DIR
  LOG=$RES/gpu_check.log
fi
mkdir -p "$RES"
STEPS_TSV=$RES/steps.tsv
: > "$LOG"
printf 'step\trc\tseconds\tstatus\tlimit\n' > "$STEPS_TSV"
# Everything from here on also goes to the log; fds 3 and 4 keep the original stdout / stderr so
# that the log can be closed (and tee waited for) at the end.
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 L2V_BENCH_OUT=$RES MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${L2V_COMMIT:-}" ]; then
  L2V_COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  if [ "$L2V_COMMIT" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    L2V_COMMIT="$L2V_COMMIT+dirty"
  fi
fi
export L2V_COMMIT
SNAP_S=${L2V_SNAPSHOT_S:-20}
E2E_FLAGS=${L2V_E2E_FLAGS-"--hf-batch-sizes 32 --compile none"}
E2E_SMALL_FLAGS=${L2V_E2E_SMALL_FLAGS-"--quick --hf-batch-sizes 32 --compile none"}
TEST_ORDER=${L2V_TEST_ORDER:-"tests/test_attention.py tests/test_cuda_graphs.py tests/test_norm.py tests/test_rope.py tests/test_pooling.py tests/test_activation.py tests/test_gemm.py"}
START=$SECONDS
START_EPOCH=$(( $(date +%s) - 1 ))  # reports older than this are an earlier run's
FAILED=0
HEADER="commit $L2V_COMMIT, started $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s"

echo "== l2v gpu_check: $HEADER"
echo "== steps: $(for s in $STEPS_ALL; do [ -n "${WANT[$s]:-}" ] && printf '%s ' "$s"; done)"
echo "== results: $RES$([ "$PACK" = 1 ] && echo " (packed into $OUT_DIR/results.tar.gz after every step)")"
DEVICE_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "== nvidia-smi: ${DEVICE_LINE:-none}"
VERSIONS=$(timeout 60 "$PY" - <<'EOF' 2>&1 | tail -1
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
EOF
)
echo "== python: $VERSIONS"

# --only without build: build anyway when the extension does not import (a fresh machine).
if [ -n "$ONLY" ] && [ -z "${WANT[build]:-}" ]; then
  if ! timeout 60 "$PY" -c "import torch, l2v_kernels._C" >/dev/null 2>&1; then
    echo "== l2v_kernels._C does not import: adding the build step"
    WANT[build]=1
  fi
fi

# The schedule: scale the caps of the selected steps (the summary's excepted) to the budget.
SELECTED=()
for s in $STEPS_ALL; do [ -n "${WANT[$s]:-}" ] && SELECTED+=("$s"); done
sum=0
for s in "${SELECTED[@]}"; do [ "$s" = summary ] || sum=$(( sum + CAP[$s] )); done
avail=$(( BUDGET - RESERVE - CAP[summary] ))
declare -A DEADLINE=()
t=$(( START + RESERVE / 2 ))
for s in "${SELECTED[@]}"; do
  if [ "$s" = summary ]; then
    t=$(( START + BUDGET - RESERVE / 2 ))
  else
    t=$(( t + (sum > 0 ? CAP[$s] * avail / sum : 0) ))
  fi
  DEADLINE[$s]=$t
done

# ---------------------------------------------------------------------------------------------
# Keeping what is finished
# ---------------------------------------------------------------------------------------------

# Replace DEST atomically by SRC's content (the temporary name is the only 8th file there can be).
put() { cp -f "$1" "$2.part" && mv -f "$2.part" "$2"; }

# PROGRESS.md: the steps so far and what each produced (OUT_DIR's SUMMARY.md until bench.plots
# has written this run's SUMMARY.md; the script never writes SUMMARY.md itself).
progress_summary() {
  local f
  {
    echo "# l2v GPU check ($1)"
    echo
    echo "$HEADER. ${DEVICE_LINE:+nvidia-smi: $DEVICE_LINE. }python: $VERSIONS"
    echo
    echo "| step | status | seconds | limit |"
    echo "|---|---|---|---|"
    tail -n +2 "$STEPS_TSV" | while IFS=$'\t' read -r name rc secs status limit; do
      echo "| $name | $status | $secs | $limit |"
    done
    for f in "$RES"/pytest_*.txt; do
      [ -f "$f" ] || continue
      echo
      echo "## $(basename "$f" .txt)"
      echo
      echo '```'
      grep -E '^(FAILED|ERROR)' "$f" | head -30
      grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$f" | tail -1
      echo '```'
    done
    for f in "$RES"/e2e_*.md "$RES"/attention.md "$RES"/gemm.md; do
      [ -f "$f" ] || continue
      echo
      echo "## $(basename "$f" .md)"
      echo
      sed -e 's/^# /### /' -e 's/^## /#### /' "$f"
    done
  } > "$RES/PROGRESS.md.part" && mv -f "$RES/PROGRESS.md.part" "$RES/PROGRESS.md"
}

# This run's SUMMARY.md from bench.plots when the summary step wrote it, else PROGRESS.md.
summary_file() {
  if [ -f "$RES/SUMMARY.md" ] && [ "$(stat -c %Y "$RES/SUMMARY.md")" -ge "$START_EPOCH" ] \
     && head -1 "$RES/SUMMARY.md" | grep -q '^# l2v GPU check: '; then
    echo "$RES/SUMMARY.md"
  else
    echo "$RES/PROGRESS.md"
  fi
}

# Everything finished so far into OUT_DIR: one archive replaced atomically, SUMMARY.md beside it.
snapshot() {
  progress_summary "${1:-in progress}"
  [ "$PACK" = 1 ] || return 0
  cp -f "$LOG" "$RES/gpu_check.log" 2>/dev/null
  if tar -czf "$OUT_DIR/results.tar.gz.part" -C "$SCRATCH" results 2>/dev/null; then
    mv -f "$OUT_DIR/results.tar.gz.part" "$OUT_DIR/results.tar.gz"
  fi
  put "$(summary_file)" "$OUT_DIR/SUMMARY.md"
}

# run_step NAME CMD...: run CMD until NAME's deadline; record rc, seconds, status; snapshot.
run_step() {
  local name=$1; shift
  local limit=$(( DEADLINE[$name] - SECONDS ))
  if (( limit < 3 )); then
    echo "== [$name] skipped: out of time"
    printf '%s\t\t0\tskipped (out of time)\t%s\n' "$name" "$limit" >> "$STEPS_TSV"
    snapshot
    return 99
  fi
  local tee_to=/dev/null
  case $name in model|tests|tests-compile) tee_to=$RES/pytest_$name.txt ;; esac
  echo "== [$name] (limit ${limit}s) $*"
  local t0=$SECONDS rc status pid next=$(( SECONDS + SNAP_S ))
  ( timeout --kill-after=2 "$(( limit > 4 ? limit - 2 : limit ))" "$@" 2>&1 | tee "$tee_to"
    exit "${PIPESTATUS[0]}" ) &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.2
    if (( SECONDS >= next )); then snapshot "running: $name"; next=$(( SECONDS + SNAP_S )); fi
  done
  wait "$pid"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s"; echo ;;  # (ends a cut progress line)
    *) status="failed (exit $rc)" ;;
  esac
  echo "== [$name] $status in $(( SECONDS - t0 ))s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$status" "$limit" >> "$STEPS_TSV"
  snapshot
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------

# Build: only the local GPU's architecture (half the compile time of "90a;80") unless
# L2V_CUDA_ARCHS says otherwise; a skipped extension is an error (L2V_REQUIRE_EXTENSION=1).
step_build() {
  if [ -z "${L2V_CUDA_ARCHS:-}" ]; then
    local cap
    cap=$(timeout 60 "$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null | tail -1)
    case "$cap" in
      90) export L2V_CUDA_ARCHS=90a ;;
      [0-9][0-9]|[0-9][0-9][0-9]) export L2V_CUDA_ARCHS=$cap ;;
    esac
  fi
  L2V_REQUIRE_EXTENSION=1 run_step build bash -c \
    '"$0" setup.py -q build_ext --inplace && "$0" -c "import torch, l2v_kernels._C; print(\"l2v_kernels._C loads\")"' \
    "$PY" || FAILED=1
}

pytest_step() {  # NAME MARKER FILES...
  local name=$1 marker=$2; shift 2
  run_step "$name" "$PY" -m pytest -m "$marker" -p no:cacheprovider -p no:randomly -rfE \
    --durations=10 "$@"
  local rc=$?
  # 5: no test collected (nothing failed); 99: skipped for time
  if [ "$rc" != 0 ] && [ "$rc" != 5 ] && [ "$rc" != 99 ]; then FAILED=1; fi
}

gpu_test_files() {  # the files with GPU tests: TEST_ORDER first, then the others (not test_model)
  local f files=()
  for f in $TEST_ORDER tests/test_*.py; do
    [ -f "$f" ] && [ "$f" != tests/test_model.py ] || continue
    case " ${files[*]} " in *" $f "*) continue ;; esac
    grep -q 'mark\.gpu' "$f" && files+=("$f")
  done
  echo "${files[@]}"
}

# A kernel benchmark; it stops starting cases 8 s before its limit, so its report is written.
# --case: the same main with the cases filtered (no other file knows about the filter).
CASE_RUNNER='
import importlib, re, sys
op, pattern, argv = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3:]
from bench import common
mod = importlib.import_module("bench.bench_" + op)
def cases(smoke):
    return [c for c in mod.cases(smoke) if pattern.search(f"{c.group} {c.impl}")]
common.kernel_bench_main(op, cases, argv)
'
kernel_step() {  # OP
  local op=$1 name=kernel-$1
  local budget=$(( DEADLINE[$name] - SECONDS - 8 ))
  (( budget < 1 )) && budget=1
  if [ -n "$CASE" ]; then
    run_step "$name" "$PY" -c "$CASE_RUNNER" "$op" "$CASE" --out "$RES" --time-budget "$budget"
  else
    run_step "$name" "$PY" -m "bench.bench_$op" --out "$RES" --time-budget "$budget"
  fi
}

e2e_step() {  # NAME MODEL FLAGS: the e2e process stops starting measurements 20 s before its
  local name=$1 model=$2 flags=$3   # limit (it writes its report after every measurement)
  local budget=$(( DEADLINE[$name] - SECONDS - 20 ))
  (( budget < 5 )) && budget=5
  # shellcheck disable=SC2086  # flags is a list of options
  run_step "$name" "$PY" -m bench.e2e --models "$model" --name "e2e_$model" --out "$RES" \
    --time-budget "$budget" --no-plots ${E2E_WORKLOADS:+--workloads "$E2E_WORKLOADS"} $flags
}

snapshot
# Offline wheels (bench/README.md): installed first, into a folder put on PYTHONPATH; pip never
# goes online. Part of the start-up, at most 60 s.
WHEELS=${L2V_WHEELS:-$REPO/wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d)/site
  t0=$SECONDS
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    printf 'wheels\t0\t%s\tok\t60\n' "$(( SECONDS - t0 ))" >> "$STEPS_TSV"
  else
    printf 'wheels\t1\t%s\tfailed\t60\n' "$(( SECONDS - t0 ))" >> "$STEPS_TSV"
  fi
fi
for s in "${SELECTED[@]}"; do
  case $s in
    build) step_build ;;
    model) pytest_step model gpu tests/test_model.py ;;
    e2e-mistral) e2e_step e2e-mistral mistral-7b "$E2E_FLAGS" ;;
    tests)
      if [ -n "$TESTS" ]; then
        # shellcheck disable=SC2086  # a list of node ids
        pytest_step tests gpu $TESTS
      else
        # shellcheck disable=SC2046
        pytest_step tests "gpu and not compile_heavy" $(gpu_test_files)
      fi ;;
    # shellcheck disable=SC2046
    tests-compile) pytest_step tests-compile "gpu and compile_heavy" tests/test_model.py $(gpu_test_files) ;;
    kernel-attention) kernel_step attention ;;
    kernel-gemm) kernel_step gemm ;;
    e2e-smollm2) e2e_step e2e-smollm2 smollm2-135m "$E2E_SMALL_FLAGS" ;;
    serve)
      run_step serve "$PY" -m bench.serve --shape mistral-7b --requests 150 --rates 0.5,1.0 \
        --out "$RES" --name serve_mistral-7b ;;
    summary)
      run_step summary "$PY" -m bench.plots "$RES" --steps "$STEPS_TSV" --failed "$FAILED" \
        --since "$START_EPOCH" ;;
  esac
done

echo "== total $(( SECONDS - START ))s; exit status $FAILED"
if [ "$PACK" = 1 ]; then
  # The files worth reading at once, beside the archive (7 in all).
  for f in e2e.md e2e_throughput.png e2e_latency_b1.png attention_tflops.png; do
    [ -f "$RES/$f" ] && put "$RES/$f" "$OUT_DIR/$f"
  done
fi
# Close the log (back to the original stdout / stderr; tee writes its last lines and exits),
# then the last snapshot.
exec 1>&3 2>&4 3>&- 4>&-
for _ in $(seq 25); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.2; done
snapshot "finished"
cat "$(summary_file)"
exit "$FAILED"
