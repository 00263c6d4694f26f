"""Data-parallel training on PyTorch's own stack: torchrun's environment, one process per device.

    d, device = init_from_environment("cuda")  # Dist(rank, world, local_rank), cuda:LOCAL_RANK
    ddp = replicate(adapters, d)               # DDP over the LoRA matrices (the base is not a
                                               # parameter of it: it is replicated as loaded)
    shard_base(model, device, d)               # FSDP2 (fully_shard) per layer: --fsdp
    rows = gather_rows(local, counts, d)       # every rank's rows, with their gradients
    shutdown()

Launch with `torchrun --nproc-per-node N -m l2v_models.train STAGE ...` (or
`l2v train STAGE --nproc-per-node N ...`, which runs torchrun's launcher): on one machine or
many (torchrun's --nnodes and rendezvous). Without torchrun's variables nothing is initialized
and every function here is the one-process identity.

Gradients: DDP averages the ranks' gradients, so each rank back-propagates `world` times its
share of the step's loss; gather_rows's backward sums the gathered rows' gradients over the
ranks (every rank computes the same loss from the same gathered rows), which is that factor for
the contrastive losses. Backends: NCCL on CUDA, gloo on the CPU (the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_from_environment(device=None) -> tuple[Dist, torch.device | None]:
    """Join the process group torchrun describes (a no-op without it, or with one process).

    device: None or "cuda" -> cuda:LOCAL_RANK where CUDA is available, else the CPU; "cpu"; an
    explicit "cuda:N" is refused with several ranks per machine (each rank takes its own).
    Returns (Dist, this rank's device or None to let the loader choose)."""
    if not launched_by_torchrun():
        return Dist(), (torch.device(device) if device is not None else None)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {device}: with several processes per machine each rank "
                             "uses cuda:LOCAL_RANK; pass --device cuda")  # fmt: skip
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return Dist(rank, world, local), device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another rank is gone (gloo: "Connection
    reset/closed by peer"; NCCL: a DistBackendError or a watchdog timeout)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed",
                            "Broken pipe", "ProcessGroup", "c10d"))  # fmt: skip


# ------------------------------------------------------------------------------ collectives
def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over the ranks (a copy; the value itself with one process)."""
    if not d.active:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank (pickled)."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem: str | None, d: Dist) -> str | None:
    """The first (in rank order) of every process's problem, on every process, so that all of
    them stop on the same error instead of some waiting for the others forever."""
    if not d.active:
        return problem
    import torch.distributed as dist

    every = [None] * d.world
    dist.all_gather_object(every, problem)
    return next((p for p in every if p is not None), None)


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shape tensors; backward: the gradient summed over the ranks, this
    rank's slice (every rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, world: int, rank: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank = rank
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


def gather_rows(local: torch.Tensor, counts: list[int], d: Dist, *,
                grad: bool = True) -> list[torch.Tensor]:  # fmt: skip
    """Every rank's rows [counts[r], D] in rank order, this rank's being `local`. With grad, the
    gathered rows carry gradients back to the rank that made them (an autograd-aware
    all_gather); ranks with fewer rows are padded for the collective and trimmed after."""
    if not d.active:
        return [local]
    import torch.distributed as dist

    longest = max(counts)
    padded = local
    if local.shape[0] < longest:
        pad = local.new_zeros(longest - local.shape[0], *local.shape[1:])
        padded = torch.cat([local, pad])
    if grad:
        stacked = _GatherRows.apply(padded, d.world, d.rank)
    else:
        out = [torch.empty_like(padded) for _ in range(d.world)]
        dist.all_gather(out, padded.detach().contiguous())
        stacked = torch.stack(out)
    return [stacked[r, : counts[r]] for r in range(d.world)]


# ------------------------------------------------------------------------------ DDP / FSDP2
class LossHolder(nn.Module):
    """The trainable adapters as one module whose forward runs a loss function: what DDP wraps
    (DDP hooks the backward of what its forward returns). The base model is not a submodule:
    DDP neither broadcasts nor checks its (frozen, identical) weights."""

    def __init__(self, adapters: nn.Module):
        super().__init__()
        self.adapters = adapters

    def forward(self, fn, *args):
        return fn(*args)


def replicate(adapters: nn.Module, d: Dist) -> nn.Module:
    """DDP over the adapters (gradients all-reduced during the backward, in buckets); with one
    process the plain holder."""
    holder = LossHolder(adapters)
    if not d.active:
        return holder
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(holder, device_ids=None)


def shard_base(model, device: torch.device, d: Dist) -> None:
    """FSDP2: shard the frozen base's layers over the ranks (fully_shard per layer, then the
    root for the embeddings and final norm); each layer's weights are all-gathered just before
    its forward (and its recomputation / backward) and freed after. The per-layer norms stay
    whole: the layer body reads the next layer's input norm. Load the model on the CPU first;
    the shards move to `device`."""
    if not d.active:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    norms = {p for layer in model.layers for name, p in layer.named_parameters()
             if name.endswith("norm")}  # fmt: skip
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=norms)
    fully_shard(model, mesh=mesh, ignored_params=norms)
    for p in norms:
        p.data = p.data.to(device)
    # The RoPE tables are plain attributes (not parameters): move them with the shards.
    for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
        table = getattr(model, name, None)
        if table is not None:
            setattr(model, name, table.to(device))
