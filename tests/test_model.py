"""The l2v Transformer against Hugging Face's own model made bidirectional (hf_compat), same
weights: fp32 on CPU for tiny random Llama / Mistral / Qwen2 configs and the real SmolLM2-135M,
the triton backend in the interpreter, backend selection, pooling; bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, skip_unless_gguf_readable
from tiny import LLAMA3_SCALING, randomize_, tiny_config

from l2v_kernels import reference
from l2v_models.checkpoint import from_hf_state_dict, load_model, to_hf_state_dict
from l2v_models.config import ModelConfig
from l2v_models.hf_compat import build_hf_model, hf_bidirectional
from l2v_models.model import Transformer, masked_pool_torch, resolve_backend
from l2v_models.ops import length_groups

HAS_CUDA = torch.cuda.is_available()
# Mixed lengths: a single token, awkward sizes, one text much longer than the rest.
LENGTHS = [7, 1, 23, 40, 13]


def random_texts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def pack(texts, device="cpu"):
    lengths = torch.tensor([len(t) for t in texts])
    cu = torch.zeros(len(texts) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return torch.cat(texts).to(device), cu.to(device), int(lengths.max())


def left_pad(texts, pad_id=2, device="cpu"):
    """llm2vec's layout: left padding, attention mask 0 on pads."""
    L = max(len(t) for t in texts)
    ids = torch.full((len(texts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), L, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, L - len(t) :] = t
        mask[i, L - len(t) :] = 1
    return ids.to(device), mask.to(device)


def unpad(hidden, texts):
    L = hidden.shape[1]
    return torch.cat([hidden[i, L - len(t) :] for i, t in enumerate(texts)])


def hf_and_ours(hf_config, *, backend="torch", dtype=torch.float32, device="cpu", seed=0):
    hf = build_hf_model(hf_config, dtype=dtype, device=device)
    randomize_(hf, seed)
    ours = from_hf_state_dict(
        ModelConfig.from_hf_config(hf_config), hf.state_dict(), dtype=dtype, device=device,
        backend=backend,
    )  # fmt: skip
    return hf, ours


def compare(hf, ours, texts, device="cpu", hidden_tol=1e-4, cos_min=0.99999):
    ids, mask = left_pad(texts, device=device)
    ref = unpad(hf(input_ids=ids, attention_mask=mask).last_hidden_state, texts)
    packed, cu, max_len = pack(texts, device)
    out = ours(packed, cu, max_len)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = rel_err(out.float(), ref.float())
    assert err < hidden_tol, f"hidden-state rel error {err:.2e}"
    pool_mask = torch.ones(packed.shape[0], dtype=torch.bool, device=device)
    ours_pooled = ours.pool(out, pool_mask, cu, "mean")
    ref_pooled = reference.masked_pool(ref, pool_mask, "mean", cu)
    cos = F.cosine_similarity(ours_pooled, ref_pooled.to(ours_pooled.device), dim=-1)
    assert cos.min().item() >= cos_min, f"pooled cosine {cos.min().item():.6f}"
    return out, err


CASES = {
    "llama-gqa": lambda: tiny_config("llama"),
    "llama-mha": lambda: tiny_config("llama", gqa=False),
    "llama3-rope": lambda: tiny_config("llama", rope_scaling=LLAMA3_SCALING),
    "mistral": lambda: tiny_config("mistral", sliding_window=4096),
    "qwen2-bias": lambda: tiny_config("qwen2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_hf_fp32(case):
    hf, ours = hf_and_ours(CASES[case]())
    assert ours.backend == "torch"
    compare(hf, ours, random_texts(LENGTHS, 256))


def test_packed_batch_equals_each_text_alone():
    _, ours = hf_and_ours(tiny_config("llama"))
    texts = random_texts(LENGTHS, 256, seed=1)
    packed, cu, max_len = pack(texts)
    together = ours(packed, cu, max_len)
    alone = torch.cat([ours(*pack([t])) for t in texts])
    assert rel_err(together, alone) < 1e-5
    # ... and with an empty text in the batch (cu_seqlens repeats an offset).
    cu_empty = torch.cat([cu[:2], cu[1:]])
    assert rel_err(ours(packed, cu_empty, max_len), alone) < 1e-5


def test_length_groups():
    # longest first; within a group the longest is at most twice the shortest; <= 32 together
    assert length_groups([300, 1, 37, 20, 600, 280, 0]) == [[4, 0], [5], [2, 3], [1, 6]]
    assert length_groups([64, 40, 33]) is None  # one group: the padded view as before
    assert length_groups([5]) is None and length_groups([]) is None


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_torch_attention_in_length_groups_equals_one_padded_view(arch):
    """Inference runs texts of very different lengths in separate padded views (softcap and
    local windows included); the result equals one view of all texts, as training runs it,
    and a view holding only an empty text is harmless."""
    config = tiny_config(arch, sliding_window=16) if arch != "llama" else tiny_config(arch)
    _, ours = hf_and_ours(config)
    texts = random_texts([70, 3, 33, 1, 9, 40], 256, seed=2)
    packed, cu, max_len = pack(texts)
    grouped = ours(packed, cu, max_len)
    ours.ops.training = True  # no dropout in this model: the same math on one padded view
    try:
        one_view = ours(packed, cu, max_len)
    finally:
        ours.ops.training = False
    assert rel_err(grouped, one_view) < 1e-5
    cu_empty = torch.cat([cu, cu[-1:]])  # a seventh, empty text: a group of its own
    assert rel_err(ours(packed, cu_empty, max_len), grouped) < 1e-5


def test_hf_reference_is_bidirectional_and_ignores_left_padding():
    """The reference itself: a later token changes an earlier token's state (a causal model's
    would not), and left padding leaves the real tokens' states unchanged."""
    config = tiny_config("llama")
    hf = build_hf_model(config)
    randomize_(hf)
    text = random_texts([12], 256)[0]
    changed = text.clone()
    changed[-1] = (changed[-1] + 1) % 256
    first = hf(input_ids=text[None]).last_hidden_state[0, 0]
    assert (first - hf(input_ids=changed[None]).last_hidden_state[0, 0]).abs().max() > 1e-3

    from transformers import AutoModel

    causal = AutoModel.from_config(config)
    causal.load_state_dict(hf.state_dict())
    c_first = causal(input_ids=text[None]).last_hidden_state[0, 0]
    assert torch.equal(c_first, causal(input_ids=changed[None]).last_hidden_state[0, 0])

    texts = [text, random_texts([30], 256, seed=3)[0]]
    ids, mask = left_pad(texts)
    padded = hf(input_ids=ids, attention_mask=mask).last_hidden_state[0, -12:]
    alone = hf(input_ids=text[None]).last_hidden_state[0]
    assert rel_err(padded, alone) < 1e-5


def test_hf_bidirectional_refuses_flash_attention():
    config = tiny_config("llama")
    hf = build_hf_model(config)
    hf.config._attn_implementation = "flash_attention_2"
    hf._l2v_bidirectional = False
    with pytest.raises(ValueError, match="sdpa"):
        hf_bidirectional(hf)


def test_sliding_window_refuses_longer_texts():
    _, ours = hf_and_ours(tiny_config("mistral", sliding_window=16))
    ours(*pack(random_texts([16, 5], 256)))  # at the window: fine
    with pytest.raises(ValueError, match="sliding window"):
        ours(*pack(random_texts([17], 256)))


def test_forward_input_errors():
    _, ours = hf_and_ours(tiny_config("llama"))
    ids, cu, max_len = pack(random_texts([5, 9], 256))
    with pytest.raises(ValueError, match="token ids"):
        ours(torch.tensor([0, 256, 3]), torch.tensor([0, 3], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="max_seqlen"):
        ours(ids, cu, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(ids, cu.long(), max_len)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(ids, torch.tensor([0, 5, 13], dtype=torch.int32), max_len)
    with pytest.raises(ValueError, match="input_ids"):
        ours(ids.float(), cu, max_len)


def test_rope_tables_grow_for_long_texts():
    _, ours = hf_and_ours(tiny_config("llama", max_position_embeddings=32))
    assert ours.rope_cos.shape[0] == 32
    texts = random_texts([70], 256)
    out = ours(*pack(texts))
    assert ours.rope_cos.shape[0] >= 70 and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last", "max"])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_pool_matches_reference(mode, normalize):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 1, 17, 9]
    T = sum(lengths)
    hidden = torch.randn(T, 37, generator=g)
    mask = torch.rand(T, generator=g) < 0.6
    mask[5:6] = False  # the 1-token text has nothing to pool -> zeros
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = masked_pool_torch(hidden, mask, cu, mode, normalize)
    ref = reference.masked_pool(hidden.double(), mask, mode, cu, normalize)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    assert torch.equal(out[1], torch.zeros(37)) and torch.equal(out[2], torch.zeros(37))
    # padded layout
    padded = torch.randn(3, 11, 37, generator=g)
    pmask = torch.rand(3, 11, generator=g) < 0.5
    out = masked_pool_torch(padded, pmask, None, mode, normalize)
    assert rel_err(out, reference.masked_pool(padded.double(), pmask, mode, None, normalize)) < 1e-6


def test_torch_max_pool_is_differentiable():
    """The trainer runs TorchOps.pool under autograd: max sends each column's gradient to the
    token holding the maximum, and nothing to tokens left out of the pool."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64).float().requires_grad_(True)
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)  # the middle text pools nothing
    masked_pool_torch(hidden, mask, cu, "max").sum().backward()
    expected = torch.zeros(9, 5)
    for s, e in ((0, 4), (6, 9)):
        rows = torch.arange(s, e)[mask[s:e]]
        best = rows[hidden.detach()[rows].argmax(0)]
        expected[best, torch.arange(5)] = 1.0
    assert torch.equal(hidden.grad, expected)


def test_backend_selection(monkeypatch):
    config = ModelConfig.from_hf_config(tiny_config("llama"))
    assert resolve_backend("torch", "cpu", config) == "torch"
    assert resolve_backend("auto", "cpu", config) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu", config)
    with pytest.raises(ValueError, match="resolved backend"):
        Transformer(config, "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("triton", "cpu", config)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="head_dim=16"):  # the attention kernel's head dims
        resolve_backend("triton", "cpu", config)


def _triton_config():
    """Tiny, but with head_dim 64 (the attention kernel's smallest): 2 query heads, 1 kv head."""
    return tiny_config(
        "qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=96, num_hidden_layers=2,
    )  # fmt: skip


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the GPU test covers CUDA")
def test_triton_backend_in_interpreter_matches_torch_and_hf():
    hf, ours = hf_and_ours(_triton_config(), backend="triton")
    assert ours.backend == "triton"
    texts = random_texts([9, 1, 20], 256)
    out, _ = compare(hf, ours, texts)
    torch_model = from_hf_state_dict(ours.config, to_hf_state_dict(ours), backend="torch",
                                     device="cpu", dtype=torch.float32)  # fmt: skip
    assert rel_err(out, torch_model(*pack(texts))) < 1e-5
    packed, cu, max_len = pack(texts)
    mask = torch.rand(packed.shape[0], generator=torch.Generator().manual_seed(0)) < 0.7
    for mode in ("mean", "weighted_mean", "last", "max"):
        a = ours.pool(out, mask, cu, mode, normalize=True)
        b = torch_model.pool(out, mask, cu, mode, normalize=True)
        assert rel_err(a, b) < 1e-6
    # The encoder drives the unchecked (sync-free) forward and pooling launchers.
    from l2v_models.encoder import LLM2Vec

    ids, n_pool = [t.tolist() for t in texts], [5, 1, 30]
    for mode in ("mean", "weighted_mean", "last_token"):
        a = LLM2Vec.from_model(ours, pooling_mode=mode).encode_token_ids(ids, n_pool)
        b = LLM2Vec.from_model(torch_model, pooling_mode=mode).encode_token_ids(ids, n_pool)
        assert rel_err(a, b) < 1e-5, mode


@pytest.fixture(scope="module")
def smollm2():
    skip_unless_gguf_readable()
    return load_model("smollm2", dtype=torch.float32, device="cpu", backend="torch")


def test_smollm2_matches_hf(smollm2):
    """The real SmolLM2-135M-Instruct (30 layers, GQA 9/3) from the embedded GGUF."""
    model = smollm2.model
    hf = build_hf_model(smollm2.hf_config, to_hf_state_dict(model))
    texts = random_texts([14, 3, 31], smollm2.config.vocab_size, seed=5)
    compare(hf, model, texts)


# ---------------------------------------------------------------------------- GPU
def _mistral_7b_two_layers():
    return tiny_config(
        "mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=2, vocab_size=32000, sliding_window=None,
        max_position_embeddings=32768, rms_norm_eps=1e-5,
    )  # fmt: skip


@pytest.mark.gpu
def test_bf16_triton_matches_hf_bf16_on_gpu():
    """2-layer Mistral-7B shapes, bf16: ours (triton backend) vs HF bf16 SDPA, both judged
    against HF in fp32: cosine >= 0.999 and an error within 3x of HF's own bf16 error."""
    config = _mistral_7b_two_layers()
    hf32 = build_hf_model(config, dtype=torch.float32, device="cuda")
    randomize_(hf32, seed=0)
    state = hf32.state_dict()
    hf16 = build_hf_model(config, state, dtype=torch.bfloat16, device="cuda")
    ours = from_hf_state_dict(ModelConfig.from_hf_config(config), state, dtype=torch.bfloat16,
                              device="cuda", backend="triton")  # fmt: skip
    assert ours.backend == "triton"
    # The layer loop takes the unchecked fused launchers (SwiGLU always; cuBLASLt residual GEMM
    # when the extension is built, which gpu_check.sh does first).
    from l2v_kernels import gemm

    assert ours.ops._swiglu is gemm.gemm_swiglu_fwd and ours.ops._gemm is gemm.gemm_residual_fwd
    assert gemm.extension_available(), "build the extension first (bench/gpu_check.sh does)"
    texts = random_texts([100, 1, 257, 512, 33, 64], 32000, seed=7)
    ids, mask = left_pad(texts, device="cuda")
    with torch.no_grad():
        ref = unpad(hf32(input_ids=ids, attention_mask=mask).last_hidden_state, texts)
        hf_bf16 = unpad(hf16(input_ids=ids, attention_mask=mask).last_hidden_state, texts)
    packed, cu, max_len = pack(texts, "cuda")
    out = ours(packed, cu, max_len)
    assert out.dtype == torch.bfloat16
    ours_err, hf_err = rel_err(out.float(), ref), rel_err(hf_bf16.float(), ref)
    assert ours_err <= 3 * hf_err + 1e-3, f"ours {ours_err:.3e} vs HF bf16 {hf_err:.3e}"
    pool_mask = torch.ones(packed.shape[0], dtype=torch.bool, device="cuda")
    a = ours.pool(out, pool_mask, cu, "mean")
    b = reference.masked_pool(hf_bf16, pool_mask, "mean", cu)
    assert F.cosine_similarity(a, b, dim=-1).min().item() >= 0.999
    # The torch backend on the GPU as well.
    torch_model = from_hf_state_dict(ours.config, state, dtype=torch.bfloat16, device="cuda",
                                     backend="torch")  # fmt: skip
    t_err = rel_err(torch_model(packed, cu, max_len).float(), ref)
    assert t_err <= 3 * hf_err + 1e-3, f"torch backend {t_err:.3e} vs HF bf16 {hf_err:.3e}"
