"""`l2v serve --ray` (serve/ray_serve.py) on a local Ray cluster: two CPU model replicas behind
the same API; a replica killed mid-load loses no admitted request and is replaced.

Loopback only (Ray Serve's proxy on 127.0.0.1, a local cluster without dashboard); every loop is
bounded in count and time; the cluster is shut down by the fixture."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tiny import make_tiny_checkpoint

# Under pytest-xdist every test that starts a local Ray cluster runs on the same worker.
pytestmark = pytest.mark.xdist_group("ray")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from l2v_models.embedder import Embedder  # noqa: E402
from l2v_models.serve.app import ServeSettings  # noqa: E402
from l2v_models.serve.ray_serve import MODEL_DEPLOYMENT, build_ray_app  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COS = 0.99999


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ray-serve"), "llama"))


@pytest.fixture(scope="module")
def ray_app(tiny_dir):
    """The application on a local cluster: 2 model replicas, 1 ingress; yields the base URL."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p), "OMP_NUM_THREADS": "1"}  # fmt: skip
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
             object_store_memory=200 * 2**20, runtime_env={"env_vars": env})  # fmt: skip
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Each pass waits 300 ms for more work: at the kill, both replicas hold requests.
        settings = ServeSettings(max_wait_ms=300, max_client_batch_size=16, tokenizer_workers=1,
                                 served_model_name="tiny")  # fmt: skip
        app = build_ray_app({"model": tiny_dir, "device": "cpu"}, settings, min_replicas=2,
                            max_replicas=2, model_actor_options={"num_cpus": 0.5},
                            ingress_actor_options={"num_cpus": 0.5})  # fmt: skip
        serve.run(app, name="l2v", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the Ray Serve application did not become healthy")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids(n_calls: int = 40) -> set[int]:
    """The model replicas' process ids (calls are routed to replicas at random)."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name="l2v")
    pids = set()
    for _ in range(n_calls):  # bounded
        try:
            pids.add(handle.pid.remote().result(timeout_s=30))
        except Exception:  # a replica that just died; the next call goes elsewhere
            time.sleep(0.2)
        if len(pids) >= 2:
            break
    return pids


def test_a_killed_replica_loses_no_admitted_request_and_is_replaced(ray_app, tiny_dir):
    url = ray_app
    texts = ["the cat sat on the mat", "a dog", "retrieve the passage about cats", "x y z"]
    ref = Embedder.from_pretrained(tiny_dir, device="cpu").encode(
        texts, show_progress_bar=False, normalize_embeddings=True).numpy()  # fmt: skip
    # The same API: models, errors, limits.
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(url + "/v1/embeddings", json={"input": ["a"] * 17}, timeout=30)
    assert r.status_code == 413 and "at most 16" in r.json()["error"]["message"]
    r = httpx.post(url + "/embed", json={"inputs": ""}, timeout=30)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    r = httpx.post(url + "/v1/embeddings", json={"input": texts, "model": "tiny"}, timeout=60)
    assert r.status_code == 200, r.text
    assert cosines([d["embedding"] for d in r.json()["data"]], ref).min() >= COS

    before = replica_pids()
    assert len(before) == 2, before
    results: list = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    plans = [rng.integers(len(texts), size=3).tolist() for _ in range(96)]

    def client(k: int):
        with httpx.Client(base_url=url, timeout=120) as http:
            for idx in plans[k::6]:
                t0 = time.monotonic()
                r = http.post("/v1/embeddings", json={"input": [texts[i] for i in idx],
                                                       "encoding_format": "float"})  # fmt: skip
                ok = r.status_code == 200
                rows = [d["embedding"] for d in r.json()["data"]] if ok else r.text
                with lock:
                    results.append((r.status_code, idx, rows, t0, time.monotonic()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 10 and time.monotonic() < deadline:  # mid-load
        time.sleep(0.05)
    victim = sorted(before)[0]
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == len(plans)
    bad = [(s, rows) for s, _, rows, _, _ in results if s != 200]
    assert not bad, bad[:3]
    for _, idx, rows, _, _ in results:
        assert cosines(rows, ref[idx]).min() >= COS
    # Six requests were in flight at the kill (each replica holds its requests ~300 ms): all
    # answered, by the surviving replica (Ray Serve's router or the ingress sent them again).
    spanning = [r for r in results if r[3] < t_kill < r[4]]
    assert len(spanning) >= 3, len(spanning)

    # The replica is replaced: two replicas again, one of them new.
    deadline = time.monotonic() + 180
    after: set[int] = set()
    while time.monotonic() < deadline:
        after = replica_pids()
        if len(after) == 2 and victim not in after:
            break
        time.sleep(1)
    assert len(after) == 2 and victim not in after and after & before, (before, after)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert "l2v_resent_requests_total" in httpx.get(url + "/metrics", timeout=30).text
