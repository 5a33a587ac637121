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
    assert r.exit_code == 0 or "openvino" in r.output  # built, or a clear install hint


def test_missing_base_or_wrong_input_is_a_clear_error(exported, tmp_path):
    _, out, _ = exported
    with pytest.raises(ValueError, match="class-conditional: pass cond"):
        load_run(out).model(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not onnx")
    (tmp_path / "bad" / "config.yaml").write_text((out / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="cannot load ONNX model"):
        load_run(tmp_path / "bad")


def test_int8_export_is_calibrated_close_and_smaller(exported, tmp_path):
    """Static int8 (ONNX Runtime QDQ): weights int8, ranges from noisy real inputs; the
    output stays close to the eager fp32 network's, relative to its spread."""
    run, out, fp32_report = exported
    report = export_run(run, tmp_path / "int8", repeats=1, int8=True, calib_batches=2)
    assert report["int8"] and report["bytes"] < report["bytes_fp32_graph"]
    assert "engine_fp32" in report["latency_ms"]["8"]
    assert not list((tmp_path / "int8").glob("*.tmp")) and not list((tmp_path / "int8").glob("*.pre"))
    eager, q = load_run(run, device="cpu").model, load_run(tmp_path / "int8", device="cpu").model
    g = torch.Generator().manual_seed(4)
    x, t, c = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 50, (16,), generator=g), \
        torch.randint(0, 11, (16,), generator=g)
    with torch.no_grad():
        ref, got = eager(x, t, c), q(x, t, c)
    assert 0 < (got - ref).square().mean().sqrt() < 0.2 * ref.std()
    (entry,) = read_lineage(tmp_path / "int8")
    assert entry["int8"].startswith("static")
    assert generate(load_run(tmp_path / "int8", device="cpu"), 2, steps=2, seed=0).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match="choose onnx, openvino, auto"):
        export_run(run, tmp_path / "x", fmt="tensorrt")


def test_openvino_runs_the_same_graph(exported, tmp_path):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    from effusion.models.exported import OpenVinoNetwork

    run, onnx_dir, _ = exported
    report = export_run(run, tmp_path / "ov", fmt="openvino", repeats=1)
    assert report["engine"] == "openvino" and report["max_abs_diff_fp32"] < 1e-4
    ov = load_run(tmp_path / "ov", device="cpu")
    assert isinstance(ov.model, OpenVinoNetwork)
    assert read_lineage(tmp_path / "ov")[-1]["engine"] == "openvino"
    a = generate(ov, 4, steps=3, seed=2).float()
    b = generate(load_run(onnx_dir, device="cpu"), 4, steps=3, seed=2).float()
    assert (a - b).abs().max() <= 1  # uint8 rounding at most


