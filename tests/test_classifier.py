"""The classifier recipe: accuracy targets, the shared loop, int8 quantization."""

from __future__ import annotations

import json

import pytest
import torch

from effusion.config import ConfigError
from effusion.data import load_source, split
from effusion.models import build_model
from effusion.recipes import classifier_config, train
from effusion.runs import load_classifier, read_metrics
from effusion.runs.files import CheckpointError


def held_out_accuracy(run) -> float:
    rows = [m for m in read_metrics(run) if "val_acc" in m]
    return rows[-1]["val_acc"]


def test_cnn_recipe_reaches_98_percent(feature_classifier):
    run = feature_classifier.run_dir
    assert held_out_accuracy(run) >= 0.98
    # One validation row per epoch, each with training and held-out loss and accuracy.
    rows = [m for m in read_metrics(run) if "val_acc" in m]
    assert len(rows) == 15 and all({"train_loss", "train_acc", "val_loss"} <= set(r) for r in rows)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    cfg = feature_classifier.config
    assert (cfg.model.arch, cfg.train.optimizer, cfg.train.lr_schedule) == ("cnn", "adam", "step")
    assert cfg.model.num_classes == 10  # filled in from the data and recorded in the run


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mlp") / "run"
    cfg = classifier_config(["model.arch=mlp", "model.dropout=0.1", "train.lr_schedule=cosine",
                             "train.epochs=50", "data.translate=0"])
    train(cfg, run, progress=False)
    return run


def test_mlp_recipe_reaches_95_percent(mlp_run):
    assert held_out_accuracy(mlp_run) >= 0.95
    model = load_classifier(mlp_run).model
    sizes = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [128, 64, 10]  # the classic 784-128-64-10
    assert model.body[1].in_features == 784


def test_quantized_mlp_keeps_accuracy_and_round_trips(mlp_run, tmp_path):
    from effusion.optimize.quantize import quantize_classifier, quantize_model

    out = tmp_path / "int8"
    r = quantize_classifier(mlp_run, out)
    assert abs(r["val_acc_int8"] - r["val_acc_fp32"]) <= 0.01
    assert r["bytes_int8"] < 0.3 * r["bytes_fp32"]  # int8 weights: about 4x smaller
    assert json.loads((out / "report.json").read_text()) == r
    loaded = load_classifier(out)
    assert loaded.quantized
    qlin = [m for m in loaded.model.modules() if type(m).__name__ == "Linear"
            and "quantized" in type(m).__module__]
    assert len(qlin) == 3 and all(m.weight().dtype == torch.qint8 for m in qlin)
    # The saved int8 model predicts exactly what the in-memory quantized model does.
    src = load_classifier(mlp_run)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    want = quantize_model(src.model)(x.float() / 127.5 - 1)
    got = loaded.model(x.float() / 127.5 - 1)
    assert torch.equal(want, got)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_classifier(out, tmp_path / "again")


def test_classifier_reuses_loop_switches_and_validates(tmp_path, make_cfg):
    cfg = classifier_config(["model.arch=cnn", "data.limit=200", "data.image_size=16",
                             "train.epochs=2", "train.optimizer=sgd", "train.lr=0.05",
                             "train.precision=fp32", "train.threads=1", "train.checkpoint_every=5"])
    res = train(cfg, tmp_path / "c", progress=False)
    assert res.step == 2 * -(-180 // 64)  # 2 epochs of the 180 training images, batch 64
    assert (tmp_path / "c" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="held-out split"):
        train(classifier_config(["data.val_fraction=0", "train.max_steps=1"]), tmp_path / "d",
              progress=False)


def test_classifier_needs_labels_and_classes(tmp_path):
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.zeros((20, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="needs labels"):
        train(classifier_config([f"data.source=npz:{tmp_path / 'x.npz'}", "data.image_size=8"]),
              tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        build_model(classifier_config(["model.num_classes=1", "data.image_size=28", "data.channels=1"]))


def test_load_classifier_rejects_a_diffusion_run(tmp_path, make_cfg):
    train(make_cfg("train.max_steps=1"), tmp_path / "unet", progress=False)
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(tmp_path / "unet")


def test_split_is_fixed_disjoint_and_shared(make_cfg):
    data = load_source(make_cfg().data)
    a_train, a_val = split(data, 0.25)
    b_train, b_val = split(data, 0.25)
    assert torch.equal(a_val.images, b_val.images) and len(a_val) == 16 and len(a_train) == 48
    both = torch.cat([a_train.images, a_val.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in both}) == len({tuple(r.tolist()) for r in data.images.flatten(1)})
    assert split(data, 0.0)[1] is None


def test_distillation_loss_is_soft_kl_plus_hard_ce(tmp_path, make_cfg):
    """alpha = 1 with the student as its own teacher: zero loss at any temperature;
    alpha = 0: exactly the cross-entropy; in between the T^2-scaled KL is added."""
    import torch.nn.functional as F

    from effusion.precision import Precision
    from effusion.recipes.classifier import ClassifierDistillTask
    from effusion.train.loop import TaskContext

    cfg = classifier_config(["model.arch=mlp", "data.limit=64", "train.device=cpu",
                             "data.image_size=28", "data.channels=1"])
    data = split(load_source(cfg.data), 0.25)
    student = build_model(cfg, num_classes=10).eval()
    teacher = build_model(cfg, num_classes=10).eval()
    ctx = TaskContext(cfg, tmp_path, Precision(torch.device("cpu"), "fp32"),
                      torch.contiguous_format, None, data[0], data[1])
    x = torch.randn(16, 1, 28, 28)
    y = torch.arange(16) % 10
    for T in (1.0, 4.0):
        assert ClassifierDistillTask(ctx, student, T, 1.0).loss(student, x, y, None).abs() < 1e-6
    ce = F.cross_entropy(student(x), y)
    assert torch.allclose(ClassifierDistillTask(ctx, teacher, 4.0, 0.0).loss(student, x, y, None), ce)
    kl = F.kl_div(F.log_softmax(student(x) / 4, 1), F.log_softmax(teacher(x) / 4, 1),
                  log_target=True, reduction="batchmean")
    mixed = ClassifierDistillTask(ctx, teacher, 4.0, 0.5).loss(student, x, y, None)
    assert torch.allclose(mixed, 0.5 * 16 * kl + 0.5 * ce, atol=1e-6)


def test_distilled_student_is_a_classifier_run_with_lineage(feature_classifier, tmp_path):
    from effusion.recipes.classifier import distill_classifier
    from effusion.runs import read_lineage

    out = tmp_path / "student"
    distill_classifier(feature_classifier.run_dir, out, arch="mlp", temperature=4.0, progress=False,
                       overrides=["train.epochs=3"])
    student = load_classifier(out)
    assert student.config.model.arch == "mlp"
    assert held_out_accuracy(out) > 0.8
    (entry,) = read_lineage(out)
    assert entry["pass"] == "distill-classifier" and entry["teacher_arch"] == "cnn"
    with pytest.raises(ConfigError, match="--temperature"):
        distill_classifier(feature_classifier.run_dir, tmp_path / "x", temperature=0)
    with pytest.raises(ConfigError, match="--alpha"):
        distill_classifier(feature_classifier.run_dir, tmp_path / "x", alpha=1.5)
