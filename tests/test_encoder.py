"""The LLM2Vec encoder against llm2vec 0.2.3's own pipeline, transcribed.

`llm2vec_encode` below is llm2vec's `encode` / `_encode` / `forward` / `get_pooling` written out
on a Hugging Face bidirectional model (l2v_models.hf_compat) with the same tiny random weights:
left-padded batches sorted by string length, pad = eos, pooling over the padded rows. Our packed
encoder must give the same vectors (cosine >= 0.99999 in fp32) wherever llm2vec is well defined,
and the documented result where it is not.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import skip_unless_gguf_readable
from test_tokenization import Llm2vecTextRef
from tiny import make_lora_adapter, make_tiny_checkpoint
from transformers import AutoModel

from l2v_models import tokenization as tk
from l2v_models.encoder import LLM2Vec
from l2v_models.hf_compat import dtype_kwargs, hf_bidirectional

COS_MIN = 0.99999

TEXTS = [
    ["Retrieve the passage", "the cat sat on the mat"],
    "a dog is in the text",
    ["query:", "which cat"],
    "x",
    "A longer document, with punctuation! It is for the test of a passage that is long.",
    ["  represent this  ", " dog "],
    "the mat",
]


# ------------------------------------------------------------------ llm2vec 0.2.3, transcribed
def llm2vec_get_pooling(features, last_hidden_states, pooling_mode, skip_instruction, bos_id):
    if skip_instruction:
        features["attention_mask"] = features["embed_mask"]
    seq_lengths = features["attention_mask"].sum(dim=-1)
    if pooling_mode == "mean":
        return torch.stack(
            [last_hidden_states[i, -length:, :].mean(dim=0) for i, length in enumerate(seq_lengths)]
        )
    if pooling_mode == "weighted_mean":
        bs, l, _ = last_hidden_states.shape
        complete_weights = torch.zeros(bs, l, device=last_hidden_states.device)
        for i, seq_l in enumerate(seq_lengths):
            if seq_l > 0:
                complete_weights[i, -seq_l:] = torch.arange(seq_l) + 1
                complete_weights[i] /= torch.clamp(complete_weights[i].sum(), min=1e-9)
        return torch.sum(last_hidden_states * complete_weights.unsqueeze(-1), dim=1)
    if pooling_mode in ("eos_token", "last_token"):
        return last_hidden_states[:, -1]
    if pooling_mode == "bos_token":
        return last_hidden_states[features["input_ids"] == bos_id]
    raise ValueError(pooling_mode)


@torch.no_grad()
def llm2vec_encode(hf, enc: LLM2Vec, sentences, batch_size=32):
    """llm2vec's LLM2Vec.encode with enc's settings, on the HF bidirectional model `hf`."""
    ref = Llm2vecTextRef(enc.tokenizer, enc.name_or_path, enc.config, enc.pooling_mode,
                         enc.max_length, enc.doc_max_length)  # fmt: skip
    if isinstance(sentences[0], str):
        sentences = [[""] + [sentence] for sentence in sentences]
    texts = [ref._convert_to_str(s[0], s[1]) for s in sentences]
    order = np.argsort([-len(t) for t in texts])
    texts_sorted = [texts[i] for i in order]
    out = []
    for start in range(0, len(texts), batch_size):
        batch = texts_sorted[start : start + batch_size]
        features = ref.tokenize([ref.prepare_for_tokenization(t) for t in batch])
        embed_mask = features.pop("embed_mask")
        hidden = hf(**features).last_hidden_state
        features["embed_mask"] = embed_mask
        out.append(llm2vec_get_pooling(features, hidden, enc.pooling_mode, enc.skip_instruction,
                                       enc.tokenizer.bos_token_id))  # fmt: skip
    emb = torch.cat(out)[np.argsort(order)]
    return emb.to(torch.float32)


def mixed_to_pairs(items):
    """Our mixed list -> llm2vec's all-pairs form (what llm2vec needs to read it correctly)."""
    return [["", t] if isinstance(t, str) else list(t) for t in items]


def assert_rows_match(ours: torch.Tensor, ref: torch.Tensor, cos_min: float = COS_MIN):
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    for i in range(ref.shape[0]):
        if ref[i].norm() == 0:
            assert ours[i].norm() == 0, f"row {i}: expected zeros"
            continue
        cos = torch.nn.functional.cosine_similarity(ours[i].double(), ref[i].double(), dim=0)
        rel = ((ours[i] - ref[i]).norm() / ref[i].norm()).item()
        assert cos >= cos_min and rel < 1e-4, f"row {i}: cos {cos:.7f}, rel err {rel:.2e}"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("enc"), "llama")


