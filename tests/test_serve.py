"""`l2v serve`: real uvicorn servers on free 127.0.0.1 ports, real clients (openai, httpx, raw
sockets), real models (the embedded default SmolLM2 for the openai-client equality test, a tiny
random checkpoint elsewhere to keep the load tests cheap).

Every server is shut down by its fixture (finally); every load loop is bounded in count and
time. Torch runs one thread in this module: on 2 shared cores, two torch threads competing with
the server's event loop and the clients are many times slower than one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tiny import make_tiny_checkpoint

from l2v_models.encoder import LLM2Vec
from l2v_models.packing import TokenizedTexts

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from l2v_models.serve.app import ServeSettings, create_app  # noqa: E402
from l2v_models.serve.batcher import ContinuousBatcher  # noqa: E402
from l2v_models.serve.metrics import ServerMetrics  # noqa: E402
from l2v_models.serve.replicas import build_replicas  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COS = 0.99999  # fp32, the bar
WARMUP_TEXTS = 2  # the warm-up pass of a server with a tokenizer runs two texts


# ------------------------------------------------------------------------------ fixtures
# The server's model worker and the test's clients share the CPU: one torch thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve"), "llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LLM2Vec.from_pretrained(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def default_encoder():
    return LLM2Vec.from_pretrained(None, device="cpu")


@contextlib.contextmanager
def served(encoder, **settings):
    """A uvicorn server for `encoder` in a background thread on a free loopback port; yields
    (base url, the app's ServerState) once /health answers 200; always shut down. Requests are
    prepared in a thread unless tokenizer_workers is given (a tokenizer process starts in
    seconds on this shared CPU; the tests that are about processes ask for them)."""
    settings.setdefault("tokenizer_workers", 0)
    app = create_app(encoder, ServeSettings(**settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A long keep-alive: no idle-connection close racing a reused connection on a slow machine.
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=20, timeout_keep_alive=120
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=60)
        yield url, app.state.l2v
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.05)
    raise AssertionError(f"server at {url} not healthy after {timeout}s: {last}")


def assert_healthy(url: str) -> None:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text


def metrics(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} from GET /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def poll(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def raw_request(port: int, path: str, body: bytes, *, send_body: bool = True) -> socket.socket:
    """A POST on a raw socket; with send_body=False only the headers and the first byte."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    s.sendall(head + (body if send_body else body[:1]))
    return s


def read_response(s: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before the headers: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(x.split(":")[1]) for x in lines[1:] if x.lower().startswith("content-length"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, body


WORDS = ("the a of and to in is was for on that with as by at from it an be this are or which "
         "query passage document retrieve represent text cat dog sat mat").split()  # fmt: skip


def make_texts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(lo, hi, size=n)]


# ------------------------------------------------------------------------------ the default model
def test_openai_client_matches_offline_encode(default_encoder):
    """The official openai client (float, base64 both ways, extra_body instruction, token ids),
    raw httpx on /embed, /v1/models and the API key, against offline encode of the same input."""
    enc = default_encoder
    texts = ["The cat sat on the mat.", "Paris is the capital and largest city of France.", "x"]
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    ref = enc.encode(texts, show_progress_bar=False).numpy()
    ref_ins = enc.encode([[instruction, t] for t in texts], show_progress_bar=False).numpy()
    assert cosines(ref, ref_ins).min() < 0.999  # the instruction changes the embedding
    # A budget of 16 tokens splits the requests over several passes.
    with served(enc, api_key="sk-test", max_batch_tokens=16, tokenizer_workers=1,
                accept_token_ids=True) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=60)

        # No encoding_format: the client asks for base64 and decodes it itself.
        r = client.embeddings.create(model="l2v", input=texts)
        got = np.array([d.embedding for d in r.data])
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == "l2v"
        assert got.shape == ref.shape and cosines(got, ref).min() >= COS
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        lengths = enc.prepare_texts(texts).lengths
        assert r.usage.prompt_tokens == r.usage.total_tokens == int(lengths.sum())

        r = client.embeddings.create(model="l2v", input=texts, encoding_format="float")
        assert cosines([d.embedding for d in r.data], ref).min() >= COS

        r = client.embeddings.create(model="l2v", input=texts, encoding_format="base64")
        raw = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])
        assert raw.shape == ref.shape and cosines(raw, ref).min() >= COS

        r = client.embeddings.create(
            model="l2v", input=texts, extra_body={"instruction": instruction}
        )
        assert cosines([d.embedding for d in r.data], ref_ins).min() >= COS
        ins_lengths = enc.prepare_texts([[instruction, t] for t in texts]).lengths
        assert r.usage.prompt_tokens == int(ins_lengths.sum())

        r = client.embeddings.create(model="l2v", input=texts[1])  # one string
        assert len(r.data) == 1 and cosines([r.data[0].embedding], ref[1:2])[0] >= COS

        ids = [list(map(int, x)) for x in enc.prepare_texts(texts).input_ids]
        ref_ids = enc.engine.embed(TokenizedTexts.whole(ids)).numpy()
        r = client.embeddings.create(model="l2v", input=ids)
        assert cosines([d.embedding for d in r.data], ref_ids).min() >= COS

        assert [m.id for m in client.models.list().data] == ["l2v"]

        # TEI's /embed with raw httpx: normalize=false gives encode's own (unnormalized) rows.
        headers = {"Authorization": "Bearer sk-test"}
        r = httpx.post(url + "/embed", json={"inputs": texts, "normalize": False},
                       headers=headers, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        # Equal up to fp32 summation order: the server's 16-token passes group texts differently
        # from encode's (row norms here are ~37-46: 1e-4 absolute is ~3e-6 of a row).
        np.testing.assert_allclose(np.array(r.json()), ref, rtol=1e-4, atol=1e-4)
        r = httpx.post(url + "/embed", json={"inputs": texts[0], "instruction": instruction},
                       headers=headers, timeout=60)  # fmt: skip
        assert cosines(r.json(), ref_ins[:1])[0] >= COS

        # The API key: wrong or missing -> 401, and the server stays healthy.
        bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.embeddings.create(model="l2v", input="hello")
        assert err.value.status_code == 401 and "invalid API key" in str(err.value)
        r = httpx.post(url + "/v1/embeddings", json={"input": "hello"}, timeout=30)
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 401
        assert_healthy(url)


# ------------------------------------------------------------------------------ limits and errors
LIMITS = dict(max_client_batch_size=4, max_input_tokens=32, payload_limit=4000)
LONG = "the cat " * 30  # 61 tokens with <s>: over max_input_tokens=32
ERROR_CASES = [
    ("/v1/embeddings", b"{not json", 400, "malformed JSON: Expecting property name"),
    ("/v1/embeddings", b"", 400, "empty request body"),
    ("/v1/embeddings", [1, 2], 400, "the request body must be a JSON object, got a list"),
    ("/v1/embeddings", {"model": "l2v"}, 400, 'missing field "input"'),
    ("/v1/embeddings", {"input": 5}, 400, '"input" must be a string, a list of strings'),
    ("/v1/embeddings", {"input": []}, 400, '"input" is an empty list'),
    ("/v1/embeddings", {"input": ["a", "b", ""]}, 400, "input[2]: empty string"),
    ("/v1/embeddings", {"input": ["a", 3]}, 400, "input[1]: expected a string like input[0]"),
    ("/v1/embeddings", {"input": [[1, 2], [3, 256]]}, 400,
     "input[1][1]: token id 256 is outside the vocabulary [0, 256)"),
    ("/v1/embeddings", {"input": [[1, -1]]}, 400, "input[0][1]: token id -1 is outside"),
    ("/v1/embeddings", {"input": [[1, 2.5]]}, 400, "input[0][1]: token ids must be integers"),
    ("/v1/embeddings", {"input": [[1], []]}, 400, "input[1]: empty token-id list"),
    ("/v1/embeddings", {"input": [[1, 2]], "instruction": "x"}, 400,
     '"instruction" applies to text inputs only'),
    ("/v1/embeddings", {"input": "a", "instruction": 3}, 400, '"instruction" must be a string'),
    ("/v1/embeddings", {"input": "a", "model": 7}, 400, '"model" must be a string'),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int4"}, 400,
     '"encoding_format" must be one of float, base64, float16, int8, uint8, binary, ubinary'),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8", "normalize": False}, 400,
     '"encoding_format": "int8" quantizes unit vectors; it needs "normalize": true'),
    ("/v1/embeddings", {"input": "a", "dimensions": 97}, 400, '"dimensions" must lie in 1..96'),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 400, '"dimensions" must lie in 1..96'),
    ("/v1/embeddings", {"input": "a", "prompt_name": "query"}, 400,
     "unknown prompt name 'query': this model has no named prompts"),
    ("/v1/embeddings", {"input": "a", "prompt_name": "q", "instruction": "x"}, 400,
     '"instruction" (a prompt\'s text) or "prompt_name"'),
    ("/v1/embeddings", {"input": [[1, 2]], "prompt_name": "q"}, 400,
     '"prompt_name" applies to text inputs only'),
    ("/v1/embeddings", {"input": "a", "dimensions": "64"}, 400, '"dimensions" must be an integer'),
    ("/v1/embeddings", {"input": "a", "normalize": "yes"}, 400,
     '"normalize" must be true or false'),
    ("/v1/embeddings", {"input": "a", "temperature": 1}, 400, "unknown field(s) 'temperature'"),
    ("/v1/embeddings", {"input": ["a"] * 5}, 413,
     '"input" has 5 inputs but this server takes at most 4 per request'),
    ("/v1/embeddings", {"input": ["word " * 900]}, 413,
     "over this server's limit of 4000 bytes (--payload-limit)"),
    ("/v1/embeddings", {"input": ["a", LONG], "truncate": False}, 413,
     "input[1] has 61 tokens, over this server's limit of 32 (--max-input-tokens)"),
    ("/v1/embeddings", {"input": [list(range(1, 40))], "truncate": False}, 413,
     "input[0] has 39 tokens, over this server's limit of 32"),
    ("/embed", {"inputs": ["a", ""]}, 422, "inputs[1]: empty string"),
    ("/embed", {"inputs": ["a"] * 5}, 413, "takes at most 4 per request"),
    ("/embed", {"inputs": LONG, "truncate": False}, 413, "inputs[0] has 61 tokens"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, 422, "unknown prompt name 'query'"),
    ("/embed", {"inputs": "a", "truncation_direction": "Up"}, 422,
     '"truncation_direction" must be "right" or "left"'),
    ("/embed", b"[", 422, "malformed JSON"),
]  # fmt: skip


