"""Classifier-free guidance: the mixing rule, label dropout, conditional sampling."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from effusion.config import ConfigError, DiffusionConfig
from effusion.diffusion import GuidedDenoiser, Schedule
from effusion.precision import Precision
from effusion.train.objective import diffusion_loss

NULL = 10


class FakeDenoiser:
    """x0 = x_t * (1 + label / 10): conditional and null predictions differ per label."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond=None):
        self.calls.append(x_t.shape[0])
        return x_t * (1 + cond.float().view(-1, 1, 1, 1) / 10)


@pytest.fixture
def xt():
    return torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))


def test_guidance_zero_is_unconditional_and_one_is_conditional(xt):
    labels = torch.tensor([0, 3, 5, 9])
    fake = FakeDenoiser()
    t = torch.zeros(4, dtype=torch.long)
    uncond = fake(xt, t, torch.full_like(labels, NULL))
    cond = fake(xt, t, labels)
    assert torch.equal(GuidedDenoiser(fake, NULL, 0.0)(xt, t, labels), uncond)
    assert torch.equal(GuidedDenoiser(fake, NULL, 1.0)(xt, t, labels), cond)
    fake.calls.clear()
    got = GuidedDenoiser(fake, NULL, 3.0)(xt, t, labels)
    assert torch.allclose(got, uncond + 3.0 * (cond - uncond))
    assert fake.calls == [8]  # both halves in one batched forward


def test_guidance_clips_after_mixing(xt):
    labels = torch.tensor([9, 9, 9, 9])
    fake = FakeDenoiser()
    guided = GuidedDenoiser(fake, NULL, 5.0, clip_x0=True)(xt * 3, 0, labels)
    assert guided.abs().max() <= 1.0
    raw = GuidedDenoiser(fake, NULL, 5.0)(xt * 3, 0, labels)
    assert torch.equal(guided, raw.clamp(-1, 1))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_observed_label_drop_rate_matches_cond_drop(p):
    seen = []

    def forward(x_t, t, cond):
        seen.append(cond.clone())
        return torch.zeros_like(x_t)

    sched = Schedule.make("cosine", 50)
    gen = torch.Generator().manual_seed(0)
    prec = Precision(torch.device("cpu"), "fp32")
    labels = torch.arange(20000) % 10
    diffusion_loss(forward, torch.zeros(20000, 1, 2, 2), labels, DiffusionConfig(timesteps=50),
                   sched, gen, prec, cond_drop=p, null_class=NULL)
    dropped = (seen[0] == NULL).double().mean().item()
    assert dropped == pytest.approx(p, abs=0.01)
    kept = seen[0] != NULL
    assert torch.equal(seen[0][kept], labels[kept])  # the rest keep their own label


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    from conftest import tiny_config

    from effusion.recipes import train

    run = tmp_path_factory.mktemp("cond") / "run"
    train(tiny_config("model.num_classes=10", "train.max_steps=2"), run, progress=False)
    return run


def test_generate_conditional_defaults_to_an_even_spread(cond_run):
    from effusion.runs import load_run
    from effusion.sampling import class_labels, generate

    run = load_run(cond_run, device="cpu")
    a = generate(run, 10, steps=2, seed=1)
    b = generate(run, 10, steps=2, seed=1, cond=torch.arange(10))
    assert torch.equal(a, b)
    c = generate(run, 10, steps=2, seed=1, cond=torch.arange(10), guidance=3.0)
    assert not torch.equal(a, c)
    assert class_labels("3,5", 5, 10).tolist() == [3, 5, 3, 5, 3]
    assert class_labels(7, 2, 10).tolist() == [7, 7]
    with pytest.raises(ConfigError, match="between 0 and 9"):
        class_labels("12", 3, 10)
    with pytest.raises(ConfigError, match="comma list"):
        class_labels("seven", 3, 10)


def test_guidance_errors(cond_run, tmp_path, make_cfg):
    from effusion.recipes import train
    from effusion.runs import load_run
    from effusion.sampling import generate

    train(make_cfg("train.max_steps=1"), tmp_path / "u", progress=False)
    uncond = load_run(tmp_path / "u", device="cpu")
    with pytest.raises(ConfigError, match="class-conditional"):
        generate(uncond, 2, steps=1, guidance=2.0)
    with pytest.raises(ConfigError, match="unconditional"):
        generate(uncond, 2, steps=1, cond=torch.tensor([1, 2]))
    train(make_cfg("train.max_steps=1", "model.num_classes=10", "train.cond_drop=0"),
          tmp_path / "nodrop", progress=False)
    nodrop = load_run(tmp_path / "nodrop", device="cpu")
    with pytest.raises(ConfigError, match="cond_drop=0"):
        generate(nodrop, 2, steps=1, guidance=2.0)
    generate(nodrop, 2, steps=1, guidance=1.0)  # plain conditional is fine


def test_sample_cli_class_and_guidance(cond_run, tmp_path):
    import numpy as np

    from effusion.cli import app

    npy = tmp_path / "s.npy"
    result = CliRunner().invoke(app, ["sample", "--run", str(cond_run), "--n", "4", "--steps",
                                      "2", "--class", "3", "--guidance", "2", "--npy", str(npy),
                                      "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert np.load(npy).shape == (4, 16, 16)
    bad = CliRunner().invoke(app, ["sample", "--run", str(cond_run), "--class", "11"])
    assert bad.exit_code == 2 and "between 0 and 9" in bad.output


def test_guidance_sweep_writes_json_and_plot(cond_run, tmp_path):
    import json

    from effusion.cli import app
    from effusion.recipes import classifier_config, train

    clf = tmp_path / "clf"
    train(classifier_config(["model.arch=mlp", "data.image_size=16", "train.epochs=1",
                             "train.threads=1", "data.limit=300"]), clf, progress=False)
    result = CliRunner().invoke(app, ["evaluate", "--run", str(cond_run), "--guidance-sweep",
                                      "0,1,3", "--n", "20", "--steps", "2", "--features",
                                      str(clf), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert [x["guidance"] for x in r["sweep"]] == [0.0, 1.0, 3.0]
    assert all("class_accuracy" in x and "fid" in x and "coverage" in x for x in r["sweep"])
    assert json.loads((cond_run / "guidance_sweep.json").read_text())["sweep"] == r["sweep"]
    assert (cond_run / "guidance_sweep.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["evaluate", "--run", str(cond_run), "--guidance-sweep", "1,x"])
    assert bad.exit_code == 2 and "comma list of numbers" in bad.output


def test_guidance_sweep_needs_a_conditional_run(tmp_path, make_cfg):
    from effusion.evaluate import guidance_sweep
    from effusion.recipes import train

    train(make_cfg("train.max_steps=1"), tmp_path / "u", progress=False)
    with pytest.raises(ConfigError, match="class-conditional"):
        guidance_sweep(tmp_path / "u", [0, 1], n=10)


def test_guidance_interval_guides_only_inside_and_saves_calls(xt):
    """Kynkaanniemi et al. 2024: guidance where lo <= sigma_t <= hi, the plain conditional
    prediction (one call of b rows instead of 2b) elsewhere."""
    from effusion.diffusion.guidance import sigma_of_t

    sched = Schedule.make("cosine", 100)
    labels = torch.tensor([0, 3, 5, 9])
    sig = sigma_of_t(sched, torch.arange(100))
    assert torch.all(sig[1:] > sig[:-1])  # sigma grows with t
    lo, hi = float(sig[30]), float(sig[60])
    fake = FakeDenoiser()
    guided = GuidedDenoiser(fake, NULL, 3.0)
    limited = GuidedDenoiser(fake, NULL, 3.0, interval=(lo, hi), schedule=sched)
    plain = GuidedDenoiser(fake, NULL, 1.0)
    for t_val, inside in [(10, False), (30, True), (45, True), (60, True), (90, False)]:
        t = torch.full((4,), t_val)
        fake.calls.clear()
        out = limited(xt, t, labels)
        ref = (guided if inside else plain)(xt, t, labels)
        assert torch.equal(out, ref), t_val
        assert fake.calls[0] == (8 if inside else 4)
    # rows at different noise levels: each gets its own weight, in one batch
    t = torch.tensor([10, 45, 90, 30])
    out = limited(xt, t, labels)
    for i in range(4):
        ref = (guided if i in (1, 3) else plain)(xt[i:i + 1], t[i:i + 1], labels[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], ref)
    with pytest.raises(ValueError, match="schedule"):
        GuidedDenoiser(fake, NULL, 3.0, interval=(0.1, 1.0))


def test_guidance_interval_from_config_cli_and_bad_values(cond_run, tmp_path, make_cfg):
    from effusion.cli import app
    from effusion.config import load_config
    from effusion.runs import load_run
    from effusion.sampling import generate

    run = load_run(cond_run, device="cpu")
    everywhere = generate(run, 4, steps=3, seed=2, guidance=3.0)
    assert torch.equal(generate(run, 4, steps=3, seed=2, guidance=3.0,
                                guidance_interval=(0.0, 1e9)), everywhere)
    nowhere = generate(run, 4, steps=3, seed=2, guidance=3.0, guidance_interval=(1e8, 1e9))
    assert torch.equal(nowhere, generate(run, 4, steps=3, seed=2, guidance=1.0))
    with pytest.raises(ConfigError, match="0 <= lo < hi"):
        generate(run, 2, steps=1, guidance_interval=(2.0, 1.0))
    with pytest.raises(ConfigError, match="guidance_interval"):
        load_config(None, ["sample.guidance_interval=[3]"])
    assert load_config(None, ["sample.guidance_interval=[0.3,5]"]).sample.guidance_interval == (0.3, 5.0)
    r = CliRunner().invoke(app, ["sample", "--run", str(cond_run), "--n", "4", "--steps", "3",
                                 "--seed", "2", "--guidance", "3", "--guidance-interval", "1e8,1e9",
                                 "--npy", str(tmp_path / "a.npy"), "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    import numpy as np
    assert np.array_equal(np.load(tmp_path / "a.npy"), nowhere[:, 0].numpy())
    r = CliRunner().invoke(app, ["sample", "--run", str(cond_run), "--guidance-interval", "x"])
    assert r.exit_code == 2 and "lo,hi" in r.output
