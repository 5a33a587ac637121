"""diffusers interop (issue 28): a UNet2DModel made and saved by diffusers is imported,
samples as diffusers' own DDIM does, goes through the deployment chain and the server, and
an effusion run of that arch exports back to a folder diffusers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs the diffusers extra: "
                                "pip install 'effusion[diffusers]'")

from conftest import tiny_config  # noqa: E402
from effusion.cli import app  # noqa: E402
from effusion.config import ConfigError  # noqa: E402
from effusion.diffusion.samplers import sample_ddim  # noqa: E402
from effusion.interop.diffusers import (diffusion_from_scheduler, export_diffusers,  # noqa: E402
                                        import_diffusers)
from effusion.recipes import train  # noqa: E402
from effusion.runs import load_run, read_config, read_lineage  # noqa: E402

SIZE = 8  # the 8x8 digits: the smallest built-in source, so the chain runs in seconds


def tiny_unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
        num_class_embeds=num_class_embeds)


def save(tmp_path, unet, scheduler, name="model"):
    d = tmp_path / name
    unet.save_pretrained(d)
    scheduler.save_pretrained(d)
    return d


def diffusers_ddim(unet, scheduler, x_T, steps, labels=None, use_clipped_model_output=False):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0,
                               use_clipped_model_output=use_clipped_model_output).prev_sample
    return x


def test_clip_sample_matches_diffusers_with_clipped_model_output(tmp_path):
    """effusion's DDIM with clip_x0 takes its noise direction from the clipped x0, as
    diffusers does only with use_clipped_model_output=True; diffusers' default pairs the
    clipped x0 with the network's unclipped noise, another trajectory (issue 28: why
    diffusers' DDIM at 50 steps scored far worse than at 10 on an exported effusion run)."""
    unet = tiny_unet(None)
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", clip_sample=True)
    run = load_run(import_diffusers(save(tmp_path, unet, sched), tmp_path / "run"),
                   device="cpu", precision="fp32")
    assert run.config.sample.clip_x0
    x_T = torch.randn((4, 1, SIZE, SIZE), generator=torch.manual_seed(0))
    ours = sample_ddim(run.denoiser(), run.schedule, x_T, 10, spacing=run.config.sample.spacing)
    same = diffusers_ddim(unet, sched, x_T, 10, use_clipped_model_output=True)
    other = diffusers_ddim(unet, sched, x_T, 10)
    assert (ours - same).abs().max() < 1e-4
    assert (ours - other).abs().max() > 1e-2  # an untrained net's x0 leaves [-1, 1]


@pytest.mark.parametrize("prediction,beta,cond", [
    ("epsilon", "linear", False), ("v_prediction", "linear", True),
    ("epsilon", "squaredcos_cap_v2", True), ("v_prediction", "squaredcos_cap_v2", False)])
def test_imported_model_samples_as_diffusers_ddim(tmp_path, prediction, beta, cond):
    unet = tiny_unet(11 if cond else None)  # 10 digits + the null class
    sched = diffusers.DDIMScheduler(beta_schedule=beta, prediction_type=prediction, clip_sample=False)
    run = load_run(import_diffusers(save(tmp_path, unet, sched), tmp_path / "run", null_class=cond),
                   device="cpu", precision="fp32")
    assert run.config.model.num_classes == (10 if cond else 0)
    assert run.config.diffusion.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert run.config.diffusion.schedule == {"linear": "linear", "squaredcos_cap_v2": "cosine"}[beta]
    x_T = torch.randn((4, 1, SIZE, SIZE), generator=torch.manual_seed(0))
    labels = torch.tensor([0, 3, 5, 10]) if cond else None  # 10: the null class
    den = run.denoiser(guidance=1.0) if cond else run.denoiser()
    ours = sample_ddim(den, run.schedule, x_T, 10, cond=labels, spacing=run.config.sample.spacing)
    theirs = diffusers_ddim(unet, sched, x_T, 10, labels)
    # an untrained eps-model's trajectory grows to ~1e2: compare images, and relative error
    img = lambda x: (x / 2 + 0.5).clamp(0, 1)  # noqa: E731 - as DDIMPipeline's output
    assert (img(ours) - img(theirs)).abs().max() < 1e-4
    assert ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1)) < 1e-5
    if not cond:  # and diffusers' own pipeline, same seed
        piped = diffusers.DDIMPipeline(unet, sched)(
            batch_size=4, generator=torch.manual_seed(0), num_inference_steps=10,
            output_type="np").images
        np.testing.assert_allclose(img(ours).permute(0, 2, 3, 1).numpy(), piped, atol=1e-4)


