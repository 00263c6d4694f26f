"""Serving overhead benchmark: `l2v serve` against offline `encode` of the same texts, with a
model small enough that tokenization, batching and HTTP dominate.

    python -m bench.serve_scale                                  # this checkout's server
    python -m bench.serve_scale --server-repo /path/to/old/checkout --name before
    python -m bench.serve_scale --device cuda --layers 32 --hidden 4096   # a GPU shape

The model: a Llama of --layers layers and hidden size --hidden (default 2 x 128: a forward pass
costs next to nothing on the CPU) with random weights and the real SmolLM2 tokenizer (the one
packaged with the default model's GGUF, vocabulary 49152), saved as a model folder that any
`l2v serve` loads. The texts: a seeded mix of queries (with the retrieval instruction) and
passages, as in bench/serve.py.

Measured, each server run by its own command line (`python -m l2v_models.cli serve`, from
--server-repo when given: the "before" of a change) in its own process:
- offline: `encode` of every text in one call (tokenization included), tokens/s, best of
  --repeats;
- the engine alone on one pre-tokenized query (`Engine.embed`), p50 ms, and the tokenization of
  one query, p50 ms: the server's batch-1 latency minus both is what the server adds;
- batch-1: single-query requests one after another, p50 / p99 ms;
- max throughput: closed loop, every request in flight --connections at a time, from
  --client-procs load-generator processes (raw HTTP/1.1 keep-alive clients: pre-encoded bodies,
  the response read whole and its status checked, so the clients cost the server's machine as
  little as possible), for each --per-request size (texts per request), tokens/s and its ratio
  to offline.
Client and server share the machine: on a small CPU the clients' own cost is in every number.
Output: <out>/<name>.json and <name>.md, stamped with device, versions, commit, date, cores and
the load average before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.workloads import QUERY_INSTRUCTION, WORDS


def make_items(n: int, seed: int = 0) -> list:
    """n inputs: 70% queries [instruction, 6-24 words], 30% passages (log-normal, median 80
    words, 4-380)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        if rng.random() < 0.7:
            words = rng.choice(WORDS, size=int(rng.integers(6, 24)))
            items.append([QUERY_INSTRUCTION, " ".join(words)])
        else:
            k = int(np.clip(rng.lognormal(math.log(80), 0.6), 4, 380))
            items.append(" ".join(rng.choice(WORDS, size=k)))
    return items


def build_model_dir(out: Path, layers: int, hidden: int) -> Path:
    """A random Llama (layers x hidden, heads of 32, GQA 2:1) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from l2v_models.checkpoint import default_model_path

    path = out / f"llama_{layers}x{hidden}_smollm2_tokenizer"
    if (path / "config.json").is_file():
        return path
    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    heads = max(1, hidden // 32)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Load generator: raw HTTP/1.1 keep-alive clients in several processes
# --------------------------------------------------------------------------------------------
def http_request(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def _exchange(reader, writer, request: bytes) -> int:
    """Send one request, read its response whole; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


def _closed_part(requests: list[bytes], tokens: list[int], port: int, connections: int,
                 start_at: float) -> dict:  # fmt: skip
    async def go():
        todo = list(range(len(requests)))[::-1]
        done = {"ok": 0, "errors": 0, "tokens": 0}

        async def conn():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                while todo:
                    i = todo.pop()
                    if await _exchange(reader, writer, requests[i]) == 200:
                        done["ok"] += 1
                        done["tokens"] += tokens[i]
                    else:
                        done["errors"] += 1
            finally:
                writer.close()

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu = time.process_time()
        await asyncio.gather(*(conn() for _ in range(connections)))
        return {**done, "end": time.time(), "cpu_s": time.process_time() - cpu}

    return asyncio.run(go())


def closed_loop(pool, port: int, requests: list[bytes], tokens: list[int], procs: int,
                connections: int) -> dict:  # fmt: skip
    start_at = time.time() + 1.0
    parts = [(requests[k::procs], tokens[k::procs], port, connections, start_at)
             for k in range(procs)]  # fmt: skip
    done = list(pool.map(_closed_part, *zip(*parts, strict=True)))
    wall = max(d["end"] for d in done) - start_at
    ok, n_tokens = sum(d["ok"] for d in done), sum(d["tokens"] for d in done)
    # client_cores: the CPU the load generators themselves used (they share the server's cores)
    return {"requests": len(requests), "ok": ok, "errors": sum(d["errors"] for d in done),
            "seconds": wall, "req_per_s": ok / wall, "tokens_per_s": n_tokens / wall,
            "client_cores": sum(d["cpu_s"] for d in done) / wall}  # fmt: skip


