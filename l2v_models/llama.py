"""The l2v Transformer: Llama / Mistral / Qwen2 as a bidirectional encoder on packed input.

A batch is `input_ids [T]` (all texts back to back, no padding) plus `cu_seqlens [B+1]`; every
token attends to every token of its own text, positions restart at 0 for each text. One layer:

    xn = rms_norm(x)                          # attn_norm
    q, k, v = split(xn @ wqkv.T (+ bqkv))     # one GEMM; Qwen2 has the bias
    q, k = rope(q, k)                         # in place on the qkv buffer
    h = attention(q, k, v) @ wo.T + x         # O GEMM, residual added in its epilogue
    hn = rms_norm(h)                          # mlp_norm
    x = silu(hn @ w_gate.T) * (hn @ w_up.T) @ w_down.T + h   # SwiGLU GEMM, down GEMM + residual

which is Hugging Face's h = x + attn(norm(x)); out = h + mlp(norm(h)), followed by the final norm.
Because the GEMMs add the residual, the norms never need to: each layer keeps one stream.

Backends: "triton" runs the l2v_kernels ops (unchecked launchers inside the layer loop; inputs are
validated once per forward, or not at all with check_inputs=False when the caller checked them on
the host, as the encoder does, so no batch syncs the host) and the gemm module's GEMMs (the C++
extension where present, cuBLAS otherwise; on CUDA in fp16/bf16 the unchecked launchers are bound
once per model by _bind_gemms); "torch" is plain PyTorch on any device (SDPA on a padded view,
fp32 norm statistics).
Weights are created on the meta device and filled from a state dict with assign=True (see
l2v_models.loading, which maps Hugging Face checkpoints onto these names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from l2v_kernels._checks import check_cu_seqlens, check_tensor, interpreting, sync_allowed
from l2v_kernels.reference import positions_from_cu_seqlens, rope_cos_sin
from l2v_models.config import ModelConfig

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
POOL_MODES = ("mean", "weighted_mean", "last")
_ROPE_MIN_POSITIONS = 4096  # rope tables start here (or at max_position_embeddings if smaller)

_kernels_cache: SimpleNamespace | None = None


def _kernels() -> SimpleNamespace:
    """The Triton-side ops, imported on first use so that CPU-only installs never need triton."""
    global _kernels_cache
    if _kernels_cache is None:
        from l2v_kernels import attention, gemm, norm, pooling, rope

        _kernels_cache = SimpleNamespace(
            attention=attention._flash_attn_varlen_fwd,
            head_dims=attention.SUPPORTED_HEAD_DIMS,
            rms_norm=norm._rms_norm_fwd,
            rotary=rope._apply_rotary_fwd,
            gemm_residual=gemm.gemm_residual,
            gemm_swiglu=gemm.gemm_swiglu,
            masked_pool=pooling.masked_pool,
            masked_pool_unchecked=pooling._masked_pool_fwd,
        )
    return _kernels_cache


def _triton_unavailable(device: torch.device, config: ModelConfig | None) -> str | None:
    """Why the triton backend cannot run here, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return (
            f"the Triton kernels need a CUDA device (got {device}; on CPU set TRITON_INTERPRET=1)"
        )
    try:
        kernels = _kernels()
    except ImportError as e:
        return f"the Triton kernels could not be imported ({e})"
    if config is not None and config.head_dim not in kernels.head_dims:
        return (
            f"head_dim={config.head_dim} is not one of the attention kernel's {kernels.head_dims}"
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


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Layer(nn.Module):
    """One decoder layer's weights. wqkv = [q; k; v] rows, w_gate_up = gate and up rows
    (plain [gate; up] on the torch backend, gemm.pack_gate_up's layout on the triton one)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.attn_norm = _weight(c.hidden_size)
        self.wqkv = _weight(c.qkv_size, c.hidden_size)
        self.bqkv = _weight(c.qkv_size) if c.qkv_bias else None
        self.wo = _weight(c.hidden_size, c.q_size)
        self.mlp_norm = _weight(c.hidden_size)
        self.w_gate_up = _weight(2 * c.intermediate_size, c.hidden_size)
        self.w_down = _weight(c.hidden_size, c.intermediate_size)


@dataclass
class _Batch:
    """Per-forward values every layer reads."""

    cu_seqlens: torch.Tensor  # int32 [B+1]
    max_seqlen: int
    positions: torch.Tensor  # int32 [T], restarting at 0 per text
    cos: torch.Tensor  # fp32 [P, D/2]
    sin: torch.Tensor
    # torch backend: where each packed token sits in a padded [B, L] view, which keys are real,
    # and each token's cos/sin row (gathered once, read by every layer)
    pad_index: torch.Tensor | None = None  # int64 [T]
    key_mask: torch.Tensor | None = None  # bool [B, 1, 1, L]
    token_cos: torch.Tensor | None = None  # fp32 [T, 1, D/2]
    token_sin: torch.Tensor | None = None


class Transformer(nn.Module):
    """Llama / Mistral / Qwen2 encoder: forward(input_ids, cu_seqlens, max_seqlen) -> hidden.

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
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.scale = config.head_dim**-0.5
        self._gemm_residual = self._gemm_swiglu = None  # unchecked GEMM launchers: _bind_gemms

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: dict[str, torch.Tensor], backend: str = "auto"
    ) -> Transformer:
        """Take ownership of `state_dict`'s tensors (our names, see loading.hf_key_map): no copy."""
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
        model._bind_gemms()
        return model

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def _build_rope(self, positions: int) -> None:
        inv_freq = self.config.inv_freq(self.device)
        self.rope_cos, self.rope_sin = rope_cos_sin(inv_freq, positions)

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
        if check_inputs:
            self._check_inputs(input_ids, cu_seqlens, max_seqlen)
        window = self.config.sliding_window  # host-side, so checked even when check_inputs=False
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
        batch = _Batch(
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            positions=positions,
            cos=self.rope_cos,
            sin=self.rope_sin,
        )
        x = F.embedding(input_ids, self.embed)
        if self.backend == "triton":
            for layer in self.layers:
                x = self._layer_triton(layer, x, batch)
            out = torch.empty_like(x)
            _kernels().rms_norm(x, self.norm, self.config.rms_norm_eps, out)
            return out
        self._prepare_torch(batch, T)
        for layer in self.layers:
            x = self._layer_torch(layer, x, batch)
        return _rms_norm_torch(x, self.norm, self.config.rms_norm_eps)

    # ---------------------------------------------------------------- triton backend
    def _bind_gemms(self) -> None:
        """Choose the layer GEMMs' entry points once per model instead of once per call.

        When every layer GEMM qualifies for the fused kernels (triton backend on CUDA, fp16/bf16
        weights, rows of a multiple of 16 bytes, 16-byte aligned weights; activations are fresh
        allocations and so aligned too), the layer loop calls the unchecked launchers: the
        extension's cuBLASLt residual GEMM and the Triton SwiGLU GEMM, skipping a few Python
        checks per GEMM per layer that cost real time at batch 1. Otherwise it calls the checked
        public functions, which pick a path per call (CPU interpreter, fp32, odd shapes).
        """
        self._gemm_residual = self._gemm_swiglu = None
        if self.backend != "triton" or self.device.type != "cuda":
            return
        c = self.config
        weights = [w for layer in self.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up,
                                                        layer.w_down)]  # fmt: skip
        rows_ok = all(n % 8 == 0 for n in (c.hidden_size, c.q_size, c.qkv_size,
                                           c.intermediate_size))  # fmt: skip
        if (
            self.dtype in (torch.float16, torch.bfloat16)
            and rows_ok
            and all(w.data_ptr() % 16 == 0 and w.is_contiguous() for w in weights)
        ):
            from l2v_kernels import gemm

            self._gemm_residual = gemm._gemm_residual_fwd
            self._gemm_swiglu = gemm._gemm_swiglu_launch

    def _layer_triton(self, layer: Layer, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        k_ops, c = _kernels(), self.config
        T, eps = x.shape[0], c.rms_norm_eps
        xn = torch.empty_like(x)
        k_ops.rms_norm(x, layer.attn_norm, eps, xn)
        gemm_residual = self._gemm_residual or k_ops.gemm_residual
        qkv = gemm_residual(xn, layer.wqkv, None, layer.bqkv)
        q, k, v = _split_qkv(qkv, c)
        k_ops.rotary(q, k, b.cos, b.sin, b.positions, q, k)  # in place
        attn = k_ops.attention(q, k, v, b.cu_seqlens, b.max_seqlen, False, self.scale)
        h = gemm_residual(attn.view(T, c.q_size), layer.wo, x, None)
        hn = torch.empty_like(h)
        k_ops.rms_norm(h, layer.mlp_norm, eps, hn)
        if self._gemm_swiglu is not None:
            act = self._gemm_swiglu(hn, layer.w_gate_up, "silu")
        else:
            act = k_ops.gemm_swiglu(hn, layer.w_gate_up, act="silu")
        return gemm_residual(act, layer.w_down, h, None)

    # ---------------------------------------------------------------- torch backend
    def _prepare_torch(self, b: _Batch, T: int) -> None:
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        n_seq, L = lengths.shape[0], max(b.max_seqlen, 1)
        seq_ids = torch.repeat_interleave(
            torch.arange(n_seq, device=self.device), lengths, output_size=T
        )
        b.pad_index = seq_ids * L + b.positions.long()
        key_mask = torch.arange(L, device=self.device)[None, :] < lengths[:, None]
        key_mask |= (lengths == 0)[:, None]  # an empty text would give NaN rows nobody reads
        b.key_mask = key_mask[:, None, None, :]
        b.token_cos = b.cos[b.positions.long()][:, None, :]
        b.token_sin = b.sin[b.positions.long()][:, None, :]

    def _layer_torch(self, layer: Layer, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        c = self.config
        T, eps = x.shape[0], c.rms_norm_eps
        qkv = F.linear(_rms_norm_torch(x, layer.attn_norm, eps), layer.wqkv, layer.bqkv)
        q, k, v = _split_qkv(qkv, c)
        q.copy_(_rope_torch(q, b.token_cos, b.token_sin))
        k.copy_(_rope_torch(k, b.token_cos, b.token_sin))
        attn = self._attention_torch(q, k, v, b)
        h = x + F.linear(attn.reshape(T, c.q_size), layer.wo)
        gate, up = F.linear(_rms_norm_torch(h, layer.mlp_norm, eps), layer.w_gate_up).chunk(2, -1)
        return h + F.linear(F.silu(gate) * up, layer.w_down)

    def _attention_torch(self, q, k, v, b: _Batch) -> torch.Tensor:
        """SDPA on a padded [B, H, L, D] view of the packed tokens; padded keys are masked."""
        n_seq, L = b.key_mask.shape[0], b.key_mask.shape[-1]
        groups = self.config.num_heads // self.config.num_kv_heads

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(n_seq * L, t.shape[1], t.shape[2]).index_copy_(0, b.pad_index, t)
            return out.view(n_seq, L, t.shape[1], t.shape[2]).transpose(1, 2)

        qp = padded(q)
        kp = padded(k).repeat_interleave(groups, dim=1)
        vp = padded(v).repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=b.key_mask, scale=self.scale)
        return out.transpose(1, 2).reshape(n_seq * L, q.shape[1], q.shape[2])[b.pad_index]

    # ---------------------------------------------------------------- pooling
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
        (nonzero = pool this token), cu_seqlens int32 [B+1]; mode "mean", "weighted_mean" or
        "last"; a text with no masked token gives zeros; normalize L2-normalizes each row.
        check_inputs=False: as in forward, no validation and no host sync (the caller
        checked)."""
        if mode not in POOL_MODES:
            raise ValueError(f"pool: mode must be one of {POOL_MODES}, got {mode!r}")
        if self.backend == "triton":
            if not check_inputs:
                n_seq = cu_seqlens.shape[0] - 1
                out = hidden.new_empty((n_seq, hidden.shape[-1]), dtype=torch.float32)
                _kernels().masked_pool_unchecked(hidden, mask, out, mode, cu_seqlens, normalize)
                return out
            return _kernels().masked_pool(
                hidden, mask, mode=mode, cu_seqlens=cu_seqlens, normalize=normalize
            )
        return masked_pool_torch(hidden, mask, cu_seqlens, mode, normalize)


def _split_qkv(qkv: torch.Tensor, c: ModelConfig):
    """Views [T, H, D] of the q, k, v column blocks of the fused projection output."""
    T = qkv.shape[0]
    q = qkv[:, : c.q_size].view(T, c.num_heads, c.head_dim)
    k = qkv[:, c.q_size : c.q_size + c.kv_size].view(T, c.num_kv_heads, c.head_dim)
    v = qkv[:, c.q_size + c.kv_size :].view(T, c.num_kv_heads, c.head_dim)
    return q, k, v


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _rope_torch(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32: [x1*c - x2*s, x2*c + x1*s]; x [T, H, D], c/s [T, 1, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def masked_pool_torch(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mode: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """Vectorized torch version of reference.masked_pool (packed, or padded when cu_seqlens is
    None): per-token weights, then one index_add per text. fp32 [B, D]."""
    if cu_seqlens is None:  # padded [B, L, D]: every row is a text of length L
        n_seq, L, D = hidden.shape
        hidden, mask = hidden.reshape(n_seq * L, D), mask.reshape(n_seq * L)
        cu_seqlens = torch.arange(n_seq + 1, device=hidden.device, dtype=torch.int32) * L
    T, D = hidden.shape
    if mask.shape != (T,):
        raise ValueError(f"pool: mask has shape {tuple(mask.shape)}, expected [{T}]")
    n_seq = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(
        torch.arange(n_seq, device=hidden.device), lengths, output_size=T
    )
    m = mask != 0
    if mode == "mean":
        w = m.float()
    elif mode == "weighted_mean":  # 1..n over each text's masked tokens
        count = torch.cumsum(m.long(), 0)
        before = torch.cat([count.new_zeros(1), count])[cu_seqlens[:-1].long()]
        w = ((count - before[seq_ids]) * m).float()
    elif mode == "last":
        token = torch.where(m, torch.arange(T, device=hidden.device), -1)
        last = token.new_full((n_seq,), -1).scatter_reduce(0, seq_ids, token, "amax")
        w = torch.zeros(T + 1, device=hidden.device)
        w.scatter_(0, torch.where(last >= 0, last, T), 1.0)  # texts without one hit slot T
        w = w[:T]
    else:
        raise ValueError(f"pool: mode must be one of {POOL_MODES}, got {mode!r}")
    total = torch.zeros(n_seq, D, device=hidden.device).index_add_(
        0, seq_ids, hidden.float() * w[:, None]
    )
    denom = torch.zeros(n_seq, device=hidden.device).index_add_(0, seq_ids, w)
    pooled = total / torch.where(denom > 0, denom, 1.0)[:, None]
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled
