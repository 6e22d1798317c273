"""Reward lookup: built-in names, entry points, dotted paths, errors; RewardConfig validation."""
import textwrap

import pytest
import torch

from nablagfn.common.config import RewardConfig
from nablagfn.common.config_io import ConfigError, from_dict
from nablagfn.rewards_service.rewards import (BrightnessReward, ColorReward, RewardError,
                                              build_reward, known_rewards)

BUILTINS = {"brightness", "color", "aesthetic", "clip_score", "hpsv2", "image_reward"}


def test_builtin_names_are_known():
    assert BUILTINS <= set(known_rewards())


def test_builtin_with_kwargs():
    r = build_reward(RewardConfig(name="color", kwargs={"target": [0.5, 0.5, 0.5], "s": 0.1}))
    assert isinstance(r, ColorReward) and not r.training
    assert torch.allclose(r.target, torch.tensor([0.5, 0.5, 0.5])) and r.s == 0.1


def test_unknown_kwarg_is_named():
    with pytest.raises(RewardError, match=r"unknown kwargs \['bogus'\].*accepted: \['scale'\]"):
        build_reward(RewardConfig(name="brightness", kwargs={"bogus": 1}))


def test_unknown_name_lists_known_names():
    with pytest.raises(RewardError) as err:
        build_reward(RewardConfig(name="no_such_reward"))
    msg = str(err.value)
    assert "no_such_reward" in msg and all(name in msg for name in BUILTINS)


def test_dotted_path_to_class_and_factory(tmp_path, monkeypatch):
    r = build_reward(RewardConfig(name="nablagfn.rewards_service.rewards.analytic:BrightnessReward",
                                  kwargs={"scale": 2.0}))
    assert isinstance(r, BrightnessReward) and r.scale == 2.0
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        def make(cfg, device):
            def reward(images, prompts):
                return -images.mean(dim=(1, 2, 3)) * cfg.kwargs["k"]
            return reward
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    f = build_reward(RewardConfig(name="my_rewards_mod:make", kwargs={"k": 3.0}))
    x = torch.full((2, 3, 4, 4), 0.5)
    assert torch.equal(f(x, None), torch.full((2,), -1.5))


@pytest.mark.parametrize("name,match", [("no_such_mod_xyz:f", "cannot import module"),
                                        ("nablagfn.rewards_service.rewards.analytic:nope",
                                         "has no attribute"),
                                        (":f", "must look like")])
def test_bad_dotted_paths(name, match):
    with pytest.raises(RewardError, match=match):
        build_reward(RewardConfig(name=name))


def test_entry_point(tmp_path, monkeypatch):
    """A real installed-distribution entry point (a dist-info folder on sys.path)."""
    (tmp_path / "plug_rewards_mod.py").write_text(textwrap.dedent("""
        from nablagfn.rewards_service.rewards import BrightnessReward
        def make(cfg, device):
            return BrightnessReward(scale=-1.0)
    """))
    info = tmp_path / "plug_rewards-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-rewards\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[nablagfn.rewards]\nplugged = plug_rewards_mod:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged" in known_rewards()
    r = build_reward(RewardConfig(name="plugged"))
    assert isinstance(r, BrightnessReward) and r.scale == -1.0


def test_reward_config_validation():
    cfg = from_dict(RewardConfig, {"name": "aesthetic", "model_path": "/m", "chunk_size": 2})
    assert cfg.model_path == "/m" and cfg.chunk_size == 2
    with pytest.raises(ConfigError, match="chunk_size"):
        from_dict(RewardConfig, {"chunk_size": 0})
