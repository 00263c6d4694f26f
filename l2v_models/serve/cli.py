"""`l2v serve`: the subcommand (argparse only at import; FastAPI, uvicorn and torch load in func).

    l2v serve                                    # the embedded SmolLM2 on http://127.0.0.1:8000
    l2v serve --model DIR --peft ADAPTER --device cuda --port 8080 --api-key KEY
    l2v serve --model MNTP --adapter search=A --adapter nli=B   # many adapters on one base
    l2v serve --devices cuda:0,cuda:1 --replicas-per-device 2   # engines on several devices
    l2v serve --ray [--ray-address ADDR] ...     # a Ray Serve deployment (serve/ray_serve.py)
    L2V_API_KEY=KEY l2v serve ...                # the key from the environment

Errors a user can fix (bad option value, port in use, unknown model) end in one line, exit 2.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to l2v's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible embedding server",
        description="Serve an LLM2Vec model over HTTP: OpenAI POST /v1/embeddings (plus an "
        '"instruction" field), text-embeddings-inference POST /embed, GET /health, '
        "/v1/models[/ID] and /metrics (Prometheus). Texts of concurrent requests share forward "
        "passes (continuous token-budget batching); results equal `l2v encode`.",
    )
    from l2v_models.model_options import add_model_options

    model = p.add_argument_group("model (as in `l2v encode`)")
    # --max-length / --batch-tokens are limits below; prompts and dimensions come per request.
    add_model_options(model, batching=False, prompts=False, truncate_dim=False)
    model.add_argument("--cuda-graphs", action="store_true",
                       help="replay passes of up to 2048 tokens / 64 texts from CUDA graphs "
                       "(CUDA + triton backend; captured at start-up): small passes are "
                       "launch-bound without them")  # fmt: skip
    net = p.add_argument_group("network")
    net.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only)",
    )
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* and /embed (default: "
                     "$L2V_API_KEY, else no key)")  # fmt: skip
    net.add_argument("--served-model-name", default=None,
                     help="model name in responses and /v1/models (default: --peft, else "
                     "--model, else smollm2-llm2vec)")  # fmt: skip
    net.add_argument("--accept-token-ids", action="store_true",
                     help="embed token-id inputs (default: refused, since a server cannot tell "
                     "which tokenizer made them; LangChain's OpenAIEmbeddings sends tiktoken "
                     "ids unless check_embedding_ctx_length=False)")  # fmt: skip
    net.add_argument("--accept-any-model-name", action="store_true",
                     help='answer requests whatever "model" they name (default: a name other '
                     "than --served-model-name is answered 404 model_not_found, as OpenAI "
                     "does)")  # fmt: skip
    lim = p.add_argument_group("batching and limits")
    lim.add_argument(
        "--max-batch-tokens",
        "--batch-tokens",
        type=int,
        default=None,
        metavar="N",
        help="real tokens per forward pass (default: 16384 on CUDA, 4096 on CPU)",
    )
    lim.add_argument(
        "--max-batch-texts",
        type=int,
        default=None,
        metavar="N",
        help="texts per forward pass (default: no limit)",
    )
    lim.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="how long an idle model waits for more requests to batch (default 2)",
    )
    lim.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=512,
        metavar="N",
        help="requests in flight; more are answered 429 (default 512)",
    )
    lim.add_argument(
        "--max-client-batch-size",
        type=int,
        default=128,
        metavar="N",
        help="inputs per request; more are answered 413 (default 128)",
    )
    lim.add_argument(
        "--max-input-tokens",
        "--max-length",
        type=int,
        default=None,
        metavar="N",
        help="tokens per input (llm2vec's max_length); longer inputs are "
        'truncated, or 413 with "truncate": false (default: the model\'s, 512)',
    )
    lim.add_argument(
        "--payload-limit",
        type=int,
        default=2_000_000,
        metavar="BYTES",
        help="request body size; larger is answered 413 (default 2000000)",
    )
    lim.add_argument(
        "--default-instruction",
        default=None,
        metavar="TEXT",
        help="instruction for text inputs of requests that send none",
    )
    lim.add_argument(
        "--tokenizer-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes parsing and tokenizing requests (default: half the cores, 1 to 8; 0: "
        "a thread of the server process)",
    )
    eng = p.add_argument_group("engines and adapters")
    eng.add_argument("--devices", default=None, metavar="LIST",
                     help="devices running the model: all (every visible GPU, else the CPU), "
                     "cpu, or a list such as cuda:0,cuda:1 (default: --device if given, else "
                     "all)")  # fmt: skip
    eng.add_argument("--replicas-per-device", type=int, default=1, metavar="N",
                     help="engines per device sharing its weights (for small models; default "
                     "1)")  # fmt: skip
    eng.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="a LoRA adapter served on the base model as \"model\": NAME, applied "
                     "unmerged (repeatable); it runs with the base model's text rules")  # fmt: skip
    ray = p.add_argument_group("Ray Serve (several machines)")
    ray.add_argument("--ray", action="store_true",
                     help="run as a Ray Serve application: one model replica per GPU across the "
                     "Ray cluster, autoscaled on queue depth, behind the same API")  # fmt: skip
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="the Ray cluster (default: $RAY_ADDRESS, else a local one)")
    ray.add_argument("--ray-min-replicas", type=int, default=1, metavar="N",
                     help="model replicas kept running (default 1)")
    ray.add_argument("--ray-max-replicas", type=int, default=None, metavar="N",
                     help="model replicas at most (default: the cluster's GPUs, else 2)")
    ray.add_argument("--ray-target-queue", type=int, default=64, metavar="N",
                     help="requests queued per model replica that autoscaling aims at "
                     "(default 64)")  # fmt: skip
    lim.add_argument("--shutdown-timeout", type=float, default=60.0, metavar="S",
                     help="on SIGTERM / Ctrl-C, wait this long for in-flight requests "
                     "(default 60)")  # fmt: skip
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))  # fmt: skip
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import logging

    from l2v_models.checkpoint import model_label
    from l2v_models.model_options import check_model_available, load_embedder

    settings_kwargs = dict(
        max_batch_tokens=args.max_batch_tokens,
        max_batch_texts=args.max_batch_texts,
        max_wait_ms=args.max_wait_ms,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        max_input_tokens=args.max_input_tokens,
        payload_limit=args.payload_limit,
        default_instruction=args.default_instruction or None,
        api_key=args.api_key if args.api_key is not None else os.environ.get("L2V_API_KEY") or None,
        served_model_name=args.served_model_name or args.peft or model_label(args.model),
        accept_any_model_name=args.accept_any_model_name,
        accept_token_ids=args.accept_token_ids,
        tokenizer_workers=args.tokenizer_workers,
        # --devices, else --device alone, else every visible GPU (the CPU without one).
        devices=args.devices if args.devices is not None else (None if args.device else "all"),
        replicas_per_device=args.replicas_per_device,
        adapters=_adapters(args.adapter),
    )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout <= 0:
        raise ValueError(f"--shutdown-timeout must be > 0, got {args.shutdown_timeout}")
    try:
        import uvicorn

        from l2v_models.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise ImportError(
            f"l2v serve needs the serve extra ({e.name or e} is missing): pip install 'l2v[serve]'"
        ) from None
    settings = ServeSettings(**settings_kwargs)
    settings.check()  # option errors before the (slow) model load
    check_model_available(args.model)
    if args.ray:
        from l2v_models.serve.ray_serve import run_cli

        return run_cli(args, settings)
    # Bind before loading the model: a taken port fails in a second, not after the load.
    sock = _bind(args.host, args.port)
    logging.getLogger("l2v").setLevel(args.log_level.upper())
    if not logging.getLogger("l2v").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("l2v").addHandler(handler)
    try:
        device = args.device
        if device is None:  # load where the first engine runs
            from l2v_models.serve.replicas import parse_devices

            device = str(parse_devices(settings.devices)[0])
        embedder = load_embedder(_with(args, device=device), cuda_graphs=args.cuda_graphs)
        failure: list[str] = []
        server = None

        def on_fatal(message: str) -> None:
            failure.append(message)
            if server is not None:
                server.should_exit = True

        app = create_app(embedder, settings, on_fatal=on_fatal)
        host, port = sock.getsockname()[:2]
        state = app.state.l2v
        adapters = f" + adapters {', '.join(settings.adapters)}" if settings.adapters else ""
        print(
            f"l2v serve: {settings.served_model_name}{adapters} on {state.served.device} "
            f"({embedder.dtype}), {settings.workers} tokenizer process(es), "
            f"http://{_url_host(host)}:{port} (POST /v1/embeddings, POST /embed, GET /health)",
            flush=True,
        )
        config = uvicorn.Config(
            app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout
        )
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise RuntimeError(failure[0])
    return 0


def _adapters(values: list[str]) -> dict[str, str]:
    """--adapter NAME=PATH options -> {name: path}; a repeated name is an error."""
    from l2v_models.errors import UsageError
    from l2v_models.serve.adapters import AdapterError, parse_adapter_option

    out: dict[str, str] = {}
    for value in values:
        try:
            name, path = parse_adapter_option(value)
        except AdapterError as e:
            raise UsageError(str(e)) from None
        if name in out:
            raise UsageError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def _with(args, **changes):
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "is in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise ValueError(f"{host}:{port} {reason}: pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
