"""Engines on every device: one replica per (device, slot), each with its adapters' ops tables.

    devices = parse_devices("cuda:0,cuda:1")                 # or None: every visible GPU, else CPU
    replicas = build_replicas(embedder, devices, per_device=2, adapters={"nli": lora})
    replica.use("nli"); rows = replica.engine.run_batch(texts, mode=...)    # a model worker

A replica is an Engine over its own view of the model: the views on one device share the weight
tensors (held once per device: on the model's own device, the embedder's own tensors), each view
has its own ops table (so each replica's thread switches adapters per pass without touching the
others or the caller's model), and a device other than the one the model was loaded on gets an
exact copy of the weights (and head). Every replica runs the same kernels on
the same weights, so a text's embedding does not depend on which replica ran it (tests check this
exactly for identical passes).
"""

from __future__ import annotations

import torch

from l2v_models.engine import Engine
from l2v_models.serve.adapters import AdapterError, AdapterTable, UnmergedLoraOps


class DeviceError(ValueError):
    """A device that cannot serve (the message names it)."""


def parse_devices(spec: str | None, default=None) -> list[torch.device]:
    """--devices: "all" or None (every visible CUDA device, else the CPU; `default`, the model's
    device, when given and spec is None), "cpu", or a comma-separated list ("cuda:0,cuda:1",
    "0,1"). DeviceError naming a device that does not exist or is listed twice."""
    if spec is None and default is not None:
        return [torch.device(default)]
    if spec is None or spec.strip().lower() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    out: list[torch.device] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise DeviceError(f"--devices {spec!r}: an empty entry (use e.g. cuda:0,cuda:1)")
        name = f"cuda:{part}" if part.isdigit() else part
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DeviceError(
                f"--devices: {part!r} is not a device (use cpu, cuda, cuda:N or N)"
            ) from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if device.index is None else device.index
            if index >= count:
                raise DeviceError(
                    f"--devices: {part} does not exist (this machine has {count} visible CUDA "
                    "device(s))"
                )
            device = torch.device("cuda", index)
        elif device.type != "cpu":
            raise DeviceError(f"--devices: {part!r} is not supported (use cpu or cuda devices)")
        if device in out:
            raise DeviceError(f"--devices: {device} is listed twice (use --replicas-per-device)")
        out.append(device)
    return out


class Replica:
    """One engine a model worker drives: `name` ("cuda:1#0"), `engine`, and per adapter name the
    ops table that applies it; use(name) selects the table for the next pass (None: the base)."""

    def __init__(self, name: str, engine: Engine, tables: dict[str, AdapterTable]):
        self.name = name
        self.engine = engine
        model = engine.model
        self.base_ops = model.ops
        self.graphs = engine.cuda_graphs
        self.adapter_ops = {k: UnmergedLoraOps(self.base_ops, t, model.config)
                            for k, t in tables.items()}  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def use(self, adapter: str | None) -> None:
        """Run the next passes with `adapter` (None: the base model). CUDA graphs hold the base
        model's kernels, so adapter passes run eagerly."""
        if adapter is None:
            self.engine.model.ops = self.base_ops
            self.engine.cuda_graphs = self.graphs
        else:
            self.engine.model.ops = self.adapter_ops[adapter]
            self.engine.cuda_graphs = False


def _view(model):
    """A Transformer sharing `model`'s weight tensors, with its own ops table."""
    from l2v_models.model import Transformer

    return Transformer.from_state_dict(model.config, dict(model.state_dict()), model.backend)


def build_replicas(embedder, devices: list[torch.device], per_device: int = 1,
                   adapters: dict | None = None) -> list[Replica]:  # fmt: skip
    """Replicas of the embedder's engine: `per_device` on each device (the weights copied once
    per device), each with the adapters ({name: checkpoint.LoraAdapter}) ready to apply.
    DeviceError / AdapterError naming what failed to load."""
    if per_device < 1:
        raise ValueError(f"replicas per device must be >= 1, got {per_device}")
    adapters = adapters or {}
    base = embedder.engine
    out: list[Replica] = []
    for device in devices:
        try:
            if _same(device, base.device):
                model, head = base.model, base.head
            else:
                state = {k: v.to(device) for k, v in base.model.state_dict().items()}
                from l2v_models.model import Transformer

                model = Transformer.from_state_dict(base.model.config, state, base.model.backend)
                head = base.head.to(device)
            # Views even on the model's own device: the server never changes the caller's model.
            views = [_view(model) for _ in range(per_device)]
        except Exception as e:
            raise DeviceError(
                f"device {device} cannot hold the model: {type(e).__name__}: {_first_line(e)}"
            ) from None
        for slot, view in enumerate(views):
            engine = Engine(view, max_tokens_per_batch=base.max_tokens_per_batch,
                            max_texts_per_batch=base.max_texts_per_batch,
                            cuda_graphs=base.cuda_graphs and device.type == "cuda",
                            head=head)  # fmt: skip
            tables = {}
            for name, adapter in adapters.items():
                try:
                    tables[name] = AdapterTable.build(view, adapter, name)
                except AdapterError:
                    raise
                except Exception as e:
                    raise AdapterError(
                        f"adapter {name!r} cannot be applied on {device}: "
                        f"{type(e).__name__}: {_first_line(e)}"
                    ) from None
            out.append(Replica(f"{device}#{slot}", engine, tables))
    return out


def _same(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index or 0) == (b.index if b.index is not None else torch.cuda.current_device())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
