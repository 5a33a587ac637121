"""The U-Net: shapes for any size, zero-initialised output, conditioning, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._python_dispatch

from effusion.config import ModelConfig
from effusion.models import UNet, build_model, count_params
from effusion.models.layers import Attention, ResBlock


def tiny(**kw) -> ModelConfig:
    base = dict(channels=8, channel_mult=(1, 2), attention_resolutions=(), norm_groups=4,
                head_channels=8, num_res_blocks=1, num_classes=0)
    base.update(kw)
    return ModelConfig(**base)


def perturb_zero_inits(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output convs random weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0 and p.ndim >= 1 and "norm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("size", [16, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input_and_starts_at_zero(size, channels):
    torch.manual_seed(0)
    attn = (size // 2,) if size != 64 else ()  # attention at the lower level where cheap
    model = UNet(tiny(attention_resolutions=attn), in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 999])
    out = model(x, t)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # conv_out is zero-initialised: predicts exactly 0
    perturb_zero_inits(model)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_odd_sizes_round_trip_through_three_levels():
    model = UNet(tiny(channel_mult=(1, 2, 2), attention_resolutions=(7,)), 1, 28)
    perturb_zero_inits(model)
    x = torch.randn(1, 1, 28, 28)
    assert model(x, torch.tensor([5])).shape == (1, 1, 28, 28)  # 28 -> 14 -> 7 and back


def test_attention_sits_at_the_configured_resolutions_in_encoder_and_decoder():
    """Every feature map whose size is in attention_resolutions gets attention, on both paths.

    With four levels, 28 -> 14 -> 7 -> 4 going down, the decoder's feature maps are
    4 -> 7 -> 14 -> 28 again (upsampling restores the skip's exact size), so 7x7 maps
    must get attention in the decoder too.
    """
    model = UNet(tiny(channel_mult=(1, 1, 1, 1), attention_resolutions=(7,)), 1, 28)
    sizes: dict[str, list[int]] = {"down": [], "up": [], "mid": []}
    for part in sizes:
        for m in getattr(model, part).modules():
            if isinstance(m, Attention):
                m.register_forward_hook(
                    lambda mod, inp, out, part=part: sizes[part].append(inp[0].shape[-1]))
    model(torch.randn(1, 1, 28, 28), torch.tensor([1]))
    assert sizes["down"] and set(sizes["down"]) == {7}
    assert set(sizes["up"]) == {7}, f"decoder attention ran at sizes {sizes['up']}"


def test_timestep_changes_the_output():
    torch.manual_seed(0)
    model = UNet(tiny(), 1, 16)
    perturb_zero_inits(model)
    x = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1])


def test_class_conditional_model():
    torch.manual_seed(0)
    model = UNet(tiny(num_classes=10), 1, 16).eval()
    assert model.class_emb.num_embeddings == 11  # 10 classes + the null class
    x = torch.randn(1, 1, 16, 16).expand(3, -1, -1, -1)
    t = torch.full((3,), 100)
    assert model(x, t, torch.tensor([0, 1, 2])).shape == x.shape
    assert model(x, t, None).shape == x.shape
    perturb_zero_inits(model)
    out = model(x, t, torch.tensor([0, 1, 10]))
    assert not torch.allclose(out[0], out[1])  # different labels -> different predictions
    # cond=None is the null class, index num_classes
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.full((3,), 10)))
    torch.testing.assert_close(out[2], model(x[:1], t[:1], None)[0])


def test_labels_without_class_embedding_raise():
    model = UNet(tiny(), 1, 16)
    with pytest.raises(ValueError, match="no class embedding"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_grad_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    cfg = tiny(channel_mult=(1, 2), attention_resolutions=(8,), dropout=0.1, num_classes=3)
    ref = UNet(cfg, 1, 16).train()
    perturb_zero_inits(ref)
    ckp = copy.deepcopy(ref)
    ckp.grad_checkpointing = mode
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.tensor([0, 1, 2, 3])
    tgt = torch.randn(4, 1, 16, 16, generator=g)

    outs, grads = [], []
    for model in (ref, ckp):
        torch.manual_seed(123)  # same dropout masks in both runs (recompute restores the RNG)
        out = model(x, t, y)
        ((out - tgt) ** 2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    nonzero = 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
        nonzero += int(grads[0][n].abs().sum() > 0)
    assert nonzero > len(grads[0]) // 2  # the comparison is not vacuous


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _block_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, (ResBlock, Attention)):
            # pre-hooks: recomputation stops early, once all it needs is back, so a block's
            # forward may not reach its end (where a forward hook would fire)
            m.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("mode,recomputed_convs", [("none", False), ("blocks", False),
                                                    ("all", True)])
def test_checkpointed_blocks_really_recompute_in_backward(mode, recomputed_convs):
    model = UNet(tiny(attention_resolutions=(8,)), 1, 16).train()
    model.grad_checkpointing = mode
    calls = _block_calls(model)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    out = model(x, t)
    n_forward = len(calls)
    assert n_forward > 4
    counter = _OpCounter()
    with counter:
        out.sum().backward()
    # Checkpointed: every residual and attention block runs its forward again in backward
    # (blocks: only the cheap ops execute, the saved conv/attention outputs are reused).
    assert len(calls) == (n_forward if mode == "none" else 2 * n_forward)
    assert (counter.counts.get("convolution", 0) > 0) == recomputed_convs
    assert counter.counts.get("convolution_backward", 0) > 0
    if mode == "blocks":  # norms and activations are recomputed
        assert counter.counts.get("native_group_norm", 0) > 0


def test_no_checkpointing_without_grad_or_in_eval():
    model = UNet(tiny(), 1, 16)
    model.grad_checkpointing = "all"
    calls = _block_calls(model)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
    with torch.no_grad():
        model.train()(x, t)
    n = len(calls)
    model.eval()(x, t).sum().backward()
    assert len(calls) == 2 * n  # eval mode: plain forward, nothing re-run


def test_checkpointing_lowers_peak_activation_memory():
    from effusion.train.memory import measure_step_memory

    cfg = tiny(channels=16, channel_mult=(1, 2), attention_resolutions=(8,))
    found = {}
    for mode in ("none", "blocks", "all"):
        torch.manual_seed(0)
        model = UNet(cfg, 1, 16).train()
        model.grad_checkpointing = mode
        opt = torch.optim.AdamW(model.parameters())
        x, t = torch.randn(32, 1, 16, 16), torch.randint(0, 1000, (32,))

        def step():
            model(x, t).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        found[mode] = measure_step_memory(step, model, opt)
    assert {m.method for m in found.values()} == {"tensors"}
    act = {k: v.activations_mb for k, v in found.items()}
    assert act["all"] < 0.6 * act["none"], act
    assert act["all"] < act["blocks"] < act["none"], act
    assert found["all"].weights_mb == pytest.approx(found["none"].weights_mb)
    assert found["none"].optimizer_mb == pytest.approx(2 * found["none"].weights_mb, rel=0.01)


def test_build_model_follows_config(make_cfg):
    cfg = make_cfg("data.channels=3", "data.image_size=20")
    model = build_model(cfg)
    assert isinstance(model, UNet)
    assert model.in_channels == 3 and model.image_size == 20
    assert model.conv_in.in_channels == 3 and model.conv_out.out_channels == 3
    wider = build_model(make_cfg("model.channels=16"))
    assert count_params(wider) > count_params(build_model(make_cfg()))
    assert count_params(model) == sum(p.numel() for p in model.parameters())
