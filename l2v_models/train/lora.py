"""Unmerged LoRA on l2v's fused weights, and the ops table that applies it with autograd.

    adapters = LoraAdapters(model.config, r=16, alpha=32)     # A [r, K] ~ PEFT's init, B = 0
    ops = LoraOps(model, adapters, lora_dropout=0.05, attn_dropout=0.0)
    model.build_ops(ops)                                       # the model now runs with LoRA

l2v's layer holds q, k, v as one fused weight `wqkv` ([q; k; v] rows) and gate, up as
`w_gate_up` ([gate; up] rows). LoRA is per Hugging Face projection, as PEFT saves it, so each
fused weight carries one (A, B) pair per part:

    y = x @ W.T + cat_parts( scale * dropout(x) @ A_p.T @ B_p.T )       (scale = alpha / r)

with an independent dropout mask per projection (PEFT has one dropout module per LoRA layer).
The frozen weights are never modified; only A and B require gradients. LoraOps finds the
adapters of a weight by the identity of the weight tensor (whichever tensor the layer's
attribute holds when it runs: its parameter, or FSDP2's gathered stand-in), so the layer body
in l2v_models.model runs unchanged. Attention dropout (SimCSE: 0.3, as llm2vec sets
`attention_dropout`) is TorchOps' own: on the attention probabilities while `training`, as
transformers' eager and SDPA paths do.

Attention: on CUDA, where the Triton backend can run (resolve_backend "auto"), l2v_kernels'
packed FlashAttnVarlen with its Triton backward (and the attention dropout in the kernel), so
nothing is padded. Elsewhere (CPU) TorchOps' padded [B, H, L, D] view with a key mask: measured
on this CPU (fwd + bwd, SmolLM2 heads, CPU seconds per layer call) it beat one block-diagonal
[T, T] mask and a loop of per-text SDPA calls (SimCSE batch of 64 texts, median 30 tokens:
0.29 s vs 0.67 s and 3.1 s; MNTP 16 texts, median 200: 0.71 s vs 2.35 s and 1.66 s).

A later backend (Triton backward kernels) slots in per op: subclass LoraOps and replace
`linear`, `gated_mlp` or `attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from l2v_models.config import ModelConfig
from l2v_models.model import layer_shapes, resolve_backend
from l2v_models.ops import TorchOps

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted projection: layer index, its Hugging Face module name
    ("self_attn.q_proj"), our fused weight ("wqkv") and the rows [start, stop) it occupies."""

    layer: int
    module: str
    weight: str
    start: int
    stop: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def peft_prefix(self) -> str:
        """PEFT's key prefix on a bare *Model (llm2vec's layout)."""
        return f"base_model.model.layers.{self.layer}.{self.module}"


