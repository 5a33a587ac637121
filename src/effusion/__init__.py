"""effusion: train diffusion models fast on the hardware you have.

    from effusion import load_config, load_run, generate
    from effusion.recipes import train
    cfg = load_config(None, ["train.max_minutes=5"])
    train(cfg, "runs/mnist")
    images = generate(load_run("runs/mnist"), 16)   # uint8 (16, 1, 28, 28)
"""

from importlib import import_module

__version__ = "0.2.0"

_API = {
    "Config": "effusion.config",
    "ConfigError": "effusion.config",
    "load_config": "effusion.config",
    "TrainingError": "effusion.train.loop",
    "load_run": "effusion.runs",
    "load": "effusion.runs",
    "generate": "effusion.sampling",
}


def __getattr__(name: str):
    # Lazy, so `import effusion.config` does not pay for torch and the whole trainer.
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'effusion' has no attribute {name!r}")


__all__ = list(_API)
