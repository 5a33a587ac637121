"""Shared fixtures: a tiny, fast configuration and a scratch run directory.

Everything here is sized for a 2-core CPU shared with other work: 16x16 images, an
8-channel two-level U-Net without attention, 50 diffusion steps, 64 training images.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effusion.config import Config, load_config

# One intra-op thread: the suite is many tiny ops, where extra threads only add contention.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES: list[str] = [
    "data.source=mnist5k",
    "data.image_size=16",
    "data.channels=1",
    "data.limit=64",
    "model.channels=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[]",
    "model.norm_groups=4",
    "model.head_channels=8",
    "model.num_classes=0",  # unconditional unless a test asks (the default is auto)
    "diffusion.timesteps=50",
    "train.batch_size=8",
    "train.max_minutes=0",
    "train.max_steps=4",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.sample_every=0",
    "train.sample_n=4",
    "train.threads=1",
    "train.precision=fp32",
    "train.device=cpu",
    "sample.steps=5",
]


def tiny_config(*extra: str) -> Config:
    """The tiny config with further `section.key=value` overrides applied last."""
    return load_config(None, TINY_OVERRIDES + list(extra))


@pytest.fixture(scope="session", autouse=True)
def _cache_builtin_datasets():
    """Read mnist5k / digits from disk once per session (each read takes seconds here).

    The real loaders run (once); every caller gets fresh copies, so no test can
    see another's modifications.
    """
    from effusion.data import sources

    cache: dict[str, tuple] = {}

    def cached(name, fn):
        def load():
            if name not in cache:
                cache[name] = fn()
            return tuple(a.copy() for a in cache[name])
        return load

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "_load_mnist5k", cached("mnist5k", sources._load_mnist5k))
        mp.setattr(sources, "_load_digits", cached("digits", sources._load_digits))
        yield


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


@pytest.fixture
def make_cfg():
    """Factory: `make_cfg("train.max_steps=8", ...)` -> tiny Config with extra overrides."""
    return tiny_config


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A not-yet-existing run directory inside pytest's tmp dir."""
    return tmp_path / "run"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/effusion."""
    import os

    old = os.environ.get("EFFUSION_CACHE")
    os.environ["EFFUSION_CACHE"] = str(tmp_path_factory.mktemp("effusion-cache"))
    yield
    if old is None:
        os.environ.pop("EFFUSION_CACHE", None)
    else:
        os.environ["EFFUSION_CACHE"] = old


@pytest.fixture(scope="session")
def feature_classifier(_private_cache):
    """The default feature classifier for mnist5k at 28px, trained once per session with
    the shipped recipe (about half a minute) into the private cache, where `effusion
    evaluate` without --features finds it."""
    from effusion.config import DataConfig
    from effusion.recipes import feature_classifier as train_or_load

    torch.set_num_threads(2)  # the one heavy job of the session
    try:
        return train_or_load(DataConfig())
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """An MLP on 16px digits: enough to provide features for tiny-run tests in seconds."""
    from effusion.recipes import classifier_config, train

    run = tmp_path_factory.mktemp("clf16") / "run"
    train(classifier_config(["model.arch=mlp", "data.image_size=16", "train.epochs=2",
                             "train.threads=1", "train.precision=fp32"]), run, progress=False)
    return run


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A real trained class-conditional digits run (tests/data/serve-digits: the default
    recipe at width 16, 1,152 steps, FID 19.9), rebuilt from its fp16 EMA weights into a
    run directory the `runs` layer loads like any other."""
    import shutil

    from safetensors.torch import load_file

    from effusion.runs.files import save_checkpoint

    src = REPO_ROOT / "tests" / "data" / "serve-digits"
    run = tmp_path_factory.mktemp("serve") / "digits"
    run.mkdir()
    shutil.copy(src / "config.yaml", run / "config.yaml")
    weights = {k: v.float() for k, v in load_file(str(src / "ema-fp16.safetensors")).items()}
    save_checkpoint(run, 1152, model=weights, ema=weights,
                    optimizer={"state": {}, "param_groups": []},
                    rng={"cpu": torch.get_rng_state()}, state={"fixture": True}, keep=1)
    return run
