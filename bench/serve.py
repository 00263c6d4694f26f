"""Serving benchmark: `l2v serve` (continuous token-budget batching) vs a naive per-request server.

    python -m bench.serve --smoke                      # CPU, the default SmolLM2, CI size
    python -m bench.serve --shape mistral-7b           # GPU: Mistral-7B shape, random bf16 weights
    python -m bench.serve [--rates 0.25,0.5,0.75,1.0] [--requests N] [--out DIR] [--name serve]

Workload: a seeded mix of requests, 70% queries (one text with the retrieval instruction) and
30% passage batches (1-4 passages, log-normal lengths). With the default model (it has a
tokenizer) they are texts; with a random-weight shape (no tokenizer) they are token ids from
bench/workloads.py (queries: BOS + 16-token instruction + 10-40 tokens; passages median ~120).

Each server runs in a child process (`--serve l2v|naive`, same model, built the same way) under
uvicorn on a loopback port, one after the other, driven by the same load generator: asyncio +
httpx in `--client-procs` processes (default 4 with CUDA, else 1: one Python client process
may itself cap the load a fast server sees), base64 responses as the openai client asks for;
client overhead is in every latency, equally. With CUDA both servers replay passes of up to
2048 tokens from CUDA graphs (--no-cuda-graphs to compare):
- `l2v`: l2v_models.serve.create_app (one model worker, texts of all requests packed into
  token-budget batches, waiting at most --max-wait-ms when idle).
- `naive`: a FastAPI endpoint calling `encode` once per request under a lock (what a
  hand-written wrapper does: no cross-request batching; the lock because a shared tokenizer
  and model are not safe to call from many threads at once).

Measured per server: batch-1 latency (sequential single queries), max throughput (closed loop,
all requests in flight, `--concurrency` at a time), then open-loop Poisson arrivals at each
rate (fractions of l2v's max throughput; the naive server gets the same absolute rates):
p50 / p90 / p99 latency from the scheduled arrival to the response, achieved throughput, and
for l2v the batch-size distribution of that rate (from its /metrics). Also the offline
`encode` throughput of the same texts (one call). Goals (for the GPU run, Mistral-7B shape):
p99 at 50% load <= 3x batch-1 latency; l2v max throughput >= 90% of offline encode.

Output: <out>/<name>.json, <name>.md and <name>_latency.png; each row is stamped with device,
versions, commit and date.

Longer than ~500 lines on purpose: the load generator, both servers' processes, the closed- and
open-loop measurements and the report belong to one benchmark run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import Request  # module level: FastAPI resolves the handler's annotation here

from bench import common
from bench.workloads import QUERY_INSTRUCTION, WORDS

QUERY_SHARE = 0.7
GOAL_P99_OVER_B1 = 3.0  # at 50% of the max throughput
GOAL_THROUGHPUT_VS_OFFLINE = 0.9


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def make_requests(n: int, *, tokens: bool, cfg: dict | None, seed: int, smoke: bool) -> list:
    """n request bodies (OpenAI /v1/embeddings JSON, base64 responses), seeded."""
    rng = np.random.default_rng(seed)
    bodies = []
    if tokens:
        from bench.workloads import make_workload

        queries = make_workload("queries", n, cfg, seed=seed).ids
        passages = make_workload("passages", 4 * n, cfg, seed=seed).ids
        q = p = 0
    for _ in range(n):
        is_query = rng.random() < QUERY_SHARE
        count = 1 if is_query else int(rng.integers(1, 5))
        if tokens:
            if is_query:
                inputs, q = [queries[q]], q + 1
            else:
                inputs, p = passages[p : p + count], p + count
            bodies.append({"input": inputs, "encoding_format": "base64"})
            continue
        if is_query:
            lo, hi = (4, 12) if smoke else (6, 24)
            words = [rng.choice(WORDS, size=int(rng.integers(lo, hi)))]
        else:
            median, top = (16, 40) if smoke else (80, 380)
            sizes = np.clip(rng.lognormal(math.log(median), 0.6, size=count), 4, top).astype(int)
            words = [rng.choice(WORDS, size=int(k)) for k in sizes]
        body = {"input": [" ".join(w) for w in words], "encoding_format": "base64"}
        if is_query:
            body["instruction"] = QUERY_INSTRUCTION
        bodies.append(body)
    return bodies


def offline_items(bodies: list) -> tuple[list, list]:
    """(text items for encode, token-id lists) of all bodies' inputs, in order."""
    items, ids = [], []
    for b in bodies:
        for x in b["input"]:
            if isinstance(x, str):
                items.append([b["instruction"], x] if "instruction" in b else x)
            else:
                ids.append(x)
    return items, ids


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------
def naive_app(encoder):
    """One encode call per request, one at a time: no cross-request batching."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from l2v_models.packing import TokenizedTexts

    app = FastAPI()
    lock = threading.Lock()

    def run(body: dict):
        inputs = body["input"]
        with lock:
            if inputs and not isinstance(inputs[0], str):
                texts = TokenizedTexts.whole(inputs)
                rows = encoder.engine.embed(texts, mode=encoder.engine_pool_mode, normalize=True)
                n_tokens = int(texts.lengths.sum())
            else:
                ins = body.get("instruction")
                items = [[ins, t] if ins else t for t in inputs]
                rows = encoder.encode(items, show_progress_bar=False, normalize_embeddings=True)
                n_tokens = 0
        rows = rows.numpy().astype("<f4")
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(r.tobytes()).decode()}
            for i, r in enumerate(rows)
        ]
        return {"object": "list", "data": data, "model": "naive",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}  # fmt: skip

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        loop = asyncio.get_running_loop()
        return JSONResponse(await loop.run_in_executor(None, run, body))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def server_settings(args):
    from l2v_models.serve.app import ServeSettings

    return ServeSettings(
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_concurrent_requests=100_000,
        max_client_batch_size=1024,
    )


def serve_forever(args) -> None:
    """`--serve l2v|naive --port P`: build the encoder and serve it until SIGTERM."""
    import uvicorn

    from l2v_models.serve.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder, _ = build_encoder(args, graphs=args.cuda_graphs)
    app = create_app(encoder, server_settings(args)) if args.serve == "l2v" else naive_app(encoder)
    if args.serve == "naive":  # warm up like the l2v server does (compile, autotune)
        encoder.engine.embed(_warmup_texts(encoder), mode=encoder.engine_pool_mode)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                            access_log=False, timeout_keep_alive=300)  # fmt: skip
    uvicorn.Server(config).run()


def _warmup_texts(encoder):
    from l2v_models.packing import TokenizedTexts

    return TokenizedTexts.whole([[1, 2, 3, 4], [5, 6]])


_SERVER_ARGS = ("model", "shape", "device", "threads", "max_batch_tokens", "max_wait_ms")


@contextlib.contextmanager
def server_process(kind: str, args, log_path: Path, health_timeout: float = 900.0):
    """`kind` ("l2v" or "naive") served by a child process (so the load generator here never
    competes with it for the GIL) on a free 127.0.0.1 port; yields the base URL; the child is
    stopped with SIGTERM (then killed) on exit. Its output goes to log_path."""
    import httpx

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cmd = [sys.executable, "-m", "bench.serve", "--serve", kind, "--port", str(port)]
    for name in _SERVER_ARGS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd.append("--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs")
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + health_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the {kind} server exited with {proc.returncode}; see {log_path}"
                )
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {kind} server did not become healthy; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        log.close()


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def _client(url: str, timeout: float):
    import httpx

    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)


async def _post(http, body) -> int:
    """POST one request; its HTTP status (the rows are decoded as the openai client does)."""
    r = await http.post("/v1/embeddings", json=body)
    if r.status_code != 200:
        return r.status_code
    for d in r.json()["data"]:
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
    return 200


def batch1_latency(url: str, bodies: list, n: int, timeout: float) -> list[float]:
    """Seconds per single-query request, sent one after another (after one warm-up call)."""
    queries = [b for b in bodies if len(b["input"]) == 1][: max(n, 1)]

    async def go():
        out = []
        async with _client(url, timeout) as http:
            await _post(http, queries[0])
            for b in queries:
                t0 = time.perf_counter()
                if await _post(http, b) == 200:
                    out.append(time.perf_counter() - t0)
        return out

    return asyncio.run(go())


class Clients:
    """The load generator: `procs` client processes (1: this process), each an asyncio + httpx
    loop over its share of the requests, so one Python process's overhead does not cap the load
    a fast server sees. Requests go round-robin to processes; each process starts at a common
    wall-clock time."""

    def __init__(self, procs: int):
        self.procs = max(1, int(procs))
        self.pool = None
        if self.procs > 1:
            import concurrent.futures
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(self.procs, mp_context=ctx)
            # Start and import in every worker now, not inside a timed run.
            list(self.pool.map(time.sleep, [0.5] * self.procs))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _map(self, fn, parts: list[tuple]) -> list:
        if self.pool is None:
            return [fn(*parts[0])]
        return list(self.pool.map(fn, *zip(*parts, strict=True)))

    def _start_at(self) -> float:
        return time.time() + (0.5 if self.pool is not None else 0.05)

    def closed_loop(self, url, bodies, tokens, concurrency: int, timeout: float) -> dict:
        """All requests, `concurrency` in flight at a time (in all): the max throughput.
        tokens: each body's token count (the same for every server)."""
        start_at = self._start_at()
        per = max(1, concurrency // self.procs)
        parts = [([bodies[i] for i in range(k, len(bodies), self.procs)],
                  [tokens[i] for i in range(k, len(bodies), self.procs)],
                  url, per, timeout, start_at) for k in range(self.procs)]  # fmt: skip
        done = self._map(_closed_part, parts)
        wall = max(d["end"] for d in done) - start_at
        ok, n_tokens = sum(d["ok"] for d in done), sum(d["tokens"] for d in done)
        errors = sum(d["errors"] for d in done)
        return {"ok": ok, "tokens": n_tokens, "errors": errors, "seconds": wall,
                "req_per_s": ok / wall, "tokens_per_s": n_tokens / wall}  # fmt: skip

    def open_loop(self, url, bodies, tokens, rate: float, seed: int, timeout: float) -> dict:
        """Poisson arrivals at `rate` requests/s (open loop: arrivals never wait for
        responses). Latency = response time - scheduled arrival."""
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / rate, size=len(bodies))
        arrivals = (np.cumsum(gaps) - gaps[0]).tolist()
        start_at = self._start_at()
        parts = [([bodies[i] for i in range(k, len(bodies), self.procs)],
                  [tokens[i] for i in range(k, len(bodies), self.procs)],
                  [arrivals[i] for i in range(k, len(bodies), self.procs)],
                  url, timeout, start_at) for k in range(self.procs)]  # fmt: skip
        results = [r for part in self._map(_open_part, parts) for r in part]
        ok = [r for r in results if r[1] == 200]
        lat = np.array([r[0] for r in ok]) if ok else np.array([float("nan")])
        span = max(r[3] for r in results) - start_at
        return {
            "offered_req_per_s": rate,
            "requests": len(bodies),
            "ok": len(ok),
            "errors": len(bodies) - len(ok),
            "achieved_req_per_s": len(ok) / span,
            "tokens_per_s": sum(r[2] for r in ok) / span,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p90_ms": float(np.percentile(lat, 90) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "max_ms": float(lat.max() * 1e3),
        }


