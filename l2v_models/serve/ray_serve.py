"""`l2v serve --ray`: the same server as a Ray Serve application, across a Ray cluster.

    l2v serve --ray --model DIR [--ray-address auto] [--ray-min-replicas 1] ...   # the command

    from ray import serve
    from l2v_models.serve.ray_serve import build_ray_app
    app = build_ray_app({"model": "DIR"}, ServeSettings(...), min_replicas=1, max_replicas=8)
    serve.run(app, name="l2v", route_prefix="/")              # the documented entry point

Two deployments (Ray Serve's HTTP proxy in front):
- `l2v-ingress` (CPU): the FastAPI app of l2v_models.serve.app (build_app) with its tokenizer
  processes: the same routes, validation, limits (429, 413, 401...), error shapes and metrics as
  `l2v serve` on one machine. Its backend sends each request's tokenized texts (compact arrays)
  to the model deployment.
- `l2v-model`: one replica per GPU (num_gpus=1; on a cluster without GPUs, one CPU replica
  each), each the engine, continuous batcher and model worker of one `l2v serve` (serve.app's
  LocalBackend: adapters, CUDA graphs and all), autoscaled between min and max replicas on queue
  depth (Ray Serve's target_ongoing_requests: requests queued or running per replica).

Faults: an admitted request whose model replica dies (killed, lost node) is sent again to
another replica (up to RETRIES times, with a short back-off), so no admitted request is lost;
Ray Serve's controller replaces the dead replica. A replica whose workers stopped fails its
health check and is replaced too. Per-pass metrics (batch sizes, queue) stay in each model
replica (`ModelReplica.metrics`); the ingress's /metrics has the request metrics.

Ray is imported only when these functions run (the `ray` extra: ray[serve]).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time

from l2v_models.serve.app import ServeSettings

logger = logging.getLogger("l2v.serve")

RETRIES = 4  # times an admitted request is sent again after its model replica died
MODEL_DEPLOYMENT = "l2v-model"
INGRESS_DEPLOYMENT = "l2v-ingress"


class RemoteJob:
    """A request on its way to the model deployment: future (concurrent.futures.Future of the
    float32 rows), the asyncio task sending it."""

    def __init__(self):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.task: asyncio.Task | None = None


class RayBackend:
    """ServerState's backend on the ingress: each job is one call to the model deployment,
    sent again when the replica running it dies."""

    def __init__(self, handle, retries: int = RETRIES, metrics=None):
        self.handle = handle
        self.retries = retries
        self.metrics = metrics
        self.in_flight: set[RemoteJob] = set()
        self.stopping = False
        self.resent = 0  # calls sent again after a replica died

    def start(self) -> None:
        pass

    @property
    def alive(self) -> bool:
        return not self.stopping

    def submit(self, texts, model: str | None) -> RemoteJob:
        from l2v_models.serve.batcher import ShuttingDown

        if self.stopping:
            raise ShuttingDown("the server is shutting down")
        job = RemoteJob()
        ids, lengths = texts.flat()
        args = (model, ids, lengths, texts.pool_starts, texts.pool_counts)
        job.task = asyncio.get_running_loop().create_task(self._call(job, args))
        self.in_flight.add(job)
        job.future.add_done_callback(lambda _: self.in_flight.discard(job))
        return job

    async def _call(self, job: RemoteJob, args) -> None:
        import ray.exceptions as rex

        lost = (rex.RayActorError, rex.ActorUnavailableError)
        for attempt in range(self.retries + 1):
            try:
                rows = await self.handle.embed.remote(*args)
            except asyncio.CancelledError:
                job.future.cancel()
                raise
            except lost as e:
                if attempt == self.retries:
                    job.future.set_exception(RuntimeError(
                        f"the model replicas kept failing ({type(e).__name__})"))  # fmt: skip
                    return
                self.resent += 1
                if self.metrics is not None:
                    self.metrics.resent_requests.inc()
                logger.warning("l2v serve: a model replica died (%s); sending the request "
                               "again", type(e).__name__)  # fmt: skip
                await asyncio.sleep(min(2.0, 0.25 * 2**attempt))
                continue
            except Exception as e:
                job.future.set_exception(e)
                return
            job.future.set_result(rows)
            return

    def cancel(self, job: RemoteJob) -> int:
        if job.task is not None and not job.task.done():
            job.task.cancel()  # Ray cancels the call on the replica, which drops its texts
        return 0

    def stop(self, timeout: float | None) -> bool:
        """Refuse new work and wait (up to timeout) for the calls in flight."""
        self.stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.in_flight and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return not self.in_flight


class ModelReplicaImpl:
    """One model replica (see the module docstring): loads the model on this actor's device,
    warms it up and serves `embed` calls through a continuous batcher."""

    def __init__(self, load: dict, settings: ServeSettings):
        import torch

        from l2v_models.embedder import Embedder
        from l2v_models.packing import TokenizedTexts
        from l2v_models.serve.app import WARMUP_IDS, LocalBackend
        from l2v_models.serve.metrics import ServerMetrics
        from l2v_models.serve.preparer import ServedModel

        load = dict(load)
        load.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        self.embedder = Embedder.from_pretrained(**load)
        settings = ServeSettings(**{**settings.__dict__, "devices": None})
        self.metrics = ServerMetrics()
        self.backend = LocalBackend(self.embedder, settings, self.metrics)
        self.backend.warm_up(TokenizedTexts.whole(WARMUP_IDS),
                             settings.max_input_tokens or self.embedder.rules.max_length)
        self.backend.start()
        self.served = ServedModel.of(self.embedder, settings.served_model_name,
                                     tuple(settings.adapters), device=self.backend.describe())

    def served_model(self):
        return self.served

    async def embed(self, model, ids, lengths, pool_starts, pool_counts):
        from l2v_models.packing import TokenizedTexts

        texts = TokenizedTexts.from_flat(ids, lengths, pool_starts, pool_counts)
        job = self.backend.submit(texts, model)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.backend.cancel(job)
            raise

    def pid(self) -> int:
        return os.getpid()

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def check_health(self) -> None:
        if not self.backend.alive:
            raise RuntimeError("the model workers stopped")


class IngressImpl:
    """The HTTP side: the app of serve.app over a RayBackend."""

    async def __init__(self, model_handle, settings: ServeSettings):
        self.model_handle = model_handle
        self.settings = settings
        self.served = await model_handle.served_model.remote()

    def __serve_build_asgi_app__(self):
        from l2v_models.serve.app import ServerState, build_app
        from l2v_models.serve.metrics import ServerMetrics

        metrics = ServerMetrics()
        backend = RayBackend(self.model_handle, metrics=metrics)
        self.state = ServerState(self.served, self.settings, backend, metrics=metrics)
        return build_app(self.state)


def build_ray_app(load: dict, settings: ServeSettings, *, min_replicas: int = 1,
                  max_replicas: int = 2, target_queue: int = 64,
                  model_actor_options: dict | None = None,
                  ingress_actor_options: dict | None = None):  # fmt: skip
    """The Ray Serve application (pass it to serve.run). load: Embedder.from_pretrained
    keywords ("model", "peft", "dtype", "cuda_graphs", ...; "device" defaults to the replica's
    GPU, else the CPU). model_actor_options: Ray options of each model replica (default: one GPU
    when the cluster has GPUs, else one CPU)."""
    import ray
    from ray import serve

    settings.check()
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"replicas: need 1 <= min ({min_replicas}) <= max ({max_replicas})")
    if model_actor_options is None:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        model_actor_options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    model = serve.deployment(
        ModelReplicaImpl, name=MODEL_DEPLOYMENT, ray_actor_options=model_actor_options,
        max_ongoing_requests=max(4 * target_queue, settings.max_concurrent_requests),
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_queue},
        health_check_period_s=5, health_check_timeout_s=30,
    )  # fmt: skip
    ingress = serve.deployment(
        serve.ingress()(IngressImpl), name=INGRESS_DEPLOYMENT,
        ray_actor_options=ingress_actor_options or {"num_cpus": 1},
        max_ongoing_requests=settings.max_concurrent_requests + 16,
    )  # fmt: skip
    return ingress.bind(model.bind(load, settings), settings)


def run_cli(args, settings: ServeSettings) -> int:
    """`l2v serve --ray`: start (or join) a Ray cluster, run the application behind Ray Serve's
    HTTP proxy on --host:--port, until Ctrl-C / SIGTERM."""
    import signal

    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(
            f"l2v serve --ray needs Ray Serve ({e.name or e} is missing): pip install 'l2v[ray]'"
        ) from None
    from l2v_models.model_options import model_kwargs

    load = {"model": args.model, "peft": args.peft, **model_kwargs(args),
            "cuda_graphs": args.cuda_graphs}  # fmt: skip
    load.pop("device", None)  # each replica runs on its own GPU (or the CPU)
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False) if address else ray.init(
        include_dashboard=False)  # fmt: skip
    gpus = int(ray.cluster_resources().get("GPU", 0))
    max_replicas = args.ray_max_replicas or max(gpus, 2)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_ray_app(load, settings, min_replicas=args.ray_min_replicas,
                        max_replicas=max_replicas, target_queue=args.ray_target_queue)
    serve.run(app, name="l2v", route_prefix="/")
    print(f"l2v serve --ray: {settings.served_model_name} on {max_replicas} model replicas at "
          f"most ({gpus} GPUs in the cluster), http://{args.host}:{args.port}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
