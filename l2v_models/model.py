"""The l2v Transformer: every registered family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2,
Gemma-3) as a bidirectional encoder on packed input, with one layer body.

A batch is `input_ids [T]` (all texts back to back, no padding) plus `cu_seqlens [B+1]`; every
token attends to every token of its own text (within a window on Gemma-2/3 local layers; only
to earlier ones when the config is causal), positions restart at 0 for each text. One layer
(`layer_forward`), with `xn` the input norm of `x` computed by the previous step:

    q, k, v = split(xn @ wqkv.T (+ bqkv))              # one GEMM; Qwen2 has the bias
    q, k = rope(qk_norm(q), qk_norm(k))                # in place; norms on Gemma-3 / Qwen3
    o = attention(q, k, v)                             # flash attention, window / soft-cap
  pre-norm families (Llama, Mistral, Qwen2, Qwen3, Gemma):
    h = o @ wo.T + x                                   # residual added in the GEMM epilogue
    m = act(norm(h) @ gate.T) * (norm(h) @ up.T)       # SwiGLU / GeGLU GEMM
    x' = m @ w_down.T + h;  xn' = next_norm(x')
  sandwich families (Gemma-2, Gemma-3):
    h = x + post_attn_norm(o @ wo.T); hn = mlp_norm(h)                  # one fused kernel
    x' = h + post_mlp_norm(mlp(hn) @ w_down.T); xn' = next_norm(x')     # one fused kernel

which is Hugging Face's layer for each family; `next_norm` is the next layer's input norm, or
the final norm after the last layer, so the forward returns the final-norm hidden states.

The ops come from a table chosen when the model is built (l2v_models.ops): TritonOps (the
l2v_kernels kernels, unchecked launchers, no host sync) or TorchOps (plain PyTorch, any device,
autograd). Weights are created on the meta device and filled from a state dict with assign=True
(l2v_models.checkpoint maps Hugging Face checkpoints onto these names, by the family's spec in
l2v_models.architectures).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from l2v_kernels._checks import check_cu_seqlens, check_tensor, interpreting, sync_allowed
from l2v_kernels.reference import positions_from_cu_seqlens, rope_cos_sin
from l2v_models.config import ModelConfig
from l2v_models.ops import POOL_MODES, BatchTables, TorchOps, TritonOps, masked_pool_torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
__all__ = ["BACKENDS", "POOL_MODES", "Layer", "Transformer", "layer_forward", "layer_shapes",
           "masked_pool_torch", "resolve_backend"]  # fmt: skip
_ROPE_MIN_POSITIONS = 4096  # rope tables start here (or at max_position_embeddings if smaller)


def _triton_unavailable(device: torch.device, config: ModelConfig | None) -> str | None:
    """Why the triton backend cannot run here, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return (
            f"the Triton kernels need a CUDA device (got {device}; on CPU set TRITON_INTERPRET=1)"
        )
    try:
        from l2v_kernels.attention import SUPPORTED_HEAD_DIMS
    except ImportError as e:
        return f"the Triton kernels could not be imported ({e})"
    if config is not None and config.head_dim not in SUPPORTED_HEAD_DIMS:
        return (
            f"head_dim={config.head_dim} is not one of the attention kernel's "
            f"{SUPPORTED_HEAD_DIMS}"
        )
    return None


