#!/usr/bin/env bash
# tests/run_gpu_stack.sh: the CPU test suite on the GPU machine's Python stack (torch 2.11,
# triton 3.6, the newest numpy, transformers 5.17) instead of the one ./run.sh installs
# (torch 2.14.1, triton 3.8). CI keeps the run.sh stack; run this before changing a kernel.
#
#   bash tests/run_gpu_stack.sh                       # the kernel test files
#   bash tests/run_gpu_stack.sh tests/test_model.py   # any pytest arguments
#
# The virtual environment lives OUTSIDE the checkout, in $L2V_GPUSTACK_VENV (default
# ../venv-gpustack beside the repository); it is created on first use (the torch 2.11 wheel and
# its CUDA libraries are a few GB). The tests run in a scratch copy of the checkout (tracked and
# untracked-not-ignored files), so the extension this stack needs is built there
# (L2V_GPUSTACK_BUILD=0: not built, its tests skip) and never replaces the checkout's own
# l2v_kernels/_C*.so, which belongs to ./run.sh's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${L2V_GPUSTACK_VENV:-$(dirname "$REPO")/venv-gpustack}
PKGS=(torch==2.11.0 triton==3.6.0 numpy transformers==5.17.0 safetensors huggingface_hub tqdm
      pytest peft gguf httpx "setuptools>=77,<82" wheel ninja)

# (setuptools >= 77 reads pyproject.toml's SPDX license string; torch 2.11 wants < 82)
if ! "$VENV/bin/python" -c "import torch, triton, numpy, transformers, pytest, setuptools
assert int(setuptools.__version__.split('.')[0]) >= 77" 2>/dev/null; then
  echo "[gpu-stack] setting up $VENV (${PKGS[*]})" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}"
fi
"$VENV/bin/python" - <<'EOF' >&2
import numpy, torch, transformers, triton
print(f"[gpu-stack] torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}, transformers {transformers.__version__}")
EOF

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git ls-files -z --cached --others --exclude-standard | grep -zv '\.so$' \
  | tar --null -T - -cf - | tar -xf - -C "$WORK"
cd "$WORK"
if [ "${L2V_GPUSTACK_BUILD:-1}" = 1 ]; then
  echo "[gpu-stack] building the extension against this torch (L2V_GPUSTACK_BUILD=0 skips)" >&2
  L2V_CUDA_ARCHS=${L2V_CUDA_ARCHS:-90a} "$VENV/bin/python" setup.py -q build_ext --inplace >&2
else
  export L2V_SKIP_CUDA_BUILD=1  # tests/test_extension.py then skips instead of failing
fi
if (( $# == 0 )); then
  set -- tests/test_attention.py tests/test_pooling.py tests/test_norm.py tests/test_rope.py \
    tests/test_activation.py tests/test_gemm.py tests/test_extension.py
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
