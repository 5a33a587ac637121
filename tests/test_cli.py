"""The `effusion` command line: one-line user errors, train -> sample -> info end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from PIL import Image
from typer.testing import CliRunner

from effusion.cli import app


def _set_args(*extra: str) -> list[str]:
    args = []
    for item in list(TINY_OVERRIDES) + list(extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step tiny run trained through the CLI (shared by the read-only tests below)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = CliRunner().invoke(app, ["train", "--run", str(run), "--quiet",
                                      *_set_args("train.max_steps=3")])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps (24 images)" in result.output
    return run


def test_bad_set_key_exits_2_with_valid_keys(tmp_path):
    result = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "r"),
                                      "--set", "train.learning_rate=1e-3"])
    assert result.exit_code == 2
    assert "error: unknown config key train.learning_rate" in result.output
    assert "valid keys in train:" in result.output and "batch_size" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # nothing was written


def test_malformed_set_and_missing_config_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "r"), "--set", "foo"])
    assert r.exit_code == 2 and "--set expects key=value" in r.output
    r = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "r"),
                                 "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "config file not found" in r.output
    assert "Traceback" not in r.output


def test_train_then_sample_writes_png_and_npy(trained_run, tmp_path):
    assert (trained_run / "checkpoints" / "step-0000003").is_dir()
    out, npy = tmp_path / "grid.png", tmp_path / "out.npy"
    r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "6",
                                 "--out", str(out), "--npy", str(npy), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "6 samples from step 3" in r.output
    arr = np.load(npy)
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16)
    img = Image.open(out)
    assert img.format == "PNG"
    # 6 images -> 3 per row, 2 rows of 16 px with 2 px padding, upscaled 64 // 16 = 4x
    assert img.size == ((3 * 18 + 2) * 4, (2 * 18 + 2) * 4)
    # the same seed gives the same samples, another seed other samples
    npy2, npy3 = tmp_path / "b.npy", tmp_path / "c.npy"
    for path, seed in ((npy2, "0"), (npy3, "1")):
        r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "6",
                                     "--out", str(tmp_path / "g.png"), "--npy", str(path),
                                     "--seed", seed, "--device", "cpu"])
        assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(npy2), arr)
    assert not np.array_equal(np.load(npy3), arr)


def test_sample_default_output_and_sampler_choice(trained_run):
    r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "2",
                                 "--sampler", "ddim", "--steps", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (trained_run / "samples.png").is_file()
    r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "2",
                                 "--sampler", "euler", "--device", "cpu"])
    assert r.exit_code == 2 and "unknown sampler 'euler'" in r.output
    r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "2",
                                 "--steps", "5000", "--device", "cpu"])
    assert r.exit_code == 2 and "steps must be between 1 and 50" in r.output


def test_sample_ddim_with_any_step_count(trained_run, tmp_path):
    """Regression: T=50 with 29 trailing steps used to visit t=-1 and divide by zero."""
    r = CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "2", "--sampler",
                                 "ddim", "--steps", "29", "--out", str(tmp_path / "g.png"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"


def test_info_json(trained_run):
    r = CliRunner().invoke(app, ["info", "--run", str(trained_run), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["step"] == 3
    assert info["checkpoints"] == ["step-0000003"]
    assert info["last_metrics"]["step"] == 3
    assert info["config"]["model"]["channels"] == 8
    assert info["config"]["train"]["precision"] == "fp32"
    assert isinstance(info["params"], int) and info["params"] > 0
    r = CliRunner().invoke(app, ["info", "--run", str(trained_run)])
    assert r.exit_code == 0 and "step:        3" in r.output


def test_the_same_command_resumes_and_resume_is_one_rule(trained_run, tmp_path):
    r = CliRunner().invoke(app, ["train", "--run", str(trained_run), "--quiet", *_set_args()])
    assert r.exit_code == 0 and "resuming" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["train", "--run", str(trained_run), "--quiet", *_set_args(),
                                 "--set", "model.channels=16"])
    assert r.exit_code == 2 and "another config (model.channels" in r.output
    # --resume with options that build another config: the same error in every command
    for argv in (["train", "--run", str(trained_run), "--resume", "--config", "whatever.yaml"],
                 ["classifier", "train", "--run", str(tmp_path / "c"), "--resume", "--arch", "mlp"],
                 ["vae", "train", "--run", str(tmp_path / "v"), "--resume", "--kl-weight", "0.1"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 2 and "--resume uses the run's own config.yaml; drop --" in r.output, argv


def test_sample_missing_run_exits_2(tmp_path):
    missing = tmp_path / "no-such-run"
    r = CliRunner().invoke(app, ["sample", "--run", str(missing), "--n", "2"])
    assert r.exit_code == 2
    assert f"error: run directory not found: {missing}" in r.output
    assert "Traceback" not in r.output
    missing.mkdir()
    r = CliRunner().invoke(app, ["sample", "--run", str(missing)])
    assert r.exit_code == 2 and "is not a run directory" in r.output
    r = CliRunner().invoke(app, ["info", "--run", str(missing)])
    assert r.exit_code == 2 and "is not a run directory" in r.output


@pytest.fixture(scope="module")
def cli_classifier(tmp_path_factory):
    """A 1-epoch MLP on 16px digits, trained through `effusion classifier train`."""
    run = tmp_path_factory.mktemp("cli-clf") / "clf"
    result = CliRunner().invoke(app, [
        "classifier", "train", "--arch", "mlp", "--epochs", "1", "--optimizer", "rmsprop",
        "--lr", "1e-3", "--lr-schedule", "none", "--augment", "flip,rotate", "--run", str(run),
        "--quiet", "--set", "data.image_size=16", "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and (run / "curves.png").is_file()
    return run


def test_classifier_train_records_flags_in_config(cli_classifier):
    from effusion.runs.files import read_config

    cfg = read_config(cli_classifier)
    assert (cfg.model.arch, cfg.train.optimizer, cfg.train.lr, cfg.train.lr_schedule) == \
        ("mlp", "rmsprop", 1e-3, "none")
    assert (cfg.data.hflip, cfg.data.rotate, cfg.data.translate) == (True, 10.0, 0)
    assert cfg.train.epochs == 1 and cfg.model.dropout == 0.2  # recipe default kept


def test_classifier_bad_augment_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["classifier", "train", "--augment", "rotate,zoom",
                                      "--run", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--augment: unknown zoom" in result.output


def test_classifier_quantize_json(cli_classifier, tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["classifier", "quantize", "--run", str(cli_classifier),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bytes_int8"] < report["bytes_fp32"]
    assert {"latency_ms_per_256_fp32", "latency_ms_per_256_int8", "val_acc_fp32",
            "val_acc_int8"} <= set(report)
    assert (out / "quantized.safetensors").is_file()


def test_evaluate_cli_json_and_images(trained_run, cli_classifier, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--run", str(trained_run), "--n", "30",
                                      "--steps", "2", "--features", str(cli_classifier),
                                      "--bpd-n", "4", "--bpd-strata", "3", "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert {"fid", "kid", "precision", "recall", "coverage"} <= set(m)
    assert "class_accuracy" not in m  # unconditional run
    assert (trained_run / "metrics.json").is_file()
    # Samples written by `sample --npy` score the same way through --images.
    npy = tmp_path / "s.npy"
    assert CliRunner().invoke(app, ["sample", "--run", str(trained_run), "--n", "20", "--steps",
                                    "2", "--npy", str(npy), "--out", str(tmp_path / "g.png")]
                              ).exit_code == 0
    result = CliRunner().invoke(app, ["evaluate", "--images", str(npy), "--features",
                                      str(cli_classifier)])
    assert result.exit_code == 0, result.output
    assert "| fid |" in result.output and "real floor" in result.output


@pytest.mark.parametrize("args,msg", [
    ([], "exactly one of --run DIR or --images"),
    (["--images", "nope.npy"], "image array not found"),
])
def test_evaluate_cli_errors(args, msg):
    result = CliRunner().invoke(app, ["evaluate", *args])
    assert result.exit_code == 2 and msg in result.output


def test_evaluate_features_must_match_images(trained_run, tmp_path):
    # The feature classifier of the cached default is 28px; these images are 16px.
    np.save(tmp_path / "x.npy", np.zeros((20, 16, 16), np.uint8))
    clf = tmp_path / "c28"
    assert CliRunner().invoke(app, ["classifier", "train", "--arch", "mlp", "--epochs", "1",
                                    "--run", str(clf), "--quiet", "--set", "data.limit=200",
                                    "--set", "train.threads=1"]).exit_code == 0
    result = CliRunner().invoke(app, ["evaluate", "--images", str(tmp_path / "x.npy"),
                                      "--features", str(clf)])
    assert result.exit_code == 2 and "16px" in result.output and "28px" in result.output


def test_classifier_resume_keeps_the_runs_config(cli_classifier, tmp_path):
    import shutil

    from effusion.runs.files import read_config

    run = tmp_path / "clf"
    shutil.copytree(cli_classifier, run)
    # --resume continues the run as it was configured; only --set changes it.
    result = CliRunner().invoke(app, ["classifier", "train", "--run", str(run), "--resume",
                                      "--quiet", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    cfg = read_config(run)
    assert cfg.model.arch == "mlp" and cfg.train.optimizer == "rmsprop" and cfg.train.epochs == 2
