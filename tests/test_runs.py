"""The runs layer: every kind of run directory loads into a ready object, through one
place; the wrong kind, a missing config or a truncated checkpoint is a clear error; run
directories written before this layer existed (main at f54247e) still load, sample and
predict exactly as they did, and still resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO_ROOT, tiny_config
from effusion.cli import app
from effusion.config import DataConfig, config_from_dict, parse_overrides
from effusion.evaluate import NoFeatureClassifier, default_feature_classifier
from effusion.recipes import train
from effusion.runs import (CheckpointError, LoadedClassifier, LoadedRun, LoadedVAE, describe,
                           load, load_classifier, load_run, load_vae, read_config, read_lineage,
                           write_config)
from effusion.sampling import generate

OLD = REPO_ROOT / "tests" / "data" / "runs-main-f54247e"  # see make_fixture.py there


@pytest.fixture
def old_runs(tmp_path):
    """A writable copy of the run dirs written by the code before the runs layer."""
    dst = tmp_path / "old"
    shutil.copytree(OLD, dst)
    return dst


def test_every_kind_loads_as_what_it_is(old_runs):
    run = load(old_runs / "diffusion", device="cpu")
    assert isinstance(run, LoadedRun) and run.step == 3 and run.num_classes == 10
    assert isinstance(load(old_runs / "vae"), LoadedVAE)
    clf, q = load(old_runs / "classifier"), load(old_runs / "classifier-int8")
    assert isinstance(clf, LoadedClassifier) and not clf.quantized
    assert isinstance(q, LoadedClassifier) and q.quantized
    kinds = {name: describe(old_runs / name).kind
             for name in ("diffusion", "vae", "classifier", "classifier-int8")}
    assert kinds == {"diffusion": "diffusion", "vae": "vae", "classifier": "classifier",
                     "classifier-int8": "classifier"}


def test_old_run_dirs_sample_and_predict_exactly_as_before(old_runs):
    """Golden outputs written by main at f54247e from these very run dirs."""
    images = generate(load_run(old_runs / "diffusion", device="cpu"), 4, seed=3, steps=3)
    assert np.array_equal(images.numpy(), np.load(OLD / "diffusion-samples.npy"))
    x = torch.from_numpy(np.load(OLD / "inputs.npy"))
    for name in ("classifier", "classifier-int8"):
        _, probs = load_classifier(old_runs / name).predict(x)
        np.testing.assert_allclose(probs.numpy(), np.load(OLD / f"{name}-probs.npy"), atol=1e-6)


def test_old_run_dir_resumes(old_runs):
    run = old_runs / "diffusion"
    cfg = config_from_dict(parse_overrides(["train.max_steps=5"]), read_config(run))
    res = train(cfg, run, resume=True, progress=False)
    assert res.step == 5 and describe(run).step == 5


@pytest.mark.parametrize("loader, path, message", [
    (load_run, "classifier", r"is a mlp classifier run \(model.arch=mlp\), not a diffusion run; "
                             r"make one with `effusion train`"),
    (load_run, "vae", "is a VAE run .*not a diffusion run"),
    (load_vae, "diffusion", "is a diffusion run .*not a VAE run; make one with `effusion vae train`"),
    (load_classifier, "diffusion", "not a classifier run; make one with `effusion classifier train`"),
])
def test_wrong_kind_is_a_clear_error(old_runs, loader, path, message):
    with pytest.raises(CheckpointError, match=message):
        loader(old_runs / path)


def test_missing_and_broken_run_dirs_are_clear_errors(old_runs, tmp_path):
    with pytest.raises(CheckpointError, match="run directory not found"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"not a run directory \(no config.yaml\)"):
        load(tmp_path / "empty")
    run = old_runs / "diffusion"
    (run / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(CheckpointError, match="not readable YAML"):
        load_run(run)
    (run / "config.yaml").write_text("model:\n  arch: transformer\n")
    with pytest.raises(CheckpointError, match="config.yaml: model.arch: 'transformer' is not one of"):
        load_run(run)


def test_truncated_checkpoint_is_a_clear_error(old_runs):
    ema = next((old_runs / "diffusion" / "checkpoints").iterdir()) / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="every checkpoint in .* is corrupt or truncated"):
        load_run(old_runs / "diffusion")
    q = old_runs / "classifier-int8" / "quantized.safetensors"
    q.write_bytes(q.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot read weights .*quantized.safetensors"):
        load_classifier(old_runs / "classifier-int8")


def test_resume_from_a_checkpoint_of_another_model_changes_nothing(old_runs):
    """Mismatched weights are reported before anything is loaded or overwritten."""
    run = old_runs / "diffusion"
    cfg = tiny_config("model.num_classes=10", "model.channels=16", "train.max_steps=5")
    write_config(run, cfg)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="does not match this model.*shape mismatches"):
        train(cfg, run, resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_lineage_round_trips_through_config_yaml(tmp_path):
    cfg = tiny_config()
    lineage = [{"pass": "prune", "base": "/runs/a", "ratio": 0.5},
               {"pass": "quantize", "base": "/runs/a-pruned", "method": "int8"}]
    write_config(tmp_path / "r", cfg, lineage)
    assert read_config(tmp_path / "r") == cfg
    assert read_lineage(tmp_path / "r") == lineage
    write_config(tmp_path / "t", cfg)
    assert read_lineage(tmp_path / "t") == []


def test_quantize_pass_writes_its_lineage_and_info_shows_it(old_runs, tmp_path):
    from effusion.optimize.quantize import quantize_classifier

    out = tmp_path / "q"
    quantize_classifier(old_runs / "classifier", out)
    (step,) = read_lineage(out)
    assert step["pass"] == "quantize" and step["base"] == str((old_runs / "classifier").resolve())
    assert load(out).quantized
    r = CliRunner().invoke(app, ["info", "--run", str(out)])
    assert r.exit_code == 0, r.output
    assert "(classifier)" in r.output and "derived:     quantize of" in r.output


def test_evaluate_only_loads_the_feature_classifier(monkeypatch, tmp_path):
    """Training it is an explicit step; an empty cache is a clear error naming that step."""
    monkeypatch.setenv("EFFUSION_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(NoFeatureClassifier, match="effusion.recipes.feature_classifier"):
        default_feature_classifier(DataConfig(source="digits", image_size=8))
