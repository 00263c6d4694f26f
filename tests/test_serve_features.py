"""`l2v serve` at scale (issue 21): output types with their exact rules, /tokenize, /decode,
/similarity, truncation_direction, LoRA adapters on one base, several engine replicas, tokenizer
processes that die, engines that fail. Real uvicorn servers on loopback ports, tiny random
checkpoints; every loop bounded, every server shut down by its context manager."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from test_serve import COS, assert_healthy, cosines, make_texts, metric, metrics, poll, served
from tiny import make_lora_adapter, make_tiny_checkpoint

from l2v_models.embedder import Embedder
from l2v_models.packing import TokenizedTexts, fits, plan_batches, take_fifo
from l2v_models.serve import encoding
from l2v_models.serve.adapters import AdapterError, parse_adapter_option
from l2v_models.serve.app import ServeSettings, create_app
from l2v_models.serve.replicas import DeviceError, build_replicas, parse_devices

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")


# The server's model worker and the test's clients share the CPU: one torch thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("features"), "llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Embedder.from_pretrained(str(tiny_dir), device="cpu")


# ------------------------------------------------------------------------------ the cut rule
def test_the_cut_rule_is_one_function():
    """fits: the first text always joins; then within both budgets. take_fifo applies it in
    order and passes over empty texts; plan_batches cuts longest-first runs with it."""
    assert fits(100, 0, 0, 10, 1)  # an empty batch takes a text longer than the budget
    assert fits(4, 6, 1, 10) and not fits(5, 6, 1, 10)
    assert not fits(1, 1, 2, 100, 2) and fits(1, 1, 1, 100, 2)
    assert fits(10**9, 10**9, 10**6, None, None)  # no limits: everything fits
    assert take_fifo([3, 0, 4, 5], 0, 8) == (3, 7, 2)  # the empty text is passed over
    assert take_fifo([3, 4, 5], 1, 8, tokens=3, texts=1) == (2, 7, 2)  # a batch in progress
    assert take_fifo([9, 1], 0, 4) == (1, 9, 1)  # alone over the budget
    assert take_fifo([1, 1, 1], 0, 100, 2) == (2, 2, 2)
    batches = plan_batches(np.array([5, 1, 0, 3, 3, 8]), max_tokens=8)
    assert [b.tolist() for b in batches] == [[5], [0, 3], [4, 1]]


# ------------------------------------------------------------------------------ output types
def test_output_types_follow_their_documented_rules(tiny):
    """Every encoding_format against its rule applied to the float response; base64 is the
    float32 bytes; the openai client's default (base64) and float agree."""
    texts = make_texts(5, seed=21, lo=3, hi=20)
    with served(tiny) as (url, _):
        def get(fmt, **extra):
            r = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": fmt,
                                                          **extra}, timeout=30)  # fmt: skip
            assert r.status_code == 200, r.text
            return [d["embedding"] for d in r.json()["data"]]

        x = np.array(get("float"), dtype=np.float32)
        assert x.shape == (5, 96) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
        raw = np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in get("base64")])
        np.testing.assert_array_equal(raw, x)
        np.testing.assert_array_equal(np.array(get("float16"), np.float16), x.astype(np.float16))
        i8 = np.array(get("int8"))
        np.testing.assert_array_equal(i8, np.clip(np.rint(127 * x), -127, 127))
        assert i8.min() >= -127 and i8.max() <= 127 and np.abs(i8).max() > 30
        u8 = np.array(get("uint8"))
        np.testing.assert_array_equal(u8, np.clip(np.rint(127.5 * (x + 1)), 0, 255))
        ub = np.array(get("ubinary"))
        assert ub.shape == (5, 12) and ub.min() >= 0 and ub.max() <= 255
        bits = np.unpackbits(ub.astype(np.uint8), axis=1)[:, :96]
        np.testing.assert_array_equal(bits, (x > 0).astype(np.uint8))
        np.testing.assert_array_equal(np.array(get("binary")), ub - 128)
        # 20 dimensions: 3 bytes, the last padded with zero bits; renormalized first.
        ub20 = np.array(get("ubinary", dimensions=20))
        assert ub20.shape == (5, 3)
        np.testing.assert_array_equal(np.unpackbits(ub20.astype(np.uint8), axis=1)[:, 20:], 0)
        np.testing.assert_array_equal(np.unpackbits(ub20.astype(np.uint8), axis=1)[:, :20],
                                      (x[:, :20] > 0).astype(np.uint8))  # fmt: skip
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = np.array([d.embedding for d in client.embeddings.create(model="l2v",
                                                                      input=texts).data])
        np.testing.assert_array_equal(got.astype(np.float32), x)


