"""The plain-torch paths of ops whose callers must work without Triton (imports torch only).

`l2v_kernels.gemm` falls back to these when its fused path cannot run, and the checkpoint loader
uses them on an install where Triton (hence l2v_kernels.gemm) cannot be imported.
"""

from __future__ import annotations

import torch


def lora_merge_torch_(weight, lora_A, lora_B, scale: float) -> torch.Tensor:
    """W += scale * B @ A in place: fp32 product, one rounding to W's dtype; row blocks bound the
    temporary. weight [N, K], lora_A [r, K], lora_B [N, r]. Returns weight."""
    n, k = weight.shape
    a32, b32 = lora_A.float(), lora_B.float()
    rows_per_block = max(1, (1 << 24) // max(1, k))
    for r0 in range(0, n, rows_per_block):
        rows = weight[r0 : r0 + rows_per_block]
        delta = b32[r0 : r0 + rows_per_block] @ a32
        if weight.dtype == torch.float32:
            rows.add_(delta, alpha=scale)
        else:
            rows.copy_(rows.float().add_(delta, alpha=scale))
    return weight
