"""The kernel benchmarks (bench/bench_<op>.py) under pytest-benchmark.

Every bench_<op> module exposes `cases(smoke) -> list[Case]`; each case becomes one benchmark,
grouped by `case.group` (op and shape) with our implementation and its baselines side by side:

    pytest bench --benchmark-only -m gpu            # real sizes on a GPU
    pytest bench/test_kernels_bench.py              # CPU: smoke sizes, each run once (CI)

Without CUDA only the smoke sizes run (in the Triton interpreter or plain torch), once each, so CI
proves every benchmark still works; the real sizes are collected as one `gpu`-marked item per op
and skipped. With CUDA both are collected and the real sizes are timed by pytest-benchmark's
calibrated loop, each call followed by a device synchronize (CUDA launches are asynchronous).
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

OPS = ("attention", "pooling", "norm", "rope", "activation", "gemm")
HAS_CUDA = torch.cuda.is_available()

# Cases are built once at collection (to name the items) and again, lazily, when an op's first
# item runs; only one op's real-size inputs are held at a time so GPU memory stays small.
_live: dict[tuple[str, bool], list] = {}


def _build(op: str, smoke: bool) -> list:
    return importlib.import_module(f"bench.bench_{op}").cases(smoke)


def _cases(op: str, smoke: bool) -> list:
    key = (op, smoke)
    if key not in _live:
        _live.clear()
        if HAS_CUDA:
            torch.cuda.empty_cache()
        _live[key] = _build(op, smoke)
    return _live[key]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")


def _params() -> list:
    params = []
    sizes = [(True, "smoke")] + ([(False, "real")] if HAS_CUDA else [])
    for op in OPS:
        for smoke, size in sizes:
            marks = [] if smoke else [pytest.mark.gpu]
            try:
                cases = _build(op, smoke)
            except Exception as e:  # a broken module fails its own item, not the whole file
                err = f"{type(e).__name__}: {e}"
                params.append(
                    pytest.param(op, smoke, -1, err, id=f"{op}-{size}-cases", marks=marks)
                )
                continue
            seen: dict[str, int] = {}
            for index, case in enumerate(cases):
                name = f"{op}-{size}-{_slug(case.group)}-{_slug(case.impl)}"
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    name += f"-{seen[name]}"
                params.append(pytest.param(op, smoke, index, None, id=name, marks=marks))
        if not HAS_CUDA:  # the real sizes exist; say so in the report instead of hiding them
            params.append(
                pytest.param(op, False, -1, None, id=f"{op}-real", marks=[pytest.mark.gpu])
            )
    return params


def _all_finite(result) -> bool:
    if isinstance(result, torch.Tensor):
        return not result.is_floating_point() or bool(torch.isfinite(result).all())
    if isinstance(result, (tuple, list)):
        return all(_all_finite(r) for r in result)
    return True


@pytest.mark.parametrize("op,smoke,index,build_error", _params())
def test_kernel(benchmark, op, smoke, index, build_error):
    if build_error:
        pytest.fail(f"bench_{op}.cases(smoke={smoke}) failed: {build_error}")
    case = _cases(op, smoke)[index]
    benchmark.group = case.group
    benchmark.name = case.impl
    benchmark.extra_info.update(impl=case.impl, flops=case.flops, bytes=case.bytes, **case.params)
    on_cuda = HAS_CUDA and not smoke
    if on_cuda:

        def run():
            out = case.fn()
            torch.cuda.synchronize()
            return out

        result = benchmark(run)
    else:
        # CPU smoke: one call proves the benchmark works; CPU timings are not performance.
        result = benchmark.pedantic(case.fn, rounds=1, iterations=1)
    assert _all_finite(result), f"{case.group} / {case.impl} returned NaN or inf"
