#!/usr/bin/env bash
# bench/gpu_check.sh: everything a fresh, offline GPU machine with a copy of the checkout runs.
#
#   bash bench/gpu_check.sh [--quick] [--pack | --no-pack] [OUT_DIR]
#
# Steps, each under its own time limit, each recorded in OUT_DIR/steps.tsv; a failing step never
# stops the next one:
#   1. wheels   install wheels/*.whl offline when that folder exists (pip --no-index)
#   2. build    pip install -e . --no-build-isolation --no-deps  (the extension, against the
#               machine's own torch)
#   3. tests    pytest -m gpu on the test files with GPU tests, most important first; on a
#               timeout the files that did not run (or finish) are listed
#   4. kernels  python -m bench.bench_<op> for attention and gemm (JSON + markdown per op)
#   5. e2e      python -m bench.e2e, one process per model shape (a crash or an out-of-memory
#               loses one model, not the run): Mistral-7B, then SmolLM2-135M
#   6. extras   only with time left: the other kernel ops, the other e2e model shapes
#   7. summary  python -m bench.plots: PNG plots, merged e2e report, SUMMARY.md
# The whole run stays within 9 minutes (--quick: 4): later steps get what earlier ones left, the
# kernel benchmarks always leave the end-to-end benchmark E2E_MIN seconds. Limits and lists can be
# changed through environment variables (bench/README.md, "Knobs").
#
# Under the workplace's device tool:  L2V_COMMIT=<sha> bash bench/gpu_check.sh "$OUT"
#
# OUT_DIR: the argument, else $L2V_BENCH_OUT, else bench/results/. Every report carries the
# device, torch / triton / CUDA versions, the commit ($L2V_COMMIT, else `git rev-parse`) and date.
# --pack (automatic when OUT_DIR is the device tool's $OUT, which returns at most 8 files): the
# full results go into OUT_DIR/results.tar.gz, with SUMMARY.md, the log and the main plots beside.
#
# Exit status: 0 when the build and the GPU tests passed, 1 otherwise (benchmark failures are
# reported in SUMMARY.md but do not change it).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

QUICK=0
PACK=auto
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --pack) PACK=1 ;;
    --no-pack) PACK=0 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done

OUT_DIR=${OUT_ARG:-${L2V_BENCH_OUT:-$REPO/bench/results}}
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ "$PACK" = auto ]; then
  PACK=0
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" = "$OUT_DIR" ]; then PACK=1; fi
fi
if [ "$PACK" = 1 ]; then RES=$(mktemp -d)/results; else RES=$OUT_DIR; fi
mkdir -p "$RES"
LOG=$RES/gpu_check.log
STEPS=$RES/steps.tsv
: > "$LOG"
printf 'step\trc\tseconds\tstatus\n' > "$STEPS"
# Everything from here on also goes to the log; fds 3 and 4 keep the original stdout / stderr so
# that the log can be closed (and tee waited for) before it is packed.
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export L2V_BENCH_OUT=$RES
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${L2V_COMMIT:-}" ]; then
  L2V_COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  if [ "$L2V_COMMIT" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    L2V_COMMIT="$L2V_COMMIT+dirty"
  fi
fi
export L2V_COMMIT

# Time budget (seconds); every limit below is capped by what is left of it. Full run, worst case:
# BUDGET 505 + T_SUMMARY 25 = 530 s of the device tool's 600 s (plus at most 10 s per step for a
# kill after its timeout). Expected: start-up ~10, build <= 150, tests <= 130, kernels (attention,
# gemm) 60 when time beyond E2E_MIN is left, e2e >= 220 (Mistral-7B 3/4, SmolLM2-135M the rest),
# then the extras with whatever is left.
if [ "$QUICK" = 1 ]; then
  BUDGET=${L2V_BUDGET_S:-215}; T_SUMMARY=20
  T_BUILD=${L2V_T_BUILD:-100}; T_TESTS=${L2V_T_TESTS:-45}; T_KERNELS=${L2V_T_KERNELS:-30}
  E2E_MIN=${L2V_E2E_MIN:-80}
  KERNEL_OPS=${L2V_KERNEL_OPS:-"attention:1 gemm:1"}
  E2E_MODELS=${L2V_E2E_MODELS:-"mistral-7b:1"}
  EXTRAS=${L2V_EXTRAS-"e2e:smollm2-135m:45"}
  E2E_FLAGS=${L2V_E2E_FLAGS-"--quick --hf-batch-sizes 32 --compile none"}
  export L2V_BENCH_WARMUP_MS=${L2V_BENCH_WARMUP_MS:-10} L2V_BENCH_REP_MS=${L2V_BENCH_REP_MS:-40}
else
  BUDGET=${L2V_BUDGET_S:-505}; T_SUMMARY=25
  T_BUILD=${L2V_T_BUILD:-150}; T_TESTS=${L2V_T_TESTS:-130}; T_KERNELS=${L2V_T_KERNELS:-60}
  E2E_MIN=${L2V_E2E_MIN:-220}
  KERNEL_OPS=${L2V_KERNEL_OPS:-"attention:1 gemm:1"}
  E2E_MODELS=${L2V_E2E_MODELS:-"mistral-7b:75 smollm2-135m:25"}
  EXTRAS=${L2V_EXTRAS-"kernel:pooling:20 kernel:norm:20 e2e:sheared-llama-1.3b:60 kernel:rope:20 kernel:activation:20 e2e:llama-2-7b:120"}
  # One baseline (hf_bs32, the reference) and no torch.compile baseline: neither hf_bs64 nor
  # compiling a 7B model (minutes) fits 9 minutes. L2V_E2E_FLAGS="--compile mistral-7b" (and
  # no --hf-batch-sizes) brings them back.
  E2E_FLAGS=${L2V_E2E_FLAGS-"--hf-batch-sizes 32 --compile none"}
fi
# GPU test files, most important first (the model end to end, then the kernels it runs, the
# largest file last); files with GPU tests not named here run after them.
TEST_ORDER=${L2V_TEST_ORDER:-"tests/test_model.py tests/test_attention.py tests/test_norm.py tests/test_rope.py tests/test_pooling.py tests/test_activation.py tests/test_gemm.py"}
START=$SECONDS
START_EPOCH=$(( $(date +%s) - 1 ))  # reports older than this are an earlier run's
FAILED=0

left() { echo $(( BUDGET - (SECONDS - START) - T_SUMMARY )); }

# run_step NAME LIMIT CMD...: run CMD under min(LIMIT, time left); record rc, seconds, status.
run_step() {
  local name=$1 limit=$2; shift 2
  local avail; avail=$(left)
  (( limit > avail )) && limit=$avail
  if (( limit < 5 )); then
    echo "== [$name] skipped: out of time"
    printf '%s\t\t0\tskipped (out of time)\n' "$name" >> "$STEPS"
    return 99
  fi
  echo "== [$name] (limit ${limit}s) $*"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s"; echo ;;  # (ends a cut progress line)
    *) status="failed (exit $rc)" ;;
  esac
  echo "== [$name] $status in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$status" >> "$STEPS"
  return $rc
}

