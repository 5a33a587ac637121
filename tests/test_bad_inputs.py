"""Every bad input a clear error, nothing lost.

Each row of BAD is one command line (through the CLI, as a user types it) that must fail:
exit code != 0, one `error:` line that names the problem (the row's pattern), no Python
traceback, no partial output left behind, and the existing runs untouched (every file of
them hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO_ROOT, TINY_OVERRIDES
from effusion.cli import app

OLD_RUNS = REPO_ROOT / "tests" / "data" / "runs-main-f54247e"


def _sets(*overrides: str) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Runs and data files the bad inputs point at, built once."""
    from PIL import Image

    from effusion.recipes import train

    from conftest import tiny_config

    root = tmp_path_factory.mktemp("bad")
    w: dict[str, Path] = {"root": root}
    for name in ("diffusion", "classifier", "vae"):  # a class-conditional run, and the other kinds
        shutil.copytree(OLD_RUNS / name, root / name)
        w[name] = root / name
    w["uncond"] = root / "uncond"  # an unconditional diffusion run
    train(tiny_config("train.max_steps=2"), w["uncond"], progress=False)
    # another architecture's checkpoint under this config
    w["other_arch"] = root / "other_arch"
    shutil.copytree(w["uncond"], w["other_arch"])
    cfg = (w["other_arch"] / "config.yaml").read_text()
    (w["other_arch"] / "config.yaml").write_text(cfg.replace("channels: 8", "channels: 16", 1))
    # a run whose only checkpoint is cut in half
    w["truncated"] = root / "truncated"
    shutil.copytree(w["uncond"], w["truncated"])
    for f in (w["truncated"] / "checkpoints").glob("*/ema.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def folder(name: str, files: dict[str, bytes]) -> Path:
        d = root / name
        d.mkdir()
        ok = d / "ok.png"
        Image.fromarray(np.full((16, 16), 200, np.uint8)).save(ok)
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        return d

    png = (w["root"] / "x.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(png)
    w["zero_byte"] = folder("zero_byte", {"empty.png": b""})
    w["truncated_png"] = folder("truncated_png", {"cut.png": png.read_bytes()[:-12]})  # no IEND
    w["text_png"] = folder("text_png", {"notes.png": b"this is not an image\n"})
    w["no_images"] = root / "no_images"
    w["no_images"].mkdir()
    (w["no_images"] / "readme.txt").write_text("nothing here")

    def npz(name: str, **arrays) -> Path:
        p = root / f"{name}.npz"
        np.savez(p, **arrays)
        return p

    good = np.zeros((8, 16, 16), np.uint8)
    w["npz_shape"] = npz("shape", images=np.zeros((8, 16), np.uint8))
    w["npz_dtype"] = npz("dtype", images=good.astype(np.int64))
    w["npz_labels"] = npz("labels", images=good, labels=np.array([0, 1, 2, -1, 0, 1, 2, 3]))
    nan = np.zeros((8, 16, 16), np.float32)
    nan[0, 0, 0] = np.nan
    w["npz_nan"] = npz("nan", images=nan)
    inf = np.zeros((8, 16, 16), np.float32)
    inf[1, 2, 3] = np.inf
    w["npz_inf"] = npz("inf", images=inf)
    w["a_file"] = root / "a_file.txt"
    w["a_file"].write_text("a file where a folder should be")
    return w


TRAIN = ["train", "--quiet"] + _sets(*TINY_OVERRIDES)

# (id, argv with {placeholders} from `world`, pattern the error line must match)
BAD: list[tuple[str, list[str], str]] = [
    # images
    ("zero-byte image", TRAIN + ["--run", "{root}/new1", "--set", "data.source=folder:{zero_byte}"],
     r"empty\.png.*(empty|unreadable)"),
    ("truncated png", TRAIN + ["--run", "{root}/new2", "--set", "data.source=folder:{truncated_png}"],
     r"cut\.png"),
    ("text file named .png", TRAIN + ["--run", "{root}/new3", "--set", "data.source=folder:{text_png}"],
     r"notes\.png"),
    ("folder without images", TRAIN + ["--run", "{root}/new4", "--set", "data.source=folder:{no_images}"],
     r"no readable images"),
    ("missing folder", TRAIN + ["--run", "{root}/new5", "--set", "data.source=folder:{root}/nowhere"],
     r"image folder not found"),
    # npz data
    ("npz wrong shape", TRAIN + ["--run", "{root}/new6", "--set", "data.source=npz:{npz_shape}"],
     r"must be N x H x W"),
    ("npz wrong dtype", TRAIN + ["--run", "{root}/new7", "--set", "data.source=npz:{npz_dtype}"],
     r"must be uint8.*int64"),
    ("npz labels out of range", TRAIN + ["--run", "{root}/new8", "--set", "data.source=npz:{npz_labels}"],
     r"labels.*-1"),
    ("npz NaN pixels", TRAIN + ["--run", "{root}/new9", "--set", "data.source=npz:{npz_nan}"],
     r"NaN"),
    ("npz Inf pixels", TRAIN + ["--run", "{root}/new10", "--set", "data.source=npz:{npz_inf}"],
     r"Inf"),
    # config
    ("unknown key", TRAIN + ["--run", "{root}/new11", "--set", "train.max_step=3"],
     r"unknown config key train\.max_step; did you mean train\.max_steps"),
    ("wrong type", TRAIN + ["--run", "{root}/new12", "--set", "train.batch_size=abc"],
     r"train\.batch_size: expected an integer"),
    ("zero batch size", TRAIN + ["--run", "{root}/new13", "--set", "train.batch_size=0"],
     r"train\.batch_size must be >= 1"),
    ("negative lr", TRAIN + ["--run", "{root}/new14", "--set", "train.lr=-1"], r"train\.lr must be > 0"),
    ("zero steps", TRAIN + ["--run", "{root}/new15", "--set", "train.max_steps=0"],
     r"train\.max_steps must be >= 1"),
    ("negative minutes", TRAIN + ["--run", "{root}/new16", "--set", "train.max_minutes=-1"],
     r"train\.max_minutes must be >= 0"),
    ("unknown sampler", TRAIN + ["--run", "{root}/new17", "--set", "sample.sampler=euler"],
     r"sample\.sampler: 'euler' is not one of"),
    ("unknown schedule", TRAIN + ["--run", "{root}/new18", "--set", "diffusion.schedule=sigmoid2"],
     r"diffusion\.schedule: 'sigmoid2' is not one of"),
    ("unknown prediction", TRAIN + ["--run", "{root}/new19", "--set", "diffusion.prediction=score"],
     r"diffusion\.prediction: 'score' is not one of"),
    ("missing config file", ["train", "--run", "{root}/new20", "--config", "{root}/nope.yaml"],
     r"nope\.yaml"),
    # sampling requests
    ("guidance on an unconditional run",
     ["sample", "--run", "{uncond}", "--n", "2", "--guidance", "3", "--out", "{root}/s1.png"],
     r"guidance.*class-conditional"),
    ("class out of range",
     ["sample", "--run", "{diffusion}", "--n", "2", "--class", "12", "--out", "{root}/s2.png"],
     r"classes must be between 0 and 9"),
    ("--n 0", ["sample", "--run", "{uncond}", "--n", "0", "--out", "{root}/s3.png"], r"--n must be >= 1"),
    ("unknown sampler flag",
     ["sample", "--run", "{uncond}", "--n", "2", "--sampler", "euler", "--out", "{root}/s4.png"],
     r"euler"),
    # run directories
    ("run dir does not exist", ["sample", "--run", "{root}/nowhere", "--out", "{root}/s5.png"],
     r"run directory not found"),
    ("classifier given to sample", ["sample", "--run", "{classifier}", "--out", "{root}/s6.png"],
     r"classifier"),
    ("VAE given to sample", ["sample", "--run", "{vae}", "--out", "{root}/s7.png"], r"VAE|vae"),
    ("checkpoint of another architecture", ["sample", "--run", "{other_arch}", "--out", "{root}/s8.png"],
     r"does not match this model"),
    ("truncated safetensors", ["sample", "--run", "{truncated}", "--out", "{root}/s9.png"],
     r"corrupt"),
    # output
    ("output folder not writable",
     ["sample", "--run", "{uncond}", "--n", "2", "--out", "{a_file}/grid.png"], r"cannot write"),
    # training
    ("resume with a changed model config",
     ["train", "--quiet", "--run", "{uncond}"] + _sets(*TINY_OVERRIDES, "train.max_steps=2", "model.channels=16"),
     r"another config \(model\.channels"),
    ("loss that stays NaN",
     TRAIN + ["--run", "{root}/new21", "--set", "train.lr=1e20", "--set", "train.max_steps=40",
              "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0"],
     r"NaN/Inf for \d+ steps in a row"),
]


def _snapshot(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_the_table_is_big_enough():
    assert len(BAD) >= 25


@pytest.mark.parametrize("argv,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(world, argv, pattern):
    args = [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]
    runs = [world[k] for k in ("diffusion", "classifier", "vae", "uncond", "other_arch", "truncated")]
    before = _snapshot(runs)
    outputs = [Path(a) for a in args if a.startswith(str(world["root"]) + "/new")
               or a.endswith(".png") and a.startswith(str(world["root"]) + "/s")]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code not in (0, None), result.output
    text = result.output
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert re.search(pattern, errors[0]), errors[0]
    for p in outputs:  # nothing half-made: no run dir (a NaN run keeps its log only), no image
        if p.suffix == ".png" or not re.search("NaN", pattern):
            assert not p.exists(), p
        else:
            assert not any((p / "checkpoints").glob("step-*")), p
    assert _snapshot(runs) == before, "an existing run was modified"


def test_mixed_image_modes_work(tmp_path):
    """Grayscale, RGB, RGBA, palette and 16-bit images in one folder are all read, at the
    right brightness (16-bit is scaled, not clipped)."""
    from PIL import Image

    from effusion.config import DataConfig
    from effusion.data import load_source

    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(np.full((20, 20), 128, np.uint8), "L").save(d / "gray.png")
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8), "RGB").save(d / "rgb.png")
    rgba = np.full((20, 20, 4), 128, np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(np.full((20, 20), 128 * 257, np.uint16)).save(d / "deep.png")  # 16-bit
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8), "RGB").convert("P").save(d / "pal.png")
    for channels in (1, 3):
        data = load_source(DataConfig(source=f"folder:{d}", image_size=16, channels=channels))
        assert tuple(data.images.shape) == (5, channels, 16, 16)
        means = data.images.float().mean(dim=(1, 2, 3))
        assert ((means - 128).abs() <= 2).all(), means


def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(world, tmp_path):
    """A write that fails past a file-size limit (RLIMIT_FSIZE, as a full disk would) ends
    with one error line; no half-written grid or array is left."""
    import resource

    out, npy = tmp_path / "grid.png", tmp_path / "grid.npy"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    p = subprocess.run([sys.executable, "-m", "effusion", "sample", "--run", str(world["uncond"]),
                        "--n", "64", "--out", str(out), "--npy", str(npy)],
                       capture_output=True, text=True, preexec_fn=limit,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}, timeout=300)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(r"cannot write .*(File too large|No space)", errors[0]), p.stderr
    assert not npy.exists() and not out.exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_loading_is_safe_no_pickle():
    """Loading stays safetensors + JSON/YAML (safe_load): no pickle, no torch.load without
    weights_only=True, no numpy allow_pickle=True, anywhere in the package."""
    bad = []
    for f in (REPO_ROOT / "src" / "effusion").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if (re.search(r"\bimport pickle\b|\bpickle\.load|\bcPickle\b|allow_pickle\s*=\s*True", code)
                    or re.search(r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load", code)
                    or ("torch.load(" in code and "weights_only=True" not in code)):
                bad.append(f"{f.relative_to(REPO_ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
