"""ONNX export: the graph matches the eager U-Net, and the exported run directory is a run
like any other (sample, evaluate, info) with its lineage."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'effusion[onnx]'")

from effusion.cli import app  # noqa: E402
from effusion.config import ConfigError  # noqa: E402
from effusion.models.exported import OnnxNetwork  # noqa: E402
from effusion.optimize.export import export_run  # noqa: E402
from effusion.runs import describe, load_run, read_lineage  # noqa: E402
from effusion.sampling import generate  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import tiny_config
    from effusion.recipes import train

    root = tmp_path_factory.mktemp("export")
    train(tiny_config("model.num_classes=10", "train.max_steps=3", "train.cond_drop=0.2",
                      "model.channel_mult=[1,2,2]", "model.attention_resolutions=[4]"),
          root / "run", progress=False)
    report = export_run(root / "run", root / "onnx", repeats=1)
    return root / "run", root / "onnx", report


def test_onnx_matches_eager_and_reports_latency(exported):
    run, out, report = exported
    assert report["max_abs_diff_fp32"] < 1e-4
    assert set(report["latency_ms"]) == {"1", "8", "64"}
    eager, onnx = load_run(run, device="cpu").model, load_run(out, device="cpu").model
    assert isinstance(onnx, OnnxNetwork)
    torch.manual_seed(3)
    for b in (1, 5):  # a batch size the export never saw: the batch dimension is dynamic
        x, t, c = torch.randn(b, 1, 16, 16), torch.randint(0, 50, (b,)), torch.randint(0, 11, (b,))
        with torch.no_grad():
            torch.testing.assert_close(onnx(x, t, c), eager(x, t, c), rtol=0, atol=1e-4)


def test_exported_run_samples_like_its_base_with_no_extra_flags(exported):
    run, out, _ = exported
    a = generate(load_run(run, device="cpu"), 6, steps=4, seed=5)
    b = generate(load_run(out, device="cpu"), 6, steps=4, seed=5, guidance=2.0)
    c = generate(load_run(run, device="cpu"), 6, steps=4, seed=5, guidance=2.0)
    assert b.shape == a.shape and (b.float() - c.float()).abs().max() <= 1  # uint8 rounding
    (step,) = read_lineage(out)
    assert step["pass"] == "export" and step["format"] == "onnx" and step["step"] == 3
    assert load_run(out).step == 3 and describe(out).step == 3 and describe(out).lineage == [step]
    with pytest.raises(ConfigError, match="needs the eager effusion U-Net"):
        load_run(out).network(cache_interval=2)


def test_cli_export_and_sample(exported, tmp_path):
    run, _, _ = exported
    r = CliRunner().invoke(app, ["optimize", "export", "--run", str(run), "--out",
                                 str(tmp_path / "e"), "--json"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["max_abs_diff_fp32"] < 1e-4
    r = CliRunner().invoke(app, ["sample", "--run", str(tmp_path / "e"), "--n", "4", "--steps", "3",
                                 "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["optimize", "export", "--run", str(run), "--out",
                                 str(tmp_path / "v"), "--format", "openvino"])
    assert r.exit_code == 2 and "only onnx is built" in r.output


def test_missing_base_or_wrong_input_is_a_clear_error(exported, tmp_path):
    _, out, _ = exported
    with pytest.raises(ValueError, match="class-conditional: pass cond"):
        load_run(out).model(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not onnx")
    (tmp_path / "bad" / "config.yaml").write_text((out / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="cannot load ONNX model"):
        load_run(tmp_path / "bad")