def test_import_records_lineage_and_keeps_weights_in_safetensors(tmp_path):
    src = save(tmp_path, tiny_unet(11), diffusers.DDIMScheduler())
    run = import_diffusers(src, tmp_path / "run", null_class=True)
    cfg = read_config(run)
    assert cfg.model.arch == "diffusers_unet2d" and cfg.data.source == "digits"
    assert (cfg.data.image_size, cfg.data.channels) == (SIZE, 1)
    assert cfg.train.cond_drop > 0 and cfg.sample.clip_x0  # DDIM's clip_sample default
    (entry,) = read_lineage(run)
    assert entry["pass"] == "import" and entry["from"] == "diffusers" and entry["null_class"]
    files = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert ".bin" not in files and ".safetensors" in files
    with pytest.raises(ConfigError, match="not empty"):
        import_diffusers(src, run)


def test_import_without_null_class_samples_conditionally_only(tmp_path):
    src = save(tmp_path, tiny_unet(10), diffusers.DDPMScheduler())
    run = load_run(import_diffusers(src, tmp_path / "run"), device="cpu", precision="fp32")
    assert run.config.model.num_classes == 10 and run.config.train.cond_drop == 0
    with pytest.raises(ConfigError, match="guidance 1"):
        run.denoiser(guidance=2.0)
    with pytest.raises(ValueError, match="no null class"):
        run.model(torch.zeros(2, 1, SIZE, SIZE), torch.tensor([5, 5]))  # no label


@pytest.mark.parametrize("change,match", [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule='scaled_linear'"),
    ({"beta_start": 0.001}, "linear betas"),
    ({"prediction_type": "flow"}, "prediction_type='flow'"),
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({"thresholding": True}, "thresholding"),
    ({"steps_offset": 1}, "steps_offset"),
])
def test_unrepresentable_schedulers_are_clear_errors(change, match):
    base = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 1e-4,
            "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    with pytest.raises(ConfigError, match=match):
        diffusion_from_scheduler({**base, **change})


def test_a_conditional_unet_from_another_class_is_refused(tmp_path):
    d = tmp_path / "cond"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConfigError, match="UNet2DConditionModel"):
        import_diffusers(d, tmp_path / "run")
    with pytest.raises(ConfigError, match="no UNet2DModel"):
        import_diffusers(tmp_path, tmp_path / "run2")


def test_an_ambiguous_size_asks_for_data(tmp_path):
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    src = save(tmp_path, unet, diffusers.DDIMScheduler())
    with pytest.raises(ConfigError, match="--data"):
        import_diffusers(src, tmp_path / "run")
    assert read_config(import_diffusers(src, tmp_path / "run", data="shapes")).data.source == "shapes"


@pytest.fixture(scope="module")
def effusion_trained(tmp_path_factory):
    """effusion's recipe on diffusers' network: model.arch=diffusers_unet2d, digits."""
    run = tmp_path_factory.mktemp("dtrain") / "run"
    train(tiny_config("data.source=digits", "model.arch=diffusers_unet2d", "model.channels=16",
                      "model.channel_mult=[1,2]", "model.attention_resolutions=[4]",
                      "model.num_classes=-1", "train.cond_drop=0.3", "train.max_steps=3"),
          run, progress=False)
    return run