def load_hf(path, adapter=None):
    hf = AutoModel.from_pretrained(path, attn_implementation="sdpa", **dtype_kwargs(torch.float32))
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    return hf_bidirectional(hf.eval())


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return load_hf(tiny_dir)


@pytest.fixture(scope="module")
def base_encoder(tiny_dir):
    return LLM2Vec.from_pretrained(str(tiny_dir), device_map="cpu", torch_dtype=torch.float32)


@pytest.fixture
def enc(base_encoder):
    """The shared encoder with llm2vec's default settings restored after each test."""
    yield base_encoder
    base_encoder.pooling_mode, base_encoder.skip_instruction = "mean", True
    base_encoder.max_length, base_encoder.doc_max_length = 512, 400


def encode(enc, items, **kw):
    kw.setdefault("show_progress_bar", False)
    return enc.encode(items, **kw)


# ------------------------------------------------------------------ llm2vec's rules, end to end
@pytest.mark.parametrize("skip_instruction", [True, False])
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"])
def test_pooling_matches_llm2vec(enc, hf, mode, skip_instruction):
    enc.pooling_mode, enc.skip_instruction = mode, skip_instruction
    ours = encode(enc, TEXTS, max_tokens_per_batch=40)  # several packed batches
    ref = llm2vec_encode(hf, enc, mixed_to_pairs(TEXTS), batch_size=4)  # padded batches
    assert_rows_match(ours, ref)


def test_defaults_and_attributes(enc, tiny_dir):
    assert (enc.pooling_mode, enc.max_length, enc.doc_max_length, enc.skip_instruction) == (
        "mean", 512, 400, True)  # fmt: skip
    assert enc.tokenizer.pad_token == enc.tokenizer.eos_token
    assert enc.tokenizer.padding_side == "left"
    assert type(enc.config).__name__ == "LlamaConfig" and enc.config_family == "llama"
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.eval() is enc


def test_doc_max_length_and_max_length(enc, hf):
    enc.doc_max_length, enc.max_length = 6, 12
    ours = encode(enc, TEXTS)
    assert_rows_match(ours, llm2vec_encode(hf, enc, mixed_to_pairs(TEXTS)))
    # over-long texts are truncated: more words after the limit change nothing
    long = "a dog is in the text and the cat sat on the mat " * 3
    a, b = encode(enc, [long, long + " which cat of the mat"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_chat_template_by_name_or_path(tmp_path):
    name = "mistralai/Mistral-7B-Instruct-v0.2"
    path = make_tiny_checkpoint(tmp_path, "mistral", name_or_path=name)
    enc = LLM2Vec.from_pretrained(str(path), device="cpu", pooling_mode="eos_token")
    assert enc.name_or_path == name and enc.config_family == "mistral"
    prepared = enc.prepare_for_tokenization(enc._convert_to_str("Q", "the cat"))
    assert prepared == "[INST] Q !@#$%^&*()the cat [/INST] </s>"
    items = [["Q", "the cat"], "a dog"]
    assert_rows_match(encode(enc, items), llm2vec_encode(load_hf(path), enc, mixed_to_pairs(items)))


def test_llm2vec_config_json_and_adapter(tmp_path, tiny_dir):
    cfg = {"pooling_mode": "weighted_mean", "max_length": 30, "doc_max_length": 8,
           "skip_instruction": False}  # fmt: skip
    adapter = make_lora_adapter(tmp_path, tiny_dir, llm2vec_config=cfg)
    enc = LLM2Vec.from_pretrained(str(tiny_dir), str(adapter), device="cpu")
    assert (enc.pooling_mode, enc.max_length, enc.doc_max_length, enc.skip_instruction) == (
        "weighted_mean", 30, 8, False)  # fmt: skip
    assert_rows_match(encode(enc, TEXTS), llm2vec_encode(load_hf(tiny_dir, adapter), enc,
                                                         mixed_to_pairs(TEXTS)))  # fmt: skip
    # explicit keywords win over llm2vec_config.json; None keeps the file's value (llm2vec)
    enc2 = LLM2Vec.from_pretrained(
        str(tiny_dir),
        str(adapter),
        device="cpu",
        pooling_mode="mean",
        max_length=None,
        merge_peft=True,
    )
    assert (enc2.pooling_mode, enc2.max_length) == ("mean", 30)


# ------------------------------------------------------------------ batching and order
def test_results_do_not_depend_on_batching_and_keep_input_order(enc):
    words = "the cat sat on a mat and a dog was in the text of this passage".split()
    rng = np.random.default_rng(0)
    items = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=23)]
    items[3] = ["query:", items[3]]
    base = encode(enc, items, max_tokens_per_batch=10**6)
    for kw in ({"max_tokens_per_batch": 7}, {"max_tokens_per_batch": 45},
               {"batch_size": 1}, {"batch_size": 4, "max_tokens_per_batch": 60}):  # fmt: skip
        torch.testing.assert_close(encode(enc, items, **kw), base, rtol=1e-5, atol=1e-6)
    alone = torch.stack([encode(enc, [t])[0] for t in items[:6]])
    torch.testing.assert_close(alone, base[:6], rtol=1e-5, atol=1e-6)