echo "== l2v gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $L2V_COMMIT, quick=$QUICK, budget ${BUDGET}s"
echo "== results: $RES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
"$PY" - <<'EOF' 2>&1 || true
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(f"python torch {torch.__version__} cuda {torch.version.cuda} triton {tv} "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
EOF

# 1. Offline wheels: packages missing on the machine (see bench/README.md). pip never goes online.
WHEELS=${L2V_WHEELS:-$REPO/wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if ! run_step wheels 60 "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; then
    # Read-only or conflicting environment: put them on PYTHONPATH instead.
    SITE=$(mktemp -d)/site
    run_step wheels-target 60 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
      && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# 2. Build the extension against this machine's torch. Only the local GPU's architecture is
# compiled (half the time of the default list) unless L2V_CUDA_ARCHS says otherwise.
if [ -z "${L2V_CUDA_ARCHS:-}" ]; then
  CAP=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || true)
  case "$CAP" in
    90) export L2V_CUDA_ARCHS=90a ;;
    [0-9][0-9]|[0-9][0-9][0-9]) export L2V_CUDA_ARCHS=$CAP ;;
  esac
fi
if ! run_step build "$T_BUILD" "$PY" -m pip install -e . --no-build-isolation --no-deps; then
  FAILED=1
fi
"$PY" -c "import l2v_kernels as k; print('== extension available:', k.extension_available())" 2>&1 || true

# 3. GPU tests (the CPU tests run in CI), one pytest process over the files that have GPU tests,
# in TEST_ORDER (no random ordering); the output is kept for the summary. Default verbosity
# prints each file's name when its first test starts, so after a timeout the files that never
# started, and the one that was cut, are known and listed.
test_files=()
for f in $TEST_ORDER tests/test_*.py; do
  [ -f "$f" ] || continue
  case " ${test_files[*]} " in *" $f "*) continue ;; esac
  grep -q 'mark\.gpu' "$f" && test_files+=("$f")