@pytest.fixture(scope="module")
def limits_server(tiny):
    with served(tiny, **LIMITS, accept_token_ids=True) as s:
        yield s


@pytest.mark.parametrize("path,body,status,message", ERROR_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(ERROR_CASES)])  # fmt: skip
def test_limits_and_errors(limits_server, path, body, status, message):
    url, _ = limits_server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, timeout=30,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    payload = r.json()
    if path == "/embed":  # text-embeddings-inference's error shape (422 for invalid requests)
        assert message in payload["error"], payload
        assert payload["error_type"] in ("Validation",)
    else:  # OpenAI's error shape (400 for invalid requests, as OpenAI and vLLM answer)
        assert message in payload["error"]["message"], payload
        assert payload["error"]["code"] == r.status_code
        assert payload["error"]["type"] == "invalid_request_error"
    assert_healthy(url)


def test_chunked_body_over_the_payload_limit(limits_server):
    url, _ = limits_server

    def body():  # no Content-Length: the server counts what arrives
        yield b'{"input": ["'
        for _ in range(100):
            yield b"word " * 20
        yield b'"]}'

    r = httpx.post(url + "/v1/embeddings", content=body(), timeout=30)
    assert r.status_code == 413 and "(--payload-limit)" in r.json()["error"]["message"]
    assert_healthy(url)


