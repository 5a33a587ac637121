"""A colour run goes through the deployment chain and the server with no extra flags:
guidance distillation, step distillation, ONNX export, `effusion serve` (RGB PNGs)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'effusion[onnx]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import tiny_config  # noqa: E402
from effusion.optimize.export import export_run  # noqa: E402
from effusion.recipes import distill_guidance, distill_steps, train  # noqa: E402
from effusion.runs import load_run, read_config, read_lineage  # noqa: E402
from effusion.sampling import generate, generate_seeded  # noqa: E402
from effusion.serve import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """shapes with size and channels left to the data (0): a 3-channel class-conditional run."""
    run = tmp_path_factory.mktemp("colour") / "run"
    train(tiny_config("data.source=shapes:64", "data.image_size=0", "data.channels=0",
                      "model.num_classes=-1", "train.cond_drop=0.3", "train.max_steps=3"),
          run, progress=False)
    return run


def test_colour_run_resolves_rgb_and_samples_rgb(colour_run):
    d = read_config(colour_run).data
    assert (d.channels, d.image_size) == (3, 32) and read_config(colour_run).model.num_classes == 6
    x = generate(load_run(colour_run, device="cpu"), 4, steps=2, seed=0)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8


def test_colour_chain_distils_exports_and_serves_rgb(colour_run, tmp_path):
    gd, s2, onnx = tmp_path / "gd", tmp_path / "gd-s2", tmp_path / "gd-s2-onnx"
    short = ["train.max_steps=2", "train.warmup_steps=1"]
    distill_guidance(colour_run, gd, minutes=0, progress=False, overrides=short)
    distill_steps(gd, s2, steps=2, from_steps=4, minutes=0, progress=False, overrides=short)
    report = export_run(s2, onnx, repeats=1)
    assert report["max_abs_diff_fp32"] < 1e-3
    assert [p["pass"] for p in read_lineage(onnx)][-1] == "export"
    run = load_run(onnx, device="cpu")
    eager = generate(load_run(s2, device="cpu"), 3, seed=1)
    exported = generate(run, 3, seed=1)
    assert exported.shape == (3, 3, 32, 32)
    assert (exported.float() - eager.float()).abs().max() <= 2  # uint8 rounding
    with TestClient(create_app(run, ServeSettings())) as c:
        r = c.post("/v1/generate", json={"n": 2, "class": 1, "seed": 5, "format": "png"})
        assert r.status_code == 200, r.text
        assert r.json()["shape"] == [2, 3, 32, 32]
        im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert im.mode == "RGB" and im.size == (32, 32)
        api = generate_seeded(run, [5, 6], cond=torch.tensor([1, 1]))  # the server's sampler
        np.testing.assert_array_equal(np.array(im), api[0].permute(1, 2, 0).numpy())
        info = c.get("/v1/info").json()
        assert info["image"] == {"channels": 3, "height": 32, "width": 32}
