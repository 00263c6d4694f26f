"""`l2v serve`: an OpenAI-compatible embedding server with continuous token-budget batching.

    l2v serve [--model M] [--peft P] [--port 8000] ...         # the command (serve/cli.py)
    app = create_app(encoder, ServeSettings(...))               # the ASGI app (serve/app.py)

Modules, one job each: schemas (request validation -> EmbedRequest, ApiError), preparer (a
request body -> tokenized work, by the model's text rules), tokenizer_pool (the processes that
run the preparer), batcher (one queue; a pipelined model worker per engine packs texts of many
requests into token-budget passes), replicas (engines on every device, adapters ready), adapters
(LoRA applied unmerged), encoding (output types, JSON from buffers), metrics (Prometheus
registry), app (FastAPI routes, admission, limits, auth, drain), ray_serve (the same app as a
Ray Serve deployment), cli (the `serve` subcommand).

Nothing heavy is imported here: `l2v_models.cli` imports `l2v_models.serve.cli` while building
its parser, so FastAPI, uvicorn and torch are imported only when the server starts.
"""
