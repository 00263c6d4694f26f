"""Ahead-of-time compiles for sm_90a (bench/aot_check.py) and the autotuning size classes.

The fast subset compiles the autotuned kernels of the Mistral-7B path (every attention tile and
every SwiGLU config the pruning keeps) for sm_90a without a GPU and fails on any spill or on
shared memory above the H200's 227 KiB per block. It runs in a subprocess: the test process has
TRITON_INTERPRET=1, under which the kernels are interpreted, not compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from l2v_kernels import attention, gemm

REPO = Path(__file__).resolve().parent.parent


def test_fast_subset_compiles_for_sm90a_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.aot_check", "--fast", "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["target"] == "sm_90a" and data["shared_limit"] == 227 * 1024
    variants = data["variants"]
    kernels = {v["kernel"] for v in variants}
    assert {"_attn_fwd_kernel", "_gemm_swiglu_kernel", "_attn_bwd_dq_kernel",
            "_attn_bwd_dkdv_kernel"} <= kernels
    # Every tile autotuning may pick for D = 128 and every config of the two M classes;
    # training's forward (writing its log-sum-exp) and both backward kernels too.
    attn = [v for v in variants if v["kernel"] == "_attn_fwd_kernel"]
    inference = [v for v in attn if v["constexprs"]["STORE_LSE"] == "False"]
    assert len(inference) == len(attention._CUDA_TILES[128])
    assert len(attn) - len(inference) == len(attention._CUDA_TILES[128])
    for kernel, table in (("_attn_bwd_dq_kernel", attention._BWD_DQ_TILES),
                          ("_attn_bwd_dkdv_kernel", attention._BWD_DKDV_TILES)):
        assert len([v for v in variants if v["kernel"] == kernel]) == len(table[128]), kernel
    swiglu = [v for v in variants if v["kernel"] == "_gemm_swiglu_kernel"]
    assert len(swiglu) >= len(gemm._CLASS_CONFIGS[1]) + len(gemm._CLASS_CONFIGS[3])
    for v in variants:
        assert v["error"] is None and v["registers"] and v["registers"] <= 255, v
        assert v["spill_stores"] == 0 and v["spill_loads"] == 0, v
        assert 0 < v["shared"] <= 227 * 1024 or v["kernel"] != "_attn_fwd_kernel", v


def test_failure_rules():
    from bench.aot_check import Variant

    def variant(dtype, stores=0, shared=1024, error=None):
        return Variant("k", ["label"], {}, {"num_warps": 4, "num_stages": 3}, dtype,
                       registers=128, spill_stores=stores, spill_loads=stores, shared=shared,
                       error=error)  # fmt: skip

    limit = 227 * 1024
    assert variant("bf16").failed(limit) is None
    assert "spills 8 B" in variant("bf16", stores=8).failed(limit)
    assert "spills" in variant("fp16", stores=4).failed(limit)
    assert variant("fp32", stores=400).failed(limit) is None  # a testing dtype: reported only
    assert "shared memory" in variant("bf16", shared=limit + 1).failed(limit)
    assert "compile error" in variant("fp32", error="boom").failed(limit)


def test_gemm_m_classes_and_fixed_shapes():
    assert [gemm.m_class(m) for m in (1, 16, 17, 56, 128, 129, 1024, 1025, 16384)] == \
        [0, 0, 1, 1, 1, 2, 2, 3, 3]  # fmt: skip
    bf16 = torch.bfloat16
    # A batch-1 query on Mistral-7B's MLP: the query class, tuned over its own candidates.
    tuner, cls, configs = gemm.swiglu_config_choice(56, 14336, 4096, bf16)
    assert cls == 1 and tuner is gemm._TUNED[1] and len(configs) > 1
    assert gemm.swiglu_config_choice(1, 14336, 4096, bf16)[0] is gemm._TUNED[0]
    assert gemm.swiglu_config_choice(16384, 14336, 4096, bf16)[1] == 3
    assert gemm.swiglu_config_choice(448, 5504, 2048, bf16)[0] is gemm._TUNED[2]
    # Test-only and toy shapes (and SmolLM2-135M): one fixed config, never benchmarked.
    for m, i, k in ((77, 2048, 1024), (33, 130, 96), (100, 2048, 4096), (4096, 1536, 576)):
        tuner, cls, configs = gemm.swiglu_config_choice(m, i, k, bf16)
        assert tuner is gemm._FIXED[cls] and len(configs) == 1 and len(tuner.configs) == 1
    tuner, _, configs = gemm.swiglu_config_choice(257, 1000, 520, torch.float32)
    assert tuner is gemm._FP32 and configs == [gemm._FP32_CONFIG]
    assert all("M_CLASS" in t.keys for t in gemm._TUNED)


def test_attention_size_class_is_in_the_key():
    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_dq_kernel,
                   attention._attn_bwd_dkdv_kernel):
        assert "size_class" in kernel.keys
    classes = {
        "6-text test batch": attention.size_class_of(6, 200),
        "batch-1 query": attention.size_class_of(1, 56),
        "batch-8 queries": attention.size_class_of(8, 56),
        "packed passages": attention.size_class_of(32, 512),
        "packed queries": attention.size_class_of(290, 56),
        "long documents": attention.size_class_of(8, 2048),
    }
    assert classes["6-text test batch"] != classes["packed passages"]
    assert classes["batch-1 query"] == classes["batch-8 queries"] != classes["packed queries"]
    assert classes["6-text test batch"] != classes["batch-1 query"]
    assert len(set(classes.values())) == 5, classes


def test_interpreter_compat_patches_only_the_old_conversion():
    """Triton <= 3.6's interpreter turns scalar arguments into ints with int(array), which
    numpy >= 2.4 refuses for 1-element arrays; _interp_compat squeezes them first. On a Triton
    that already does (3.8), nothing is patched. (tests/run_gpu_stack.sh runs the kernel tests
    on triton 3.6 + numpy 2.4, where the patch is what makes them pass.)"""
    import numpy as np

    from l2v_kernels import _interp_compat

    def old(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    def new(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    assert _interp_compat._needs_patch(old) and not _interp_compat._needs_patch(new)

    class Handle:
        data = np.array([7], dtype=np.int32)

    class Scalar:
        handle = Handle()

    assert _interp_compat._index(Scalar()) == 7
    from triton.runtime import interpreter

    patched = _interp_compat.install()
    assert patched == _interp_compat._installed
    if not patched:  # this Triton converts correctly by itself
        assert not _interp_compat._needs_patch(interpreter._patch_lang_tensor)
