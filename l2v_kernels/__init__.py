"""l2v_kernels: Triton kernels and the C++/CUDA extension behind the l2v encoder.

Every op has a plain-PyTorch reference in `l2v_kernels.reference`. Importing this package is
cheap: the op modules (and Triton) are imported on first use.
"""

from __future__ import annotations

import importlib

_OPS = {
    "flash_attn_varlen": "attention",
    "flash_attn_padded": "attention",
    "masked_pool": "pooling",
    "rms_norm": "norm",
    "apply_rotary": "rope",
    "gated_act": "activation",
    "lora_merge_": "gemm",
    "gemm_residual": "gemm",
    "gemm_swiglu": "gemm",
    "pack_gate_up": "gemm",
    "unpack_gate_up": "gemm",
    "extension_available": "gemm",
}

__all__ = sorted(_OPS)


def __getattr__(name: str):
    if name in _OPS:
        module = importlib.import_module(f"l2v_kernels.{_OPS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'l2v_kernels' has no attribute {name!r}")
