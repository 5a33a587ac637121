"""`effusion optimize quantize` on diffusion runs: dynamic int8 (Linear layers) and bf16
weights write run directories that load and sample like their base; static int8 is the
export pass."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from effusion.cli import app
from effusion.config import ConfigError
from effusion.optimize.quantize import quantize_run
from effusion.runs import CheckpointError, describe, load_run, read_lineage
from effusion.runs.files import BF16_WEIGHTS, QUANTIZED_WEIGHTS
from effusion.sampling import generate


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import tiny_config
    from effusion.recipes import train

    root = tmp_path_factory.mktemp("quant")
    train(tiny_config("model.num_classes=10", "train.max_steps=3", "train.cond_drop=0.2"),
          root / "run", progress=False)
    return root


def test_dynamic_int8_stores_int8_linears_and_stays_close(base):
    report = quantize_run(base / "run", base / "dyn", "dynamic-int8", calib_batches=2)
    assert (base / "dyn" / QUANTIZED_WEIGHTS).is_file()
    assert report["layers"] and all("emb" in n or "time_mlp" in n for n in report["layers"])
    assert 0 < report["params_quantized_share"] < 1
    assert report["prediction_rel_error"] < 0.05
    assert set(report["latency_ms"]) == {"1", "8", "64"}
    run = load_run(base / "dyn", device="cpu")
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    assert any(isinstance(m, QLinear) for m in run.model.modules())
    assert run.step == load_run(base / "run", device="cpu").step
    lineage = read_lineage(base / "dyn")
    assert lineage[-1]["pass"] == "quantize" and lineage[-1]["method"] == "dynamic-int8"
    assert describe(base / "dyn").lineage == lineage
    a = generate(load_run(base / "run", device="cpu"), 4, seed=1, steps=3).float()
    b = generate(run, 4, seed=1, steps=3).float()
    assert (a - b).abs().mean() < 8  # uint8 levels, 4 images of a 3-step tiny run


def test_bf16_weights_halve_the_file_and_load_as_fp32(base):
    report = quantize_run(base / "run", base / "bf16", "bf16-weights", calib_batches=2)
    assert report["bytes"] < 0.55 * report["bytes_base"]
    assert report["prediction_rel_error"] < 0.02
    run = load_run(base / "bf16", device="cpu")
    ref = load_run(base / "run", device="cpu")
    for (k, p), (_, q) in zip(run.model.state_dict().items(), ref.model.state_dict().items()):
        assert p.dtype == q.dtype, k  # upcast on load
        if p.is_floating_point():
            torch.testing.assert_close(p, q.to(torch.bfloat16).to(q.dtype), rtol=0, atol=0)


def test_quantize_refuses_what_it_cannot_do(base, tmp_path):
    with pytest.raises(ConfigError, match="choose dynamic-int8"):
        quantize_run(base / "run", tmp_path / "x", "int4")
    with pytest.raises(CheckpointError, match="own directory"):
        quantize_run(base / "run", base / "run", "bf16-weights")
    quantize_run(base / "run", tmp_path / "q1", "bf16-weights", calib_batches=1)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_run(tmp_path / "q1", tmp_path / "q2", "dynamic-int8")


def test_cli_quantize_then_sample(base, tmp_path):
    r = CliRunner().invoke(app, ["optimize", "quantize", "--run", str(base / "run"), "--out",
                                 str(tmp_path / "q"), "--method", "dynamic-int8",
                                 "--calib-batches", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert '"method": "dynamic-int8"' in r.output
    r = CliRunner().invoke(app, ["sample", "--run", str(tmp_path / "q"), "--n", "2",
                                 "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["optimize", "quantize", "--run", str(base / "run"), "--out",
                                 str(tmp_path / "z"), "--method", "fp8"])
    assert r.exit_code == 2 and "choose dynamic-int8" in r.output
