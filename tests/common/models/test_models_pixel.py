"""The pixel family: unconditional UNet2DModel pipelines (DDPMPipeline folders) load through
load_pipeline with an identity VAE, take LoRA the diffusers way and reload it exactly; the bundled
digits model is found by name, is small, and gives clear errors when misnamed or missing."""
from pathlib import Path

import pytest
import torch

from nablagfn.common.config import LoRAConfig, ModelConfig
from nablagfn.common.models import (Denoiser, ModelLoadError, add_lora, adapters_disabled, build_tiny_pipeline,
                                    load_lora_state_dict, load_pipeline, lora_state_dict, save_lora_diffusers)
from nablagfn.common.models.bundled import bundled_model_dir
from nablagfn.common.models.pixel import PIXEL_LORA_TARGETS, PixelDiffusionPipeline, PixelUNet2DModel

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return build_tiny_pipeline("pixel", tmp_path_factory.mktemp("pixel") / "tiny-pixel", seed=0)


@pytest.fixture
def pixel_pipe(pixel_dir):
    return load_pipeline(ModelConfig(pretrained=str(pixel_dir), family="pixel"))


def _inputs(n=3):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([981, 500, 21][:n])


def _perturb(unet, scale=0.2):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _out(unet, x, t):
    with torch.no_grad():
        return unet(x, t).sample


def test_pixel_pipeline_loads_with_identity_vae_and_frozen_weights(pixel_pipe):
    assert isinstance(pixel_pipe, PixelDiffusionPipeline) and isinstance(pixel_pipe.unet, PixelUNet2DModel)
    assert pixel_pipe.tokenizer is None and pixel_pipe.text_encoder is None and pixel_pipe.vae_scale_factor == 1
    assert not any(p.requires_grad for p in pixel_pipe.unet.parameters())
    z = torch.randn(2, 1, 8, 8)
    rgb = pixel_pipe.vae.decode(z).sample
    assert rgb.shape == (2, 3, 8, 8)
    assert torch.equal(rgb, z.expand(2, 3, 8, 8))  # identity on every channel: exact


def test_denoiser_ignores_prompts_on_an_unconditional_unet(pixel_pipe):
    den = Denoiser.from_pipeline(pixel_pipe)
    assert not den.conditional
    emb = den.encode_prompts(["a", "b", "c"])
    assert emb.shape == (3, 1, 1) and not emb.any()
    x, t = _inputs()
    # ε-prediction: the guided ε is the UNet output itself, whatever the guidance scale
    eps = den.eps(x, t, emb, den.encode_prompts([""]), guidance_scale=5.0)
    assert torch.equal(eps, _out(pixel_pipe.unet, x, t))


def test_lora_on_default_targets_round_trips_through_the_diffusers_format(pixel_pipe, pixel_dir, tmp_path):
    x, t = _inputs()
    pretrained = _out(pixel_pipe.unet, x, t)
    params = add_lora(pixel_pipe.unet, LoRAConfig(rank=4, alpha=8.0, target_modules=PIXEL_LORA_TARGETS))
    assert torch.equal(_out(pixel_pipe.unet, x, t), pretrained)  # lora_B = 0 at init
    names = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, _ in pixel_pipe.unet.named_parameters()
             if ".lora_" in n}
    assert {"conv1", "conv2", "time_emb_proj", "to_q"} <= names
    assert all(p.requires_grad for p in params)
    _perturb(pixel_pipe.unet)
    policy = _out(pixel_pipe.unet, x, t)
    assert (policy - pretrained).abs().max() > 1e-3  # the adapter really acts
    with adapters_disabled(pixel_pipe.unet):
        assert torch.equal(_out(pixel_pipe.unet, x, t), pretrained)

    save_lora_diffusers(pixel_pipe, tmp_path / "lora")
    fresh = PixelDiffusionPipeline.from_pretrained(str(pixel_dir))
    fresh.load_lora_weights(str(tmp_path / "lora"))
    # Same weights and α/r scaling; tolerance 1e-6: the reloaded layers may sum in another order.
    torch.testing.assert_close(_out(fresh.unet, x, t), policy, atol=1e-6, rtol=0)

    # the in-memory path (the LoRA registry's): state dict → another adapter of the same config
    other = load_pipeline(ModelConfig(pretrained=str(pixel_dir), family="pixel"))
    add_lora(other.unet, LoRAConfig(rank=4, alpha=8.0, target_modules=PIXEL_LORA_TARGETS))
    load_lora_state_dict(other.unet, lora_state_dict(pixel_pipe.unet))
    assert torch.equal(_out(other.unet, x, t), policy)


def test_bundled_digits_model_loads_by_name_and_is_small():
    folder = bundled_model_dir("digits")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 8 * 2**20, f"models/digits is {total / 2**20:.1f} MiB; the issue asks for a few MB"
    pipe = load_pipeline(ModelConfig(pretrained="digits", family="pixel"))
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1
    assert (folder / "classifier" / "model.safetensors").is_file() and (folder / "quality.json").is_file()


def test_bundled_model_errors_name_the_field_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="model.family=pixel"):
        load_pipeline(ModelConfig(pretrained="digits", family="sd"))
    monkeypatch.setenv("NABLAGFN_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="train_digits_models.py"):
        load_pipeline(ModelConfig(pretrained="digits", family="pixel"))