def batch1(port: int, requests: list[bytes]) -> list[float]:
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = []
        await _exchange(reader, writer, requests[0])
        for r in requests:
            t0 = time.perf_counter()
            assert await _exchange(reader, writer, r) == 200
            out.append(time.perf_counter() - t0)
        writer.close()
        return out

    return asyncio.run(go())


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(args, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    repo = Path(args.server_repo).resolve() if args.server_repo else common.REPO
    env = dict(os.environ, PYTHONPATH=str(repo))
    if args.threads:  # the server's torch threads, as offline encode's
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "l2v_models.cli", "serve", "--model", str(model_dir),
           "--device", args.device, "--port", str(port), "--max-concurrent-requests", "100000",
           "--max-client-batch-size", "1024", "--max-wait-ms", str(args.max_wait_ms),
           "--log-level", "warning"]  # fmt: skip
    cmd += args.server_args.split() if args.server_args else []
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64)[9:12] == b"200":
                    return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not become healthy; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def bodies(items: list, size: int) -> list[tuple[dict, list]]:
    """Requests of `size` inputs each (a request's texts share its instruction or have none)."""
    queries = [x for x in items if isinstance(x, list)]
    passages = [x for x in items if isinstance(x, str)]
    out = []
    for group, instruction in ((queries, QUERY_INSTRUCTION), (passages, None)):
        for k in range(0, len(group), size):
            chunk = group[k : k + size]
            texts = [x[1] for x in chunk] if instruction else chunk
            body = {"input": texts, "encoding_format": "base64"}
            if instruction:
                body["instruction"] = instruction
            out.append((body, chunk))
    order = np.random.default_rng(1).permutation(len(out))
    return [out[i] for i in order]