def test_normalize_and_output_types(enc):
    raw = encode(enc, TEXTS)
    unit = encode(enc, TEXTS, normalize_embeddings=True)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=-1), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    arr = encode(enc, TEXTS, convert_to_numpy=True)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (7, 96)
    np.testing.assert_array_equal(arr, raw.numpy())
    t = encode(enc, TEXTS, convert_to_numpy=True, convert_to_tensor=True)  # tensor wins
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
    t *= 2  # an ordinary tensor (not an inference tensor): in-place use works
    assert encode(enc, TEXTS, device="cpu").shape == (7, 96)


# ------------------------------------------------------------------ documented divergences
def test_bare_string_mixed_list_and_medi_item(enc):
    single = encode(enc, "a dog is in the text")
    assert single.shape == (96,)  # llm2vec: one embedding per character
    torch.testing.assert_close(single, encode(enc, ["a dog is in the text"])[0])
    mixed = encode(enc, ["the cat", ["query:", "the mat"]])
    torch.testing.assert_close(mixed[0], encode(enc, ["the cat"])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], encode(enc, [["query:", "the mat"]])[0], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    medi = encode(enc, ["query:", "the mat", 0])  # llm2vec's bare [instruction, text, id]
    assert medi.shape == (1, 96)
    torch.testing.assert_close(medi[0], mixed[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean"])
def test_empty_and_whitespace_texts(enc, hf, mode):
    enc.pooling_mode = mode
    empties = ["", "   ", ["query:", ""], ["query:", " \t "]]
    ours = encode(enc, empties + ["a long text about the cat and the dog on the mat"])
    # llm2vec's result for each text encoded alone (no padding): mean -> all tokens (h[-0:]),
    # weighted_mean -> zeros
    alone = torch.cat([llm2vec_encode(hf, enc, [list(p)], batch_size=1)
                       for p in mixed_to_pairs(empties)])  # fmt: skip
    assert_rows_match(ours[:4], alone)
    if mode == "weighted_mean":
        assert (ours[:4] == 0).all()
    else:
        assert (ours[:4].norm(dim=-1) > 0).all()
    torch.testing.assert_close(ours[:4], encode(enc, empties), rtol=1e-5, atol=1e-6)


def test_issue80_embed_length_beyond_the_sequence_is_clamped(enc):
    ids = [[1, 40, 41, 42], [1, 43]]
    a = enc.encode_token_ids(ids, [3, 1])
    b = enc.encode_token_ids(ids, [4, 2])
    c = enc.encode_token_ids(ids, [50, 9])  # llm2vec: crash (issue 80)
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert not torch.equal(a[0], b[0])


def test_bos_token_with_zero_or_two_bos(enc, hf):
    enc.pooling_mode = "bos_token"
    ids = [[40, 41, 42], [40, 1, 41, 1]]  # no BOS: first token; two: the first BOS
    ours = enc.encode_token_ids(ids, [3, 4])
    with torch.no_grad():
        h0 = hf(input_ids=torch.tensor([ids[0]])).last_hidden_state[0, 0]
        h1 = hf(input_ids=torch.tensor([ids[1]])).last_hidden_state[0, 1]
    assert_rows_match(ours, torch.stack([h0, h1]))


def test_text_without_any_token_gives_zeros(enc):
    out = enc.encode_token_ids([[], [1, 40]], [0, 1])
    assert (out[0] == 0).all() and out[1].norm() > 0


def test_from_model_and_encode_token_ids(enc):
    bare = LLM2Vec.from_model(enc.model, max_tokens_per_batch=9)
    tokens = enc.tokenize_pairs([("", t) if isinstance(t, str) else tuple(t) for t in TEXTS])
    got = bare.encode_token_ids(tokens.input_ids, tokens.embed_lengths)
    torch.testing.assert_close(got, encode(enc, TEXTS), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.encode(["a"])


# ------------------------------------------------------------------ bad inputs
def test_bad_encode_inputs(enc):
    assert encode(enc, []).shape == (0, 96)
    for bad in (None, 3, b"bytes", [None], ["a", 3.0], [["only one"]], [["a", 3]], [{"t": 1}]):
        with pytest.raises(TypeError):
            encode(enc, bad)
    with pytest.raises(ValueError, match="batch_size"):
        encode(enc, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        encode(enc, ["a"], max_tokens_per_batch=0)
    enc.pooling_mode = "cls"
    with pytest.raises(ValueError, match="pooling_mode"):
        encode(enc, ["a"])
    enc.pooling_mode = "mean"
    with pytest.raises(ValueError, match="token ids"):
        enc.encode_token_ids([[1, 10**6]], [1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            encode(enc, ["a"], device="cuda")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"torch_dtype": "float64"}, ValueError, "dtype"),
        ({"torch_dtype": torch.int8}, ValueError, "dtype"),
        ({"torch_dtype": "fp32", "dtype": "bf16"}, ValueError, "both"),
        ({"device_map": "tpu"}, ValueError, "device"),
        ({"device_map": "balanced"}, ValueError, "one GPU"),
        ({"device_map": {"embed": 0, "layers": "cpu"}}, ValueError, "one device"),
        ({"pooling_mode": "cls"}, ValueError, "pooling_mode"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"attention": "left"}, ValueError, "attention must be one of"),
        ({"load_in_4bit": True}, TypeError, "unsupported keyword"),
        ({"token": "hf_x"}, TypeError, "local directory"),
        ({"max_tokens_per_batch": -1}, ValueError, "max_tokens_per_batch"),
    ],
)
def test_bad_from_pretrained_arguments(tiny_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM2Vec.from_pretrained(str(tiny_dir), **kwargs)


def test_accepted_hf_keywords(tiny_dir):
    enc = LLM2Vec.from_pretrained(
        str(tiny_dir), torch_dtype="auto", device_map={"": "cpu"}, attn_implementation="sdpa",
        low_cpu_mem_usage=True, backend="torch",
    )  # fmt: skip
    assert enc.device.type == "cpu" and enc.dtype == torch.float32
    with pytest.raises(TypeError, match="LLM2Vec wraps"):
        LLM2Vec(torch.nn.Linear(2, 2), None)


# ------------------------------------------------------------------ the real default model
@pytest.mark.slow
def test_untrained_smollm2_orders_similar_texts():
    skip_unless_gguf_readable()
    enc = LLM2Vec.from_pretrained("smollm2", device="cpu")
    assert enc.config_family == "llama" and enc.hidden_size == 576
    # Untrained SmolLM2 run bidirectionally: its mean-pooled vectors still put close
    # paraphrases well ahead of unrelated sentences (checked to match HF bidirectional).
    sets = [
        ["A cat sits on the mat.", "A cat is sitting on the mat.",
         "Stock markets fell sharply today."],
        ["The weather is sunny and warm today.", "It is a warm and sunny day.",
         "The stock market crashed after the announcement."],
        ["How do I bake bread at home?", "What is a simple recipe for homemade bread?",
         "The quarterly earnings report beat expectations."],
    ]  # fmt: skip
    emb = encode(enc, [t for s in sets for t in s], normalize_embeddings=True).view(3, 3, -1)
    for e in emb:
        close, far1, far2 = float(e[0] @ e[1]), float(e[0] @ e[2]), float(e[1] @ e[2])
        assert close > max(far1, far2) + 0.2, (close, far1, far2)


DEMO = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]


@pytest.mark.slow
def test_default_model_is_the_shipped_trained_encoder():
    """None / "smollm2-llm2vec": SmolLM2 + the shipped MNTP and SimCSE + supervised adapters
    (float16, a few MB); a lone adapter goes on untrained SmolLM2; the README's demo holds."""
    from safetensors import safe_open

    from l2v_models.checkpoint import default_encoder_dirs

    skip_unless_gguf_readable()
    mntp, second = default_encoder_dirs()
    assert {p.name for p in mntp.iterdir()} >= {"adapter_config.json", "config.json",
                                                "tokenizer.json", "adapter_model.safetensors"}
    for folder in (mntp, second):
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size < 12 * 2**20
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    default = LLM2Vec.from_pretrained(None, device="cpu")
    emb = encode(default, DEMO, normalize_embeddings=True)
    explicit = LLM2Vec.from_pretrained(str(mntp), peft_model_name_or_path=str(second),
                                       device="cpu")  # fmt: skip
    assert torch.equal(encode(explicit, DEMO, normalize_embeddings=True), emb)
    del explicit
    cat_kitten, cat_stocks = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert cat_kitten > cat_stocks + 0.2, (cat_kitten, cat_stocks)
    untrained = encode(LLM2Vec.from_pretrained("smollm2", device="cpu"), DEMO,
                       normalize_embeddings=True)  # fmt: skip
    assert float(untrained[0] @ untrained[1]) < float(untrained[0] @ untrained[2])  # the issue
    # A lone adapter goes on untrained SmolLM2 (what `l2v train` trains on by default).
    lone = LLM2Vec.from_pretrained(None, peft_model_name_or_path=str(mntp), device="cpu")
    assert lone.name_or_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ValueError, match="already holds its two adapters.*--model smollm2"):
        LLM2Vec.from_pretrained("smollm2-llm2vec", peft_model_name_or_path=str(mntp))


