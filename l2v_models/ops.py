"""The ops the model's one layer body calls, per backend: chosen once, when a model is built.

    ops = TorchOps(config)                 # plain PyTorch: any device, autograd (training)
    ops = TritonOps(config, weights)       # l2v_kernels' Triton kernels + the C++ extension

Both have the same methods (the layer body in l2v_models.model never asks which it has):

    rms_norm(x, w) -> y                              y = x / rms(x) * (offset + w)
    norm_add_norm(x, residual, w_a, w_b) -> (y, h)   h = residual + norm_a(x); y = norm_b(h)
    linear(x, w, bias=None, residual=None) -> y      x @ w.T (+ bias) (+ residual)
    gated_mlp(x, w_gate_up) -> y                     act(x @ gate.T) * (x @ up.T)
    rotary(q, k, batch, local, q_norm, k_norm)       RoPE (per-head norms first) -> (q, k)
    attention(q, k, v, batch, local) -> o            bidirectional (or causal) per text
    pool(hidden, mask, cu_seqlens, mode, normalize)  masked pooling (POOL_MODES) -> fp32 [B, D]

Rounding points follow Hugging Face: every op's math in fp32, rounded once to the model dtype
(l2v_kernels.reference defines each op; tests hold both tables to it). The math of each op is
written once per backend: the Triton kernels in l2v_kernels, the torch versions here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2v_models.config import ModelConfig

logger = logging.getLogger(__name__)

POOL_MODES = ("mean", "weighted_mean", "last", "max")


@dataclass
class PadGroup:
    """Some of a batch's texts in one padded [n, L] view (torch backend attention): which packed
    tokens they hold (None: every token, in order), where each sits in the view, and which
    (query, key) pairs may attend, per layer kind (bool [n, 1, 1 or L, L])."""

    tokens: torch.Tensor | None  # int64 [t]
    pad_index: torch.Tensor  # int64 [t]: text * L + position
    n_seq: int
    seq_len: int
    allowed: dict


@dataclass
class BatchTables:
    """Per-forward values every layer reads (built once per forward by the model)."""

    cu_seqlens: torch.Tensor  # int32 [B+1]
    max_seqlen: int
    positions: torch.Tensor  # int32 [T], restarting at 0 per text
    cos: torch.Tensor  # fp32 [P, D/2] (global layers)
    sin: torch.Tensor
    local_cos: torch.Tensor | None = None  # local layers with their own RoPE base (Gemma-3)
    local_sin: torch.Tensor | None = None
    # torch backend only: the padded views attention runs on (TorchOps.prepare fills it)
    pad_groups: list[PadGroup] | None = None

    def rope(self, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if local and self.local_cos is not None:
            return self.local_cos, self.local_sin
        return self.cos, self.sin


def attention_window(config: ModelConfig, local: bool) -> tuple[int, int] | None:
    """(left, right): the keys j a query i of a local layer sees, i - left <= j <= i + right;
    None in a global layer. For a configured sliding window W, bidirectional attention sees
    |i - j| <= config.local_reach, by default W // 2 (transformers' rule for Gemma-3 with
    use_bidirectional_attention, the configuration EmbeddingGemma uses: a span of about W keys
    centred on the query); causal attention sees the W keys up to the query (i - W < j <= i), as
    transformers' causal Gemma."""
    if not local or config.local_window is None:
        return None
    w = config.local_window
    if config.causal:
        return (w - 1, 0)
    reach = config.local_reach if config.local_reach is not None else w // 2
    return (reach, reach)