def run(args) -> dict:
    import concurrent.futures
    import multiprocessing

    import torch

    from l2v_models.embedder import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    out = common.out_dir(args.out)
    load_before = os.getloadavg()
    model_dir = build_model_dir(out, args.layers, args.hidden)
    items = make_items(args.texts)
    emb = Embedder.from_pretrained(str(model_dir), device=args.device)
    lengths = emb.prepare_texts(items).lengths
    n_tokens = int(lengths.sum())
    emb.encode(items[:256], show_progress_bar=False)  # warm-up
    offline_s = math.inf
    for _ in range(args.repeats):  # best of --repeats, as the server's runs
        t0 = time.perf_counter()
        emb.encode(items, show_progress_bar=False)
        offline_s = min(offline_s, time.perf_counter() - t0)
    offline = {"texts": len(items), "tokens": n_tokens, "seconds": offline_s,
               "tokens_per_s": n_tokens / offline_s}  # fmt: skip
    one = [items[i] for i in range(len(items)) if isinstance(items[i], list)][: args.batch1]
    engine_ms, tok_ms = [], []
    for x in one:
        t = time.perf_counter()
        texts = emb.prepare_texts([x])
        tok_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        emb.engine.embed(texts)
        engine_ms.append((time.perf_counter() - t) * 1e3)
    del emb
    result = {"kind": "l2v-serve-scale", "stamp": common.stamp(), "config": vars(args).copy(),
              "cores": os.cpu_count(), "load_before": load_before, "offline": offline,
              "engine_b1_p50_ms": float(np.median(engine_ms)),
              "tokenize_b1_p50_ms": float(np.median(tok_ms)), "runs": []}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    proc = start_server(args, model_dir, port, out / f"{args.name}_server.log")
    try:
        with concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool:
            list(pool.map(time.sleep, [0.2] * args.client_procs))
            b1 = batch1(port, [http_request(port, "/v1/embeddings", json.dumps(
                {"input": [x[1]], "instruction": x[0], "encoding_format": "base64"}).encode())
                for x in one])  # fmt: skip
            result["server_b1_p50_ms"] = float(np.median(b1) * 1e3)
            result["server_b1_p99_ms"] = float(np.percentile(b1, 99) * 1e3)
            index = {id(x): i for i, x in enumerate(items)}
            for size in [int(x) for x in args.per_request.split(",")]:
                reqs = bodies(items, size)
                raw = [http_request(port, "/v1/embeddings", json.dumps(b).encode())
                       for b, _ in reqs]  # fmt: skip
                toks = [int(sum(lengths[index[id(x)]] for x in chunk)) for _, chunk in reqs]
                closed_loop(pool, port, raw[: len(raw) // 4], toks[: len(raw) // 4],
                            args.client_procs, args.connections)  # warm-up  # fmt: skip
                best = None
                for _ in range(args.repeats):
                    m = closed_loop(pool, port, raw, toks, args.client_procs, args.connections)
                    if best is None or m["tokens_per_s"] > best["tokens_per_s"]:
                        best = m
                best.update(per_request=size, ratio_to_offline=best["tokens_per_s"]
                            / offline["tokens_per_s"])  # fmt: skip
                result["runs"].append(best)
                print(f"[serve_scale] {size} texts/request: {best['tokens_per_s']:.0f} tokens/s "
                      f"({best['ratio_to_offline']:.2f} x offline), {best['errors']} errors",
                      flush=True)  # fmt: skip
    finally:
        stop_server(proc)
    result["server_adds_b1_ms"] = (result["server_b1_p50_ms"] - result["engine_b1_p50_ms"]
                                   - result["tokenize_b1_p50_ms"])  # fmt: skip
    return result


def write_report(result: dict, out: Path, name: str) -> Path:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    st, cfg, off = result["stamp"], result["config"], result["offline"]
    lines = [
        f"# Serving overhead: `l2v serve` vs offline encode ({name})", "",
        f"{st['device']}, {result['cores']} cores (load average before the run "
        f"{result['load_before'][0]:.1f}), torch {st['torch']}, commit {st['commit']}, "
        f"{st['date']}. Server code: {cfg['server_repo'] or 'this checkout'}"
        f"{' (' + cfg['server_args'] + ')' if cfg['server_args'] else ''}.", "",
        f"Model: Llama {cfg['layers']} layers x hidden {cfg['hidden']}, random weights, SmolLM2's "
        f"tokenizer; {off['texts']} texts ({off['tokens']} tokens; 70% queries with an "
        f"instruction, 30% passages). Load: {cfg['client_procs']} client processes x "
        f"{cfg['connections']} connections, closed loop, base64 responses; best of "
        f"{cfg['repeats']}.", "",
        "| measure | value |", "|---|---|",
        f"| offline encode (tokenization included) | {off['tokens_per_s']:.0f} tokens/s |",
        f"| engine alone, one query | {result['engine_b1_p50_ms']:.2f} ms p50 |",
        f"| tokenization alone, one query | {result['tokenize_b1_p50_ms']:.2f} ms p50 |",
        f"| server, one query at a time | {result['server_b1_p50_ms']:.2f} ms p50, "
        f"{result['server_b1_p99_ms']:.2f} ms p99 |",
        f"| what the server adds at batch 1 | {result['server_adds_b1_ms']:.2f} ms |",
    ]
    for r in result["runs"]:
        lines.append(f"| server max, {r['per_request']} texts per request | "
                     f"{r['tokens_per_s']:.0f} tokens/s = {r['ratio_to_offline']:.2f} x offline "
                     f"({r['req_per_s']:.0f} req/s, {r['errors']} errors; the clients used "
                     f"{r['client_cores']:.2f} of the {result['cores']} cores) |")  # fmt: skip
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--per-request", default="1,32", help="texts per request, comma-separated")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--connections", type=int, default=16, help="per client process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch1", type=int, default=50)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of offline encode and of the server (default 1: on a "
                   "small shared CPU more threads than free cores thrash; 0: torch's default)")
    p.add_argument("--server-repo", default=None, help="run the server from this checkout")
    p.add_argument("--server-args", default="", help="more `l2v serve` options")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="serve_scale")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    md = write_report(result, common.out_dir(args.out), args.name)
    print(md.read_text())
    return result


if __name__ == "__main__":
    main()
