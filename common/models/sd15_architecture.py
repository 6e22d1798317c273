"""Stable Diffusion 1.5's architecture with random weights (the "sd15-random" preset).

For speed and memory benchmarks on a GPU without downloading anything: the UNet, VAE and CLIP
ViT-L/14 text encoder configs are written out by hand from the published SD1.5 model cards
(parameter counts 859,520,964 / 83,653,863 / 123,060,480, checked by a test). The tokenizer is the
tiny offline byte-level BPE of tiny.py: its ids are a subset of the 49,408-token vocabulary, which
is all a timing run needs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .tiny import MODEL_MAX_LENGTH, tiny_ddim_scheduler, tiny_tokenizer

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)

SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)

SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu",
    projection_dim=768)

SD15_PARAMETER_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def sd15_modules(tokenizer=None):
    """(unet, vae, text_encoder) with SD1.5's architecture, random weights on the current device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_kw = dict(SD15_TEXT)
    if tokenizer is not None:  # pool at the tokenizer's EOS id (SD itself uses the hidden states)
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        text_kw.update(bos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.bos_token),
                       eos_token_id=eos, pad_token_id=eos)
    return (UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE),
            CLIPTextModel(CLIPTextConfig(**text_kw)))


def build_sd15_random(out_dir: Path) -> None:
    """Write a StableDiffusionPipeline folder with SD1.5's architecture and random weights."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    unet, vae, text_encoder = sd15_modules(tokenizer)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=tiny_ddim_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(out_dir)