def test_truncation_by_default_matches_encode_at_the_limit(limits_server, tiny):
    url, state = limits_server
    r = httpx.post(url + "/v1/embeddings", json={"input": [LONG, "a dog"]}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Truncated-Inputs"] == "1"
    at_limit = copy.copy(tiny)
    at_limit.max_length = 32  # what llm2vec's max_length=32 gives
    ref = at_limit.encode([LONG, "a dog"], show_progress_bar=False).numpy()
    got = [d["embedding"] for d in r.json()["data"]]
    assert cosines(got, ref).min() >= COS
    assert r.json()["usage"]["prompt_tokens"] == 32 + len(
        tiny.prepare_texts(["a dog"]).input_ids[0]
    )
    # Under the limit: no header.
    r = httpx.post(url + "/embed", json={"inputs": ["a dog"]}, timeout=30)
    assert r.status_code == 200 and "X-Truncated-Inputs" not in r.headers
    assert metric(metrics(url), "l2v_truncated_inputs_total") >= 1
    # Token ids are cut at the limit too.
    r = httpx.post(url + "/v1/embeddings", json={"input": [list(range(1, 40))]}, timeout=30)
    assert r.status_code == 200 and r.headers["X-Truncated-Inputs"] == "1"
    ref = tiny.engine.embed(TokenizedTexts.whole([list(range(1, 33))])).numpy()
    assert cosines([r.json()["data"][0]["embedding"]], ref)[0] >= COS


def test_dimensions_equal_to_the_width_and_default_instruction(tiny):
    with served(tiny, default_instruction="Retrieve passages") as (url, _):
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog", "dimensions": 96})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 96
        with_default = tiny.encode([["Retrieve passages", "a dog"]], show_progress_bar=False)
        assert cosines([r.json()["data"][0]["embedding"]], with_default)[0] >= COS
        # "instruction": "" turns the default off.
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog", "instruction": ""})
        plain = tiny.encode(["a dog"], show_progress_bar=False)
        assert cosines([r.json()["data"][0]["embedding"]], plain)[0] >= COS
        assert cosines(with_default, plain)[0] < 0.9999


def test_every_truncation_is_visible_and_truncate_false_refuses_it(tiny):
    """llm2vec's doc_max_length cut (400 text tokens, under the 512-token limit) counts as
    truncation: header, usage, metric; "truncate": false refuses it naming the rule (issue 25)."""
    long_text = " ".join(["the cat sat on the mat"] * 120)  # ~720 tokens: over 400, cut by words
    short = "a dog"
    with served(tiny) as (url, _):
        r = httpx.post(url + "/v1/embeddings", json={"input": [short, long_text]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["X-Truncated-Inputs"] == "1"
        assert r.json()["usage"]["truncated_inputs"] == 1
        want = tiny.encode([short, long_text], show_progress_bar=False, normalize_embeddings=True)
        assert cosines([d["embedding"] for d in r.json()["data"]], want.numpy()).min() >= COS
        r = httpx.post(url + "/v1/embeddings", json={"input": [short, long_text],
                                                      "truncate": False}, timeout=60)
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["param"] == "input[1]" and "doc_max_length of 400" in err["message"]
        r = httpx.post(url + "/embed", json={"inputs": long_text, "truncate": False}, timeout=60)
        assert r.status_code == 413 and "doc_max_length" in r.json()["error"]
        metrics = httpx.get(url + "/metrics").text
        assert "l2v_truncated_inputs_total 1.0" in metrics
        r = httpx.post(url + "/v1/embeddings", json={"input": short}, timeout=30)
        assert "X-Truncated-Inputs" not in r.headers and r.json()["usage"]["truncated_inputs"] == 0


def test_dimensions_and_prompt_names_of_a_sentence_transformers_model(tmp_path):
    from l2v_models.embedder import Embedder
    from tests.st_folders import make_st_folder

    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    folder = make_st_folder(tmp_path, "llama", dense=[(96, 64)], normalize=True,
                            prompts=prompts, config={"is_causal": False})  # fmt: skip
    emb = Embedder.from_pretrained(str(folder), device="cpu")
    texts = ["a dog", "the cat sat on the mat"]
    with served(emb) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = client.embeddings.create(model="l2v", input=texts, dimensions=16,
                                       extra_body={"prompt_name": "query"})  # fmt: skip
        rows = np.array([d.embedding for d in got.data])
        want = emb.encode(texts, prompt_name="query", truncate_dim=16, show_progress_bar=False)
        assert rows.shape == (2, 16) and cosines(rows, want.numpy()).min() >= COS
        assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
        r = httpx.post(url + "/embed", json={"inputs": texts, "prompt_name": "document"})
        want = emb.encode(texts, prompt_name="document", show_progress_bar=False)
        assert cosines(r.json(), want.numpy()).min() >= COS
        r = httpx.post(url + "/embed", json={"inputs": texts, "prompt_name": "passage"})
        assert r.status_code == 422 and "'query', 'document'" in r.json()["error"]
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model="l2v", input=texts, dimensions=65)


def test_health_and_embeddings_wait_for_the_warm_up(tiny):
    """Before the lifespan started (no warm-up yet): /health and the endpoints answer 503."""

    async def go():
        app = create_app(tiny, ServeSettings())
        transport = httpx.ASGITransport(app=app)  # runs no lifespan: the worker never starts
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            h = await client.get("/health")
            e = await client.post("/v1/embeddings", json={"input": "a"})
        return h, e

    h, e = asyncio.run(go())
    assert h.status_code == 503 and h.json() == {"status": "loading"}
    assert e.status_code == 503 and "warming up" in e.json()["error"]["message"]


def test_failed_pass_answers_500_and_the_server_recovers(tiny, monkeypatch):
    with served(tiny) as (url, state):
        calls = []
        engine = state.backend.replicas[0].engine
        original = engine.forward

        def failing_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected failure\nsecond line")
            return original(*args, **kwargs)

        monkeypatch.setattr(engine, "forward", failing_once)
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a dog", "the cat"]}, timeout=30)
        assert r.status_code == 500
        assert r.json()["error"]["message"] == (
            "inference failed (RuntimeError: injected failure); see the server log"
        )
        assert "Traceback" not in r.text and "second line" not in r.text
        assert_healthy(url)
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a dog", "the cat"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert metric(metrics(url), "l2v_requests_total", endpoint="openai", status="500") == 1


@contextlib.contextmanager
def server_logs():
    """The records the server's loggers (l2v.*, uvicorn.*) emit while the block runs."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger("l2v"), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def bad_text_and_deep_json(name: str) -> list[tuple[bytes, str | None, str]]:
    """(body, the field the error names, what its message says) for `name` ("input" or
    "inputs"): lone surrogates (JSON's \\ud800 escapes decode to one; ensure_ascii writes them
    so) and JSON nested deeper than Python's parser recurses."""
    deep = b"[" * 5000 + b"]" * 5000  # 10 KB of well-formed JSON
    return [
        (json.dumps({name: "\ud800"}).encode(), name, f"{name}: lone UTF-16 surrogate \\ud800"),
        (json.dumps({name: ["a dog", "the \udc00 cat"]}).encode(), f"{name}[1]",
         f"{name}[1]: lone UTF-16 surrogate \\udc00 at character 4"),
        (json.dumps({name: "a dog", "instruction": "Retrieve \ud83d"}).encode(), "instruction",
         "instruction: lone UTF-16 surrogate \\ud83d at character 9"),
        (b"[" * 5000, None, "malformed JSON: nested too deeply"),
        (deep, None, "malformed JSON: nested too deeply"),
        (b'{"' + name.encode() + b'": ' + deep + b"}", None, "malformed JSON: nested too deeply"),
    ]  # fmt: skip


def test_lone_surrogates_and_deep_json_are_client_errors_without_a_traceback(tiny):
    """Issue 25 item 3: 400 on /v1 (OpenAI's shape), 422 Validation on /embed (TEI's), naming
    the field; nothing logged as an error, no 5xx in the metrics, the server stays healthy."""
    headers = {"Content-Type": "application/json"}
    with served(tiny) as (url, _), server_logs() as logs:
        for path, name, status in (("/v1/embeddings", "input", 400), ("/embed", "inputs", 422)):
            for body, param, message in bad_text_and_deep_json(name):
                r = httpx.post(url + path, content=body, headers=headers, timeout=30)
                assert r.status_code == status, (path, body[:60], r.text)
                if path == "/embed":
                    assert r.json()["error_type"] == "Validation", r.text
                    assert r.json()["error"].startswith(message), r.text
                else:
                    error = r.json()["error"]
                    assert error["message"].startswith(message), r.text
                    assert error["param"] == param and error["type"] == "invalid_request_error"
        # A valid surrogate pair (an emoji) is text like any other.
        r = httpx.post(url + "/v1/embeddings", content=json.dumps({"input": "a \U0001f600"}),
                       headers=headers, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        assert_healthy(url)
        m = metrics(url)
    n = len(bad_text_and_deep_json("input"))
    assert metric(m, "l2v_requests_total", endpoint="openai", status="400") == n
    assert metric(m, "l2v_requests_total", endpoint="tei", status="422") == n
    statuses = [dict(labels)["status"] for name, labels in m if name == "l2v_requests_total"]
    assert not [s for s in statuses if s.startswith("5")], statuses
    errors = [r for r in logs if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


def test_openai_error_shapes_model_names_and_routes(tiny):
    """Issue 25 item 4: on /v1, OpenAI's statuses and error object (the openai client raises
    BadRequestError / NotFoundError), 404 model_not_found for a name not served (unless
    accept_any_model_name), GET /v1/models/{id}, OpenAI's shape on unknown routes and wrong
    methods; TEI's routes keep TEI's shape; HEAD /health; latency buckets past 60 s."""
    name = "org/tiny-llm2vec"  # a repo-id-like served name: /v1/models/{id} takes the "/"
    with served(tiny, served_model_name=name) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model=name, input=["a dog", ""])
        e = err.value
        assert e.status_code == 400 and e.type == "invalid_request_error"
        assert e.param == "input[1]" and "input[1]: empty string" in e.message
        assert e.body == {"message": e.body["message"], "type": "invalid_request_error",
                          "param": "input[1]", "code": 400}  # fmt: skip

        with pytest.raises(openai.NotFoundError) as err:
            client.embeddings.create(model="text-embedding-3-small", input="a dog")
        e = err.value
        assert e.status_code == 404 and e.code == "model_not_found"
        assert e.type == "invalid_request_error" and e.param == "model"
        assert "'text-embedding-3-small' does not exist on this server" in e.message
        assert f"it serves {name!r}" in e.message
        r = client.embeddings.create(model=name, input="a dog")
        assert r.model == name and len(r.data) == 1
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)  # no model
        assert r.status_code == 200, r.text

        m = client.models.retrieve(name)
        assert m.id == name and m.object == "model" and m.owned_by == "l2v"
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("other-model")
        assert err.value.code == "model_not_found"

        # Unknown routes and wrong methods under /v1: OpenAI's error object.
        with pytest.raises(openai.NotFoundError) as err:
            client.get("/chat/completions", cast_to=object)
        assert "no route GET /v1/chat/completions" in err.value.message
        for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/embeddings", 405),
                                     ("DELETE", "/v1/models", 405)):  # fmt: skip
            r = httpx.request(method, url + path, timeout=30)
            assert r.status_code == status, r.text
            assert set(r.json()) == {"error"}, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == status
            assert path in error["message"]
        assert httpx.get(url + "/v1/embeddings").headers["allow"] == "POST"
        # TEI's routes (and l2v's own) keep TEI's error shape.
        for method, path, status in (("GET", "/embed", 405), ("GET", "/nope", 404),
                                     ("POST", "/health", 405)):  # fmt: skip
            r = httpx.request(method, url + path, timeout=30)
            assert r.status_code == status, r.text
            assert set(r.json()) == {"error", "error_type"} and path in r.json()["error"]

        r = httpx.head(url + "/health", timeout=30)
        assert r.status_code == 200 and r.content == b""

        m = metrics(url)
        assert metric(m, "l2v_requests_total", endpoint="openai", status="400") == 1
        assert metric(m, "l2v_requests_total", endpoint="openai", status="404") == 1
        count = metric(m, "l2v_request_seconds_count", endpoint="openai")
        for le in ("60.0", "120.0", "300.0", "600.0"):  # every request is under 60 s here
            assert metric(m, "l2v_request_seconds_bucket", endpoint="openai", le=le) == count > 0

    with served(tiny, served_model_name=name, accept_any_model_name=True) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = client.embeddings.create(model="text-embedding-3-small", input="a dog")
        assert r.model == name and len(r.data) == 1
        assert [x.id for x in client.models.list().data] == [name]


# ------------------------------------------------------------------------------ load
def test_concurrent_clients_mixed_requests_are_batched_together_and_correct(tiny):
    """32 concurrent clients, 512 requests of 1-8 inputs (texts, instructions, token ids; float,
    base64, /embed): every row is the offline embedding of its input, in order; passes really
    hold texts of several requests."""
    n_clients, per_client = 32, 16
    texts = make_texts(40, seed=1)
    items = texts[:24] + [["Represent the query", t] for t in texts[24:]]
    ref_items = unit(tiny.encode(items, show_progress_bar=False).numpy())
    ids = [list(map(int, x)) for x in tiny.prepare_texts(texts[:16]).input_ids]
    ref_ids = unit(tiny.engine.embed(TokenizedTexts.whole(ids)).numpy())
    rng = np.random.default_rng(7)
    plans = []  # per request: (kind, indices); a request's texts share one instruction or none
    for _ in range(n_clients * per_client):
        kind = ["float", "base64", "tei", "ids"][int(rng.integers(4))]
        n = int(rng.choice([1, 1, 2, 3, 5, 8]))
        if kind == "ids":
            idx = rng.integers(len(ids), size=n)
        elif rng.random() < 0.5:
            idx = rng.integers(24, size=n)  # plain texts
        else:
            idx = rng.integers(24, len(items), size=n)  # texts with the instruction
        plans.append((kind, idx.tolist()))

    def body(kind, idx):
        if kind == "ids":
            return "/v1/embeddings", {"input": [ids[i] for i in idx]}
        inputs = [texts[i] for i in idx]
        extra = {"instruction": "Represent the query"} if idx[0] >= 24 else {}
        if kind == "tei":
            return "/embed", {"inputs": inputs, **extra}
        return "/v1/embeddings", {"input": inputs, "encoding_format": kind, **extra}

    def rows_of(kind, response):
        if kind == "tei":
            return np.array(response)
        assert [d["index"] for d in response["data"]] == list(range(len(response["data"])))
        if kind == "base64":
            return np.stack(
                [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in response["data"]]
            )
        return np.array([d["embedding"] for d in response["data"]])

    results: dict[int, tuple[int, np.ndarray]] = {}

    async def client(c: int, http: httpx.AsyncClient):
        for k in range(per_client):
            n = c * per_client + k
            kind, idx = plans[n]
            path, payload = body(kind, idx)
            r = await http.post(path, json=payload)
            results[n] = (
                r.status_code,
                rows_of(kind, r.json()) if r.status_code == 200 else r.text,
            )

    with served(tiny, max_batch_tokens=256, max_wait_ms=20, max_client_batch_size=16,
                tokenizer_workers=1, accept_token_ids=True) as (url, _):

        async def main():
            limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
                await asyncio.wait_for(
                    asyncio.gather(*(client(c, http) for c in range(n_clients))), timeout=180
                )

        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        m = metrics(url)
        assert_healthy(url)

    assert len(results) == len(plans) == 512
    n_inputs = 0
    for n, (kind, idx) in enumerate(plans):
        status, rows = results[n]
        assert status == 200, (n, rows)
        assert rows.shape == (len(idx), 96), (n, rows.shape)
        ref = (ref_ids if kind == "ids" else ref_items)[idx]
        cos = cosines(rows, ref)
        assert cos.min() >= COS, (n, kind, idx, cos)
        n_inputs += len(idx)
    answered = metric(m, "l2v_requests_total", endpoint="openai", status="200") + metric(
        m, "l2v_requests_total", endpoint="tei", status="200"
    )
    assert answered == 512
    assert metric(m, "l2v_texts_total") == n_inputs + WARMUP_TEXTS  # nothing dropped or repeated
    assert metric(m, "l2v_dropped_texts_total") == 0
    assert metric(m, "l2v_mixed_batches_total") > 0
    # Mean requests per pass > 1: passes really hold texts of several requests.
    assert metric(m, "l2v_batch_requests_sum") > 1.2 * metric(m, "l2v_batch_requests_count")
    assert metric(m, "l2v_batch_tokens_sum") <= 256 * metric(m, "l2v_batch_tokens_count")
    assert metric(m, "l2v_queue_texts") == 0 and metric(m, "l2v_requests_in_flight") == 0
    print(f"512 requests from 32 clients in {elapsed:.1f}s")


def test_overload_answers_429_at_once_and_recovers(tiny):
    body = json.dumps({"input": ["the cat sat on the mat"] * 3}).encode()
    with served(tiny, max_concurrent_requests=2) as (url, state):
        port = int(url.rsplit(":", 1)[1])
        # Two clients hold their slots: headers sent, body still coming.
        held = [raw_request(port, "/v1/embeddings", body, send_body=False) for _ in range(2)]
        try:
            poll(lambda: state.in_flight == 2, 20, "two admitted requests")
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)
            assert time.monotonic() - t0 < 5
            assert r.status_code == 429
            assert (
                "limit of 2 concurrent requests (--max-concurrent-requests)"
                in (r.json()["error"]["message"])
            )
            r = httpx.post(url + "/embed", json={"inputs": "a dog"}, timeout=30)
            assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
            assert_healthy(url)
            assert metric(metrics(url), "l2v_requests_in_flight") == 2
            for s in held:  # the held requests complete normally
                s.sendall(body[1:])
            for s in held:
                status, payload = read_response(s)
                assert status == 200 and len(json.loads(payload)["data"]) == 3
        finally:
            for s in held:
                s.close()
        # Recovery, then a real burst of 40 concurrent clients: only 200s and 429s, both seen.
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)
        assert r.status_code == 200

        async def burst():
            big = {"input": make_texts(16, seed=3, lo=20, hi=40)}
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                rs = await asyncio.gather(
                    *(http.post("/v1/embeddings", json=big) for _ in range(40))
                )
            return [r.status_code for r in rs]

        statuses = asyncio.run(asyncio.wait_for(burst(), 120))
        assert set(statuses) == {200, 429}, statuses
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)
        assert r.status_code == 200
        assert_healthy(url)
        m = metrics(url)
        assert (
            metric(m, "l2v_requests_total", endpoint="openai", status="429")
            == statuses.count(429) + 1
        )


