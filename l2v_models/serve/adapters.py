"""Many LoRA adapters on one base: each applied unmerged, per forward pass.

    adapters = read_adapters({"search": "path/to/supervised-a", "nli": "path/to/supervised-b"})
    table = AdapterTable.build(model, adapters["search"])   # per model view and adapter
    model.ops = UnmergedLoraOps(base_ops, table, model.config)  # this pass runs with "search"

The base weights are held once; an adapter adds only its A and B matrices (fp32, on the
model's device). A pass runs one adapter's texts (the batcher never mixes adapters in a pass):
for every adapted projection of l2v's fused weights (q, k, v rows of `wqkv`; gate, up rows of
`w_gate_up`; `wo`; `w_down`) the layer computes

    y = base_linear(x, W) + x @ A_cat.T @ B_cat.T          (fp32, rounded once to the dtype)

where A_cat stacks the A of every part of that weight ([sum r, K]) and B_cat places each part's
`scale * B` in its rows of the fused output ([N, sum r], zeros elsewhere), so one weight costs two
small GEMMs whatever number of parts it has. The gated MLP of an adapted `w_gate_up` runs as the
linear plus its delta, then the activation. In fp32 this equals the merged model (W + scale B A)
to rounding; in bf16 the merged weight is rounded once where this path rounds the base GEMM and
adds an fp32 delta (a different rounding, same function).

Reads adapters with l2v_models.checkpoint (PEFT's files, checked: DoRA, biases and other targets
are refused there) and maps their Hugging Face names onto the fused weights with the family's
key map (checkpoint.hf_key_map). Nothing here imports the training package.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

# An adapter's name is what requests send as "model": printable, no spaces or slashes' tricks.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}")


class AdapterError(ValueError):
    """An adapter that cannot be served (the message names it)."""


def parse_adapter_option(value: str) -> tuple[str, str]:
    """"NAME=PATH" -> (name, path); AdapterError saying what is wrong otherwise."""
    name, sep, path = value.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise AdapterError(f"--adapter {value!r}: expected NAME=PATH (e.g. search=./my-adapter)")
    if not _NAME.fullmatch(name):
        raise AdapterError(
            f"--adapter {value!r}: the name {name!r} must start with a letter or digit and hold "
            "only letters, digits and . _ : - / (at most 128 characters)"
        )
    return name, path


def read_adapters(named: dict[str, str]) -> dict:
    """{name: path} -> {name: checkpoint.LoraAdapter}, each read and checked; AdapterError naming
    the adapter (its name and path) that fails."""
    from l2v_models.checkpoint import read_lora_adapter

    out = {}
    for name, path in named.items():
        try:
            if not Path(path).expanduser().is_dir():
                raise FileNotFoundError(f"{path} is not a folder")
            out[name] = read_lora_adapter(Path(path).expanduser())
        except Exception as e:
            raise AdapterError(
                f"adapter {name!r} ({path}) cannot be loaded: {_first_line(e)}"
            ) from None
    return out


class AdapterTable:
    """One adapter's unmerged LoRA for one model view: id(fused weight) -> (weight, A_cat fp32
    [R, K], B_cat fp32 [N, R]) on the model's device (see the module docstring)."""

    def __init__(self, name: str, entries: dict[int, tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]]):  # fmt: skip
        self.name = name
        self.entries = entries

    @classmethod
    def build(cls, model, adapter, name: str = "") -> AdapterTable:
        """The table of `adapter` (a checkpoint.LoraAdapter) on `model` (an l2v Transformer);
        AdapterError naming the adapter when it does not fit the model."""
        from l2v_models.checkpoint import hf_key_map, hf_shapes

        c = model.config
        key_map, shapes = hf_key_map(c), hf_shapes(c)
        rows = {"q": (0, c.q_size), "k": (c.q_size, c.q_size + c.kv_size),
                "v": (c.q_size + c.kv_size, c.qkv_size), "gate": (0, c.intermediate_size),
                "up": (c.intermediate_size, 2 * c.intermediate_size)}  # fmt: skip
        grouped: dict[str, list] = {}
        for hf_name, (a, b, scale) in adapter.deltas.items():
            if hf_name not in key_map:
                raise AdapterError(
                    f"adapter {name!r} ({adapter.path}) targets {hf_name}, which this model "
                    "does not have: it was trained for another base model"
                )
            n, k = shapes[hf_name]
            if a.shape[1] != k or b.shape[0] != n:
                raise AdapterError(
                    f"adapter {name!r} ({adapter.path}): {hf_name} is [{n}, {k}] but lora_A is "
                    f"{tuple(a.shape)} and lora_B {tuple(b.shape)}: it was trained for another "
                    "base model"
                )
            ours, part = key_map[hf_name]
            layer, weight_name = ours.split(".")[1], ours.split(".")[2]
            w = getattr(model.layers[int(layer)], weight_name)
            start, stop = rows[part] if part is not None else (0, w.shape[0])
            grouped.setdefault(ours, [w, []])[1].append((start, stop, a, b, scale))
        device = model.device
        entries = {}
        for w, parts in grouped.values():
            r_total = sum(p[2].shape[0] for p in parts)
            a_cat = torch.empty(r_total, w.shape[1], dtype=torch.float32, device=device)
            b_cat = torch.zeros(w.shape[0], r_total, dtype=torch.float32, device=device)
            col = 0
            for start, stop, a, b, scale in sorted(parts, key=lambda p: p[0]):
                r = a.shape[0]
                a_cat[col : col + r] = a.to(device, torch.float32)
                b_cat[start:stop, col : col + r] = scale * b.to(device, torch.float32)
                col += r
            entries[id(w)] = (w, a_cat, b_cat)
        return cls(name, entries)


class UnmergedLoraOps:
    """An ops table (l2v_models.ops) plus one adapter's LoRA on the weights of its table; every
    other op is the base table's. Inference only (no dropout, no gradients)."""

    def __init__(self, base, table: AdapterTable, config):
        self.base = base
        self.table = table
        self.hidden_act = config.hidden_act

    def __getattr__(self, name):  # rms_norm, attention, rotary, pool, prepare, backend, c ...
        return getattr(self.base, name)

    def _delta(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        entry = self.table.entries.get(id(w))
        if entry is None or entry[0] is not w:
            return None
        _, a, b = entry
        return (x.float() @ a.t()) @ b.t()

    def linear(self, x, w, bias=None, residual=None):
        delta = self._delta(x, w)
        if delta is None:
            return self.base.linear(x, w, bias, residual)
        y = self.base.linear(x, w, bias, None).float() + delta
        if residual is not None:
            y = y + residual.float()
        return y.to(x.dtype)

    def gated_mlp(self, x, w_gate_up):
        delta = self._delta(x, w_gate_up)
        if delta is None:
            return self.base.gated_mlp(x, w_gate_up)
        gate, up = (self.base.linear(x, w_gate_up).float() + delta).to(x.dtype).chunk(2, dim=-1)
        act = F.silu(gate) if self.hidden_act == "silu" else F.gelu(gate, approximate="tanh")
        return act * up


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