def test_openvino_int8_is_nncf_quantized_close_and_loads_as_a_run(exported, tmp_path):
    """OpenVINO int8 = NNCF post-training quantization (OpenVINO's own), written as an IR
    beside the fp32 ONNX graph; the run loads the IR and stays close to fp32."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    pytest.importorskip("nncf", reason="needs the openvino extra (nncf)")
    from effusion.models.exported import OpenVinoNetwork
    from effusion.runs.files import OPENVINO_INT8

    run, _, _ = exported
    out = tmp_path / "ov8"
    report = export_run(run, out, fmt="openvino", repeats=1, int8=True, calib_batches=2)
    assert report["int8"].startswith("NNCF") and (out / OPENVINO_INT8).is_file()
    assert (out / "model.onnx").is_file() and not list(out.glob("*.tmp"))
    eager = load_run(run, device="cpu").model
    fp32_weight_bytes = 4 * sum(p.numel() for p in eager.parameters())
    # int8 weights in the .bin (the .xml, the graph's text, dominates for a model this tiny)
    assert (out / OPENVINO_INT8).with_suffix(".bin").stat().st_size < 0.5 * fp32_weight_bytes
    (entry,) = read_lineage(out)
    assert entry["engine"] == "openvino" and entry["int8"].startswith("NNCF")
    loaded = load_run(out, device="cpu")
    assert isinstance(loaded.model, OpenVinoNetwork) and loaded.model.path.name == OPENVINO_INT8
    g = torch.Generator().manual_seed(4)
    x, t, c = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 50, (16,), generator=g), \
        torch.randint(0, 11, (16,), generator=g)
    with torch.no_grad():
        ref, got = eager(x, t, c), loaded.model(x, t, c)
    assert 0 < (got - ref).square().mean().sqrt() < 0.2 * ref.std()
    assert generate(loaded, 2, steps=2, seed=0).shape == (2, 1, 16, 16)


def test_fp16_graph_is_half_the_bytes_close_to_fp32_and_samples(exported, tmp_path):
    """--fp16: an fp16 graph behind fp32 inputs and output (for ONNX Runtime on CUDA or
    TensorRT); ONNX Runtime's CPU provider runs it too, which checks it here."""
    import onnx

    run, out, _ = exported
    report = export_run(run, tmp_path / "h", repeats=1, fp16=True)
    assert report["fp16"] is True and "engine_fp32" in report["latency_ms"]["1"]
    assert report["bytes"] < report["bytes_fp32_graph"]  # (the graph's text dominates here)
    assert not list((tmp_path / "h").glob("*.tmp"))
    graph = onnx.load(str(tmp_path / "h" / "model.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in graph.graph.input[:1]] == [onnx.TensorProto.FLOAT]
    eager, h = load_run(run, device="cpu").model, load_run(tmp_path / "h", device="cpu").model
    n_params = sum(p.numel() for p in eager.parameters())
    half_bytes = sum(len(i.raw_data) for i in graph.graph.initializer if i.data_type == f16)
    assert 0.9 * 2 * n_params <= half_bytes <= 2 * n_params  # (nearly) every weight in fp16
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 11, (16,), generator=g)
    t = torch.tensor([0, 1, 2, 3, 10, 20, 30, 40, 45, 46, 47, 48, 49, 49, 25, 5])
    with torch.no_grad():
        ref, got = eager(x, t, c), h(x, t, c)
    assert got.dtype == torch.float32
    # fp16 rounding only (the t embedding stays fp32): far below int8's error
    assert 0 < (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert read_lineage(tmp_path / "h")[-1]["fp16"] is True
    assert generate(load_run(tmp_path / "h", device="cpu"), 2, steps=2, seed=0).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match="choose one"):
        export_run(run, tmp_path / "y", fp16=True, int8=True)
    r = CliRunner().invoke(app, ["optimize", "export", "--run", str(run), "--out",
                                 str(tmp_path / "c"), "--fp16", "--int8"])
    assert r.exit_code != 0 and "choose one" in r.output  # the flag reaches export_run
    with pytest.raises(ConfigError, match="--format onnx --fp16"):
        export_run(run, tmp_path / "z", fmt="openvino", fp16=True)


# ------------------------------------------------------------------ --format auto

def test_auto_picks_the_fastest_engine_within_tolerance_from_given_timings(exported, tmp_path):
    """With the timings given, the choice is the fastest candidate within tolerance: a
    faster one over the tolerance loses; every candidate tried is in the report."""
    from effusion.optimize.export import choose_engine, export_auto

    run, _, _ = exported
    names = ["eager fp32", "eager bf16", "onnxruntime fp32", "onnxruntime int8",
             "openvino fp32", "openvino int8"]
    ms = {n: {"1": 5.0, "8": 5.0, "256": 100.0 - 10 * i} for i, n in enumerate(names)}
    ms["onnxruntime fp32"]["256"] = 1.0  # the fastest given
    out = tmp_path / "auto"
    r = export_auto(run, out, repeats=1, calib_batches=2, given_ms=ms)
    tried = {c["name"]: c for c in r["candidates"]}
    assert set(tried) == set(names)
    assert tried["eager fp32"]["error"] == 0.0 and r["timings"] == "given"
    assert r["chosen"] == "onnxruntime fp32"
    assert tried["onnxruntime fp32"]["error"] < 1e-5
    (entry,) = read_lineage(out)
    assert entry["pass"] == "export" and entry["engine"] == "onnxruntime" and entry["auto"]
    assert isinstance(load_run(out, device="cpu").model, OnnxNetwork)
    assert json_report(out)["chosen"] == "onnxruntime fp32"
    # a faster candidate over the tolerance is refused; eager fp32 always qualifies
    cands = [{"name": "a", "error": 0.0, "latency_ms": {"8": 9.0}},
             {"name": "b", "error": 0.3, "latency_ms": {"8": 1.0}},
             {"name": "c", "error": 0.01, "latency_ms": {"8": 4.0}},
             {"name": "d", "error": None, "skipped": "not installed"}]
    assert choose_engine(cands, 0.02, 8)["name"] == "c"
    assert choose_engine(cands, 0.5, 8)["name"] == "b"
    assert choose_engine(cands, 0.001, 8)["name"] == "a"


def json_report(out):
    import json
    return json.loads((out / "report.json").read_text())


def test_auto_can_choose_eager_and_writes_a_run_of_the_same_checkpoint(exported, tmp_path):
    from effusion.optimize.export import export_auto

    run, _, _ = exported
    ms = {n: {"1": 5.0, "8": 5.0, "256": 50.0} for n in
          ("eager bf16", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8")}
    ms["eager fp32"] = {"1": 1.0, "8": 1.0, "256": 1.0}
    out = tmp_path / "auto-eager"
    r = export_auto(run, out, repeats=1, calib_batches=2, given_ms=ms)
    assert r["chosen"] == "eager fp32"
    assert not (out / "model.onnx").exists() and not (out / ".candidates").exists()
    loaded = load_run(out, device="cpu")
    assert isinstance(loaded.model, torch.nn.Module) and loaded.precision.mode == "fp32"
    a = generate(load_run(run, device="cpu", precision="fp32"), 4, steps=3, seed=2)
    assert torch.equal(generate(loaded, 4, steps=3, seed=2), a)
    assert read_lineage(out)[-1]["engine"] == "torch"


def test_auto_measures_on_this_machine_and_refuses_flags_it_chooses_itself(exported, tmp_path):
    run, _, _ = exported
    r = CliRunner().invoke(app, ["optimize", "export", "--run", str(run), "--out",
                                 str(tmp_path / "m"), "--format", "auto", "--json"])
    assert r.exit_code == 0, r.output
    import json
    rep = json.loads(r.output)
    assert rep["timings"] == "measured"
    timed = [c for c in rep["candidates"] if c.get("error") is not None]
    assert len(timed) >= 3 and all(set(c["latency_ms"]) == {"1", "8", "256"} for c in timed)
    best = min((c for c in timed if c["within_tolerance"]), key=lambda c: c["latency_ms"]["256"])
    assert rep["chosen"] == best["name"]
    generate(load_run(tmp_path / "m", device="cpu"), 2, steps=2, seed=0)
    with pytest.raises(ConfigError, match="drop --int8"):
        export_run(run, tmp_path / "x", "auto", int8=True)
    with pytest.raises(ConfigError, match="auto"):
        export_run(run, tmp_path / "y", "tensorrt")