def test_client_disconnect_drops_its_queued_texts(tiny):
    """Two requests wait in the queue (the idle worker waits 2 s for a fuller pass); the
    second one's client goes away: its texts are dropped and never run, the first is answered."""
    kept_texts = make_texts(20, seed=5, lo=5, hi=20)
    dropped_texts = make_texts(8, seed=6)
    with served(tiny, max_wait_ms=2000) as (url, state):
        port = int(url.rsplit(":", 1)[1])
        result = {}

        def run_a():
            result["a"] = httpx.post(url + "/v1/embeddings", json={"input": kept_texts},
                                     timeout=120)  # fmt: skip

        a = threading.Thread(target=run_a)
        a.start()
        try:
            poll(lambda: state.batcher.queued_requests == 1, 30, "request A queued")
            b = raw_request(port, "/v1/embeddings", json.dumps({"input": dropped_texts}).encode())
            poll(lambda: state.batcher.queued_requests == 2, 30, "request B queued behind A")
            b.close()  # the client goes away
            poll(lambda: metric(metrics(url), "l2v_dropped_texts_total") == 8, 30, "B dropped")
            assert state.batcher.queued_requests == 1
        finally:
            a.join(120)
        assert result["a"].status_code == 200 and len(result["a"].json()["data"]) == 20
        ref = tiny.encode(kept_texts, show_progress_bar=False).numpy()
        assert cosines([d["embedding"] for d in result["a"].json()["data"]], ref).min() >= COS
        m = metrics(url)
        assert metric(m, "l2v_texts_total") == 20 + WARMUP_TEXTS  # B's texts never ran
        assert metric(m, "l2v_requests_total", endpoint="openai", status="499") == 1
        assert metric(m, "l2v_queue_texts") == 0
        assert_healthy(url)


