"""Configuration: defaults, YAML presets, `--set` overrides and their error messages."""

from __future__ import annotations

import dataclasses

import pytest

from effusion.config import (Config, ConfigError, config_from_dict, load_config,
                             parse_overrides)

from conftest import REPO_ROOT


def test_defaults_equal_configs_mnist_yaml():
    path = REPO_ROOT / "configs" / "mnist.yaml"
    assert load_config(path) == Config()
    # and the file spells out every key, not just a subset
    import yaml

    data = yaml.safe_load(path.read_text())
    assert {s: set(v) for s, v in data.items()} == {s: set(v) for s, v in Config().to_dict().items()}


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section 'optim'") as e:
        config_from_dict({"optim": {"lr": 1.0}})
    assert "data, model, diffusion, train, sample" in str(e.value)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.learning_rate=0.1"])
    msg = str(e.value)
    assert "unknown config key train.learning_rate" in msg
    for key in ("batch_size", "lr", "max_steps", "precision"):
        assert key in msg


def test_bad_literal_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["diffusion.prediction=score"])
    msg = str(e.value)
    assert "diffusion.prediction" in msg and "'score'" in msg
    for choice in ("'eps'", "'v'", "'x0'"):
        assert choice in msg
    with pytest.raises(ConfigError, match="'ddim', 'ddpm', 'dpmpp_2m'"):
        load_config(None, ["sample.sampler=euler"])


@pytest.mark.parametrize("item,fragment", [
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=2.5", "expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.ema_warmup=maybe", "expected true or false"),
    ("train.ema_warmup=1", "expected true or false"),
    ("model.channel_mult=wide", "expected a list of integers"),
    ("model.channel_mult=[1,x]", "expected an integer"),
    ("train.batch_size=true", "expected an integer"),
])
def test_wrong_types(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [item])


def test_literal_int_choice_keeps_its_type():
    """data.channels is Literal[1, 3]; 3.0 or `true` must not sneak through as a float/bool."""
    cfg = load_config(None, ["data.channels=3"])
    assert cfg.data.channels == 3 and type(cfg.data.channels) is int
    for bad in ("data.channels=true", "data.channels=3.0"):
        try:
            cfg = load_config(None, [bad])
        except ConfigError:
            continue
        assert type(cfg.data.channels) is int, (
            f"{bad!r} gave data.channels={cfg.data.channels!r} ({type(cfg.data.channels).__name__})")


def test_set_parsing_values():
    cfg = load_config(None, ["train.lr=3e-4", "model.channel_mult=[1,2]", "train.max_steps=10",
                             "train.ema_warmup=false", "data.source=digits",
                             "model.attention_resolutions=[]", "train.max_minutes=0"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == (1, 2)
    assert cfg.model.attention_resolutions == ()
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.ema_warmup is False
    assert cfg.data.source == "digits"
    assert cfg.train.max_minutes == 0.0 and isinstance(cfg.train.max_minutes, float)
    # a single int is accepted for a list, an int for a float
    cfg = load_config(None, ["model.channel_mult=4", "train.lr=1"])
    assert cfg.model.channel_mult == (4,) and cfg.train.lr == 1.0
    assert parse_overrides(["train.lr=3e-4", "a.b=x=y"]) == {"train": {"lr": 3e-4}, "a": {"b": "x=y"}}


def test_later_overrides_win_and_untouched_values_stay_default():
    cfg = load_config(None, ["train.lr=1e-3", "train.lr=5e-4"])
    assert cfg.train.lr == 5e-4
    assert cfg.train.batch_size == Config().train.batch_size
    assert cfg.model == Config().model


@pytest.mark.parametrize("item,fragment", [
    ("foo", "--set expects key=value, got 'foo'"),
    ("lr=3", "section.key"),
    ("a.b.c=3", "section.key"),
])
def test_malformed_set(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [item])


@pytest.mark.parametrize("item,fragment", [
    ("data.image_size=4", "image_size must be >= 8"),
    ("model.channels=10", "multiple of model.norm_groups"),
    ("train.lr=0", "train.lr must be > 0"),
    ("diffusion.timesteps=1", "timesteps must be >= 2"),
    ("data.source=imagenet", "choose mnist5k, digits, shapes"),
    ("train.device=tpu", "choose auto, cpu, cuda or cuda:N"),
    ("model.dropout=1.0", "dropout must be in"),
])
def test_range_validation(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [item])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_bad_yaml_files(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(p)
    p.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-3\n  batch_size: 16\nmodel:\n  channel_mult: [1, 2, 4]\n"
                 "sample:\n")
    cfg = load_config(p, ["train.batch_size=32"])
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 32
    assert cfg.model.channel_mult == (1, 2, 4)


def test_to_yaml_round_trip(tmp_path, tiny_cfg):
    for cfg in (Config(), tiny_cfg, load_config(None, ["diffusion.schedule=sigmoid",
                                                       "data.source=npz:/x/y.npz",
                                                       "model.num_classes=10"])):
        p = tmp_path / "rt.yaml"
        p.write_text(cfg.to_yaml())
        back = load_config(p)
        assert back == cfg
        assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_config_from_dict_does_not_mutate_base():
    base = Config()
    new = config_from_dict({"train": {"lr": 0.5}}, base)
    assert new.train.lr == 0.5 and base.train.lr == Config().train.lr