def test_effusion_run_exports_to_diffusers_and_back(effusion_trained, tmp_path):
    out = tmp_path / "hf"
    r = export_diffusers(effusion_trained, out)
    assert {"config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors",
            "effusion.json"} <= set(r["files"])
    unet = diffusers.UNet2DModel.from_pretrained(out, low_cpu_mem_usage=False)
    sched = diffusers.DDIMScheduler.from_pretrained(out)
    run = load_run(effusion_trained, device="cpu", precision="fp32")
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.manual_seed(1))
    t, c = torch.tensor([10, 500, 990]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        np.testing.assert_allclose(unet(x, t, class_labels=c).sample.numpy(),
                                   run.model(x, t, c).numpy(), atol=1e-5)
    # the same DDIM trajectory in both libraries
    ours = sample_ddim(run.denoiser(guidance=1.0, clip_x0=False), run.schedule, x, 5,
                       cond=torch.tensor([1, 2, 3]), spacing=run.config.sample.spacing)
    sched.config  # noqa: B018 - loaded
    sched = diffusers.DDIMScheduler.from_config({**sched.config, "clip_sample": False})
    theirs = diffusers_ddim(unet, sched, x, 5, torch.tensor([1, 2, 3]))
    assert (ours - theirs).abs().max() < 1e-4
    # and back: the sidecar says the last embedding is the null class
    back = read_config(import_diffusers(out, tmp_path / "back"))
    assert back.model.num_classes == 10 and back.train.cond_drop > 0
    assert [p["pass"] for p in read_lineage(tmp_path / "back")][-1] == "import"


def test_export_of_effusions_own_unet_says_why_not(tmp_path):
    run = tmp_path / "own"
    train(tiny_config("data.source=digits", "model.num_classes=0", "train.max_steps=1"), run,
          progress=False)
    with pytest.raises(ConfigError, match="no exact UNet2DModel mapping"):
        export_diffusers(run, tmp_path / "hf")


def test_imported_model_goes_through_the_chain_and_serves(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'effusion[onnx]'")
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'effusion[serve]'")
    from fastapi.testclient import TestClient

    from effusion.optimize.export import export_run
    from effusion.recipes import distill_guidance, distill_steps
    from effusion.sampling import generate
    from effusion.serve import ServeSettings, create_app

    src = save(tmp_path, tiny_unet(11), diffusers.DDIMScheduler(prediction_type="v_prediction"))
    run = import_diffusers(src, tmp_path / "run", null_class=True)
    gd, s2, onnx = tmp_path / "gd", tmp_path / "gd-s2", tmp_path / "gd-s2-onnx"
    short = ["train.max_steps=2", "train.warmup_steps=1"]
    distill_guidance(run, gd, minutes=0, progress=False, overrides=short)
    assert read_config(gd).model.arch == "diffusers_unet2d" and read_config(gd).model.guidance_input
    distill_steps(gd, s2, steps=2, from_steps=4, minutes=0, progress=False, overrides=short)
    report = export_run(s2, onnx, repeats=1)
    assert report["max_abs_diff_fp32"] < 1e-3
    eager = generate(load_run(s2, device="cpu"), 3, seed=1)
    exported = generate(load_run(onnx, device="cpu"), 3, seed=1)
    assert (exported.float() - eager.float()).abs().max() <= 2
    assert [p["pass"] for p in read_lineage(onnx)][0] == "import"
    with TestClient(create_app(load_run(onnx, device="cpu"), ServeSettings())) as c:
        r = c.post("/v1/generate", json={"n": 2, "class": 3, "seed": 5, "format": "png"})
        assert r.status_code == 200, r.text
        assert r.json()["shape"] == [2, 1, SIZE, SIZE]
    with pytest.raises(ConfigError, match="guidance-distilled"):
        export_diffusers(gd, tmp_path / "hf")


def test_cli_import_and_export(tmp_path, effusion_trained):
    from typer.testing import CliRunner

    src = save(tmp_path, tiny_unet(None), diffusers.DDIMScheduler())
    res = CliRunner().invoke(app, ["import", "diffusers", str(src), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "unconditional" in res.output and "data digits" in res.output
    res = CliRunner().invoke(app, ["export", "--format", "diffusers", "--run",
                                   str(effusion_trained), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors").is_file()
    res = CliRunner().invoke(app, ["import", "diffusers", str(tmp_path / "nowhere"), "--out",
                                   str(tmp_path / "r2")])
    assert res.exit_code != 0 and "not a folder" in res.output