# ------------------------------------------------------------------------------ the batcher alone
def test_batcher_splits_and_mixes_requests_exactly(tiny):
    """Jobs of mixed sizes through a 40-token budget: each job's rows equal engine.embed of its
    texts alone, whatever pass each text landed in."""
    texts = [tiny.prepare_texts(make_texts(n, seed=10 + n, hi=25)) for n in (1, 7, 3, 12, 2)]
    m = ServerMetrics()
    b = ContinuousBatcher(build_replicas(tiny, [tiny.device]), mode="mean", max_batch_tokens=40,
                          max_wait_s=0.0, metrics=m)  # fmt: skip
    jobs = [b.submit(t) for t in texts]  # queued before the worker starts: one queue
    b.start()
    try:
        for job, t in zip(jobs, texts, strict=True):
            rows = job.future.result(timeout=60)
            np.testing.assert_allclose(rows, tiny.engine.embed(t).numpy(), rtol=1e-4, atol=1e-5)
    finally:
        assert b.stop(timeout=30)
    assert m.mixed_batches._value.get() > 0
    total = sum(int(t.lengths.sum()) for t in texts)
    assert m.tokens._value.get() == total and b.batches_run >= total // 40


def test_batcher_idle_wait_lets_two_requests_share_a_pass(tiny):
    one, two = tiny.prepare_texts(["a dog"]), tiny.prepare_texts(["the cat sat"])
    replicas = build_replicas(tiny, [tiny.device])
    b = ContinuousBatcher(replicas, mode="mean", max_batch_tokens=4096, max_wait_s=1.0)
    b.start()
    try:
        j1 = b.submit(one)
        time.sleep(0.05)
        j2 = b.submit(two)
        j1.future.result(timeout=30), j2.future.result(timeout=30)
        assert b.batches_run == 1  # the worker waited for more work: one pass for both
        assert 0.95 <= j2.first_batch - j1.submitted < 10  # ... until the first had waited 1 s
    finally:
        b.stop(timeout=30)
    b0 = ContinuousBatcher(replicas, mode="mean", max_batch_tokens=4096, max_wait_s=0.0)
    b0.start()
    try:
        j1 = b0.submit(one)
        j1.future.result(timeout=30)
        j2 = b0.submit(two)
        j2.future.result(timeout=30)
        assert b0.batches_run == 2
        with pytest.raises(Exception, match="shutting down"):
            b0.stop(timeout=30)
            b0.submit(one)
    finally:
        b0.stop(timeout=30)


