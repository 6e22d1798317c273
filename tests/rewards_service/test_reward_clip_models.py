"""Aesthetic and CLIP-similarity rewards on a tiny random CLIP loaded from a local dir."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from reward_fixtures import (clip_image_features, clip_text_features, head_reference,
                             public_laion_head_state)
from nablagfn.common.config import RewardConfig
from nablagfn.rewards_service.rewards import (AestheticReward, ClipScoreReward, LaionAestheticHead,
                                              RewardError, build_reward, clip_preprocess,
                                              load_laion_head)

PROJ = 16  # projection dim of the tiny CLIP


@pytest.fixture(scope="module")
def head_sd():
    return public_laion_head_state(PROJ)


@pytest.fixture(scope="module")
def head_pth(tmp_path_factory, head_sd):
    p = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_sd, p)
    return p


@pytest.mark.parametrize("layout", ["plain_pth", "safetensors", "lightning", "mlp_prefix"])
def test_laion_head_key_mapping(tmp_path, head_sd, layout):
    if layout == "plain_pth":
        p = tmp_path / "head.pth"
        torch.save(head_sd, p)
    elif layout == "safetensors":
        p = tmp_path / "head.safetensors"
        save_file(head_sd, str(p))
    elif layout == "lightning":
        p = tmp_path / "head.ckpt"
        torch.save({"state_dict": head_sd, "epoch": 3}, p)
    else:
        p = tmp_path / "head.pth"
        torch.save({f"mlp.{k}": v for k, v in head_sd.items()}, p)
    head = load_laion_head(p)
    assert head.in_dim == PROJ
    x = torch.randn(5, PROJ)
    # float32 head vs float64 explicit matmuls: 5 layers of O(1) values, rounding ~1e-6;
    # 1e-4 leaves margin.
    torch.testing.assert_close(head.eval()(x).double(), head_reference(head_sd, x),
                               atol=1e-4, rtol=1e-4)


def test_laion_head_wrong_layout(tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 4)}, p)
    with pytest.raises(RewardError, match="layers.0.weight"):
        load_laion_head(p)
    sd = public_laion_head_state(PROJ)
    del sd["layers.7.bias"]
    torch.save(sd, p)
    with pytest.raises(RewardError, match="missing"):
        load_laion_head(p)


def test_aesthetic_from_local_dir_matches_reference(clip_dir, head_pth, head_sd,
                                                    clip_and_tokenizer):
    reward = build_reward(RewardConfig(name="aesthetic", model_path=str(clip_dir),
                                       weights_path=str(head_pth)))
    assert isinstance(reward, AestheticReward) and not reward.training
    assert reward.image_size == 32 and not reward.needs_prompts
    clip, _ = clip_and_tokenizer
    images = torch.rand(3, 3, 48, 40)
    with torch.no_grad():
        e = clip_image_features(clip, clip_preprocess(images, 32))
        e = e / e.norm(dim=-1, keepdim=True)
        ref = head_reference(head_sd, e)
        got = reward(images, None)
    assert got.shape == (3,) and got.dtype == torch.float32
    # same float32 network, loaded vs in memory, plus a float64 head: rounding only; 1e-4 margin.
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_aesthetic_gradient_directional_fd(clip_and_tokenizer, head_sd):
    clip = copy.deepcopy(clip_and_tokenizer[0])  # .double() below must not touch the shared one
    head = LaionAestheticHead(PROJ)
    head.load_state_dict(head_sd)
    reward = AestheticReward(clip, head).double()  # the constructor accepts built modules
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(reward(x, None).sum(), x)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    v = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        fd = (reward(x + eps * v, None).sum() - reward(x - eps * v, None).sum()) / (2 * eps)
    # float64 central difference: truncation O(eps^2) ~1e-12, rounding ~1e-16/eps ~1e-10;
    # relative 1e-6 is far above both and far below any wrong-gradient error.
    torch.testing.assert_close((g * v).sum(), fd, rtol=1e-6, atol=1e-9)


def test_aesthetic_dim_mismatch(clip_and_tokenizer):
    with pytest.raises(RewardError, match="projection dim 16 != head input dim 768"):
        AestheticReward(clip_and_tokenizer[0], LaionAestheticHead(768))


def test_aesthetic_missing_files(clip_dir, head_pth, tmp_path):
    missing = tmp_path / "nope" / "head.pth"
    with pytest.raises(RewardError, match=f"file not found: {missing}"):
        build_reward(RewardConfig(name="aesthetic", model_path=str(clip_dir),
                                  weights_path=str(missing)))
    with pytest.raises(RewardError, match="set reward.weights_path"):
        build_reward(RewardConfig(name="aesthetic", model_path=str(clip_dir)))
    with pytest.raises(RewardError, match="no config.json"):
        build_reward(RewardConfig(name="aesthetic", model_path=str(tmp_path),
                                  weights_path=str(head_pth)))
    with pytest.raises(RewardError, match="set reward.model_path"):
        build_reward(RewardConfig(name="aesthetic", weights_path=str(head_pth)))


def test_clip_score_matches_reference_and_is_differentiable(clip_dir, clip_and_tokenizer):
    reward = build_reward(RewardConfig(name="clip_score", model_path=str(clip_dir),
                                       kwargs={"scale": 2.5}))
    assert isinstance(reward, ClipScoreReward) and reward.needs_prompts
    clip, tok = clip_and_tokenizer
    prompts = ["a cat", "a dog", "a cat"]
    images = torch.rand(3, 3, 32, 36, requires_grad=True)
    got = reward(images, prompts)
    with torch.no_grad():
        i = clip_image_features(clip, clip_preprocess(images, 32))
        t_in = tok(prompts, padding="max_length", max_length=16, truncation=True,
                   return_tensors="pt")
        t = clip_text_features(clip, t_in["input_ids"], t_in["attention_mask"])
        ref = 2.5 * torch.nn.functional.cosine_similarity(i, t, dim=-1)
    # float32, same network: rounding only (~1e-6 on values O(1)); 1e-5 margin.
    torch.testing.assert_close(got.detach(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), images)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    assert set(reward._cache) == {"a cat", "a dog"}  # text features cached per string
    with pytest.raises(RewardError, match="one prompt per image"):
        reward(images, ["a cat"])