def resolve_backend(backend: str, device, config: ModelConfig | None = None) -> str:
    """Pick the backend: "auto" is "triton" on CUDA when the kernels import and support the
    model's head_dim, else "torch"; an explicit "triton" that cannot run raises (no fallback)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto" and device.type != "cuda":
        return "torch"
    reason = _triton_unavailable(device, config)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' was requested but {reason}; use backend='torch'")
    logger.debug("l2v: using the torch backend because %s", reason)
    return "torch"


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our per-layer weights of this config's family -> their shapes. wqkv = [q; k; v] rows,
    w_gate_up = [gate; up] rows (gemm.pack_gate_up's layout, the same on both backends)."""
    c = config
    every = {
        "attn_norm": (c.hidden_size,),
        "wqkv": (c.qkv_size, c.hidden_size),
        "bqkv": (c.qkv_size,),
        "q_norm": (c.head_dim,),
        "k_norm": (c.head_dim,),
        "wo": (c.hidden_size, c.q_size),
        "post_attn_norm": (c.hidden_size,),
        "mlp_norm": (c.hidden_size,),
        "w_gate_up": (2 * c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
        "post_mlp_norm": (c.hidden_size,),
    }
    return {name: every[name] for name in c.spec.weights}


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


_OPTIONAL_WEIGHTS = ("bqkv", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


class Layer(nn.Module):
    """One layer's weights: those of the family's spec; the others are None."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        shapes = layer_shapes(config)
        for name in _OPTIONAL_WEIGHTS:
            if name not in shapes:
                setattr(self, name, None)
        for name, shape in shapes.items():
            setattr(self, name, _weight(*shape))

    def forward(self, ops, x, xn, next_norm, b: BatchTables, c: ModelConfig, local: bool):
        """layer_forward on this layer's weights, as a module call so that module hooks run
        (training shards layers with FSDP2, whose hooks gather a layer's weights)."""
        return layer_forward(ops, self, x, xn, next_norm, b, c, local)


def split_qkv(qkv: torch.Tensor, c: ModelConfig):
    """Views [T, H, D] of the q, k, v column blocks of the fused projection output."""
    T = qkv.shape[0]
    q = qkv[:, : c.q_size].view(T, c.num_heads, c.head_dim)
    k = qkv[:, c.q_size : c.q_size + c.kv_size].view(T, c.num_kv_heads, c.head_dim)
    v = qkv[:, c.q_size + c.kv_size :].view(T, c.num_kv_heads, c.head_dim)
    return q, k, v


def layer_forward(ops, layer: Layer, x, xn, next_norm, b: BatchTables, c: ModelConfig,
                  local: bool):  # fmt: skip
    """One layer: (x, its input norm xn) -> (x', next_norm(x')). See the module docstring."""
    T = x.shape[0]
    q, k, v = split_qkv(ops.linear(xn, layer.wqkv, layer.bqkv), c)
    q, k = ops.rotary(q, k, b, local, layer.q_norm, layer.k_norm)
    o = ops.attention(q, k, v, b, local).reshape(T, c.q_size)
    if c.sandwich_norms:
        hn, h = ops.norm_add_norm(ops.linear(o, layer.wo), x, layer.post_attn_norm,
                                  layer.mlp_norm)  # fmt: skip
        m = ops.linear(ops.gated_mlp(hn, layer.w_gate_up), layer.w_down)
        xn_next, x_next = ops.norm_add_norm(m, h, layer.post_mlp_norm, next_norm)
        return x_next, xn_next
    h = ops.linear(o, layer.wo, residual=x)
    hn = ops.rms_norm(h, layer.mlp_norm)
    x_next = ops.linear(ops.gated_mlp(hn, layer.w_gate_up), layer.w_down, residual=h)
    return x_next, ops.rms_norm(x_next, next_norm)


class Transformer(nn.Module):
    """forward(input_ids, cu_seqlens, max_seqlen, positions) -> final-norm hidden states.

    Build with `Transformer.from_state_dict(config, state_dict, backend)`; the constructor itself
    only declares the weights (call it under `torch.device("meta")`).
    """

    def __init__(self, config: ModelConfig, backend: str = "torch"):
        super().__init__()
        if backend not in ("triton", "torch"):
            raise ValueError(
                f"Transformer needs a resolved backend 'triton' or 'torch', got {backend!r}"
            )
        self.config = config
        self.backend = backend
        self.embed = _weight(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = _weight(config.hidden_size)
        self.rope_cos = self.rope_sin = None
        self.rope_local_cos = self.rope_local_sin = None
        self.ops = None  # the ops table: build_ops(), once the weights are real
        # Training: recompute each layer in the backward pass instead of keeping its
        # activations (torch.utils.checkpoint); only when autograd is recording.
        self.gradient_checkpointing = False

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: dict[str, torch.Tensor], backend: str = "auto"
    ) -> Transformer:
        """Take ownership of `state_dict`'s tensors (our names, see checkpoint.hf_key_map)."""
        devices = {t.device for t in state_dict.values()}
        dtypes = {t.dtype for t in state_dict.values()}
        if len(devices) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"weights must share one device and dtype, got {sorted(map(str, devices))} and "
                f"{sorted(map(str, dtypes))}"
            )
        device = devices.pop()
        backend = resolve_backend(backend, device, config)
        with torch.device("meta"):
            model = cls(config, backend)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.requires_grad_(False).eval()
        model._build_rope(min(config.max_position_embeddings, _ROPE_MIN_POSITIONS))
        model.build_ops()
        return model

    def build_ops(self, ops=None) -> None:
        """Choose the ops table (default: the backend's); the trainer passes its own."""
        if ops is None:
            ops = TorchOps(self.config) if self.backend == "torch" else TritonOps(
                self.config, [p for p in self.parameters()])  # fmt: skip
        self.ops = ops

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def rope_tables(self) -> list[torch.Tensor]:
        """The RoPE tables a forward reads (a CUDA graph keeps them alive)."""
        return [t for t in (self.rope_cos, self.rope_sin, self.rope_local_cos,
                            self.rope_local_sin) if t is not None]  # fmt: skip

    def _build_rope(self, positions: int) -> None:
        c = self.config
        self.rope_cos, self.rope_sin = rope_cos_sin(c.inv_freq(self.device), positions)
        if c.local_rope_theta is not None:
            local = c.inv_freq(self.device, local=True)
            self.rope_local_cos, self.rope_local_sin = rope_cos_sin(local, positions)

    def _check_inputs(self, input_ids, cu_seqlens, max_seqlen) -> None:
        op = "Transformer.forward"
        check_tensor(op, "input_ids", input_ids, ndim=1, dtypes=(torch.int32, torch.int64))
        if input_ids.device != self.device:
            raise ValueError(
                f"{op}: input_ids is on {input_ids.device}, the model on {self.device}"
            )
        check_cu_seqlens(op, cu_seqlens, input_ids.shape[0], self.device)
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
        if input_ids.numel() and sync_allowed():  # one host sync, skipped in graph capture
            lo, hi = input_ids.min(), input_ids.max()
            longest = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
            lo, hi, longest = torch.stack([lo.long(), hi.long(), longest.long()]).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"{op}: token ids must lie in [0, {self.config.vocab_size}), got {lo} ... {hi}"
                )
            if longest > max_seqlen:
                raise ValueError(f"{op}: max_seqlen={max_seqlen} < the longest text ({longest})")

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        positions: torch.Tensor | None = None,
        *,
        check_inputs: bool = True,
    ):
        """input_ids int [T], cu_seqlens int32 [B+1] (0 ... T), max_seqlen >= the longest text,
        positions int32 [T] (each token's index in its text; computed from cu_seqlens when None)
        -> final-norm hidden states [T, hidden_size] in the model dtype.

        check_inputs=False skips the validation (and its one device-to-host sync): for callers
        that built the batch themselves and checked it on the host, like the engine, so the host
        can prepare the next batch while the GPU works."""
        c = self.config
        if check_inputs:
            self._check_inputs(input_ids, cu_seqlens, max_seqlen)
        window = c.sliding_window  # host-side, so checked even when check_inputs=False
        if window is not None and max_seqlen > window:
            raise ValueError(
                f"Transformer.forward: max_seqlen={max_seqlen} exceeds the model's sliding window "
                f"({window}); l2v attends over whole texts, so texts must be at most that long"
            )
        T = input_ids.shape[0]
        if max_seqlen > self.rope_cos.shape[0]:
            self._build_rope(1 << (max_seqlen - 1).bit_length())
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, T)
        b = BatchTables(cu_seqlens, max_seqlen, positions, self.rope_cos, self.rope_sin,
                        self.rope_local_cos, self.rope_local_sin)  # fmt: skip
        ops = self.ops
        ops.prepare(b, self.device)
        x = F.embedding(input_ids, self.embed)
        if c.embed_scale is not None:  # Gemma: the scale rounded to the dtype, as in HF
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype, device=x.device)
        n = len(self.layers)
        xn = ops.rms_norm(x, self.layers[0].attn_norm if n else self.norm)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].attn_norm if i + 1 < n else self.norm
            args = (ops, x, xn, next_norm, b, c, c.layer_is_local(i))
            if recompute:
                x, xn = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, xn = layer(*args)
        return xn

    def pool(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        cu_seqlens: torch.Tensor,
        mode: str = "mean",
        normalize: bool = False,
        *,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """Pool each text's masked tokens -> float32 [B, hidden_size] (see
        l2v_kernels.reference.masked_pool): hidden [T, D] from forward, mask bool/int [T]
        (nonzero = pool this token), cu_seqlens int32 [B+1]; mode "mean", "weighted_mean",
        "last" or "max" (element-wise); a text with no masked token gives zeros; normalize
        L2-normalizes each row. check_inputs=False: as in forward, no validation and no host
        sync (the caller checked)."""
        if mode not in POOL_MODES:
            raise ValueError(f"pool: mode must be one of {POOL_MODES}, got {mode!r}")
        if check_inputs and self.backend == "triton":
            from l2v_kernels.pooling import masked_pool

            return masked_pool(hidden, mask, mode=mode, cu_seqlens=cu_seqlens,
                               normalize=normalize)  # fmt: skip
        return self.ops.pool(hidden, mask, cu_seqlens, mode, normalize)
