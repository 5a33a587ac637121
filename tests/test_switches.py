"""The training-efficiency switches each do what they claim; `effusion bench train` works."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

from effusion.bench import bench_train, markdown, write
from effusion.config import ConfigError
from effusion.data import BatchLoader, BatchStream, load_source
from effusion.diffusion import schedule_for
from effusion.models import build_model
from effusion.precision import Precision, bf16_supported
from effusion.recipes import train
from effusion.runs import read_metrics
from effusion.train.objective import diffusion_loss
from effusion.train.optim import build_optimizer, optimizer_state_bytes
from effusion.train.switches import CompiledWithFallback, apply_switches


def _record_dtypes(model: nn.Module, kinds: tuple[type, ...]) -> dict[str, set]:
    seen: dict[str, set] = {}
    for m in model.modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda mod, i, o: seen.setdefault(type(mod).__name__, set()).add(o.dtype))
    return seen


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_autocast_really_runs_convolutions_in_bf16_and_the_loss_in_fp32(make_cfg):
    cfg = make_cfg("model.attention_resolutions=[8]")
    model = build_model(cfg)
    seen = _record_dtypes(model, (nn.Conv2d, nn.Linear, nn.GroupNorm))
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(model, x0, None, cfg.diffusion, schedule_for(cfg), g,
                          Precision(torch.device("cpu"), "bf16"))
    assert seen["Conv2d"] == {torch.bfloat16} and seen["Linear"] == {torch.bfloat16}
    assert seen["GroupNorm"] == {torch.bfloat16}  # CPU autocast keeps the input dtype...
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)

    seen.clear()
    diffusion_loss(model, x0, None, cfg.diffusion, schedule_for(cfg), g,
                   Precision(torch.device("cpu"), "fp32"))
    assert seen["Conv2d"] == {torch.float32}


def test_bf16_group_norm_statistics_are_accumulated_in_fp32():
    """...but the kernel accumulates mean and variance in fp32: on data with a large mean,
    where bf16 statistics lose the variance to cancellation, the result matches the fp32
    computation to bf16 output rounding."""
    torch.manual_seed(0)
    x = (torch.randn(4, 64, 32, 32) * 0.5 + 100).bfloat16()
    ref = nn.functional.group_norm(x.float(), 8)
    out = nn.functional.group_norm(x, 8)
    assert (out.float() - ref).abs().max() < 0.02
    g = x.view(4, 8, -1)  # the same normalisation with bf16 statistics is visibly worse
    mean = g.mean(-1, keepdim=True)
    naive = ((g - mean) / ((g - mean).square().mean(-1, keepdim=True) + 1e-5).sqrt()).view_as(x)
    assert (naive.float() - ref).abs().max() > 2 * (out.float() - ref).abs().max()


def _big_model():
    return nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 8))  # 32k + 2k weights


def test_adamw8bit_state_really_is_8_bit_and_about_a_quarter_of_the_bytes(make_cfg):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model, ref = _big_model(), _big_model()
    ref.load_state_dict(model.state_dict())
    opts = [build_optimizer(m, make_cfg(f"train.optimizer={name}").train)
            for m, name in ((model, "adamw8bit"), (ref, "adamw"))]
    x = torch.randn(64, 128)
    for m, opt in zip((model, ref), opts):
        for _ in range(3):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    big = opts[0].state[model[0].weight]
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8
    assert big["state1"].shape == model[0].weight.shape
    # 8 bits per moment instead of 32, plus per-block scales and two 256-entry code books;
    # small tensors (< 4096 elements) keep fp32 moments
    assert optimizer_state_bytes(opts[0]) < 0.35 * optimizer_state_bytes(opts[1])
    # and it is still AdamW: the weights moved the same way
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=3e-3)


def test_adamw8bit_without_bitsandbytes_says_how_to_install(make_cfg, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match=r"pip install 'effusion\[8bit\]'"):
        build_optimizer(_big_model(), make_cfg("train.optimizer=adamw8bit").train)


def test_channels_last_really_changes_the_memory_format(make_cfg):
    model = build_model(make_cfg())
    _, fmt, _ = apply_switches(model, make_cfg("train.channels_last=true").train)
    assert fmt == torch.channels_last
    w = model.down[0][0].conv1.weight  # 8 -> 8 channels (with one channel both formats agree)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    seen = []
    model.down[0][0].conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    cfg = make_cfg()
    diffusion_loss(model, torch.zeros(2, 1, 16, 16), None, cfg.diffusion, schedule_for(cfg),
                   torch.Generator().manual_seed(0), Precision(torch.device("cpu"), "fp32"), fmt)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)

    plain = build_model(make_cfg())
    apply_switches(plain, make_cfg().train)
    assert plain.down[0][0].conv1.weight.is_contiguous()


def test_grad_checkpointing_switch_reaches_the_unet_and_refuses_classifiers(make_cfg):
    model = build_model(make_cfg())
    _, _, notes = apply_switches(model, make_cfg("train.grad_checkpointing=all").train)
    assert model.grad_checkpointing == "all" and any("checkpointing" in n for n in notes)
    clf = build_model(make_cfg("model.arch=mlp", "model.num_classes=10"))
    with pytest.raises(ConfigError, match="only implemented for the U-Net"):
        apply_switches(clf, make_cfg("train.grad_checkpointing=blocks").train)


def test_compile_falls_back_to_eager_when_compiling_fails(monkeypatch):
    model = nn.Linear(3, 2)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda m, **k: broken)
    net = CompiledWithFallback(model)
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eager"):
        out = net(x)
    torch.testing.assert_close(out, model(x))
    assert net.compile_s is None and "no C++ compiler" in net.error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then quietly eager
        torch.testing.assert_close(net(x), model(x))


def test_compile_times_the_first_call_and_then_uses_the_compiled_model(monkeypatch):
    calls = []
    model = nn.Linear(3, 2)
    monkeypatch.setattr(torch, "compile", lambda m, **k: (lambda *a: calls.append(1) or m(*a)))
    net = CompiledWithFallback(model)
    x = torch.randn(4, 3)
    net(x)
    net(x)
    assert len(calls) == 2 and net.compile_s is not None and net.error is None


@pytest.mark.parametrize("workers", [1, 3])
def test_loader_workers_give_the_same_batches_as_the_main_thread(make_cfg, workers):
    cfg = make_cfg("data.translate=2", "data.hflip=true", "data.rotate=10")
    data = load_source(cfg.data)
    ref = BatchLoader(BatchStream(data, 8, seed=3), cfg.data, seed=3)
    par = BatchLoader(BatchStream(data, 8, seed=3), cfg.data, seed=3, workers=workers, prefetch=2)
    try:
        for i in range(12):  # spans epochs (64 images, batches of 8)
            (a, la), (b, lb) = ref.next(), par.next()
            assert torch.equal(a, b) and torch.equal(la, lb), i
            # the resumable position is that of the batches handed out, not prefetched ones
            assert par.state_dict() == ref.state_dict()
        state = par.state_dict()
        resumed = BatchLoader(BatchStream(data, 8, seed=3), cfg.data, seed=3, workers=workers)
        resumed.load_state_dict(state)
        for _ in range(3):
            assert torch.equal(resumed.next()[0], ref.next()[0])
        resumed.close()
    finally:
        par.close()
    assert a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1


def test_pinned_batches_when_asked(make_cfg):
    if not torch.cuda.is_available():
        pytest.skip("pinning needs a CUDA device")
    cfg = make_cfg()
    loader = BatchLoader(BatchStream(load_source(cfg.data), 8, 0), cfg.data, 0, pin=True)
    assert loader.next()[0].is_pinned()


def test_training_still_lowers_the_loss_with_every_switch_on(run_dir, make_cfg):
    switches = ["train.grad_checkpointing=all", "train.grad_accum=2", "train.workers=1",
                "train.channels_last=true", "train.max_steps=40", "train.lr=3e-3",
                "train.warmup_steps=5", "data.limit=256"]
    if bf16_supported(torch.device("cpu")):
        switches.append("train.precision=bf16")
    try:
        import bitsandbytes  # noqa: F401

        switches.append("train.optimizer=adamw8bit")
    except ImportError:
        pass
    res = train(make_cfg(*switches), run_dir, progress=False)
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert res.step == 40 and len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    assert res.images_seen == 40 * 2 * 8


# ------------------------------------------------------------------ effusion bench train

def test_bench_train_measures_each_variant_in_its_own_process(tmp_path, tiny_overrides):
    pytest.importorskip("matplotlib")
    res = bench_train(steps=3, warmup=1, only=["ckpt_all", "grad_accum", "fp16"],
                      overrides=tiny_overrides + ["train.batch_size=16"], progress=False)
    rows = {r["key"]: r for r in res.rows}
    assert list(rows) == ["fp32", "fp16", "ckpt_all", "grad_accum"]  # no "fastest": not asked
    assert "CUDA" in rows["fp16"]["skipped"] or torch.cuda.is_available()
    base, ck, acc = rows["fp32"], rows["ckpt_all"], rows["grad_accum"]
    for r in (base, ck, acc):
        assert r["images_per_s"] > 0 and r["memory"]["method"] == "tensors"
        assert r["memory"]["weights_mb"] == pytest.approx(base["memory"]["weights_mb"])
    # checkpointing stores fewer activations; it computes the same function, so after the
    # same steps from the same seed the model (and its held-out loss) is the same
    assert ck["activations_saved"] > 0.2
    assert ck["quality_kept"] == pytest.approx(1.0, abs=1e-4)
    # two half batches: half the activations; gradients alive across micro-batches
    assert acc["activations_saved"] > 0.2 and acc["overrides"] == ["train.batch_size=8", "train.grad_accum=2"]
    assert base["speedup"] == 1.0 and base["quality_kept"] == 1.0

    paths = write(res, tmp_path / "out")
    table = paths["markdown"].read_text()
    assert "| technique | memory saved (peak) | speed | quality kept |" in table
    assert "grad checkpointing: all" in table and "CUDA" in table
    data = json.loads(paths["json"].read_text())
    assert [r["key"] for r in data["rows"]] == list(rows)
    assert paths["png"].stat().st_size > 1000
    assert markdown(res) + "\n" == table


def test_bench_train_rejects_bad_requests(tiny_overrides):
    with pytest.raises(ConfigError, match="--only: unknown warp; choose from"):
        bench_train(only=["warp"], overrides=tiny_overrides)
    with pytest.raises(ConfigError, match="--steps .* larger than --warmup"):
        bench_train(steps=3, warmup=3, overrides=tiny_overrides)
    with pytest.raises(ConfigError, match="measures the diffusion U-Net"):
        bench_train(overrides=tiny_overrides + ["model.arch=cnn"])
    with pytest.raises(ConfigError, match="unknown config key train.warp"):
        bench_train(overrides=["train.warp=1"])