# ------------------------------------------------------------------------------ torch
def length_groups(lengths: list[int], ratio: float = 2.0,
                  short: int = 32) -> list[list[int]] | None:  # fmt: skip
    """Texts (indices into `lengths`) grouped so that in each group the longest is at most
    `ratio` times the shortest (texts up to `short` tokens share one group), longest first;
    None when one group holds them all. Padded attention costs n * L^2 per group, so a pass of
    many short texts and one long one costs about what its tokens do, not n times the longest."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= max(ratio * lengths[i], short):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups if len(groups) > 1 else None


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + w.float())).to(x.dtype)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32: [x1*c - x2*s, x2*c + x1*s]; x [T, H, D], c/s [T, 1, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _activation(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


class TorchOps:
    """Plain PyTorch on any device; differentiable (the trainer runs it with autograd).

    Attention runs on a padded [B, H, L, D] view of the packed tokens (one SDPA call; soft-capped
    scores take an explicit softmax), with a boolean mask per layer kind (keys of the same text,
    within the window, causal when the config says so). attention_kernel=True (training on
    CUDA: the trainer's LoraOps sets it where the Triton backend can run) runs it instead on the
    packed tokens with l2v_kernels' differentiable FlashAttnVarlen (Triton forward and backward,
    attention dropout in the kernel): nothing is padded.
    """

    backend = "torch"

    def __init__(self, config: ModelConfig, *, attn_dropout: float = 0.0,
                 attention_kernel: bool = False):  # fmt: skip
        self.c = config
        # Dropout on the attention probabilities while `training` (the trainer's SimCSE stage).
        self.attn_dropout = attn_dropout
        self.training = False
        self.attention_kernel = attention_kernel

    def prepare(self, b: BatchTables, device: torch.device) -> None:
        """Padded views and attention masks, once per forward (read by every layer); the packed
        attention kernel needs neither. In inference, texts of very different lengths go to
        separate views (length_groups), so a pass that mixes short queries with long passages
        (the server's first-in-first-out passes) does not pad every query to the longest text;
        training keeps one view, so dropout draws its masks as it always has."""
        if self.attention_kernel:
            return
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        T = b.positions.shape[0]
        seq_ids = torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=device), lengths, output_size=T
        )
        host_lengths = None if self.training else lengths.tolist()
        groups = None if host_lengths is None else length_groups(host_lengths)
        if groups is None:
            b.pad_groups = [self._pad_group(None, seq_ids, lengths, max(b.max_seqlen, 1), b,
                                            device)]  # fmt: skip
            return
        # One sort puts the tokens group by group, text by text (each text's rank in that order).
        text_order = torch.tensor([i for texts in groups for i in texts], device=device)
        rank = torch.empty_like(lengths)
        rank[text_order] = torch.arange(len(text_order), device=device)
        order = torch.argsort(rank[seq_ids] * T + torch.arange(T, device=device))
        b.pad_groups = []
        first_text = first_token = 0
        for texts in groups:
            n_tokens = sum(host_lengths[i] for i in texts)
            tokens = order[first_token : first_token + n_tokens]
            members = text_order[first_text : first_text + len(texts)]
            b.pad_groups.append(self._pad_group(
                tokens, rank[seq_ids[tokens]] - first_text, lengths[members],
                max(max(host_lengths[i] for i in texts), 1), b, device))  # fmt: skip
            first_text += len(texts)
            first_token += n_tokens

    def _pad_group(self, tokens, seq_ids, lengths, L: int, b: BatchTables, device) -> PadGroup:
        """The padded [n, L] view of the texts of `lengths` (tokens: their packed tokens, None
        for all; seq_ids: each token's text within the view)."""
        c = self.c
        n_seq = lengths.shape[0]
        positions = b.positions.long() if tokens is None else b.positions.long()[tokens]
        real = torch.arange(L, device=device)[None, :] < lengths[:, None]
        key_ok = real | (lengths == 0)[:, None]  # an empty text would give NaN rows nobody reads
        # Padded query rows (outputs discarded) see every real key of their text: a row with no
        # key (past the end, outside every window) has a NaN softmax whose NaN gradient would
        # reach q and k in the backward.
        pad_row = ~real[:, None, :, None]
        allowed = {}
        for local in {c.layer_is_local(i) for i in range(c.num_layers)}:
            window = attention_window(c, local)
            if window is None and not c.causal:
                allowed[local] = key_ok[:, None, None, :]
                continue
            i = torch.arange(L, device=device)[:, None]
            j = torch.arange(L, device=device)[None, :]
            pair = torch.ones(L, L, dtype=torch.bool, device=device)
            if c.causal:
                pair &= j <= i
            if window is not None:
                pair &= (j >= i - window[0]) & (j <= i + window[1])
            allowed[local] = key_ok[:, None, None, :] & (pair | pad_row)
        return PadGroup(tokens, seq_ids * L + positions, n_seq, L, allowed)

    def rms_norm(self, x, w):
        return _norm(x, w, self.c.rms_norm_eps, self.c.norm_offset)

    def norm_add_norm(self, x, residual, w_a, w_b):
        h = residual + self.rms_norm(x, w_a)
        return self.rms_norm(h, w_b), h

    def linear(self, x, w, bias=None, residual=None):
        y = F.linear(x, w, bias)
        return y if residual is None else residual + y

    def gated_mlp(self, x, w_gate_up):
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
        return _activation(gate, self.c.hidden_act) * up

    def rotary(self, q, k, b: BatchTables, local: bool, q_norm=None, k_norm=None):
        """New tensors (autograd needs the inputs of the norms unchanged)."""
        cos, sin = b.rope(local)
        pos = b.positions.long()
        c, s = cos[pos][:, None, :], sin[pos][:, None, :]
        if q_norm is not None:
            q, k = self.rms_norm(q, q_norm), self.rms_norm(k, k_norm)
        return _rotate(q, c, s), _rotate(k, c, s)

    def attention(self, q, k, v, b: BatchTables, local: bool):
        if self.attention_kernel:
            return self._packed_attention(q, k, v, b, local)
        (group,) = b.pad_groups if len(b.pad_groups) == 1 else (None,)
        if group is not None and group.tokens is None:
            return self._padded_attention(q, k, v, group, local)
        out = torch.empty_like(q)
        for g in b.pad_groups:
            out[g.tokens] = self._padded_attention(q[g.tokens], k[g.tokens], v[g.tokens], g,
                                                   local)  # fmt: skip
        return out

    def _padded_attention(self, q, k, v, g: PadGroup, local: bool):
        """Attention of the group's tokens q, k, v [t, heads, D] on its padded view."""
        allowed = g.allowed[local]
        groups = self.c.num_heads // self.c.num_kv_heads

        def padded(t: torch.Tensor) -> torch.Tensor:
            L = g.seq_len
            out = t.new_zeros(g.n_seq * L, t.shape[1], t.shape[2]).index_copy(0, g.pad_index, t)
            return out.view(g.n_seq, L, t.shape[1], t.shape[2]).transpose(1, 2)

        qp = padded(q)
        kp = padded(k).repeat_interleave(groups, dim=1)
        vp = padded(v).repeat_interleave(groups, dim=1)
        scale = self.c.softmax_scale
        p = self.attn_dropout if self.training else 0.0
        if self.c.attn_softcap is None:
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed, dropout_p=p,
                                                 scale=scale)  # fmt: skip
        else:  # Gemma-2: scale, cap, mask, softmax in fp32 (as transformers' eager path)
            cap = self.c.attn_softcap
            scores = torch.tanh((qp.float() @ kp.float().transpose(-1, -2)) * scale / cap) * cap
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            if p > 0:
                probs = F.dropout(probs, p, training=True)
            out = (probs.to(vp.dtype) @ vp).to(q.dtype)
        n = g.n_seq * g.seq_len
        return out.transpose(1, 2).reshape(n, q.shape[1], q.shape[2])[g.pad_index]

    def _packed_attention(self, q, k, v, b: BatchTables, local: bool):
        """l2v_kernels' FlashAttnVarlen on the packed tokens (autograd: the Triton backward).
        The dropout seed comes from torch's CPU generator: seeded runs repeat, and a layer
        recomputed under torch.utils.checkpoint draws the same mask."""
        from l2v_kernels.attention import FlashAttnVarlen, draw_dropout_seed

        c = self.c
        p = self.attn_dropout if self.training else 0.0
        seed = draw_dropout_seed() if p > 0 else 0
        return FlashAttnVarlen.apply(q, k, v, b.cu_seqlens, b.max_seqlen, c.causal,
                                     c.softmax_scale, attention_window(c, local), c.attn_softcap,
                                     float(p), seed)  # fmt: skip

    def pool(self, hidden, mask, cu_seqlens, mode="mean", normalize=False):
        return masked_pool_torch(hidden, mask, cu_seqlens, mode, normalize)


def masked_pool_torch(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mode: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """Vectorized torch version of reference.masked_pool (packed, or padded when cu_seqlens is
    None): per-token weights, then one index_add per text; "max": one scatter_reduce ("amax")
    per text. Differentiable. fp32 [B, D]."""
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
    if mode == "max":
        pooled = _masked_max(hidden, m, seq_ids, n_seq)
    else:
        pooled = _weighted_sum(hidden, m, cu_seqlens, seq_ids, n_seq, mode)
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled


def _masked_max(hidden, m, seq_ids, n_seq):
    """Element-wise max over each text's pooled tokens (those not pooled hold -inf); zeros for
    a text without one."""
    T, D = hidden.shape
    values = hidden.float().masked_fill(~m[:, None], float("-inf"))
    best = torch.full((n_seq, D), float("-inf"), device=hidden.device)
    best = best.scatter_reduce(0, seq_ids[:, None].expand(T, D), values, "amax")
    count = torch.zeros(n_seq, device=hidden.device).index_add_(0, seq_ids, m.float())
    return torch.where(count[:, None] > 0, best, 0.0)


def _weighted_sum(hidden, m, cu_seqlens, seq_ids, n_seq, mode):
    """mean / weighted_mean / last as per-token weights, one index_add per text."""
    T, D = hidden.shape
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
    return total / torch.where(denom > 0, denom, 1.0)[:, None]


# ------------------------------------------------------------------------------ triton
class TritonOps:
    """l2v_kernels on CUDA (or the CPU interpreter in tests): the unchecked `<op>_fwd` launchers,
    inputs validated once per forward by the model, no host sync anywhere (graph-capturable).

    GEMMs: when every layer weight qualifies (CUDA, fp16/bf16, 16-byte aligned rows) the unchecked
    launchers are bound (the extension's cuBLASLt residual GEMM, the Triton SwiGLU GEMM);
    otherwise the checked public functions, which pick a path per call (interpreter, fp32, odd
    shapes).
    """

    backend = "triton"

    def __init__(self, config: ModelConfig, weights: list[torch.Tensor]):
        from l2v_kernels import attention, gemm, norm, pooling, rope

        self.c = config
        self._attention = attention.flash_attn_varlen_fwd
        self._rms_norm = norm.rms_norm_fwd
        self._norm_add_norm = norm.norm_add_norm_fwd
        self._rotary = rope.apply_rotary_fwd
        self._pool = pooling.masked_pool_fwd
        c = config
        rows_ok = all(n % 8 == 0 for n in (c.hidden_size, c.q_size, c.qkv_size,
                                           c.intermediate_size))  # fmt: skip
        fast = (
            all(w.device.type == "cuda" for w in weights)
            and all(w.dtype in (torch.float16, torch.bfloat16) for w in weights)
            and rows_ok
            and all(w.data_ptr() % 16 == 0 and w.is_contiguous() for w in weights)
        )
        if fast:
            self._gemm = gemm.gemm_residual_fwd
            self._swiglu = gemm.gemm_swiglu_fwd
        else:
            self._gemm = gemm.gemm_residual
            act = c.hidden_act
            self._swiglu = lambda x, w, _act: gemm.gemm_swiglu(x, w, act=act)
        self.windows = {
            local: attention_window(c, local) for local in (False, True)
        }

    def prepare(self, b: BatchTables, device: torch.device) -> None:
        pass

    def rms_norm(self, x, w):
        return self._rms_norm(x, w, self.c.rms_norm_eps, weight_offset=self.c.norm_offset)

    def norm_add_norm(self, x, residual, w_a, w_b):
        return self._norm_add_norm(x, residual, w_a, w_b, self.c.rms_norm_eps,
                                   weight_offset=self.c.norm_offset)  # fmt: skip

    def linear(self, x, w, bias=None, residual=None):
        return self._gemm(x, w, residual, bias)

    def gated_mlp(self, x, w_gate_up):
        return self._swiglu(x, w_gate_up, self.c.hidden_act)

    def rotary(self, q, k, b: BatchTables, local: bool, q_norm=None, k_norm=None):
        """In place on the fused qkv buffer (one read and one write of q and k)."""
        cos, sin = b.rope(local)
        return self._rotary(q, k, cos, sin, b.positions, q, k, q_norm_weight=q_norm,
                            k_norm_weight=k_norm, norm_eps=self.c.rms_norm_eps,
                            norm_weight_offset=self.c.norm_offset)  # fmt: skip

    def attention(self, q, k, v, b: BatchTables, local: bool):
        c = self.c
        return self._attention(q, k, v, b.cu_seqlens, b.max_seqlen, c.causal, c.softmax_scale,
                               window=self.windows[local], softcap=c.attn_softcap)  # fmt: skip

    def pool(self, hidden, mask, cu_seqlens, mode="mean", normalize=False):
        out = hidden.new_empty((cu_seqlens.shape[0] - 1, hidden.shape[-1]), dtype=torch.float32)
        return self._pool(hidden, mask, out, mode, cu_seqlens, normalize)
