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
#   3. tests    pytest -m gpu tests
#   4. kernels  python -m bench.bench_<op> for each op (JSON + markdown per op)
#   5. e2e      python -m bench.e2e, one process per model shape (a crash or an out-of-memory
#               loses one model, not the run)
#   6. summary  python -m bench.plots: PNG plots, merged e2e report, SUMMARY.md
# The whole run stays within 9 minutes (--quick: 4): later steps get what earlier ones left, the
# kernel benchmarks always leave the end-to-end benchmark E2E_MIN seconds. Limits and lists can be
# changed through environment variables (bench/README.md, "Knobs").
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
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
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
exec > >(tee -a "$LOG") 2>&1

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

# Time budget (seconds); every limit below is capped by what is left of it.
if [ "$QUICK" = 1 ]; then
  BUDGET=${L2V_BUDGET_S:-235}
  T_BUILD=${L2V_T_BUILD:-100}; T_TESTS=${L2V_T_TESTS:-45}; T_KERNELS=${L2V_T_KERNELS:-40}
  E2E_MIN=${L2V_E2E_MIN:-60}
  KERNEL_OPS=${L2V_KERNEL_OPS:-"attention:1 gemm:1"}
  E2E_MODELS=${L2V_E2E_MODELS:-"mistral-7b:65 smollm2-135m:35"}
  E2E_FLAGS="--quick"
  export L2V_BENCH_WARMUP_MS=${L2V_BENCH_WARMUP_MS:-10} L2V_BENCH_REP_MS=${L2V_BENCH_REP_MS:-40}
else
  BUDGET=${L2V_BUDGET_S:-535}
  T_BUILD=${L2V_T_BUILD:-150}; T_TESTS=${L2V_T_TESTS:-90}; T_KERNELS=${L2V_T_KERNELS:-150}
  E2E_MIN=${L2V_E2E_MIN:-180}
  KERNEL_OPS=${L2V_KERNEL_OPS:-"attention:3 gemm:3 pooling:1 norm:1 rope:1 activation:1"}
  E2E_MODELS=${L2V_E2E_MODELS:-"mistral-7b:45 smollm2-135m:15 sheared-llama-1.3b:15 llama-2-7b:25"}
  E2E_FLAGS=""
fi
T_SUMMARY=25  # kept back for the summary and packing
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
    124|137) status="timed out after ${limit}s" ;;
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

# 3. GPU tests (the CPU tests run in CI). The output is kept for the summary.
run_step tests "$T_TESTS" "$PY" -m pytest -m gpu tests -q -p no:cacheprovider -rfE 2>&1 \
  | tee "$RES/pytest_gpu.txt"
rc=${PIPESTATUS[0]}
# 5 = no GPU tests collected: nothing failed.
if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then FAILED=1; fi

# Sum of the weights of "name:weight" specs.
pending_weight() {
  local sum=0 spec
  for spec in "$@"; do sum=$((sum + ${spec##*:})); done
  echo "$sum"
}

# 4. Kernel benchmarks: one report per op, each with its share of the kernel time, never eating
# into the E2E_MIN seconds kept for the end-to-end benchmark. Each op stops starting cases a few
# seconds before its limit, so its report is written even when it cannot finish.
specs=($KERNEL_OPS)
KERNELS_END=$(( SECONDS + T_KERNELS ))
for i in "${!specs[@]}"; do
  op=${specs[$i]%%:*}
  avail=$(( KERNELS_END - SECONDS ))
  for_e2e=$(( $(left) - E2E_MIN ))
  (( avail > for_e2e )) && avail=$for_e2e
  limit=$(( avail * ${specs[$i]##*:} / $(pending_weight "${specs[@]:$i}") ))
  if (( limit < 10 )); then
    echo "== [kernel-$op] skipped: out of time"
    printf '%s\t\t0\tskipped (out of time)\n' "kernel-$op" >> "$STEPS"
    continue
  fi
  run_step "kernel-$op" "$limit" "$PY" -m bench.bench_"$op" --out "$RES" --time-budget $((limit - 8))
done

# 5. End to end, one process per model; each gets its share of the time left when it starts.
specs=($E2E_MODELS)
for i in "${!specs[@]}"; do
  spec=${specs[$i]}
  model=${spec%%:*}
  share=${spec##*:}
  rest_weight=$(pending_weight "${specs[@]:$i}")
  avail=$(left)
  limit=$(( avail * share / rest_weight ))
  flags=$E2E_FLAGS
  # torch.compile of the baseline costs a minute or more: only for the headline model, full run.
  if [ "$QUICK" = 0 ] && [ "$i" = 0 ]; then flags="$flags --compile $model"; else flags="$flags --compile none"; fi
  # The process's own budget leaves room for its imports (~10 s) and for a last measurement
  # that starts just before the budget runs out.
  run_step "e2e-$model" "$limit" "$PY" -m bench.e2e --models "$model" --name "e2e_$model" \
    --out "$RES" --time-budget $(( limit > 50 ? limit - 25 : limit / 2 )) --no-plots $flags
done

# 6. Plots, the merged e2e report and SUMMARY.md.
BUDGET=$((BUDGET + T_SUMMARY)); T_SUMMARY=0
run_step summary 60 "$PY" -m bench.plots "$RES" --steps "$STEPS" --failed "$FAILED" \
  --since "$START_EPOCH"

echo "== total $((SECONDS - START))s"
if [ "$PACK" = 1 ]; then
  # The device tool returns at most 8 files: one archive plus the files worth reading at once.
  tar -czf "$OUT_DIR/results.tar.gz" -C "$(dirname "$RES")" results
  for f in SUMMARY.md gpu_check.log e2e.md e2e_throughput.png e2e_latency_b1.png attention_tflops.png; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT_DIR/"
  done
fi
[ -f "$RES/SUMMARY.md" ] && cat "$RES/SUMMARY.md"
exit "$FAILED"
