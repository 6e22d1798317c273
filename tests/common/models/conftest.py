"""Shared fixtures: one tiny SD pipeline built per session, fresh copies loaded per test."""
import pytest
import torch

from nablagfn.common.models import build_tiny_sd_pipeline


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every model test on one thread (tests/conftest.py): on a shared 2-core machine thread
    oversubscription made a UNet forward ~60× slower (2.2 s vs 33 ms measured)."""
    yield


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny preset, built once where load_pipeline(cache_dir=its parent) looks for it."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("model_cache") / "tiny-sd", seed=0)


@pytest.fixture
def pipe(tiny_sd_dir):
    """A fresh pipeline per test (tests add adapters to its UNet), loaded like a real model."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def unet_inputs(pipe):
    """Latents (3, 4, 16, 16), distinct per-sample timesteps and text embeddings of 3 prompts."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([981, 500, 21])
    ids = pipe.tokenizer(["a cat", "the dog on a mat", "an owl"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    return x, t, emb


def _perturb_lora(unet, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def perturb_lora():
    """Sets random LoRA weights: lora_B starts at 0, which would make every adapter test vacuous."""
    return _perturb_lora