def _closed_part(bodies, tokens, url, concurrency, timeout, start_at) -> dict:
    async def go():
        todo = list(range(len(bodies)))
        done = {"ok": 0, "tokens": 0, "errors": 0}

        async def worker(http):
            while todo:
                i = todo.pop()
                if await _post(http, bodies[i]) == 200:
                    done["ok"] += 1
                    done["tokens"] += tokens[i]
                else:
                    done["errors"] += 1

        async with _client(url, timeout) as http:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return {**done, "end": time.time()}

    return asyncio.run(go())


def _open_part(bodies, tokens, arrivals, url, timeout, start_at) -> list[tuple]:
    """[(latency s, status, tokens, end wall time)] per request of this share."""

    async def go():
        async with _client(url, timeout) as http:

            async def one(i):
                due = start_at + arrivals[i]
                await asyncio.sleep(max(0.0, due - time.time()))
                try:
                    status = await _post(http, bodies[i])
                except Exception as e:  # a timeout or reset counts as an error, not a crash
                    status = type(e).__name__
                end = time.time()
                return end - due, status, tokens[i], end

            return await asyncio.gather(*(one(i) for i in range(len(bodies))))

    return asyncio.run(go())


def scrape(url: str) -> dict:
    """The l2v server's batch metrics: {name: value} for the batch histograms and counters."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = httpx.get(url + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(("l2v_batch", "l2v_mixed", "l2v_texts", "l2v_tokens")):
            continue
        for s in fam.samples:
            key = s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")
            out[key] = s.value
    return out


def batch_distribution(before: dict, after: dict) -> dict:
    """What the passes of one rate looked like (deltas of the l2v metrics)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    passes = d.get("l2v_batch_texts_count", 0.0)
    if passes <= 0:
        return {"passes": 0}
    buckets = {}
    prev = 0.0
    keys = [k for k in d if k.startswith("l2v_batch_texts_bucket")]
    for k in sorted(keys, key=lambda k: float(k.split("le=")[1].rstrip("}"))):
        le = k.split("le=")[1].rstrip("}")
        buckets[le] = int(round(d[k] - prev))
        prev = d[k]
    return {
        "passes": int(passes),
        "mean_texts": d["l2v_batch_texts_sum"] / passes,
        "mean_tokens": d["l2v_batch_tokens_sum"] / passes,
        "mean_requests": d["l2v_batch_requests_sum"] / passes,
        "mixed_share": d.get("l2v_mixed_batches_total", 0.0) / passes,
        "texts_histogram": {k: v for k, v in buckets.items() if v},
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def build_encoder(args, graphs: bool = False):
    """The encoder (the default model, or a random-weight shape); graphs: cuda_graphs=True."""
    from l2v_models.encoder import LLM2Vec

    if args.shape is None:
        return LLM2Vec.from_pretrained(args.model, device=args.device, cuda_graphs=graphs), None
    from bench.models import build_ours, random_state_dict
    from bench.workloads import model_shape

    cfg = model_shape(args.shape)
    device = torch.device(args.device)
    state = random_state_dict(cfg, device, torch.bfloat16, seed=0)
    enc = build_ours(cfg, state, torch.bfloat16, device, "auto", None)
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if graphs:
        enc = LLM2Vec.from_model(enc.model, cuda_graphs=True)
    return enc, cfg


def offline_throughput(encoder, bodies: list) -> dict:
    """Offline encode of every input of the workload in one call (after a warm-up call)."""
    from l2v_models.packing import TokenizedTexts

    items, ids = offline_items(bodies)
    if ids:
        texts = TokenizedTexts.whole(ids)

        def run():
            return encoder.engine.embed(texts, mode=encoder.engine_pool_mode)
    else:
        texts = encoder.prepare_texts(items)

        def run():
            return encoder.encode(items, show_progress_bar=False)

    run()  # warm-up (kernel compiles, autotuning)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n_tokens = int(texts.lengths.sum())
    return {"texts": len(texts), "tokens": n_tokens, "seconds": wall,
            "tokens_per_s": n_tokens / wall, "req_per_s": len(bodies) / wall}  # fmt: skip


def body_tokens(encoder, bodies: list) -> list[int]:
    """Each request's token count as the model sees it (instruction and specials included)."""
    from l2v_models.packing import TokenizedTexts

    out = []
    for b in bodies:
        if isinstance(b["input"][0], str):
            items = [[b["instruction"], x] if "instruction" in b else x for x in b["input"]]
            out.append(int(encoder.prepare_texts(items).lengths.sum()))
        else:
            out.append(int(TokenizedTexts.whole(b["input"]).lengths.sum()))
    return out


def run(args, out: Path) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder, cfg = build_encoder(args)
    tokens = cfg is not None
    bodies = make_requests(args.requests, tokens=tokens, cfg=cfg, seed=0, smoke=args.smoke)
    offline = offline_throughput(encoder, bodies)
    tokens_per_body = body_tokens(encoder, bodies)
    del encoder  # the servers load their own copy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rates_frac = [float(x) for x in args.rates.split(",")]
    result = {"kind": "l2v-serve-bench", "stamp": common.stamp(), "config": vars(args).copy(),
              "offline": offline, "servers": {}, "rows": []}  # fmt: skip
    result["config"]["tokens_input"] = tokens
    result["workload"] = {
        "requests": len(bodies),
        "inputs": sum(len(b["input"]) for b in bodies),
        "query_requests": sum(
            1 for b in bodies if len(b["input"]) == 1 and (tokens or "instruction" in b)
        ),  # fmt: skip
        "tokens": offline["tokens"],
    }
    clients = Clients(args.client_procs)
    try:
        _serve_and_measure(args, out, bodies, tokens_per_body, clients, rates_frac, result)
    finally:
        clients.close()
    result["goals"] = goals(result)
    return result


def _serve_and_measure(args, out, bodies, tokens_per_body, clients, rates_frac, result) -> None:
    max_rate = None
    for name in ("l2v", "naive"):
        with server_process(name, args, out / f"{args.name}_{name}_server.log") as url:
            b1 = batch1_latency(url, bodies, args.batch1, args.timeout)
            closed = clients.closed_loop(url, bodies, tokens_per_body, args.concurrency,
                                         args.timeout)  # fmt: skip
            if max_rate is None:
                max_rate = closed["req_per_s"]
            server = {
                "batch1_p50_ms": float(np.percentile(b1, 50) * 1e3),
                "batch1_p99_ms": float(np.percentile(b1, 99) * 1e3),
                "max": closed,
            }
            result["servers"][name] = server
            for k, frac in enumerate(rates_frac):
                before = scrape(url) if name == "l2v" else None
                row = clients.open_loop(url, bodies, tokens_per_body, frac * max_rate,
                                        seed=100 + k, timeout=args.timeout)  # fmt: skip
                row.update(server=name, load=frac, **common.stamp())
                if before is not None:
                    row["batches"] = batch_distribution(before, scrape(url))
                result["rows"].append(row)
                print(f"[serve bench] {name} at {frac:.2f} x max ({row['offered_req_per_s']:.1f}"
                      f" req/s): p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                      f"{row['errors']} errors", flush=True)  # fmt: skip


def goals(result: dict) -> list[dict]:
    out = []
    l2v = result["servers"]["l2v"]
    half = [r for r in result["rows"] if r["server"] == "l2v" and abs(r["load"] - 0.5) < 1e-9]
    if half:
        ratio = half[0]["p99_ms"] / l2v["batch1_p50_ms"]
        out.append({"goal": f"p99 at 50% load <= {GOAL_P99_OVER_B1:g}x batch-1 latency",
                    "value": f"{ratio:.2f}x", "met": bool(ratio <= GOAL_P99_OVER_B1)})  # fmt: skip
    offline = result["offline"]["tokens_per_s"]
    ratio = l2v["max"]["tokens_per_s"] / offline
    goal = f"max throughput >= {GOAL_THROUGHPUT_VS_OFFLINE:.0%} of offline encode"
    met = bool(ratio >= GOAL_THROUGHPUT_VS_OFFLINE)
    out.append({"goal": goal, "value": f"{ratio:.0%}", "met": met})
    return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def write_report(result: dict, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    png = plot(result, out / f"{name}_latency.png")
    st = result["stamp"]
    cfg = result["config"]
    wl = result["workload"]
    lines = [
        "# Serving benchmark: l2v serve vs a naive per-request server",
        "",
        f"{st['device']}, torch {st['torch']}, triton {st['triton']}, CUDA {st['cuda']}, "
        f"commit {st['commit']}, {st['date']}.",
        "",
        f"Model: {cfg['shape'] or 'default (SmolLM2-135M-Instruct)'} on {cfg['device']}; "
        f"inputs as {'token ids' if cfg['tokens_input'] else 'texts'}. Workload: "
        f"{wl['requests']} requests, {wl['inputs']} inputs, {wl['tokens']} tokens "
        f"({wl['query_requests']} single-query requests, the rest 1-4 passages). "
        f"l2v: --max-batch-tokens {cfg['max_batch_tokens'] or 'default'}, --max-wait-ms "
        f"{cfg['max_wait_ms']:g}; CUDA graphs {'on' if cfg['cuda_graphs'] else 'off'}. Each "
        f"server in its own process, the load generator in {cfg['client_procs']} other "
        "process(es) (loopback HTTP).",
        "",
        "## Summary",
        "",
        "| server | batch-1 p50 ms | max req/s | max tokens/s |",
        "|---|---|---|---|",
    ]
    for server, s in result["servers"].items():
        m = s["max"]
        lines.append(f"| {server} | {s['batch1_p50_ms']:.1f} | {m['req_per_s']:.2f} | "
                     f"{m['tokens_per_s']:.0f} |")  # fmt: skip
    off = result["offline"]
    lines += [
        f"| offline encode (one call) | | {off['req_per_s']:.2f} | {off['tokens_per_s']:.0f} |",
        "",
        "## Latency under open-loop Poisson load",
        "",
        "Load = fraction of l2v's measured max throughput; both servers get the same rates.",
        "",
        "| server | load | offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['server']} | {r['load']:.2f} | {r['offered_req_per_s']:.2f} | "
            f"{r['achieved_req_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} |"
        )
    lines += [
        "",
        "## l2v batches per load",
        "",
        "| load | passes | texts/pass | tokens/pass | requests/pass | mixed passes | "
        "texts per pass (histogram, le: count) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b = r.get("batches")
        if not b or not b.get("passes"):
            continue
        hist = ", ".join(f"{k}: {v}" for k, v in b["texts_histogram"].items())
        lines.append(
            f"| {r['load']:.2f} | {b['passes']} | {b['mean_texts']:.1f} | {b['mean_tokens']:.0f} "
            f"| {b['mean_requests']:.2f} | {b['mixed_share']:.0%} | {hist} |"
        )
    lines += ["", "## Goals (set for the GPU run, Mistral-7B shape)", "",
              "| goal | value | met |", "|---|---|---|"]  # fmt: skip
    for g in result["goals"]:
        lines.append(f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |")
    lines += ["", f"![latency vs load]({png.name})", ""]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines))
    return md


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"l2v": "tab:blue", "naive": "tab:red"}
    for server in ("l2v", "naive"):
        rows = [r for r in result["rows"] if r["server"] == server]
        x = [r["offered_req_per_s"] for r in rows]
        for key, style in (("p50_ms", "--"), ("p99_ms", "-")):
            ax.plot(x, [r[key] for r in rows], style, marker="o", color=colors[server],
                    label=f"{server} {key[:3]}")  # fmt: skip
        b1 = result["servers"][server]["batch1_p50_ms"]
        ax.axhline(b1, color=colors[server], lw=0.8, ls=":", label=f"{server} batch-1 p50")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    st = result["stamp"]
    ax.set_title(f"l2v serve vs naive per-request server\n{st['device']}, {st['commit']}",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU CI size: few short requests")
    p.add_argument("--model", default=None, help="model for from_pretrained (default: SmolLM2)")
    p.add_argument(
        "--shape",
        default=None,
        help="random-weight model shape from bench/workloads.py (e.g. mistral-7b)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=None, help="requests per load level")
    p.add_argument("--rates", default=None, help="fractions of l2v's max throughput")
    p.add_argument("--concurrency", type=int, default=None, help="closed-loop clients")
    p.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="load-generator processes (default: 4 with CUDA, else 1)",
    )
    p.add_argument("--batch1", type=int, default=None, help="sequential single queries")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--out", default=None, help="output folder (default bench/results)")
    p.add_argument("--name", default="serve")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="servers replay small passes from CUDA graphs (default: on with CUDA)",
    )
    p.add_argument("--serve", choices=("l2v", "naive"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    gpu = args.device.startswith("cuda")
    if args.requests is None:
        args.requests = 12 if args.smoke else (1000 if gpu else 60)
    if args.rates is None:
        args.rates = "0.5,1.0" if args.smoke else "0.25,0.5,0.75,1.0"
    if args.concurrency is None:
        args.concurrency = 8 if args.smoke else (256 if gpu else 16)
    if args.client_procs is None:
        args.client_procs = 4 if gpu else 1
    if args.batch1 is None:
        args.batch1 = 3 if args.smoke else 20
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.serve is not None:  # a child process: one server
        serve_forever(args)
        return None
    out = common.out_dir(args.out)
    result = run(args, out)
    md = write_report(result, out, args.name)
    print(md.read_text())
    return result


if __name__ == "__main__":
    main()