# ------------------------------------------------------------------------------ command line
def test_cli_imports_lightly_and_checks_options_before_loading(capsys):
    code = (
        "import argparse, sys; from l2v_models.serve import cli; "
        "cli.add_parser(argparse.ArgumentParser().add_subparsers()); heavy = ('fastapi', "
        "'uvicorn', 'torch', 'transformers'); print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    from l2v_models import cli

    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for option in ("--model", "--peft", "--host", "--port", "--api-key", "--max-batch-tokens",
                   "--max-concurrent-requests", "--max-client-batch-size", "--max-input-tokens",
                   "--payload-limit", "--default-instruction", "--max-wait-ms", "--dtype",
                   "--device", "--backend", "--pooling", "--accept-any-model-name"):  # fmt: skip
        assert option in help_text, option
    t0 = time.monotonic()
    assert cli.main(["serve", "--max-batch-tokens", "0"]) == 2
    assert "max_batch_tokens must be an int >= 1, got 0" in capsys.readouterr().err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port} is in use: pick another --port" in err and "Traceback" not in err
    finally:
        busy.close()
    assert time.monotonic() - t0 < 10  # refused before any model load


def test_graceful_shutdown_under_load_answers_every_accepted_request(tiny_dir, tiny, tmp_path):
    """`l2v serve` in a subprocess (key from L2V_API_KEY) under 12 looping clients; SIGTERM:
    new connections are refused, every request sent before the signal is answered 200 with the
    right rows, the worker stops after the last request, and the process ends by the signal
    (uvicorn re-raises it after the drain, as service managers expect)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, L2V_API_KEY="sk-env", OMP_NUM_THREADS="1")
    # An idle wait of 1 s: every request stays in flight for about a second.
    cmd = [sys.executable, "-m", "l2v_models.cli", "serve", "--model", str(tiny_dir),
           "--device", "cpu", "--port", str(port), "--max-wait-ms", "1000",
           "--log-level", "info"]  # fmt: skip
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    texts = make_texts(24, seed=11, lo=10, hi=30)
    ref = unit(tiny.encode(texts, show_progress_bar=False).numpy())
    headers = {"Authorization": "Bearer sk-env"}
    records = []  # (start, end, outcome, rows or None, indices)
    stop = threading.Event()
    lock = threading.Lock()

    def client(c: int):
        rng = np.random.default_rng(c)
        # A fresh connection per request: after the signal, new ones are refused.
        with httpx.Client(base_url=url, headers=headers, timeout=60,
                          limits=httpx.Limits(max_keepalive_connections=0)) as http:  # fmt: skip
            for _ in range(400):  # bounded
                idx = rng.integers(len(texts), size=8).tolist()
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/embeddings", json={"input": [texts[i] for i in idx]})
                    outcome = r.status_code
                    rows = np.array([d["embedding"] for d in r.json()["data"]]) if (
                        outcome == 200) else None  # fmt: skip
                except httpx.ConnectError:
                    outcome, rows = "refused", None
                except httpx.HTTPError as e:
                    outcome, rows = type(e).__name__, None
                with lock:
                    records.append((t0, time.monotonic(), outcome, rows, idx))
                if outcome == "refused" or stop.is_set():
                    return

    try:
        wait_healthy_or_exit(proc, url, timeout=90)
        r = httpx.post(url + "/v1/embeddings", json={"input": "a"}, timeout=30)
        assert r.status_code == 401  # L2V_API_KEY is the key
        threads = [threading.Thread(target=client, args=(c,)) for c in range(12)]
        for t in threads:
            t.start()
        poll(lambda: len(records) >= 24, 60, "some answered requests under load")
        time.sleep(0.6)  # the clients' current requests are now ~0.6 s into their ~1 s wait
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    err = log_path.read_text()
    assert rc in (0, -signal.SIGTERM), err
    assert "Traceback" not in err and "Waiting for connections to close" in err, err
    assert "l2v serve: stopped after" in err, err
    # Sent well before the signal (0.3 s: the server surely read them): all answered.
    before = [r for r in records if r[0] < t_signal - 0.3]
    assert before and all(r[2] == 200 for r in before), [r[2] for r in before if r[2] != 200]
    in_flight = [r for r in before if r[1] > t_signal]
    assert in_flight, "no request was in flight at the signal: the test did not test draining"
    for _, _, _, rows, idx in before:
        assert rows.shape == (8, 96) and cosines(rows, ref[idx]).min() >= COS
    assert any(r[2] == "refused" for r in records if r[0] > t_signal)


def wait_healthy_or_exit(proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"l2v serve exited early with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"l2v serve not healthy after {timeout}s")
