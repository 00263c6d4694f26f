"""`l2v serve`: an OpenAI-compatible embedding server with continuous token-budget batching.

    l2v serve [--model M] [--peft P] [--port 8000] ...         # the command (serve/cli.py)
    app = create_app(encoder, ServeSettings(...))               # the ASGI app (serve/app.py)

Modules: schemas (request validation -> EmbedRequest, ApiError), batcher (one queue, one model
worker packing texts of many requests into token-budget batches), metrics (Prometheus registry),
app (FastAPI routes, admission, limits, auth, drain), cli (the `serve` subcommand).

Nothing heavy is imported here: `l2v_models.cli` imports `l2v_models.serve.cli` while building
its parser, so FastAPI, uvicorn and torch are imported only when the server starts.
"""
