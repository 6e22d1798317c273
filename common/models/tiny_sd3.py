"""A tiny, fully offline Stable Diffusion 3 pipeline (the "tiny" preset of the "sd3" family).

SD3's layout with random weights, small enough for CPU tests: an SD3Transformer2DModel (MMDiT joint
attention over patch tokens and text tokens, pooled-text projection added to the timestep
embedding), two CLIPTextModelWithProjection encoders (penultimate states concatenated, projected
pooled outputs concatenated), a T5EncoderModel with a Unigram tokenizer built in memory (no
sentencepiece file, no download), a 16-channel VAE with SD3's scaling and shift factors and no
quant convs, and SD3's FlowMatchEulerDiscreteScheduler (shift 3). Saved with
`StableDiffusion3Pipeline.save_pretrained`, it loads through the same `from_pretrained` path as a
real SD3 folder (loading.py, sd3_pipeline.py).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .tiny import TINY_HIDDEN, TINY_LATENT_SIZE, tiny_text_encoder, tiny_tokenizer

SD3_LATENT_CHANNELS = 16
SD3_T5_WIDTH = 2 * TINY_HIDDEN  # = joint_attention_dim; the two CLIPs' concatenation fits exactly
SD3_POOLED_DIM = 2 * TINY_HIDDEN  # two CLIP projections
T5_MAX_LENGTH = 256  # the pipeline's default max_sequence_length


def tiny_clip_with_projection(vocab_size: int):
    from transformers import CLIPTextModelWithProjection

    cfg = tiny_text_encoder(vocab_size).config
    cfg.projection_dim = TINY_HIDDEN
    return CLIPTextModelWithProjection(cfg)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over printable ASCII and "▁x" word starts, built in memory."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars] \
        + [("▁" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=SD3_T5_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def tiny_sd3_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=SD3_LATENT_CHANNELS, sample_size=TINY_LATENT_SIZE * 2,
                         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=TINY_LATENT_SIZE, patch_size=2, in_channels=SD3_LATENT_CHANNELS,
                                 out_channels=SD3_LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=SD3_T5_WIDTH, caption_projection_dim=32,
                                 pooled_projection_dim=SD3_POOLED_DIM, pos_embed_max_size=TINY_LATENT_SIZE)


def tiny_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3(out_dir: Path) -> None:
    """Write the tiny SD3 pipeline folder (callers seed torch's RNG: tiny.build_tiny_pipeline)."""
    from diffusers import StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as tmp:  # the source files; save_pretrained rewrites them
        tok1, tok2 = tiny_tokenizer(Path(tmp) / "1"), tiny_tokenizer(Path(tmp) / "2")
    tok3 = tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=tiny_flow_scheduler(), vae=tiny_sd3_vae(),
        text_encoder=tiny_clip_with_projection(len(tok1)), tokenizer=tok1,
        text_encoder_2=tiny_clip_with_projection(len(tok2)), tokenizer_2=tok2,
        text_encoder_3=tiny_t5_encoder(len(tok3)), tokenizer_3=tok3)
    pipe.save_pretrained(out_dir)
