"""The HTTP app: a warm run behind a versioned JSON API, metrics, and a page.

FastAPI on uvicorn: the common, well-kept ASGI stack, whose request/response model, OpenAPI
schema and test client come with it. The model runs on one thread owned by the `Batcher`;
the event loop only parses, validates, queues and answers, so a full queue is refused in
microseconds while a batch samples.

Endpoints: `POST /v1/generate`, `GET /v1/info`, `GET /healthz`, `GET /metrics`
(Prometheus text), `GET /openapi.json`, and the page at `/`.
"""


import asyncio
import base64
import hmac
import io
import json
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Hashable

import numpy as np
import torch

from effusion.config import ConfigError
from effusion.diffusion import SAMPLERS
from effusion.runs import LoadedRun
from effusion.sampling import generate_seeded, resolve_sampler
from effusion.serve.batcher import Batcher, BatchStats, Cancelled, QueueFull

API = "v1"
GUIDANCE_MAX = 20.0
SEED_MAX = 2**63 - 1
GRID_PAD = 2
FIELDS = ("n", "class", "classes", "guidance", "steps", "sampler", "seed", "format")
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # no token needed: no model output, no secrets


@dataclass
class ServeSettings:
    """Limits and switches of one server (the CLI flags of `effusion serve`)."""

    max_batch: int = 64  # images per sampler call
    batch_window_ms: float = 10.0  # how long the oldest waiting request waits for company
    max_queue: int = 256  # images waiting; more is answered 503 at once
    max_n: int = 64  # images per request
    max_steps: int | None = None  # default: the run's schedule length
    max_body_bytes: int = 16 * 1024
    token: str | None = None  # Bearer token every endpoint but /healthz and / needs
    warmup: bool = True  # one tiny sampler call before accepting requests
    threads: int | None = None  # PyTorch intra-op threads of the model thread (default: torch's)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ConfigError(f"--batch-window-ms must be >= 0, got {self.batch_window_ms}")
        if self.max_n > self.max_queue:
            raise ConfigError(f"--max-n ({self.max_n}) cannot exceed --max-queue ({self.max_queue}): "
                              "such a request could never be queued")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("--token must be at least 8 characters")