def test_json_without_orjson_gives_the_same_values(monkeypatch):
    rows = np.random.default_rng(0).standard_normal((3, 17)).astype(np.float32)
    usage = {"prompt_tokens": 3}
    fast = encoding.embeddings_body(rows, "float", model="m", usage=usage)
    monkeypatch.setattr(encoding, "orjson", None)
    slow = encoding.embeddings_body(rows, "float", model="m", usage=usage)
    a = [np.array(d["embedding"], np.float32) for d in json.loads(fast)["data"]]
    b = [np.array(d["embedding"], np.float32) for d in json.loads(slow)["data"]]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(encoding.EncodingError, match="float16's range"):
        encoding.quantize(np.array([[1e5, 0]], np.float32), "float16")


# ------------------------------------------------------------------------------ TEI routes
def test_tokenize_decode_similarity_and_left_truncation(tiny):
    texts = ["the cat sat on the mat", "a dog"]
    with served(tiny, max_input_tokens=6, accept_token_ids=True) as (url, _):
        r = httpx.post(url + "/tokenize", json={"inputs": texts[1]}, timeout=30)
        assert r.status_code == 200, r.text
        want = tiny.prepare_texts([texts[1]])
        toks = r.json()[0]
        assert [t["id"] for t in toks] == list(want.input_ids[0])
        assert toks[0]["special"] and not toks[-1]["special"]  # <s> first
        assert [t["pooled"] for t in toks] == [False] + [True] * (len(toks) - 1)
        r = httpx.post(url + "/tokenize", json={"inputs": texts[1], "add_special_tokens": False})
        plain = [t["id"] for t in r.json()[0]]
        assert plain == tiny.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
        r = httpx.post(url + "/decode", json={"ids": [plain, [1, *plain]]}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 2
        assert r.json()[0] == tiny.tokenizer.decode(plain, skip_special_tokens=True)
        r = httpx.post(url + "/decode", json={"ids": [1, 999]}, timeout=30)
        assert r.status_code == 422 and "ids[0][1]" in r.json()["error"]

        # Similarity: cosines of the source against each sentence, as encode gives them.
        r = httpx.post(url + "/similarity", json={"inputs": {"source_sentence": "a dog",
                       "sentences": ["a dog", "a cat", "the mat"]}}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        emb = tiny.encode(["a dog", "a dog", "a cat", "the mat"], show_progress_bar=False,
                          normalize_embeddings=True).numpy()  # fmt: skip
        np.testing.assert_allclose(r.json(), emb[1:] @ emb[0], atol=1e-5)
        assert abs(r.json()[0] - 1) < 1e-5
        r = httpx.post(url + "/similarity", json={"inputs": {"source_sentence": "a"}})
        assert r.status_code == 422 and "sentences" in r.json()["error"]

        # Left truncation: the tokenizer's truncation_side="left" (TEI's): the special tokens
        # stay, the text keeps its end.
        for direction in ("left", "Left"):
            r = httpx.post(url + "/embed", json={"inputs": texts[0], "truncation_direction":
                                                 direction, "normalize": False})  # fmt: skip
            assert r.status_code == 200 and r.headers["X-Truncated-Inputs"] == "1"
        left = copy.copy(tiny)
        left.rules.max_length = 6
        tok = copy.deepcopy(tiny.tokenizer)
        tok.truncation_side = "left"
        left.rules.tokenizer = tok
        ids = left.prepare_texts([texts[0]]).input_ids[0]
        full = tiny.tokenizer(texts[0])["input_ids"]
        assert len(ids) == 6 and ids[0] == 1 and list(ids[1:]) == full[-5:]
        want = left.encode([texts[0]], show_progress_bar=False).numpy()
        assert cosines(r.json(), want)[0] >= COS
        right = httpx.post(url + "/embed", json={"inputs": texts[0]}).json()
        assert cosines(right, want)[0] < 0.999
        r = httpx.post(url + "/v1/embeddings", json={"input": [list(range(1, 12))],
                       "truncation_direction": "left"})  # fmt: skip
        want = tiny.engine.embed(TokenizedTexts.whole([list(range(6, 12))])).numpy()
        assert cosines([r.json()["data"][0]["embedding"]], want)[0] >= COS


# ------------------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir):
    """An MNTP base (-mntp layout) and two supervised adapters of different ranks."""
    root = tmp_path_factory.mktemp("adapters")
    mntp = make_lora_adapter(root, tiny_dir, rank=4, mntp=True, seed=3, subdir="mntp")
    a = make_lora_adapter(root, tiny_dir, rank=4, seed=5, subdir="search")
    b = make_lora_adapter(root, tiny_dir, rank=8, alpha=4, seed=7, subdir="nli",
                          target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
    return mntp, {"search": str(a), "nli": str(b)}


def test_adapters_on_one_base_equal_the_merged_models(adapters):
    mntp, named = adapters
    base = Embedder.from_pretrained(str(mntp), device="cpu")
    texts = make_texts(6, seed=31, lo=2, hi=25)
    refs = {name: Embedder.from_pretrained(str(mntp), path, device="cpu").encode(
        texts, show_progress_bar=False).numpy() for name, path in named.items()}  # fmt: skip
    ref_base = base.encode(texts, show_progress_bar=False).numpy()
    assert cosines(refs["search"], ref_base).max() < 0.999  # the adapters change the rows
    weights_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with served(base, adapters=named, served_model_name="mntp", max_batch_tokens=64) as (url, st):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["mntp", "search", "nli"]
        assert client.models.retrieve("nli").id == "nli"
        for name in ("search", "nli"):
            r = client.embeddings.create(model=name, input=texts, encoding_format="float")
            assert r.model == name
            got = np.array([d.embedding for d in r.data])
            assert cosines(got, refs[name]).min() >= COS, name
        r = client.embeddings.create(model="mntp", input=texts, encoding_format="float")
        assert cosines([d.embedding for d in r.data], ref_base).min() >= COS
        with pytest.raises(openai.NotFoundError, match="'mntp', 'search', 'nli'"):
            client.embeddings.create(model="other", input=texts)
        # Unnormalized rows equal the merged model's to fp32 tolerance.
        r = httpx.post(url + "/v1/embeddings", json={"input": texts, "model": "nli",
                                                      "normalize": False})  # fmt: skip
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, refs["nli"], rtol=1e-4, atol=1e-4)
        # One pass never mixes adapters.
        assert metric(metrics(url), "l2v_batches_total") >= 3
    for k, v in base.model.state_dict().items():  # the base is held once and never changed
        assert torch.equal(v, weights_before[k]), k


def test_adapters_that_cannot_load_stop_the_start_naming_them(adapters, tiny, tmp_path):
    mntp, named = adapters
    base = Embedder.from_pretrained(str(mntp), device="cpu")
    with pytest.raises(AdapterError, match=r"adapter 'gone' \(.*missing\) cannot be loaded"):
        create_app(base, ServeSettings(adapters={"gone": str(tmp_path / "missing")}))
    other = make_tiny_checkpoint(tmp_path, "qwen3")
    wrong = make_lora_adapter(tmp_path, other, rank=4, subdir="wrong")
    with pytest.raises(AdapterError, match="adapter 'wrong'.*another base model"):
        create_app(base, ServeSettings(adapters={"wrong": str(wrong)}))
    with pytest.raises(AdapterError, match="expected NAME=PATH"):
        parse_adapter_option("no-equals-sign")
    with pytest.raises(ValueError, match="the served model's name"):
        ServeSettings(served_model_name="x", adapters={"x": "p"}).check()


# ------------------------------------------------------------------------------ replicas
def test_devices_are_parsed_and_refused_by_name():
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices(None, default="cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert parse_devices("all") == [torch.device("cpu")]
        with pytest.raises(DeviceError, match="cuda:3 does not exist"):
            parse_devices("cuda:3")
    with pytest.raises(DeviceError, match="listed twice"):
        parse_devices("cpu,cpu")
    with pytest.raises(DeviceError, match="'tpu' is not a device"):
        parse_devices("tpu")


def test_replicas_give_identical_rows_and_a_failing_engine_fails_only_its_pass(tiny):
    texts = tiny.prepare_texts(make_texts(7, seed=41, lo=2, hi=30))
    replicas = build_replicas(tiny, [torch.device("cpu")], per_device=3)
    assert len({id(r.engine.model) for r in replicas}) == 3
    assert all(r.engine.model.embed.data_ptr() == tiny.model.embed.data_ptr() for r in replicas)
    with torch.inference_mode():
        rows = [r.engine.run_batch(texts, mode="mean") for r in replicas]
    for other in rows[1:]:
        assert torch.equal(rows[0], other)  # bit-identical, whichever engine ran it

    with served(tiny, replicas_per_device=2, max_wait_ms=0) as (url, state):
        assert len(state.backend.replicas) == 2 and state.served.device.startswith("cpu (2 ")
        broken = state.backend.replicas[1].engine

        def fail(*args, **kwargs):
            raise RuntimeError("injected engine failure")

        broken.forward = fail  # this engine fails every pass it takes
        statuses = []
        for i in range(40):  # bounded: until both engines took a pass
            r = httpx.post(url + "/v1/embeddings", json={"input": make_texts(2, seed=i)},
                           timeout=30)  # fmt: skip
            statuses.append(r.status_code)
            if r.status_code == 500:
                assert "injected engine failure" in r.json()["error"]["message"]
            if 200 in statuses and 500 in statuses:
                break
        assert set(statuses) == {200, 500}, statuses
        assert_healthy(url)
        del broken.forward
        for _ in range(6):
            r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)
            assert r.status_code == 200
        passes = state.batcher.passes_by_replica
        assert all(n > 0 for n in passes.values()), passes


# ------------------------------------------------------------------------------ tokenizer processes
def test_a_tokenizer_process_that_dies_answers_503_and_is_replaced(tiny):
    """Kill the tokenizer process while it holds a request: that request gets 503 at once (not
    a hang), a new process takes over, the server stays healthy."""
    with served(tiny, tokenizer_workers=1) as (url, state):
        pool = state.pool
        (pid,) = pool.pids
        # Hold the process: SIGSTOP it, send a request, then kill it.
        os.kill(pid, signal.SIGSTOP)
        result = {}

        def send():
            result["r"] = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=30)

        t = threading.Thread(target=send)
        t.start()
        poll(lambda: pool.pending == 1, 10, "the request in the process")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert time.monotonic() - t0 < 10
        r = result["r"]
        assert r.status_code == 503 and "tokenizer process" in r.json()["error"]["message"]
        poll(lambda: pool.replaced == 1 and pool.pids and pool.pids[0] != pid, 30, "a new one")
        r = httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=60)
        assert r.status_code == 200, r.text
        assert_healthy(url)
        assert metric(metrics(url), "l2v_requests_total", endpoint="openai", status="503") == 1


@pytest.mark.parametrize("pooling", ["cls", "lasttoken", "mean"])
def test_token_id_inputs_pool_the_token_the_rule_reads(tmp_path, pooling):
    """Token ids and the text they came from give the same row, whatever the pooling (cls reads
    the first token, not the last)."""
    from st_folders import make_st_folder

    folder = make_st_folder(tmp_path, "llama", pooling=pooling, config={"is_causal": False})
    emb = Embedder.from_pretrained(str(folder), device="cpu")
    text = "the cat sat on the mat"
    ids = [int(i) for i in emb.prepare([text]).texts.input_ids[0]]
    with served(emb, accept_token_ids=True) as (url, _):
        as_text = httpx.post(url + "/v1/embeddings", json={"input": text}, timeout=30).json()
        as_ids = httpx.post(url + "/v1/embeddings", json={"input": [ids]}, timeout=30).json()
    a, b = as_text["data"][0]["embedding"], as_ids["data"][0]["embedding"]
    assert cosines([a], [b])[0] >= COS
