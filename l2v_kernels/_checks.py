"""Input checks shared by the public op functions.

They run once at each public boundary, never inside a kernel loop. Value checks that need a
device-to-host copy (cu_seqlens) are skipped while a CUDA graph is being captured or torch.compile
is tracing, where a sync is not allowed; the model calls the unchecked launchers directly.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if interpreting():
    # Older Triton interpreters (<= 3.6) fail on loop bounds with numpy >= 2.4: see the module.
    from l2v_kernels import _interp_compat

    _interp_compat.install()


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(
            f"{op}: got a tensor on {t.device}; the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1). For CPU use l2v_kernels.reference "
            "or the model's torch backend."
        )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise ValueError(f"{op}: all tensors must be on one device, got {names}")


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> None:
    """Raise ValueError naming the op and argument when t is not what the op expects."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape, strict=False)):
            if want is not None and got != want:
                raise ValueError(
                    f"{op}: {name} has shape {tuple(t.shape)}, expected dim {i} to be {want}"
                )
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected one of {names}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1)")


def sync_allowed() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, total: int, device: torch.device) -> None:
    """cu_seqlens: int32 [B+1] on `device`, starting at 0, non-decreasing, ending at `total`."""
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device}, expected {device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold B+1 >= 2 offsets, got {cu_seqlens.numel()}")
    if not sync_allowed():
        return
    c = cu_seqlens.cpu()
    if int(c[0]) != 0 or int(c[-1]) != total:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0 and end at the token count {total}, "
            f"got {int(c[0])} ... {int(c[-1])}"
        )
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {c.tolist()[:16]}")
