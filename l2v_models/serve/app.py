"""The FastAPI app: OpenAI /v1/embeddings, TEI /embed, /similarity, /tokenize, /decode,
/health, /v1/models[/{id}], /metrics.

    app = create_app(embedder, ServeSettings(max_batch_tokens=4096, api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8000)             # what `l2v serve` does

embedder: an l2v_models.embedder.Embedder (any model l2v runs; an LLM2Vec from from_model for
token-id-only serving). The app owns:
- tokenizer processes (serve.tokenizer_pool; --tokenizer-workers): each request's body is
  parsed, validated and tokenized there by the model's text rules (serve.preparer), so nothing
  CPU-heavy runs in this interpreter besides HTTP and the model workers;
- engine replicas (serve.replicas): --devices (every visible GPU by default, or the CPU), and
  --replicas-per-device engines on each, with the --adapter LoRA adapters ready to apply;
- the continuous batcher (serve.batcher): one queue, one model worker thread per replica;
- a ServerMetrics registry.

A request, in order: API key (401) -> ready? (503 while the warm-up runs) -> admission (429 at
once when --max-concurrent-requests are in flight) -> body, at most --payload-limit bytes (413)
-> in a tokenizer process: JSON and fields (422 on TEI's routes, 400 on /v1; 413 over
--max-client-batch-size; 400 for dimensions; 404 model_not_found for a "model" this server does
not serve; an unknown prompt_name lists the model's prompts), tokenized by the model's text rules
(as `encode`, with max_length = --max-input-tokens, cut at the end or, with
"truncation_direction": "left", at the beginning), inputs a rule cut (llm2vec's doc_max_length,
the token limit) counted (header X-Truncated-Inputs, usage "truncated_inputs" on /v1, metric
l2v_truncated_inputs_total) or, with "truncate": false, refused (413 naming the input and the
rule) -> queued for the model (the base or the adapter "model" names) -> rows back in input
order, truncated to "dimensions" (renormalized), L2-normalized unless "normalize": false, in
the requested output type (serve.encoding). A client that disconnects while queued has its texts
dropped (answered 499 for the log). A tokenizer process that dies fails only the requests it held
(503) and is replaced. No stack trace ever reaches a client: unexpected errors are logged and
answered 500 with a one-line message.

Error shapes: the /v1 routes answer OpenAI's {"error": {message, type, param, code}} (so the
openai client raises BadRequestError, NotFoundError, ...), unknown /v1 routes and wrong methods
included; the other routes answer text-embeddings-inference's {"error", "error_type"}.

/health is 200 only once the warm-up ran (every replica ran a pass; 503 before, and if the
warm-up failed). Shutdown (uvicorn on SIGTERM / Ctrl-C) stops accepting connections, lets every
admitted request finish, then stops the workers and the tokenizer processes.

`build_app(state)` is the same app over any ServerState: `l2v serve --ray` (serve.ray_serve)
builds one whose batcher is a Ray Serve deployment of model replicas.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from l2v_models.serve import encoding
from l2v_models.serve.batcher import ContinuousBatcher, RequestDropped, ShuttingDown
from l2v_models.serve.metrics import ServerMetrics
from l2v_models.serve.preparer import Preparer, ServedModel, Work, model_not_found
from l2v_models.serve.schemas import ApiError
from l2v_models.serve.tokenizer_pool import TokenizerDied, TokenizerPool, default_workers

logger = logging.getLogger("l2v.serve")

# Bodies over the payload limit are read to the end (so the client sees the 413 instead of a
# reset connection) unless they run past this many times the limit.
_DRAIN_FACTOR = 8
# Without orjson, responses with more floats are encoded off the event loop.
_BIG_RESPONSE_FLOATS = 65536
WARMUP_BODY = b'{"inputs": ["l2v warm-up", "Represent this text: warm-up"]}'
WARMUP_IDS = [[1, 2, 3], [3, 2]]
ROUTE_NAMES = ("POST /v1/embeddings, GET /v1/models, GET /v1/models/{id}, POST /embed, "
               "POST /similarity, POST /tokenize, POST /decode, GET /health and GET /metrics")


@dataclass
class ServeSettings:
    """The server's limits and behaviour (the `l2v serve` options).

    max_batch_tokens: real tokens per forward pass (None: the engine's budget, 16384 on CUDA,
    4096 on CPU). max_batch_texts: texts per pass (None: no limit). max_wait_ms: how long an
    idle worker waits for more work before a pass. max_concurrent_requests: admitted requests
    in flight; more get 429. max_client_batch_size: inputs per request (413 above).
    max_input_tokens: tokens per input (None: the model's max_length); longer inputs are
    truncated, or 413 with "truncate": false. payload_limit: request body bytes (413 above).
    default_instruction: the instruction for text inputs of requests that give none. api_key:
    required as "Authorization: Bearer KEY" on /v1/* and the TEI routes (None: no key).
    served_model_name: the name in responses and /v1/models; a request naming another "model"
    (not an adapter) gets 404 model_not_found unless accept_any_model_name. accept_token_ids:
    embed token-id inputs although the model has a tokenizer (by default refused: a server cannot
    tell which tokenizer made ids; a model without a tokenizer takes only ids). tokenizer_workers:
    tokenizer processes (None: tokenizer_pool.default_workers(); 0: a thread of this process,
    for debugging). devices: where engines run (None: every visible GPU, else the CPU; see
    replicas.parse_devices). replicas_per_device: engines per device. adapters: {name: path}
    of LoRA adapters served on the base, each chosen by "model": name.
    """

    max_batch_tokens: int | None = None
    max_batch_texts: int | None = None
    max_wait_ms: float = 2.0
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 128
    max_input_tokens: int | None = None
    payload_limit: int = 2_000_000
    default_instruction: str | None = None
    api_key: str | None = None
    served_model_name: str = "l2v"
    accept_any_model_name: bool = False
    tokenizer_workers: int | None = None
    accept_token_ids: bool = False
    devices: str | None = None
    replicas_per_device: int = 1
    adapters: dict = field(default_factory=dict)

    def check(self) -> None:
        """ValueError naming the first invalid setting."""
        for name in ("max_concurrent_requests", "max_client_batch_size", "payload_limit",
                     "replicas_per_device"):  # fmt: skip
            _check_int(name, getattr(self, name))
        for name in ("max_batch_tokens", "max_batch_texts", "max_input_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        if self.tokenizer_workers is not None:
            _check_int("tokenizer_workers", self.tokenizer_workers, minimum=0)
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (pass None for no key)")
        for name in ("accept_any_model_name", "accept_token_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in self.adapters:
            if name == self.served_model_name:
                raise ValueError(
                    f"adapter name {name!r} is the served model's name; pick another name"
                )

    @property
    def workers(self) -> int:
        return default_workers() if self.tokenizer_workers is None else self.tokenizer_workers


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class LocalBackend:
    """The model side of one process: engine replicas and the continuous batcher."""

    def __init__(self, embedder, settings: ServeSettings, metrics: ServerMetrics):
        from l2v_models.serve.adapters import read_adapters
        from l2v_models.serve.replicas import build_replicas, parse_devices

        devices = parse_devices(settings.devices, default=None if settings.devices else
                                embedder.device)  # fmt: skip
        adapters = read_adapters(settings.adapters)
        self.replicas = build_replicas(embedder, devices, settings.replicas_per_device, adapters)
        engine = self.replicas[0].engine
        self.max_batch_tokens = settings.max_batch_tokens or engine.token_budget
        self.batcher = ContinuousBatcher(
            self.replicas, mode=embedder.rules.pool_mode, max_batch_tokens=self.max_batch_tokens,
            max_batch_texts=settings.max_batch_texts, max_wait_s=settings.max_wait_ms / 1000.0,
            metrics=metrics,
        )  # fmt: skip
        self.devices = devices

    def describe(self) -> str:
        devices = ", ".join(map(str, self.devices))
        per = len(self.replicas) // len(self.devices)
        return f"{devices} ({per} engine{'s' if per > 1 else ''} per device)"

    def start(self) -> None:
        self.batcher.start()

    def submit(self, texts, model: str | None):
        return self.batcher.submit(texts, model)

    def cancel(self, job) -> int:
        return self.batcher.cancel(job)

    def stop(self, timeout: float | None) -> bool:
        return self.batcher.stop(timeout)

    @property
    def alive(self) -> bool:
        return self.batcher.alive

    def warm_up(self, texts, max_input_tokens: int) -> None:
        """Every replica, directly (its worker is idle: nothing is admitted before ready): with
        CUDA graphs, capture every bucket the budget can use; one pass of `texts` with the base
        and each adapter; on CUDA a pass of a full token budget, so a budget that does not fit
        fails now and no capture or autotuning lands in a request."""
        import torch

        from l2v_models.packing import TokenizedTexts

        mode = self.batcher.mode
        for replica in self.replicas:
            engine = replica.engine
            cuda = engine.device.type == "cuda"
            ctx = torch.cuda.device(engine.device) if cuda else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                if engine.cuda_graphs:
                    runner = engine.graph_runner()
                    top = min(self.max_batch_tokens, runner.max_tokens)
                    n = len(runner.warmup((mode,), (False,), max_tokens=top))
                    logger.info("l2v serve: %s captured %d CUDA graph buckets", replica.name, n)
                for adapter in [None, *replica.adapter_ops]:
                    replica.use(adapter)
                    engine.to_host(engine.run_batch(texts, mode=mode)).wait()
                replica.use(None)
                if cuda:
                    n = min(max_input_tokens, self.max_batch_tokens)
                    count = max(1, self.max_batch_tokens // n)
                    rng = np.random.default_rng(0)
                    ids = rng.integers(3, engine.vocab_size, size=(count, n)).tolist()
                    engine.to_host(engine.run_batch(TokenizedTexts.whole(ids), mode=mode)).wait()


class ServerState:
    """Everything one app owns: the served model's description, settings, tokenizer pool,
    backend (replicas + batcher, or a remote one), metrics."""

    def __init__(self, served: ServedModel, settings: ServeSettings, backend, *,
                 metrics: ServerMetrics | None = None, on_fatal=None):  # fmt: skip
        settings.check()
        self.served = served
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or ServerMetrics()
        self.max_input_tokens = settings.max_input_tokens or served.max_length
        self.preparer = Preparer(
            served, max_client_batch_size=settings.max_client_batch_size,
            max_input_tokens=self.max_input_tokens,
            default_instruction=settings.default_instruction,
            accept_any_model_name=settings.accept_any_model_name,
            accept_token_ids=settings.accept_token_ids,
        )  # fmt: skip
        self.pool: TokenizerPool | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self.on_fatal = on_fatal
        self.ready = False
        self.error: str | None = None
        self.in_flight = 0
        self.started = int(time.time())

    @property
    def batcher(self):
        """The local continuous batcher (tests and the benchmark read its counters)."""
        return self.backend.batcher

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        workers = self.settings.workers
        if workers > 0:
            self.pool = TokenizerPool(self.preparer, workers)
            await self.pool.start()
        else:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, "l2v-tokenizer")
        self.backend.start()

    async def warm_up(self) -> None:
        """The replicas' own warm-up (LocalBackend.warm_up), then one request through the whole
        path (tokenizer process, batcher, worker, model)."""
        try:
            loop = asyncio.get_running_loop()
            if self.served.has_tokenizer:
                work = await self.prepare("tei", WARMUP_BODY)
                if isinstance(work, ApiError):
                    raise RuntimeError(work.message)
                texts = work.texts()
            else:
                from l2v_models.packing import TokenizedTexts

                texts = TokenizedTexts.whole(WARMUP_IDS)
            warm = getattr(self.backend, "warm_up", None)
            if warm is not None:
                await loop.run_in_executor(None, warm, texts, self.max_input_tokens)
            await asyncio.wrap_future(self.backend.submit(texts, None).future)
            self.ready = True
            logger.info("l2v serve: ready (warm-up done)")
        except Exception as e:
            self.error = f"warm-up failed: {type(e).__name__}: {_first_line(e)}"
            logger.exception("l2v serve: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    async def close(self, timeout: float | None = 60.0) -> None:
        self.ready = False
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.backend.stop, timeout):
            logger.error("l2v serve: the model workers did not stop within %s s", timeout)
        if self.pool is not None:
            await self.pool.close()
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ preparation
    async def prepare(self, route: str, body: bytes):
        """The Preparer's answer for a body (Work, bytes or ApiError), in a tokenizer process;
        ApiError 503 when that process died."""
        if self.pool is not None:
            try:
                return await self.pool.run(route, body)
            except TokenizerDied as e:
                return ApiError(503, f"the request was not prepared: {e}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.preparer.run, route, body)

    # ------------------------------------------------------------------ requests
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), key.encode()
        ):
            raise ApiError(401, "invalid API key")

    def model_cards(self) -> list[dict]:
        return [{"id": name, "object": "model", "created": self.started, "owned_by": "l2v"}
                for name in self.served.names]  # fmt: skip

    def check_ready(self) -> None:
        if self.error is not None:
            raise ApiError(503, f"the server is not healthy: {self.error}")
        if not self.ready:
            raise ApiError(503, "the model is warming up; retry when GET /health answers 200")
        if not self.backend.alive:
            raise ApiError(503, "the model workers have stopped (the server is shutting down)")

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.payload_limit
        declared = request.headers.get("content-length")
        declared_n = int(declared) if declared and declared.isdigit() else None
        too_big = declared_n is not None and declared_n > limit
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    too_big = True
                if too_big:
                    if size > _DRAIN_FACTOR * limit:
                        break
                    continue
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(499, "client closed the request while sending it") from None
        if too_big:
            n = declared_n if declared_n is not None else size
            raise ApiError(
                413, f"request body of {n} bytes is over this server's limit of {limit} bytes "
                "(--payload-limit): send fewer or shorter inputs per request",
            )  # fmt: skip
        return b"".join(chunks)

    async def wait_rows(self, request: Request, job) -> np.ndarray:
        """The job's rows; if the client disconnects first, its queued texts are dropped and
        ApiError 499 is raised."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            return result.result()
        # Nobody awaits the rows any more: mark their (dropped) outcome as seen.
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        dropped = self.backend.cancel(job)
        logger.info("l2v serve: client went away; dropped %d queued texts", dropped)
        raise ApiError(499, "client closed the request")

    async def handle(self, request: Request, route: str) -> Response:
        """One request on `route` (preparer.ROUTES); the error shape follows the route."""
        endpoint = "openai" if route == "openai" else "tei"
        t0 = time.perf_counter()
        admitted = False
        status = 500
        try:
            self.check_auth(request)
            self.check_ready()
            if self.in_flight >= self.settings.max_concurrent_requests:
                raise ApiError(
                    429, f"the server is at its limit of {self.settings.max_concurrent_requests} "
                    "concurrent requests (--max-concurrent-requests); retry shortly",
                )  # fmt: skip
            self.in_flight += 1
            admitted = True
            self.metrics.in_flight.set(self.in_flight)
            body = await self.read_body(request)
            t1 = time.perf_counter()
            work = await self.prepare(route, body)
            if isinstance(work, ApiError):
                raise work
            if isinstance(work, bytes):  # /tokenize, /decode: answered by the preparer
                status = 200
                return Response(content=work, media_type="application/json")
            self.metrics.tokenization_seconds.observe(time.perf_counter() - t1)
            if work.truncations:
                self.metrics.truncated_inputs.inc(len(work.truncations))
            rows = await self.run_model(request, work)
            response = await self.render(work, rows)
            if work.truncations:
                response.headers["X-Truncated-Inputs"] = str(len(work.truncations))
            status = 200
            return response
        except ApiError as e:
            response = error_response(e, endpoint)
            status = response.status_code
            return response
        except Exception as e:  # never a stack trace to the client
            logger.exception("l2v serve: unexpected error")
            status = 500
            return error_response(
                ApiError(500, f"internal server error ({type(e).__name__}); see the server log"),
                endpoint,
            )
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)

    async def run_model(self, request: Request, work: Work) -> np.ndarray:
        try:
            job = self.backend.submit(work.texts(), work.model)
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down") from None
        try:
            return await self.wait_rows(request, job)
        except (RequestDropped, ShuttingDown) as e:
            raise ApiError(503, f"the request was not run: {e}") from None
        except ApiError:
            raise
        except Exception as e:
            logger.error("l2v serve: inference failed: %s: %s", type(e).__name__, e)
            raise ApiError(
                500, f"inference failed ({type(e).__name__}: {_first_line(e)}); see the "
                "server log",
            ) from None  # fmt: skip

    async def render(self, work: Work, rows: np.ndarray) -> Response:
        req = work.request
        if req.dimensions is not None and req.dimensions < rows.shape[1]:
            rows = rows[:, : req.dimensions]  # Matryoshka: renormalized below when meant to be
        unit = req.normalize or work.route == "similarity"
        if unit or (req.dimensions is not None and self.served.normalizes):
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_tokens = work.n_tokens

        def encode() -> bytes:
            if work.route == "tei":
                return encoding.json_rows(rows)
            if work.route == "similarity":
                return encoding.dumps(rows[1:] @ rows[0])
            usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                     "truncated_inputs": len(work.truncations)}  # fmt: skip
            return encoding.embeddings_body(rows, req.encoding_format,
                                            model=work.model or self.served.name, usage=usage)

        try:
            if encoding.orjson is None and rows.size > _BIG_RESPONSE_FLOATS:
                content = await asyncio.get_running_loop().run_in_executor(None, encode)
            else:
                content = encode()
        except encoding.EncodingError as e:
            raise ApiError(400, str(e), "encoding_format") from None
        return Response(content=content, media_type="application/json")


def error_response(e: ApiError, endpoint: str, headers: dict | None = None) -> JSONResponse:
    """The error in the route's shape: endpoint "tei" (text-embeddings-inference's body and
    status) or "openai" (OpenAI's body; 400 for what TEI answers 422)."""
    if endpoint == "tei":
        body, status = e.tei_body(), e.status
    else:
        body, status = e.openai_body(), e.openai_status()
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


def _is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def create_app(embedder, settings: ServeSettings | None = None, *, on_fatal=None) -> FastAPI:
    """The ASGI app serving `embedder` in this process (see the module docstring); adapters
    and devices that fail to load raise here (AdapterError / DeviceError naming them).
    on_fatal(message): called when the warm-up fails (the CLI stops the server)."""
    settings = settings or ServeSettings()
    settings.check()
    metrics = ServerMetrics()
    backend = LocalBackend(embedder, settings, metrics)
    served = ServedModel.of(embedder, settings.served_model_name, tuple(settings.adapters),
                            device=backend.describe())  # fmt: skip
    return build_app(ServerState(served, settings, backend, metrics=metrics, on_fatal=on_fatal))


def build_app(state: ServerState) -> FastAPI:
    """The routes over a ServerState (its lifespan starts and stops it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        warm = asyncio.create_task(state.warm_up())
        try:
            yield
        finally:
            if not warm.done():
                warm.cancel()
            await state.close()
            runs = getattr(state.backend, "batcher", None)
            logger.info("l2v serve: stopped after %s forward passes",
                        runs.batches_run if runs is not None else "its")  # fmt: skip

    app = FastAPI(title="l2v serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.l2v = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes (404), wrong methods (405) and other HTTP errors from the router, in
        the route's error shape instead of FastAPI's {"detail": ...}."""
        method, path = request.method, request.url.path[:200]
        if exc.status_code == 404:
            message = f"no route {method} {path}; this server answers {ROUTE_NAMES}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {method} is not allowed on {path} (allowed: {allowed})"
        else:
            message = str(exc.detail)
        endpoint = "openai" if _is_openai_path(request.url.path) else "tei"
        return error_response(ApiError(exc.status_code, message), endpoint, exc.headers)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        return await state.handle(request, "openai")

    @app.post("/embed")
    async def tei_embed(request: Request) -> Response:
        return await state.handle(request, "tei")

    @app.post("/similarity")
    async def tei_similarity(request: Request) -> Response:
        return await state.handle(request, "similarity")

    @app.post("/tokenize")
    async def tei_tokenize(request: Request) -> Response:
        return await state.handle(request, "tokenize")

    @app.post("/decode")
    async def tei_decode(request: Request) -> Response:
        return await state.handle(request, "decode")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if state.error is not None:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.backend.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            state.check_auth(request)
        except ApiError as e:
            return error_response(e, "openai")
        return JSONResponse({"object": "list", "data": state.model_cards()})

    @app.get("/v1/models/{model_id:path}")  # :path: served names may hold "/" (a repo id)
    async def model(request: Request, model_id: str) -> Response:
        try:
            state.check_auth(request)
            cards = {c["id"]: c for c in state.model_cards()}
            if model_id not in cards:  # whatever accept_any_model_name
                raise model_not_found(model_id, state.served.names)
        except ApiError as e:
            return error_response(e, "openai")
        return JSONResponse(cards[model_id])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