# ------------------------------------------------------------------ issue 9: what a new user hits
def test_long_text_without_spaces_is_never_a_zero_vector(enc, hf):
    enc.doc_max_length = 12
    n = lambda t: len(enc.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    cjk = "猫が座っています。" * 10
    blob = "cat,dog;mat." * 8  # one "word" of 48 tokens (a URL, a base64 blob...)
    assert n(cjk) > 12 and n(blob) > 12
    items = [cjk, blob, ["query:", blob], "the cat sat on the mat " * 5]
    ours = encode(enc, items)
    assert (ours.norm(dim=-1) > 0).all()
    # each cut text is the longest prefix within doc_max_length tokens: llm2vec's result for
    # that prefix, and the same vector as the explicit prefix would give
    ref = Llm2vecTextRef(enc.tokenizer, "x", enc.config, "mean", 512, 12)
    assert ref._convert_to_str("", cjk) == "!@#$%^&*()"  # llm2vec 0.2.3: nothing left
    for i, t in enumerate(items[:2]):
        (prefix,), (count,) = tk.truncate_by_words(enc.tokenizer, [t], 512, 12)
        assert t.startswith(prefix) and 9 <= count <= 12
        assert_rows_match(ours[i : i + 1], llm2vec_encode(hf, enc, [["", prefix]]))


def test_empty_texts_warn_once_naming_the_indices(enc, caplog):
    with caplog.at_level(logging.WARNING, logger="l2v_models"):
        out = encode(enc, ["a cat", "", ["query:", "  "], "a dog", ""])
    warnings = [r for r in caplog.records if "empty" in r.getMessage()]
    assert len(warnings) == 1
    assert "3 empty texts at sentences[1, 2, 4]" in warnings[0].getMessage()
    assert out.shape == (5, 96) and (out[0] != 0).any()  # the defined result is kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="l2v_models"):
        encode(enc, ["a cat", "a dog"])
    assert not caplog.records


@pytest.mark.parametrize(
    "bad,where",
    [
        ([["a", "b", "c"]], r"sentences\[0\]"),
        (["x", ["a", "b", "c"]], r"sentences\[1\]"),
        ([["a", "b", 1, 2]], r"sentences\[0\]"),
        ([["a", "b", True]], r"sentences\[0\]"),
        ([["a", "b", 1.5]], r"sentences\[0\]"),
        (["a", "b", "c", 3], r"sentences\[3\]"),
    ],
)
def test_items_other_than_pairs_and_medi_are_refused(enc, bad, where):
    with pytest.raises(TypeError, match=where + ".*MEDI"):
        encode(enc, bad)


def test_medi_items_in_a_list(enc):
    out = encode(enc, [["query:", "the mat", 7], ("query:", "the mat", np.int64(2))])
    ref = encode(enc, [["query:", "the mat"]])
    torch.testing.assert_close(out, ref.expand(2, -1), rtol=1e-5, atol=1e-6)


def test_lone_surrogate_names_the_item(enc):
    with pytest.raises(ValueError, match=r"sentences\[2\].*text.*U\+D800 at character 1"):
        encode(enc, ["ok", "fine", "a\ud800b"])
    with pytest.raises(ValueError, match=r"sentences\[0\].*instruction.*U\+DC00"):
        encode(enc, [["\udc00", "text"]])
    with pytest.raises(ValueError, match=r"sentences\[0\]"):
        encode(enc, "\ud800")


# ------------------------------------------------------------ llm2vec API: tokenize, forward, save
def _prepared(enc, items):
    return [enc.prepare_for_tokenization(enc._convert_to_str(*p)) for p in mixed_to_pairs(items)]


@pytest.mark.parametrize("mode", ["mean", "eos_token"])
def test_tokenize_returns_llm2vecs_padded_features(enc, mode):
    enc.pooling_mode = mode
    prepared = _prepared(enc, TEXTS)
    ref = Llm2vecTextRef(enc.tokenizer, enc.name_or_path, enc.config, mode, enc.max_length,
                         enc.doc_max_length).tokenize(prepared)  # fmt: skip
    got = enc.tokenize(prepared)
    assert set(got.keys()) == {"input_ids", "attention_mask", "embed_mask"}
    for key in got:
        assert got[key].dtype == ref[key].dtype == torch.long
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "mode,skip", [("mean", True), ("weighted_mean", False), ("bos_token", True)]
)
def test_forward_of_features_equals_encode(enc, hf, mode, skip):
    enc.pooling_mode, enc.skip_instruction = mode, skip
    features = enc.tokenize(_prepared(enc, TEXTS))
    got = enc.forward(features)
    assert got.shape == (len(TEXTS), 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, encode(enc, TEXTS), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc(features), got, rtol=0, atol=0)  # nn.Module-style call
    # llm2vec's own forward + get_pooling on the padded features, on the HF model
    with torch.no_grad():
        feats = dict(features)
        embed_mask = feats.pop("embed_mask")
        hidden = hf(**feats).last_hidden_state
        feats["embed_mask"] = embed_mask
        ref = llm2vec_get_pooling(feats, hidden, mode, skip, enc.tokenizer.bos_token_id)
    assert_rows_match(got, ref.float())