class BadInput(Exception):
    """A request the server refuses with 422, naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class GenerateParams:
    n: int
    seeds: list[int]
    labels: list[int] | None
    sampler: str
    steps: int
    guidance: float | None
    format: str

    @property
    def key(self) -> Hashable:
        """Requests with equal keys can share a sampler call (classes and seeds may differ)."""
        return (self.sampler, self.steps, self.guidance)


# --------------------------------------------------------------------------- validation

def _integer(data: dict, name: str, lo: int, hi: int) -> int:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise BadInput(name, f"{name} must be an integer between {lo} and {hi}, got {json.dumps(v)}")
    v = int(v)
    if not lo <= v <= hi:
        raise BadInput(name, f"{name} must be between {lo} and {hi}, got {v}")
    return v


def default_guidance(run: LoadedRun) -> float | None:
    """The guidance weight a request without one gets (None: the run cannot be guided)."""
    if not run.num_classes:
        return None
    can_guide = run.config.train.cond_drop > 0 or run.config.model.guidance_input
    return run.config.sample.guidance if can_guide else 1.0


def parse_generate(body: bytes, run: LoadedRun, s: ServeSettings) -> GenerateParams:
    """Validate a /v1/generate body; every refusal names its field and the allowed values."""
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput("body", f"the body is not valid JSON ({e}); send e.g. {{\"n\": 4}}") from None
    if not isinstance(data, dict):
        raise BadInput("body", "the body must be a JSON object, e.g. {\"n\": 4}")
    for k in data:
        if k not in FIELDS:
            raise BadInput(k, f"unknown field {k!r}; the fields are {', '.join(FIELDS)}")
    data = {k: v for k, v in data.items() if v is not None}
    # n defaults to one image, or to one per class when `classes` lists them
    n_default = len(data["classes"]) if isinstance(data.get("classes"), list) and data["classes"] else 1
    n = _integer(data, "n", 1, s.max_n) if "n" in data else min(n_default, s.max_n)

    sampler = data.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise BadInput("sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {json.dumps(sampler)}")
    max_steps = min(s.max_steps or run.schedule.T, run.schedule.T)
    steps = _integer(data, "steps", 1, max_steps) if "steps" in data else None
    sampler, steps = resolve_sampler(run, sampler, steps)
    if steps > max_steps:
        raise BadInput("steps", f"the {sampler} sampler defaults to {steps} steps, more than this "
                                f"server allows ({max_steps}); ask for steps between 1 and {max_steps}")

    K = run.num_classes
    guidance = default_guidance(run)
    if "guidance" in data:
        g = data["guidance"]
        if not K:
            raise BadInput("guidance", "this run is unconditional (model.num_classes = 0): "
                                       "guidance does not apply; leave it out")
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= GUIDANCE_MAX:
            raise BadInput("guidance", f"guidance must be a number between 0 and {GUIDANCE_MAX:g}, "
                                       f"got {json.dumps(g)}")
        try:
            run.denoiser(guidance=float(g))
        except ConfigError as e:
            raise BadInput("guidance", str(e)) from None
        guidance = float(g)

    if "class" in data and "classes" in data:
        raise BadInput("classes", "give class or classes, not both")
    wanted: list[int] | None = None
    if "class" in data or "classes" in data:
        name = "class" if "class" in data else "classes"
        if not K:
            raise BadInput(name, "this run is unconditional (model.num_classes = 0): it has no classes")
        v = data[name]
        if name == "class" and v == "any":
            wanted = None
        else:
            items = v if name == "classes" and isinstance(v, list) else [v]
            if name == "classes" and not (isinstance(v, list) and 1 <= len(v) <= n):
                raise BadInput(name, f"classes must be a list of 1 to n ({n}) class numbers")
            for c in items:
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < K:
                    raise BadInput(name, f"{name} must be class numbers between 0 and {K - 1}"
                                         + (" or \"any\"" if name == "class" else "")
                                         + f", got {json.dumps(c)}")
            wanted = list(items)

    seed = _integer(data, "seed", 0, SEED_MAX - (n - 1)) if "seed" in data else secrets.randbelow(2**31)
    fmt = data.get("format", "png")
    if fmt not in ("png", "grid", "npy"):
        raise BadInput("format", f"format must be png, grid or npy, got {json.dumps(fmt)}")
    seeds = [seed + i for i in range(n)]
    labels = None
    if K:  # "any": the image's seed picks it (seed mod K), so n=1 with that seed repeats it
        labels = [wanted[i % len(wanted)] for i in range(n)] if wanted else [sd % K for sd in seeds]
    return GenerateParams(n, seeds, labels, sampler, steps, guidance, fmt)


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput("body", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput("body", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus counters of one app (its own registry, so apps in one process never mix)."""

    def __init__(self, batcher_waiting: Any):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("effusion_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=reg)
        self.latency = Histogram("effusion_generate_seconds", "POST /v1/generate latency (200s)",
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60, 120),
                                 registry=reg)
        self.batch = Histogram("effusion_batch_size", "images per sampler call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=reg)
        self.batch_seconds = Histogram("effusion_batch_seconds", "seconds per sampler call",
                                       buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                       registry=reg)
        self.images = Counter("effusion_images", "images generated", registry=reg)
        self.disconnects = Counter("effusion_client_disconnects",
                                   "requests whose client left before the images were done",
                                   registry=reg)
        self.stopped = Counter("effusion_stopped_batches",
                               "sampler calls stopped early because every client had left",
                               registry=reg)
        queue = Gauge("effusion_queue_images", "images waiting for a batch", registry=reg)
        queue.set_function(batcher_waiting)

    def on_batch(self, b: BatchStats) -> None:
        self.batch.observe(b.size)
        self.batch_seconds.observe(b.seconds)
        if b.stopped:
            self.stopped.inc()

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- the app

class Guard:
    """ASGI middleware: the Bearer token check, and request counts by route and status.
    (Plain ASGI rather than `@app.middleware`, whose per-request wrapping costs more.)"""

    def __init__(self, app: Any, token: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                from fastapi.responses import JSONResponse

                self.metrics.requests.labels("auth", "401").inc()
                response = JSONResponse({"error": "this server needs 'Authorization: Bearer <token>'"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        status = {"code": 500}  # an exception escaping the app is answered 500 outside

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status["code"])).inc()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


def encode_images(images: np.ndarray, fmt: str) -> dict[str, Any]:
    """uint8 numpy (N, C, H, W) as the response's image fields: numpy and PIL only, since
    this runs on the event loop's thread (see `Batcher` on threads)."""
    if fmt == "png":
        return {"images": [_b64(_png(im)) for im in images]}
    if fmt == "npy":  # N x H x W [x C], as `effusion sample --npy`
        buf = io.BytesIO()
        np.save(buf, images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1))
        return {"npy": _b64(buf.getvalue())}
    n, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((c, rows * (h + GRID_PAD) + GRID_PAD, nrow * (w + GRID_PAD) + GRID_PAD), np.uint8)
    for i in range(n):  # the layout of effusion.data.images.make_grid
        r, col = divmod(i, nrow)
        y, x = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + col * (w + GRID_PAD)
        grid[:, y:y + h, x:x + w] = images[i]
    return {"grid": _b64(_png(grid)), "grid_layout": {"nrow": nrow, "pad": GRID_PAD}}


def page_html() -> str:
    return resources.files("effusion.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(run: LoadedRun, settings: ServeSettings | None = None,
               executor: ThreadPoolExecutor | None = None) -> Any:
    """The FastAPI app serving `run` (any diffusion run dir the `runs` layer loads).
    `executor`: the one-thread pool that loaded `run` (`serve` loads it there; see
    `Batcher` on why PyTorch stays on one thread); default: a new one."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    s = settings or ServeSettings()
    s.check()

    def run_batch(key: Hashable, seeds: list[int], labels: list[int] | None, should_stop):
        sampler, steps, guidance = key  # type: ignore[misc]
        cond = None if labels is None else torch.tensor(labels)
        return generate_seeded(run, seeds, sampler=sampler, steps=steps, cond=cond,
                               guidance=guidance, should_stop=should_stop).numpy()

    batcher = Batcher(run_batch, s.max_batch, s.batch_window_ms, s.max_queue,
                      thread_init=(lambda: torch.set_num_threads(s.threads)) if s.threads else None,
                      executor=executor)
    metrics = Metrics(lambda: batcher.waiting)
    batcher.on_batch = metrics.on_batch
    state: dict[str, Any] = {"ready": False, "warmup_s": None}

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        if s.warmup:  # pay the first call's one-off costs before the first request does
            t0 = time.perf_counter()
            await batcher.call_on_model_thread(
                lambda: generate_seeded(run, [0], steps=min(2, run.schedule.T)))
            state["warmup_s"] = round(time.perf_counter() - t0, 3)
        state["ready"] = True
        yield
        await batcher.stop()

    app = FastAPI(title="effusion", version=API, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A trained effusion run behind a JSON API with dynamic batching.")
    app.state.batcher, app.state.metrics, app.state.settings, app.state.run = batcher, metrics, s, run

    app.add_middleware(Guard, token=s.token, metrics=metrics)

    @app.exception_handler(BadInput)
    async def bad_input(_request: Request, e: BadInput):
        return JSONResponse({"error": e.message, "field": e.field}, status_code=422)

    @app.exception_handler(ConfigError)
    async def config_error(_request: Request, e: ConfigError):
        return JSONResponse({"error": str(e), "field": "body"}, status_code=422)

    async def disconnected(request: Request) -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    @app.post(f"/{API}/generate", openapi_extra={"requestBody": {
        "required": False, "content": {"application/json": {"schema": GENERATE_SCHEMA}}}},
        responses={422: {"description": "invalid input: `field` names it"},
                   503: {"description": "queue full; retry after `Retry-After` seconds"}})
    async def generate(request: Request):
        """Generate images. Image i has seed `seed + i`: asking for n=1 with that seed (and
        the same class, guidance, sampler and steps) returns the same image."""
        t0 = time.perf_counter()
        p = parse_generate(await read_body(request, s.max_body_bytes), run, s)
        try:
            job = batcher.submit(p.key, p.seeds, p.labels)
        except QueueFull as e:
            return JSONResponse({"error": str(e)}, status_code=503,
                                headers={"Retry-After": str(e.retry_after)})
        watch = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not job.future.done():  # the client left: drop its work
            batcher.cancel(job)
            metrics.disconnects.inc()
            return Response(status_code=499)
        try:
            images = job.future.result()
        except Cancelled as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"error": f"sampling failed: {type(e).__name__}: {e}"}, status_code=500)
        done = time.perf_counter()
        metrics.images.inc(p.n)
        metrics.latency.observe(done - t0)
        started = job.started or done
        body = {"n": p.n, "seed": p.seeds[0], "seeds": p.seeds, "classes": p.labels,
                "sampler": p.sampler, "steps": p.steps, "guidance": p.guidance,
                "shape": list(images.shape), "format": p.format, **encode_images(images, p.format),
                "batch_sizes": job.batch_sizes,
                "timings_ms": {"queue": round(1000 * (started - job.arrived), 2),
                               "sample": round(1000 * (done - started), 2),
                               "total": round(1000 * (time.perf_counter() - t0), 2)}}
        return JSONResponse(body)

    @app.get(f"/{API}/info")
    async def info():
        """The run being served: its image size, classes, defaults and this server's limits."""
        d, sc = run.config.data, run.config.sample
        shape = list(run.vae.latent_shape) if run.vae else None
        return {"api": API, "run": run.run_dir.name, "step": run.step,
                "image": {"channels": d.channels, "height": d.image_size, "width": d.image_size},
                "latent": shape, "classes": run.num_classes,
                "class_names": [str(i) for i in range(run.num_classes)],
                "guidance": None if default_guidance(run) is None else
                {"default": default_guidance(run), "min": 0.0, "max": GUIDANCE_MAX},
                "sampler": {"default": sc.sampler, "steps": resolve_sampler(run, None, None)[1],
                            "choices": list(SAMPLERS),
                            "max_steps": min(s.max_steps or run.schedule.T, run.schedule.T)},
                "lineage": [p.get("pass") for p in run.lineage],
                "device": str(run.precision.device), "precision": run.precision.mode,
                "limits": {k: v for k, v in asdict(s).items() if k not in ("token", "warmup", "threads")},
                "auth": bool(s.token), "warmup_s": state["warmup_s"]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok" if state["ready"] else "starting", "queue": batcher.waiting,
                "running": batcher.running, "auth": bool(s.token)}

    @app.get("/metrics")
    async def prometheus():
        data, ctype = metrics.text()
        return Response(data, media_type=ctype)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    return app


GENERATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "n": {"type": "integer", "minimum": 1, "default": 1,
              "description": "images (at most the server's --max-n)"},
        "class": {"oneOf": [{"type": "integer", "minimum": 0}, {"const": "any"}],
                  "description": "class-conditional runs: one class for every image, or any "
                                 "(image i gets class (seed + i) mod K)"},
        "classes": {"type": "array", "items": {"type": "integer", "minimum": 0},
                    "description": "a class per image, cycled"},
        "guidance": {"type": "number", "minimum": 0, "maximum": GUIDANCE_MAX,
                     "description": "classifier-free guidance weight (default: the run's)"},
        "steps": {"type": "integer", "minimum": 1, "description": "sampler steps (default: the run's)"},
        "sampler": {"enum": list(SAMPLERS)},
        "seed": {"type": "integer", "minimum": 0, "description": "image i has seed + i (default: random)"},
        "format": {"enum": ["png", "grid", "npy"], "default": "png"},
    },
}

