"""The FastAPI app: OpenAI /v1/embeddings, TEI /embed, /health, /v1/models[/{id}], /metrics.

    app = create_app(embedder, ServeSettings(max_batch_tokens=4096, api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8000)             # what `l2v serve` does

embedder: an l2v_models.embedder.Embedder (any model l2v runs; an LLM2Vec from from_model for
token-id-only serving). The app owns a Batcher (one model worker thread), a small pool of
tokenizer threads (each with its own copy of the tokenizer: Hugging Face tokenizers are not safe
to share across threads when truncation is set), and a ServerMetrics registry.

A request, in order: API key (401) -> ready? (503 while the warm-up runs) -> admission (429 at
once when --max-concurrent-requests are in flight) -> body, at most --payload-limit bytes (413)
-> JSON and fields (422 on /embed, 400 on /v1; 413 over --max-client-batch-size; 400 for
dimensions; 404 model_not_found for a "model" this server does not serve; an unknown
prompt_name lists the model's prompts) -> tokenized in a tokenizer thread by the model's text
rules (l2v_models.text_rules, as `encode`, with max_length = --max-input-tokens) -> inputs a rule
cut (llm2vec's doc_max_length, the token limit) are counted (header X-Truncated-Inputs, usage
"truncated_inputs" on /v1, metric l2v_truncated_inputs_total) or, with "truncate": false,
refused (413 naming the input and the rule) -> queued for the model worker -> rows back in input
order, truncated to "dimensions" (renormalized), L2-normalized unless "normalize": false. A
client that disconnects while queued has its texts dropped (answered 499 for the log). No stack
trace ever reaches a client: unexpected errors are logged and answered 500 with a one-line
message.

Error shapes: the /v1 routes answer OpenAI's {"error": {message, type, param, code}} (so the
openai client raises BadRequestError, NotFoundError, ...), unknown /v1 routes and wrong methods
included; the other routes answer text-embeddings-inference's {"error", "error_type"}.

/health is 200 only once the warm-up pass ran (503 before, and if the warm-up failed). Shutdown
(uvicorn on SIGTERM / Ctrl-C) stops accepting connections, lets every admitted request finish,
then stops the worker.

The model's own text rules apply as in `encode`: an llm2vec model cuts a text over
doc_max_length tokens by words first, then the token limit applies to the whole sequence
(instruction, chat template and special tokens included); both count as truncation here.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import hmac
import json
import logging
import queue
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from l2v_models.packing import TokenizedTexts
from l2v_models.serve.batcher import Batcher, RequestDropped, ShuttingDown
from l2v_models.serve.metrics import ServerMetrics
from l2v_models.serve.schemas import ApiError, EmbedRequest, parse_json, parse_openai, parse_tei
from l2v_models.text_rules import Truncation

logger = logging.getLogger("l2v.serve")

# Bodies over the payload limit are read to the end (so the client sees the 413 instead of a
# reset connection) unless they run past this many times the limit.
_DRAIN_FACTOR = 8
_BIG_RESPONSE_FLOATS = 65536  # responses with more floats are encoded off the event loop
# Token ids mean nothing without the tokenizer that made them, and no check on the ids can tell
# (a foreign tokenizer's in-vocabulary ids often decode and re-encode unchanged), so a server
# whose model has a tokenizer takes text unless its operator says otherwise.
TOKEN_IDS_REFUSED = (
    '"{name}" holds token ids, which this server refuses: it cannot tell which tokenizer made '
    "them, and another tokenizer's ids give wrong embeddings (LangChain's OpenAIEmbeddings "
    "sends tiktoken ids unless given check_embedding_ctx_length=False); send the text, or "
    "start the server with --accept-token-ids if you tokenize with this model's own tokenizer"
)


@dataclass
class ServeSettings:
    """The server's limits and behaviour (the `l2v serve` options).

    max_batch_tokens: real tokens per forward pass (None: the engine's budget, 16384 on CUDA,
    4096 on CPU). max_batch_texts: texts per pass (None: no limit). max_wait_ms: how long the
    idle worker waits for more work before a pass. max_concurrent_requests: admitted requests
    in flight; more get 429. max_client_batch_size: inputs per request (413 above).
    max_input_tokens: tokens per input (None: the model's max_length); longer inputs are
    truncated, or 413 with "truncate": false. payload_limit: request body bytes (413 above).
    default_instruction: the instruction for text inputs of requests that give none. api_key:
    required as "Authorization: Bearer KEY" on /v1/* and /embed (None: no key). served_model_name:
    the name in responses and /v1/models; a request naming another "model" gets 404
    model_not_found unless accept_any_model_name. tokenizer_threads: threads tokenizing requests.
    accept_token_ids: embed token-id inputs although the model has a tokenizer (a server cannot
    tell which tokenizer made ids, so by default they are refused; a model without a tokenizer
    takes only ids).
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
    tokenizer_threads: int = 2
    accept_token_ids: bool = False

    def check(self) -> None:
        """ValueError naming the first invalid setting."""
        for name in ("max_concurrent_requests", "max_client_batch_size", "payload_limit",
                     "tokenizer_threads"):  # fmt: skip
            _check_int(name, getattr(self, name))
        for name in ("max_batch_tokens", "max_batch_texts", "max_input_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (pass None for no key)")
        for name in ("accept_any_model_name", "accept_token_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class ServerState:
    """Everything one app owns: embedder, settings, batcher, tokenizer pool, metrics."""

    def __init__(self, embedder, settings: ServeSettings, on_fatal=None):
        settings.check()
        self.embedder = embedder
        self.settings = settings
        self.engine = embedder.engine
        self.metrics = ServerMetrics()
        self.max_input_tokens = settings.max_input_tokens or int(embedder.rules.max_length)
        self.max_batch_tokens = settings.max_batch_tokens or self.engine.token_budget
        self.has_tokenizer = embedder.tokenizer is not None
        self.batcher = Batcher(
            self.engine,
            mode=embedder.rules.pool_mode,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_texts=settings.max_batch_texts,
            max_wait_s=settings.max_wait_ms / 1000.0,
            metrics=self.metrics,
        )
        self.on_fatal = on_fatal
        self.ready = False
        self.error: str | None = None
        self.in_flight = 0
        self.started = int(time.time())
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._encoders: queue.SimpleQueue = queue.SimpleQueue()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        n = self.settings.tokenizer_threads
        # One embedder view per tokenizer thread: same engine, own text rules and tokenizer.
        for _ in range(n):
            view = copy.copy(self.embedder)  # its own text rules (Embedder.__copy__)
            if self.has_tokenizer:
                view.rules.tokenizer = copy.deepcopy(self.embedder.tokenizer)
            self._encoders.put(view)
        self._pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="l2v-tokenizer")
        self.batcher.start()

    async def warm_up(self) -> None:
        """One pass through the whole path (tokenizer, worker, model); on CUDA also a pass of
        a full token budget, so a budget that does not fit in memory fails now, and with
        cuda_graphs every graph bucket the budget can use is captured first (no capture or
        autotuning lands in a request)."""
        try:
            if self.engine.cuda_graphs:  # the worker is idle: nothing is admitted before ready
                loop = asyncio.get_running_loop()
                n = await loop.run_in_executor(None, self._capture_graphs)
                logger.info("l2v serve: captured %d CUDA graph buckets", n)
            if self.has_tokenizer:
                texts, _ = await self.tokenize(["l2v warm-up", "Represent this text: warm-up"])
            else:
                texts = TokenizedTexts.whole([[1, 2, 3], [3, 2]])
            await asyncio.wrap_future(self.batcher.submit(texts).future)
            if self.engine.device.type == "cuda":
                n = min(self.max_input_tokens, self.max_batch_tokens)
                count = max(1, self.max_batch_tokens // n)
                rng = np.random.default_rng(0)
                ids = rng.integers(3, self.engine.vocab_size, size=(count, n)).tolist()
                await asyncio.wrap_future(self.batcher.submit(TokenizedTexts.whole(ids)).future)
            self.ready = True
            logger.info("l2v serve: ready (warm-up done)")
        except Exception as e:
            self.error = f"warm-up failed: {type(e).__name__}: {_first_line(e)}"
            logger.exception("l2v serve: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    def _capture_graphs(self) -> int:
        import torch

        runner = self.engine.graph_runner()
        top = min(self.max_batch_tokens, runner.max_tokens)
        with torch.cuda.device(self.engine.device), torch.inference_mode():
            return len(runner.warmup((self.batcher.mode,), (False,), max_tokens=top))

    def close(self, timeout: float | None = 60.0) -> None:
        self.ready = False
        if not self.batcher.stop(timeout):
            logger.error("l2v serve: the model worker did not stop within %s s", timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ tokenization
    async def tokenize(
        self, items: list, prompt: str | None = None, where: str = "input"
    ) -> tuple[TokenizedTexts, list[Truncation]]:
        """Texts -> (TokenizedTexts, the inputs a rule cut), by the model's text rules with
        `prompt` for every text, in a tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._tokenize, items, prompt, where)

    def _tokenize(self, items: list, prompt: str | None, where: str):
        view = self._encoders.get()
        try:
            prepared = view.prepare(items, prompt=prompt or "", max_length=self.max_input_tokens,
                                    where=where)  # fmt: skip
            return prepared.texts, prepared.truncations
        finally:
            self._encoders.put(view)

    def token_inputs(self, items: list) -> tuple[TokenizedTexts, list[Truncation]]:
        """Token-id inputs -> (TokenizedTexts pooling every token, inputs over the limit),
        cut at the limit."""
        limit = self.max_input_tokens
        over = [Truncation(i, len(ids), limit, "max_length")
                for i, ids in enumerate(items) if len(ids) > limit]  # fmt: skip
        if over:
            items = [ids[:limit] for ids in items]
        return TokenizedTexts.whole(items), over

    def resolve_prompt(self, req: EmbedRequest) -> str | None:
        """The request's prompt text (its instruction, its named prompt, the server's default
        instruction or the model's default prompt); ApiError 422 naming the model's prompts for
        an unknown prompt_name."""
        if req.tokens:
            return None
        try:
            return self.embedder.rules.resolve_prompt(req.prompt_name, req.prompt)
        except ValueError as e:
            raise ApiError(422, str(e), "prompt_name") from None

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

    def check_model(self, name) -> None:
        """ApiError 404 model_not_found for a model name this server does not serve (any name
        with accept_any_model_name; None, no name given, is fine; a non-string name is left to
        the request validation)."""
        served = self.settings.served_model_name
        if not isinstance(name, str) or name == served or self.settings.accept_any_model_name:
            return
        raise _model_not_found(name, served, '; send that name or omit "model"')

    def model_card(self) -> dict:
        return {"id": self.settings.served_model_name, "object": "model",
                "created": self.started, "owned_by": "l2v"}  # fmt: skip

    def check_ready(self) -> None:
        if self.error is not None:
            raise ApiError(503, f"the server is not healthy: {self.error}")
        if not self.ready:
            raise ApiError(503, "the model is warming up; retry when GET /health answers 200")
        if not self.batcher.alive:
            raise ApiError(503, "the model worker has stopped (the server is shutting down)")

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
        dropped = self.batcher.cancel(job)
        logger.info("l2v serve: client went away; dropped %d queued texts", dropped)
        raise ApiError(499, "client closed the request")

    async def embed(self, request: Request, endpoint: str) -> Response:
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
            obj = parse_json(await self.read_body(request))
            req = self.parse(obj, endpoint)
            prompt = self.resolve_prompt(req)
            t1 = time.perf_counter()
            name = "input" if endpoint == "openai" else "inputs"
            if req.tokens:
                texts, over = self.token_inputs(req.items)
            else:
                texts, over = await self.tokenize(req.items, prompt, name)
            self.metrics.tokenization_seconds.observe(time.perf_counter() - t1)
            if over and not req.truncate:
                raise ApiError(413, _truncation_refusal(over[0], name), f"{name}[{over[0].index}]")
            if over:
                self.metrics.truncated_inputs.inc(len(over))
            try:
                job = self.batcher.submit(texts)
            except ShuttingDown:
                raise ApiError(503, "the server is shutting down") from None
            try:
                rows = await self.wait_rows(request, job)
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
            response = await self.render(req, rows, texts, endpoint, truncated=len(over))
            if over:
                response.headers["X-Truncated-Inputs"] = str(len(over))
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

    def parse(self, obj: dict, endpoint: str) -> EmbedRequest:
        common = dict(
            vocab_size=self.engine.vocab_size,
            max_inputs=self.settings.max_client_batch_size,
            default_instruction=self.settings.default_instruction,
            has_tokenizer=self.has_tokenizer,
        )
        if endpoint == "openai":
            self.check_model(obj.get("model"))
            req = parse_openai(obj, dimension=self.engine.dimension, **common)
        else:
            req = parse_tei(obj, **common)
        if req.tokens and self.has_tokenizer and not self.settings.accept_token_ids:
            name = "input" if endpoint == "openai" else "inputs"
            raise ApiError(422, TOKEN_IDS_REFUSED.format(name=name), name)
        return req

    async def render(
        self, req: EmbedRequest, rows: np.ndarray, texts, endpoint: str, truncated: int = 0
    ) -> Response:
        if req.dimensions is not None and req.dimensions < rows.shape[1]:
            rows = rows[:, : req.dimensions]  # Matryoshka: renormalized below when meant to be
        if req.normalize or (req.dimensions is not None and self.embedder.normalizes):
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        rows = np.ascontiguousarray(rows, dtype="<f4")
        n_tokens = int(texts.lengths.sum())

        def encode() -> bytes:
            if endpoint == "tei":
                body = rows.tolist()
            else:
                data = []
                for i, row in enumerate(rows):
                    emb = (base64.b64encode(row.tobytes()).decode("ascii")
                           if req.encoding_format == "base64" else row.tolist())  # fmt: skip
                    data.append({"object": "embedding", "index": i, "embedding": emb})
                body = {
                    "object": "list",
                    "data": data,
                    "model": self.settings.served_model_name,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                              "truncated_inputs": truncated},
                }
            return json.dumps(body, separators=(",", ":")).encode()

        if rows.size > _BIG_RESPONSE_FLOATS:
            content = await asyncio.get_running_loop().run_in_executor(None, encode)
        else:
            content = encode()
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


def _model_not_found(name: str, served: str, hint: str = "") -> ApiError:
    return ApiError(
        404, f"the model {name!r:.200} does not exist on this server: it serves {served!r} "
        f"(GET /v1/models){hint}", "model", code="model_not_found",
    )  # fmt: skip


def _is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _truncation_refusal(cut: Truncation, name: str) -> str:
    """The 413 message for an input a rule would cut when the request says "truncate": false."""
    where = f"{name}[{cut.index}]"
    if cut.rule == "doc_max_length":
        return (f"{where} has {cut.tokens} text tokens, over the model's doc_max_length of "
                f"{cut.limit} (llm2vec cuts longer texts by words); shorten it or send "
                '"truncate": true')  # fmt: skip
    return (f"{where} has {cut.tokens} tokens, over this server's limit of {cut.limit} "
            '(--max-input-tokens); shorten it or send "truncate": true')  # fmt: skip


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def create_app(embedder, settings: ServeSettings | None = None, *, on_fatal=None) -> FastAPI:
    """The ASGI app serving `embedder` (see the module docstring). on_fatal(message): called
    when the warm-up fails (the CLI stops the server)."""
    state = ServerState(embedder, settings or ServeSettings(), on_fatal=on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        warm = asyncio.create_task(state.warm_up())
        try:
            yield
        finally:
            if not warm.done():
                warm.cancel()
            await asyncio.get_running_loop().run_in_executor(None, state.close)
            logger.info("l2v serve: stopped after %d forward passes", state.batcher.batches_run)

    app = FastAPI(title="l2v serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.l2v = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes (404), wrong methods (405) and other HTTP errors from the router, in
        the route's error shape instead of FastAPI's {"detail": ...}."""
        method, path = request.method, request.url.path[:200]
        if exc.status_code == 404:
            message = (f"no route {method} {path}; this server answers POST /v1/embeddings, "
                       "GET /v1/models, GET /v1/models/{id}, POST /embed, GET /health and "
                       "GET /metrics")  # fmt: skip
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {method} is not allowed on {path} (allowed: {allowed})"
        else:
            message = str(exc.detail)
        endpoint = "openai" if _is_openai_path(request.url.path) else "tei"
        return error_response(ApiError(exc.status_code, message), endpoint, exc.headers)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        return await state.embed(request, "openai")

    @app.post("/embed")
    async def tei_embed(request: Request) -> Response:
        return await state.embed(request, "tei")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if state.error is not None:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.batcher.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            state.check_auth(request)
        except ApiError as e:
            return error_response(e, "openai")
        return JSONResponse({"object": "list", "data": [state.model_card()]})

    @app.get("/v1/models/{model_id:path}")  # :path: served names may hold "/" (a repo id)
    async def model(request: Request, model_id: str) -> Response:
        try:
            state.check_auth(request)
            if model_id != state.settings.served_model_name:  # whatever accept_any_model_name
                raise _model_not_found(model_id, state.settings.served_model_name)
        except ApiError as e:
            return error_response(e, "openai")
        return JSONResponse(state.model_card())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
