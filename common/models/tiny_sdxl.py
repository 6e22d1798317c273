"""A tiny, fully offline Stable Diffusion XL pipeline (the "tiny" preset of the "sdxl" family).

The SDXL layout with random weights, small enough for CPU tests: a UNet2DConditionModel with
`addition_embed_type="text_time"` (pooled text embedding + 6 added time ids, each embedded with
`addition_time_embed_dim` sinusoids), cross-attention over the concatenation of two CLIP text encoders'
penultimate hidden states (CLIPTextModel, then CLIPTextModelWithProjection whose projected pooled
output is the pooled embedding), two byte-level tokenizers written without downloads (tiny.py), the
tiny VAE, and SD's DDIM schedule. Saved with `StableDiffusionXLPipeline.save_pretrained`, it loads
through the same `from_pretrained` path as a real SDXL folder (loading.py).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .tiny import TINY_HIDDEN, TINY_LATENT_SIZE, tiny_ddim_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_vae

SDXL_TIME_EMBED_DIM = 8  # per added time id (SDXL: 256)
SDXL_POOLED_DIM = TINY_HIDDEN  # text_encoder_2's projection_dim (SDXL: 1280)


def tiny_text_encoder_with_projection(vocab_size: int):
    """The second text encoder: a CLIPTextModelWithProjection (its text_embeds are SDXL's pooled)."""
    from transformers import CLIPTextModelWithProjection

    cfg = tiny_text_encoder(vocab_size).config
    cfg.projection_dim = SDXL_POOLED_DIM
    return CLIPTextModelWithProjection(cfg)


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TINY_HIDDEN, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM)


def build_tiny_sdxl(out_dir: Path) -> None:
    """Write the tiny SDXL pipeline folder (callers seed torch's RNG: tiny.build_tiny_pipeline)."""
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tmp:  # the source files; save_pretrained rewrites them
        tokenizer = tiny_tokenizer(Path(tmp) / "1")
        tokenizer_2 = tiny_tokenizer(Path(tmp) / "2")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder_with_projection(len(tokenizer_2)), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=tiny_sdxl_unet(), scheduler=tiny_ddim_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out_dir)
