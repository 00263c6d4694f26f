"""l2v_kernels: Triton kernels and the C++/CUDA extension behind the l2v encoder.

Every op has a plain-PyTorch reference in `l2v_kernels.reference` and, besides its checked
public function, a public unchecked launcher `<op>_fwd(..., out=None)` for hot loops. Importing
this package is cheap: the op modules (and Triton) are imported on first use.
"""

from __future__ import annotations

import importlib

_OPS = {
    "flash_attn_varlen": "attention",
    "flash_attn_padded": "attention",
    "masked_pool": "pooling",
    "rms_norm": "norm",
    "norm_add_norm": "norm",
    "apply_rotary": "rope",
    "gated_act": "activation",
    "lora_merge_": "gemm",
    "gemm_residual": "gemm",
    "gemm_swiglu": "gemm",
    # Unchecked launchers `<op>_fwd(..., out=None)`: no validation and no host sync (CUDA-graph
    # capturable); each docstring says what the caller must guarantee.
    "flash_attn_varlen_fwd": "attention",
    "flash_attn_padded_fwd": "attention",
    # Training: the unchecked backward and the autograd Function (flash_attn_varlen is
    # differentiable itself).
    "flash_attn_varlen_bwd": "attention",
    "FlashAttnVarlen": "attention",
    "masked_pool_fwd": "pooling",
    "rms_norm_fwd": "norm",
    "norm_add_norm_fwd": "norm",
    "apply_rotary_fwd": "rope",
    "gated_act_fwd": "activation",
    "gemm_residual_fwd": "gemm",
    "gemm_swiglu_fwd": "gemm",
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
