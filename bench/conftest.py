"""pytest set-up for bench/: the kernel benchmarks under pytest-benchmark and the e2e smoke test.

Like tests/conftest.py: without CUDA, Triton kernels run in the CPU interpreter, which needs
TRITON_INTERPRET=1 before any @triton.jit function is defined (so before the bench modules import
l2v_kernels), and items marked `gpu` are skipped.

    pytest bench                          # CPU: tiny smoke sizes, each case run once
    pytest bench --benchmark-only -m gpu  # GPU: the real sizes, timed by pytest-benchmark
"""

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Without CUDA the kernel benchmarks are smoke runs: run each once and print no timing
    # tables (CPU timings are not performance), unless benchmarks are asked for explicitly.
    opt = config.option
    if not HAS_CUDA and hasattr(opt, "benchmark_disable"):
        if not (opt.benchmark_only or opt.benchmark_enable):
            opt.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