def test_forward_bad_features(enc):
    with pytest.raises(ValueError, match="features tokenize"):
        enc.forward([[1, 2, 3]])
    f = enc.tokenize(_prepared(enc, TEXTS[:2]))
    with pytest.raises(ValueError, match="embed_mask has shape"):
        enc.forward({**f, "embed_mask": f["embed_mask"][:, 1:]})
    whole = enc.forward({"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]})
    enc.skip_instruction = False
    torch.testing.assert_close(whole, enc.forward(f), rtol=1e-5, atol=1e-6)  # all tokens pooled


def test_save_writes_a_folder_l2v_and_transformers_load(enc, tmp_path):
    enc.pooling_mode, enc.doc_max_length = "weighted_mean", 64
    out = tmp_path / "saved"
    enc.save(str(out), merge_before_save=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "llm2vec_config.json", "tokenizer.json"} <= names
    settings = json.loads((out / "llm2vec_config.json").read_text())
    assert settings == {"pooling_mode": "weighted_mean", "max_length": 512,
                        "doc_max_length": 64, "skip_instruction": True}  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_name_or_path"] == enc.name_or_path and cfg["torch_dtype"] == "float32"
    assert cfg["rope_theta"] == enc.config.rope_parameters["rope_theta"]  # 4.4x spelling too
    back = LLM2Vec.from_pretrained(str(out), device="cpu")
    assert (back.pooling_mode, back.doc_max_length, back.name_or_path) == (
        "weighted_mean", 64, enc.name_or_path)  # fmt: skip
    torch.testing.assert_close(encode(back, TEXTS), encode(enc, TEXTS), rtol=0, atol=0)
    # transformers' own loading of the folder (what llm2vec's LlamaBiModel.from_pretrained
    # does), made bidirectional, with llm2vec's pipeline: the same embeddings
    assert_rows_match(encode(back, TEXTS), llm2vec_encode(load_hf(out), back,
                                                          mixed_to_pairs(TEXTS)))  # fmt: skip


def test_save_without_a_transformers_config(enc, tmp_path):
    bare = LLM2Vec.from_model(enc.model, enc.tokenizer)
    with pytest.raises(ValueError, match="from_pretrained"):
        bare.save(str(tmp_path / "x"))