done
if (( ${#test_files[@]} == 0 )); then
  echo "== [tests] no test file has GPU tests"
  printf 'tests\t5\t0\tno GPU tests\n' >> "$STEPS"
else
  run_step tests "$T_TESTS" "$PY" -m pytest -m gpu -p no:cacheprovider -p no:randomly -rfE \
    --durations=15 "${test_files[@]}" 2>&1 | tee "$RES/pytest_gpu.txt"
  rc=${PIPESTATUS[0]}
  # 5 = no GPU tests collected: nothing failed.
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then FAILED=1; fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 99 ]; then
    not_run=() cut=""
    for f in "${test_files[@]}"; do
      if grep -q "^$f " "$RES/pytest_gpu.txt"; then cut=$f; else not_run+=("$f"); fi
    done
    # Only files after the last one that started are "not run" (a file whose GPU tests were all
    # deselected prints nothing either).
    if [ -n "$cut" ]; then
      seen=0 rest=()
      for f in "${test_files[@]}"; do
        (( seen )) && rest+=("$f")
        [ "$f" = "$cut" ] && seen=1
      done
      not_run=("${rest[@]}")
    fi
    msg="cut by the time limit: ${cut:-none}; not run: ${not_run[*]:-none}"
    echo "== [tests] $msg"
    printf 'tests (incomplete)\t\t0\t%s\n' "$msg" >> "$STEPS"
    {
      [ -n "$cut" ] && echo "ERROR $cut: cut by the tests step's time limit"
      for f in "${not_run[@]}"; do echo "ERROR $f: not run (the tests step ran out of time)"; done
      # The last line in bench.plots' format: the summary shows it.
      echo "= tests step stopped in its time limit: no pytest summary; error lines above list what did not run ="
    } >> "$RES/pytest_gpu.txt"
  fi
fi

# Sum of the weights of "name:weight" specs.
pending_weight() {
  local sum=0 spec
  for spec in "$@"; do sum=$((sum + ${spec##*:})); done
  echo "$sum"
}

# kernel_bench OP LIMIT: one kernel benchmark; it stops starting cases 8 s before its limit, so
# its report is written even when it cannot finish.
kernel_bench() {
  run_step "kernel-$1" "$2" "$PY" -m bench.bench_"$1" --out "$RES" --time-budget $(($2 - 8))
}

# e2e_bench MODEL LIMIT: one end-to-end process. Its own budget leaves room for its imports
# (~10 s) and for a last measurement that starts just before the budget runs out.
e2e_bench() {
  # shellcheck disable=SC2086  # E2E_FLAGS is a list of options
  run_step "e2e-$1" "$2" "$PY" -m bench.e2e --models "$1" --name "e2e_$1" --out "$RES" \
    --time-budget $(( $2 > 50 ? $2 - 25 : $2 / 2 )) --no-plots $E2E_FLAGS
}

# 4. Kernel benchmarks: one report per op, each with its share of the kernel time, never eating
# into the E2E_MIN seconds kept for the end-to-end benchmark.
specs=($KERNEL_OPS)
KERNELS_END=$(( SECONDS + T_KERNELS ))
for i in "${!specs[@]}"; do
  op=${specs[$i]%%:*}
  avail=$(( KERNELS_END - SECONDS ))
  for_e2e=$(( $(left) - E2E_MIN ))
  (( avail > for_e2e )) && avail=$for_e2e
  limit=$(( avail * ${specs[$i]##*:} / $(pending_weight "${specs[@]:$i}") ))
  if (( limit < 15 )); then
    echo "== [kernel-$op] skipped: out of time"
    printf '%s\t\t0\tskipped (out of time)\n' "kernel-$op" >> "$STEPS"
    continue
  fi
  kernel_bench "$op" "$limit"
done

# 5. End to end, one process per model; each gets its share of the time left when it starts
# (what an earlier one leaves unused goes to the later ones and then to the extras).
specs=($E2E_MODELS)
for i in "${!specs[@]}"; do
  e2e_bench "${specs[$i]%%:*}" $(( $(left) * ${specs[$i]##*:} / $(pending_weight "${specs[@]:$i}") ))
done

# 6. Extras, in order, each only when time is left: "kernel:OP:CAP" or "e2e:MODEL:CAP", each under
# min(CAP, time left) and skipped below 15 s (kernel) / 45 s (e2e).
for spec in $EXTRAS; do
  kind=${spec%%:*} rest=${spec#*:}
  name=${rest%%:*} cap=${rest##*:}
  avail=$(left)
  limit=$(( cap < avail ? cap : avail ))
  need=15; [ "$kind" = e2e ] && need=45
  if (( limit < need )); then
    echo "== [$kind-$name] skipped: out of time"
    printf '%s\t\t0\tskipped (out of time)\n' "$kind-$name" >> "$STEPS"
    continue
  fi
  case $kind in
    kernel) kernel_bench "$name" "$limit" ;;
    e2e) e2e_bench "$name" "$limit" ;;
    *) echo "== unknown extra $spec (kernel:OP:SECONDS or e2e:MODEL:SECONDS)" ;;
  esac
done

# 7. Plots, the merged e2e report and SUMMARY.md.
BUDGET=$((BUDGET + T_SUMMARY)); T_SUMMARY=0
run_step summary 60 "$PY" -m bench.plots "$RES" --steps "$STEPS" --failed "$FAILED" \
  --since "$START_EPOCH"

echo "== total $((SECONDS - START))s"
# Close the log: back to the original stdout / stderr, then let tee write its last lines and
# exit before the log is copied or packed (at most 10 s).
exec 1>&3 2>&4 3>&- 4>&-
for _ in $(seq 50); do
  kill -0 "$TEE_PID" 2>/dev/null || break
  sleep 0.2
done
if [ "$PACK" = 1 ]; then
  # The device tool returns at most 8 files: one archive plus the files worth reading at once.
  tar -czf "$OUT_DIR/results.tar.gz" -C "$(dirname "$RES")" results
  for f in SUMMARY.md e2e.md e2e_throughput.png e2e_latency_b1.png attention_tflops.png gpu_check.log; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT_DIR/"
  done
fi
[ -f "$RES/SUMMARY.md" ] && cat "$RES/SUMMARY.md"
exit "$FAILED"
