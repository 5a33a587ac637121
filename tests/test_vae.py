"""The VAE (shapes, training, scale factor) and latent diffusion runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from effusion.cli import app
from effusion.config import ConfigError, VAEConfig
from effusion.data import load_source, split, to_model_range
from effusion.models import build_model, denoiser_input
from effusion.models.vae import VAE, kl_to_standard_normal, latent_size, psnr
from effusion.recipes import train, vae_config
from effusion.runs import build_run_model, load_vae
from effusion.runs.files import VAE_INFO, CheckpointError

VAE_TINY = ["data.image_size=16", "data.channels=1", "data.limit=128", "model.channels=8", "model.norm_groups=4",
            "train.max_minutes=0", "train.threads=1", "train.precision=fp32", "train.device=cpu",
            "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
            "train.batch_size=16"]


@pytest.mark.parametrize("size,down,expect", [(28, 4, 7), (64, 4, 16), (20, 4, 5), (16, 1, 16),
                                              (15, 2, 8), (64, 8, 8)])
def test_vae_shapes(size, down, expect):
    assert latent_size(size, down) == expect
    vae = VAE(VAEConfig(latent_channels=3, downsample=down), 3, size, channels=8, groups=4)
    x = torch.rand(2, 3, size, size) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, expect, expect) == (2, *vae.latent_shape)
    recon, m2, _ = vae(x, torch.zeros_like(mean))
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, vae.decode(mean))  # eps = 0: the posterior mean
    torch.testing.assert_close(m2, mean)


def test_kl_and_psnr_formulas():
    assert kl_to_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element
    assert kl_to_standard_normal(torch.ones(5), torch.zeros(5)).item() == pytest.approx(0.5)
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x + 0.02, x) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.0004)).item())
    assert psnr(x, x) > 100


def _vae_run(tmp_path, *extra, name="vae"):
    cfg = vae_config(VAE_TINY + list(extra))
    run = tmp_path / name
    res = train(cfg, run, progress=False)
    return run, res


def test_short_vae_training_lowers_reconstruction_error_and_records_its_scale(tmp_path):
    cfg = vae_config(VAE_TINY)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg).eval()
    run, res = _vae_run(tmp_path, "train.max_steps=150", "train.lr=3e-3")
    info = json.loads((run / VAE_INFO).read_text())
    assert info["latent_shape"] == [4, 4, 4] and info["psnr_on"] == "held-out"
    assert (run / "samples" / "step-0000150.png").is_file()  # originals over reconstructions

    data = load_source(cfg.data)
    train_set, val_set = split(data, cfg.data.val_fraction)
    x = to_model_range(val_set.images)
    with torch.no_grad():
        before = psnr(untrained.decode(untrained.encode(x)[0]), x)
    assert info["psnr_db"] > before + 3, (before, info["psnr_db"])

    vae = load_vae(run)
    z = vae.encode(train_set.images)
    assert z.shape == (len(train_set), 4, 4, 4) and z.dtype == torch.float32
    # the scale factor is 1 / std of the latents over the training images: unit variance
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)
    assert vae.scale_factor == pytest.approx(info["scale_factor"])
    dec = vae.decode(z[:8])
    assert dec.shape == (8, 1, 16, 16) and dec.min() >= -1 and dec.max() <= 1
    assert psnr(dec, to_model_range(train_set.images[:8])) > before


def test_feature_loss_goes_through_the_domain_classifier(tmp_path, monkeypatch):
    import effusion.recipes.generative as generative
    from effusion.recipes import classifier_config
    from effusion.runs import LoadedClassifier

    calls = []
    ccfg = classifier_config(["data.image_size=16", "data.channels=1", "model.num_classes=10"])
    clf_model = build_model(ccfg).eval()
    real_features = clf_model.features
    clf_model.features = lambda x: calls.append(x.shape) or real_features(x)
    monkeypatch.setattr(generative, "feature_classifier",
                        lambda data, progress=False: LoadedClassifier(tmp_path, ccfg, clf_model, False))
    run, res = _vae_run(tmp_path, "train.max_steps=3", "vae.feature_weight=0.5")
    assert len(calls) == 2 * 3  # reconstructions and originals, each step
    assert not any(p.requires_grad for p in clf_model.parameters())  # the classifier stays fixed


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    run, _ = _vae_run(tmp, "train.max_steps=40", "train.lr=3e-3")
    return run


LATENT_TINY = ["data.image_size=16", "data.limit=128", "model.channels=8", "model.norm_groups=4",
               "model.channel_mult=[1,2]", "model.attention_resolutions=[]", "model.head_channels=8",
               "diffusion.timesteps=50", "train.batch_size=16", "train.max_minutes=0",
               "train.max_steps=4", "train.threads=1", "train.precision=fp32",
               "train.device=cpu", "train.sample_every=0", "train.sample_n=4", "sample.steps=4"]


def _sets(*items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


def test_latent_run_trains_samples_and_evaluates_with_no_extra_flags(tmp_path, vae_run, capsys):
    runner = CliRunner()
    run = tmp_path / "latent"
    r = runner.invoke(app, ["train", "--vae", str(vae_run), "--run", str(run), "--quiet",
                            *_sets(*LATENT_TINY)])
    assert r.exit_code == 0, r.output
    assert "encoded 115 images to (4, 4, 4) latents" in r.output  # once: no augmentation
    cfg = load_vae(vae_run).config
    from effusion.runs.files import read_config

    lcfg = read_config(run)
    assert lcfg.model.space == "latent" and lcfg.model.vae == str(vae_run.resolve())
    assert denoiser_input(lcfg, (4, 4, 4)) == (4, 4)
    assert build_run_model(lcfg).conv_in.in_channels == 4 and cfg.model.arch == "vae"
    with pytest.raises(ConfigError, match="latent shape"):
        build_model(lcfg)  # building a model reads no file: the shape must be given

    out = tmp_path / "s.png"
    r = runner.invoke(app, ["sample", "--run", str(run), "--n", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.size[0] == img.size[1] and img.size[0] >= 2 * 16  # a 2x2 grid of 16px images

    # evaluate: samples decoded through the VAE, scored in pixel space; no bits/dim
    from effusion.evaluate.evaluate import evaluate_run
    from effusion.recipes import classifier_config

    clf = tmp_path / "clf"
    train(classifier_config(["data.image_size=16", "data.limit=256", "train.epochs=1",
                             "train.threads=1", "train.device=cpu"]), clf, progress=False)
    res = evaluate_run(run, n=16, features=clf, bpd_n=8)
    assert res["fid"] > 0 and "bpd" not in res and "latent" in res["bpd_note"]


def _encoded_batches(monkeypatch, vae: Path, run: Path, augmentation: str) -> list:
    """Train a tiny augmented latent run on `vae`; the shapes `LoadedVAE.encode` was given."""
    from effusion.config import load_config
    from effusion.recipes import train as train_fn
    from effusion.runs import LoadedVAE

    calls = []
    real = LoadedVAE.encode
    monkeypatch.setattr(LoadedVAE, "encode", lambda self, x, **k: calls.append(x.shape) or real(self, x, **k))
    cfg = load_config(None, LATENT_TINY + ["model.space=latent", f"model.vae={vae}",
                                           augmentation, "model.num_classes=0"])
    train_fn(cfg, run, progress=False)
    return calls


def test_latent_run_with_augmentation_encodes_on_the_fly(tmp_path, vae_run, monkeypatch):
    from effusion.runs.files import read_config

    calls = _encoded_batches(monkeypatch, vae_run, tmp_path / "aug", "data.hflip=true")
    assert calls == [(16, 1, 16, 16)] * 4  # each (augmented) pixel batch, never the whole set
    assert read_config(tmp_path / "aug").model.space == "latent"


def test_augmented_latent_run_encodes_even_when_latents_have_the_datas_channels(tmp_path, monkeypatch):
    """With vae.latent_channels == data.channels a batch's channel count cannot tell pixels
    from latents: augmented pixel batches must still be encoded (never fed raw)."""
    vae, _ = _vae_run(tmp_path, "train.max_steps=3", "vae.latent_channels=1", name="vae1")
    calls = _encoded_batches(monkeypatch, vae, tmp_path / "aug1", "data.translate=2")
    assert calls == [(16, 1, 16, 16)] * 4


def test_latent_errors_are_clear(tmp_path, vae_run, make_cfg):
    runner = CliRunner()
    with pytest.raises(ConfigError, match="model.space=latent needs model.vae"):
        make_cfg("model.space=latent")
    # a run that is not a VAE
    other = tmp_path / "pixel"
    train(make_cfg(), other, progress=False)
    r = runner.invoke(app, ["train", "--vae", str(other), "--run", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a VAE" in r.output
    r = runner.invoke(app, ["train", "--vae", str(tmp_path / "nowhere"), "--run", str(tmp_path / "x")])
    assert r.exit_code == 2 and "VAE run directory not found" in r.output
    # a VAE for other images
    r = runner.invoke(app, ["train", "--vae", str(vae_run), "--run", str(tmp_path / "y"), "--quiet",
                            *_sets(*LATENT_TINY, "data.image_size=20")])
    assert r.exit_code == 2 and "trained on 1-channel 16x16 images" in r.output
    # sampling or evaluating the VAE run itself
    for cmd in (["sample", "--run", str(vae_run), "--n", "2"], ["evaluate", "--run", str(vae_run)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and "is a VAE run (model.arch=vae), not a diffusion run" in r.output, cmd
    # an unfinished VAE run (no vae.json)
    unfinished = tmp_path / "unfinished"
    import shutil

    shutil.copytree(vae_run, unfinished)
    (unfinished / VAE_INFO).unlink()
    with pytest.raises(CheckpointError, match="no finished VAE"):
        load_vae(unfinished)


def test_vae_cli_reports_psnr_and_scale(tmp_path):
    runner = CliRunner()
    run = tmp_path / "v"
    r = runner.invoke(app, ["vae", "train", "--run", str(run), "--latent-channels", "2",
                            "--downsample", "2", "--recon", "l2", "--quiet",
                            *_sets(*VAE_TINY, "train.max_steps=3")])
    assert r.exit_code == 0, r.output
    assert "reconstruction PSNR" in r.output and "latents (2, 8, 8)" in r.output
    from effusion.runs.files import read_config

    cfg = read_config(run)
    assert (cfg.vae.latent_channels, cfg.vae.downsample, cfg.vae.recon) == (2, 2, "l2")
    r = runner.invoke(app, ["vae", "train", "--run", str(tmp_path / "w"), "--downsample", "3"])
    assert r.exit_code == 2 and "power of 2" in r.output