def lora_targets(config: ModelConfig, targets=LORA_TARGETS) -> list[LoraTarget]:
    """Every adapted projection of the model, layer by layer, in the family's key order.

    targets: Hugging Face projection names (a subset of LORA_TARGETS)."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; choose from {LORA_TARGETS}")
    c = config
    rows = {
        "q": (0, c.q_size),
        "k": (c.q_size, c.q_size + c.kv_size),
        "v": (c.q_size + c.kv_size, c.qkv_size),
        "gate": (0, c.intermediate_size),
        "up": (c.intermediate_size, 2 * c.intermediate_size),
    }
    shapes = layer_shapes(c)
    out = []
    for i in range(c.num_layers):
        for hf, (ours, part) in c.spec.layer_keys.items():
            if not hf.endswith(".weight"):
                continue
            module = hf[: -len(".weight")]
            if module.rsplit(".", 1)[-1] not in targets:
                continue
            n, k = shapes[ours]
            start, stop = rows[part] if part is not None else (0, n)
            out.append(LoraTarget(i, module, ours, start, stop, k))
    return out


class LoraAdapters(nn.Module):
    """The trainable LoRA matrices of one adapter: A[j] fp32 [r, K], B[j] fp32 [N, r] for
    targets[j]. Initialized like PEFT (A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(K)), B = 0),
    from `generator` when given."""

    def __init__(self, config: ModelConfig, r: int = 16, alpha: float = 32,
                 targets=LORA_TARGETS, generator: torch.Generator | None = None,
                 device=None):  # fmt: skip
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {alpha!r}")
        self.config = config
        self.r, self.alpha = r, float(alpha)
        self.scale = self.alpha / r
        self.target_modules = tuple(t for t in LORA_TARGETS if t in targets)
        self.targets = lora_targets(config, targets)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for t in self.targets:
            bound = 1.0 / math.sqrt(t.in_features)
            a = torch.rand(r, t.in_features, generator=generator) * (2 * bound) - bound
            self.A.append(nn.Parameter(a.to(device)))
            self.B.append(nn.Parameter(torch.zeros(t.out_features, r, device=device)))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's names -> CPU fp32 copies: `<prefix>.lora_A.weight` [r, K], `.lora_B.weight`."""
        out = {}
        for t, a, b in zip(self.targets, self.A, self.B, strict=True):
            out[f"{t.peft_prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            out[f"{t.peft_prefix}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named A/B tensors in (every target must be present, shapes must match)."""
        for t, a, b in zip(self.targets, self.A, self.B, strict=True):
            for name, p in ((f"{t.peft_prefix}.lora_A.weight", a),
                            (f"{t.peft_prefix}.lora_B.weight", b)):  # fmt: skip
                if name not in state:
                    raise ValueError(f"LoRA state is missing {name}")
                if tuple(state[name].shape) != tuple(p.shape):
                    raise ValueError(
                        f"LoRA state {name} has shape {tuple(state[name].shape)}, expected "
                        f"{tuple(p.shape)}"
                    )
                p.copy_(state[name])

    @torch.no_grad()
    def merged_weights(self, model) -> dict[str, torch.Tensor]:
        """Our fused weight names -> W + scale * B @ A (fp32 accumulate, model dtype): what
        loading merges. For tests and for exporting a merged model."""
        out: dict[str, torch.Tensor] = {}
        for t, a, b in zip(self.targets, self.A, self.B, strict=True):
            name = f"layers.{t.layer}.{t.weight}"
            if name not in out:
                out[name] = getattr(model.layers[t.layer], t.weight).detach().float().clone()
            out[name][t.start : t.stop] += self.scale * (b.float() @ a.float())
        return {k: v.to(model.dtype) for k, v in out.items()}


def _activation(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


class LoraOps(TorchOps):
    """TorchOps plus unmerged LoRA on the adapted projections, LoRA input dropout and attention
    dropout (both only while `training` is True). Differentiable end to end.

    model: the l2v Transformer whose frozen weights the adapters belong to. adapters: its
    LoraAdapters (or None: plain TorchOps with attention dropout)."""

    def __init__(self, model, adapters: LoraAdapters | None, *, lora_dropout: float = 0.0,
                 attn_dropout: float = 0.0):  # fmt: skip
        for name, p in (("lora_dropout", lora_dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        # TorchOps applies attention dropout to the attention probabilities while `training`;
        # on CUDA its attention is the packed Triton kernel (forward and backward).
        kernel = resolve_backend("auto", model.device, model.config) == "triton"
        super().__init__(model.config, attn_dropout=float(attn_dropout), attention_kernel=kernel)
        self.adapters = adapters
        self.lora_dropout = float(lora_dropout)
        self.training = True
        # (layer module, weight name) -> [(start, stop, A, B)] sorted by rows.
        self._sites: dict[tuple[int, str], tuple[nn.Module, str, list]] = {}
        if adapters is not None:
            for t, a, b in zip(adapters.targets, adapters.A, adapters.B, strict=True):
                layer = model.layers[t.layer]
                site = self._sites.setdefault((t.layer, t.weight), (layer, t.weight, []))
                site[2].append((t.start, t.stop, a, b))
            for _, _, parts in self._sites.values():
                parts.sort(key=lambda p: p[0])
        # id(weight) -> (weight, parts or None): the weight tensor a layer hands to linear() is
        # its parameter, or under FSDP2 the gathered copy that stands in for it during the
        # layer's forward; either is looked up once and kept alive here, so its id is stable.
        self._table: dict[int, tuple[torch.Tensor, list | None]] = {}

    def _parts(self, w: torch.Tensor) -> list | None:
        entry = self._table.get(id(w))
        if entry is None or entry[0] is not w:
            found = None
            for layer, name, parts in self._sites.values():
                if getattr(layer, name) is w:
                    found = parts
                    break
            entry = self._table[id(w)] = (w, found)
        return entry[1]

    def _lora_delta(self, x: torch.Tensor, w: torch.Tensor):
        parts = self._parts(w)
        if parts is None:
            return None
        scale = self.adapters.scale
        p = self.lora_dropout if self.training else 0.0
        pieces, row = [], 0
        for start, stop, a, b in parts:
            if start > row:
                pieces.append(x.new_zeros(x.shape[0], start - row))
            xd = F.dropout(x, p, training=True) if p > 0 else x
            pieces.append(((xd.to(a.dtype) @ a.t()) @ b.t() * scale).to(x.dtype))
            row = stop
        if row < w.shape[0]:
            pieces.append(x.new_zeros(x.shape[0], w.shape[0] - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def linear(self, x, w, bias=None, residual=None):
        y = F.linear(x, w, bias)
        delta = self._lora_delta(x, w)
        if delta is not None:
            y = y + delta
        return y if residual is None else residual + y

    def gated_mlp(self, x, w_gate_up):
        gate, up = self.linear(x, w_gate_up).chunk(2, dim=-1)
        return _activation(gate, self.c.hidden_act) * up


def merge_adapter_(model, adapter) -> None:
    """Merge a loaded PEFT adapter (l2v_models.checkpoint.LoraAdapter) into the model's fused
    weights in place (fp32 accumulate, one rounding): for chains longer than load_model's
    (-mntp base + one adapter), e.g. a second adapter on a GGUF base."""
    targets = {f"layers.{t.layer}.{t.module}.weight": t for t in lora_targets(model.config)}
    for name, (a, b, scale) in adapter.deltas.items():
        t = targets.get(name)
        if t is None:
            raise ValueError(f"LoRA adapter {adapter.path} targets {name}, not in this model")
        w = getattr(model.layers[t.layer], t.weight)
        if a.shape[1] != t.in_features or b.shape[0] != t.out_features:
            raise ValueError(
                f"LoRA adapter {adapter.path}: {name} is [{t.out_features}, {t.in_features}] but "
                f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}: the adapter was "
                "trained for another base model"
            )
        with torch.no_grad():
            rows = w[t.start : t.stop].float() + scale * (b.float() @ a.float())
            w[t.start : t.stop] = rows.to(w.dtype)
