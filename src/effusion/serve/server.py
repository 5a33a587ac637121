"""Running the app: the address rule, optional torch.compile with an on-disk cache, uvicorn."""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

import torch

from effusion.config import ConfigError
from effusion.runs import LoadedRun, load_run
from effusion.serve.app import ServeSettings, create_app
from effusion.serve.batcher import model_thread


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_address(host: str, token: str | None, insecure_no_token: bool) -> None:
    """Binding beyond this machine needs a token, or saying plainly that none is wanted."""
    if token and insecure_no_token:
        raise ConfigError("--token and --insecure-no-token contradict each other; choose one")
    if not is_loopback(host) and not token and not insecure_no_token:
        raise ConfigError(f"--host {host} is reachable from other machines: give --token T (or "
                          "set EFFUSION_SERVE_TOKEN), or --insecure-no-token to serve it open")


def compile_run(run: LoadedRun, cache_dir: Path | None = None) -> str:
    """torch.compile the run's network for inference, caching compiled kernels on disk
    (`cache_dir`, default `$EFFUSION_CACHE/inductor`), so the next start reuses them.
    Returns where the cache lives. Exported (ONNX/OpenVINO) runs are already compiled
    graphs: an error."""
    if not isinstance(run.model, torch.nn.Module):
        raise ConfigError("--compile applies to PyTorch runs; this run is an exported graph "
                          "(its engine already optimizes it)")
    if run.config.sample.cache_interval != 1:
        raise ConfigError("--compile and DeepCache (sample.cache_interval > 1) cannot be combined: "
                          "the cache wrapper calls the U-Net's parts, not its compiled whole")
    if cache_dir is None:
        from effusion.evaluate.features import cache_dir as effusion_cache

        cache_dir = effusion_cache() / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    run.model = torch.compile(run.model, dynamic=True)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def serve(run_dir: Path, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", compile: bool = False, insecure_no_token: bool = False,
          log_level: str = "info") -> None:
    """Load `run_dir` once and serve it until interrupted."""
    t_start = time.perf_counter()
    check_address(host, settings.token, insecure_no_token)
    settings.check()
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"effusion serve needs the serve extra ({e.name} is missing): "
                          "pip install 'effusion[serve]'") from None
    import uvicorn

    # Load (and later sample) on the model thread: PyTorch on two threads starts two
    # OpenMP teams that contend (see effusion.serve.batcher).
    pool = model_thread((lambda: torch.set_num_threads(settings.threads)) if settings.threads else None)
    run = pool.submit(load_run, run_dir, device=device).result()
    if compile:
        where = compile_run(run)
        print(f"effusion: compiling the network (kernels cached in {where})", file=sys.stderr)
    app = create_app(run, settings, executor=pool)
    print(f"effusion: serving {run_dir} (step {run.step}) on http://{host}:{port}/ "
          f"max batch {settings.max_batch}, window {settings.batch_window_ms:g} ms, "
          f"queue {settings.max_queue} images; loaded in {time.perf_counter() - t_start:.1f} s"
          + ("; Bearer token required" if settings.token else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
