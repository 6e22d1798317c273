"""HPSv2 and ImageReward adapters up to the package boundary.

Neither package can run here (STACK.md): the scoring formulas, preprocessing and glue are tested on
small stand-ins that have the packages' model interfaces (open_clip's `model(image, text)` dict;
ImageReward's BLIP `tokenizer` / `visual_encoder` / `text_encoder`), built from real torch/
transformers modules; the package route itself is tested only for its clear error.
"""
import copy
import sys

import pytest
import torch
from torch import nn

from reward_fixtures import (clip_image_features, clip_text_features, head_reference,
                             public_laion_head_state)
from nablagfn.common.config import RewardConfig
from nablagfn.rewards_service.rewards import (HPSv2Reward, ImageRewardModel,
                                              RewardError, build_reward, clip_preprocess, hps_score,
                                              load_image_reward_head)
from nablagfn.rewards_service.rewards.hpsv2_adapter import import_hpsv2_open_clip
from nablagfn.rewards_service.rewards.image_reward_adapter import (IMAGE_REWARD_MEAN,
                                                                   IMAGE_REWARD_STD)


# ---------------------------------------------------------------- HPSv2
class OpenClipStandIn(nn.Module):
    """open_clip's CLIP interface (output_dict=True, normalised features) over a tiny CLIPModel."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.visual = nn.Module()
        self.visual.image_size = (32, 32)
        self.visual.image_mean, self.visual.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, image, text):
        i = clip_image_features(self.clip, image)
        t = clip_text_features(self.clip, text, None)
        return {"image_features": i / i.norm(dim=-1, keepdim=True),
                "text_features": t / t.norm(dim=-1, keepdim=True),
                "logit_scale": torch.tensor(100.0)}


def test_hps_score_formula():
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    # the public formula diag(img @ txt.T); float64, rounding only: default float64 tolerance.
    torch.testing.assert_close(hps_score(a, b), torch.diagonal(an @ bn.T))
    torch.testing.assert_close(hps_score(an, bn), hps_score(3 * an, 0.5 * bn))  # scale-free


def test_hpsv2_reward_on_stand_in(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    model = OpenClipStandIn(copy.deepcopy(clip))

    def tokenizer(prompts):  # open_clip tokenizers: list[str] -> LongTensor (B, context)
        return tok(prompts, padding="max_length", max_length=16, truncation=True,
                   return_tensors="pt")["input_ids"]

    reward = HPSv2Reward(model, tokenizer)
    assert reward.image_size == 32 and reward.mean == (0.5, 0.5, 0.5) and reward.needs_prompts
    images = torch.rand(2, 3, 24, 40, requires_grad=True)  # non-square: HPSv2 pads, not crops
    got = reward(images, ["a cat", "a dog"])
    with torch.no_grad():
        x = clip_preprocess(images, 32, (0.5,) * 3, (0.25,) * 3, mode="pad")
        out = model(x, tokenizer(["a cat", "a dog"]))
        ref = torch.diagonal(out["image_features"] @ out["text_features"].T)
    # same float32 network and inputs: rounding only; 1e-5 margin on values O(1).
    torch.testing.assert_close(got.detach(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), images)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_hpsv2_missing_checkpoint_names_it(tmp_path):
    missing = tmp_path / "HPS_v2_compressed.pt"
    with pytest.raises(RewardError, match=f"hpsv2 checkpoint: file not found: {missing}"):
        build_reward(RewardConfig(name="hpsv2", weights_path=str(missing)))


def test_hpsv2_unimportable_package_gives_install_hint(tmp_path, monkeypatch):
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {}}, ckpt)
    monkeypatch.setitem(sys.modules, "hpsv2", None)  # the package absent, whatever is installed
    with pytest.raises(RewardError, match=r"nablagfn\[hpsv2\].*torchvision"):
        build_reward(RewardConfig(name="hpsv2", weights_path=str(ckpt)))


def test_hpsv2_import_on_this_machine_is_clear_or_works():
    """Whatever this stack holds (here: no hpsv2; elsewhere: maybe a broken torchvision), the
    import either works or fails as RewardError with the install hint, never another error."""
    try:
        import_hpsv2_open_clip()
    except RewardError as exc:
        assert "nablagfn[hpsv2]" in str(exc)


# ---------------------------------------------------------------- ImageReward
def test_image_reward_head_formula_and_checkpoint_keys(tmp_path):
    sd = public_laion_head_state(24, seed=1)
    full = {f"mlp.{k}": v for k, v in sd.items()}
    full["blip.visual_encoder.cls_token"] = torch.zeros(1, 1, 24)  # the rest of a full checkpoint
    p = tmp_path / "ImageReward.pt"
    torch.save(full, p)
    for source in (p, full):
        head = load_image_reward_head(source).eval()
        x = torch.randn(6, 24)
        ref = (head_reference(sd, x) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
        # float32 head vs float64 matmuls, then /1.03: rounding ~1e-6; 1e-4 margin.
        torch.testing.assert_close(head(x).double(), ref, atol=1e-4, rtol=1e-4)
    assert IMAGE_REWARD_MEAN == pytest.approx(0.16717362830052426)
    assert IMAGE_REWARD_STD == pytest.approx(1.0333394966054072)


class BlipStandIn(nn.Module):
    """ImageReward's BLIP interface: tokenizer, visual_encoder (B, N, D), text_encoder with the
    image tokens as cross-attention memory returning .last_hidden_state. Records its inputs."""

    def __init__(self, clip, tokenizer, dim=32):
        super().__init__()
        self.tokenizer = tokenizer
        self.vision = clip.vision_model
        self.embed = nn.Embedding(len(tokenizer), dim)
        self.cross = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.seen = {}

    def visual_encoder(self, image):
        self.seen["image"] = image
        return self.vision(pixel_values=image).last_hidden_state

    def text_encoder(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                     return_dict):
        self.seen.update(ids=input_ids, mask=attention_mask, memory_mask=encoder_attention_mask)
        h = self.embed(input_ids)
        out, _ = self.cross(h, encoder_hidden_states, encoder_hidden_states,
                            key_padding_mask=encoder_attention_mask == 0)
        return type("Out", (), {"last_hidden_state": h + out})()


def test_image_reward_glue_on_stand_in(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    tok = copy.deepcopy(tok)
    tok.model_max_length = 64
    torch.manual_seed(0)
    blip = BlipStandIn(copy.deepcopy(clip), tok)
    head = load_image_reward_head(public_laion_head_state(32, seed=2))
    reward = ImageRewardModel(blip, head, image_size=32)
    images = torch.rand(2, 3, 40, 48, requires_grad=True)
    got = reward(images, ["a cat", "a dog"])
    assert blip.seen["ids"].shape == (2, 35)  # ImageReward's max_length=35, padded
    # 16 patches + CLS image tokens as the cross-attention memory
    assert blip.seen["memory_mask"].shape == blip.seen["image"].shape[:1] + (17,)
    with torch.no_grad():
        x = clip_preprocess(images, 32, mode="crop")
        torch.testing.assert_close(blip.seen["image"], x)  # ImageReward's resize/crop/normalise
        feats = blip.text_encoder(blip.seen["ids"], blip.seen["mask"], blip.visual_encoder(x),
                                  blip.seen["memory_mask"], True).last_hidden_state[:, 0, :]
        ref = head(feats)
    # same float32 modules and inputs: rounding only.
    torch.testing.assert_close(got.detach(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), images)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_image_reward_package_route_errors(tmp_path, monkeypatch):
    missing = tmp_path / "ImageReward.pt"
    with pytest.raises(RewardError, match=f"file not found: {missing}"):
        build_reward(RewardConfig(name="image_reward", weights_path=str(missing)))
    torch.save({}, missing)
    with pytest.raises(RewardError, match="set reward.kwargs.med_config"):
        build_reward(RewardConfig(name="image_reward", weights_path=str(missing)))
    med = tmp_path / "med_config.json"
    med.write_text("{}")
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(RewardError, match=r"nablagfn\[image-reward\].*transformers<5"):
        build_reward(RewardConfig(name="image_reward", weights_path=str(missing),
                                  kwargs={"med_config": str(med)}))
