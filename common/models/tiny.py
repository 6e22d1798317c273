"""A tiny, fully offline Stable Diffusion pipeline (the "tiny" preset).

No weights can be downloaded on CI/dev machines, yet every model code path (from_pretrained, LoRA
save/load, CFG, VJPs) must be exercised on a real diffusers pipeline. So we build one from configs
with random weights (deterministic given the seed) and save it with `save_pretrained`; callers then
load it through the same `from_pretrained` path as a real model (see loading.py).

The builder is a table family → function; shared parts (tokenizer, text encoder, VAE, scheduler) are
separate helpers so a tiny SDXL / SD3 can be added later as one more entry.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..schedule import SD_SCHEDULER_CONFIG

TINY_HIDDEN = 32  # text-encoder width = the UNet's cross-attention dim
TINY_LATENT_SIZE = 16  # latent side; the VAE halves once, so images are 32×32
MODEL_MAX_LENGTH = 77  # without it the pipeline pads to ~1e30 tokens (STACK.md)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("a", "t</w>"), ("c", "at</w>")]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the raw bytes, CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write a byte-level BPE vocab.json / merges.txt (CLIP layout) and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in _MERGES) + "\n",
                           encoding="utf-8")
    return vocab_path, merges_path


def tiny_tokenizer(work_dir: Path):
    from transformers import CLIPTokenizer

    vocab, merges = write_tiny_tokenizer_files(work_dir)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=MODEL_MAX_LENGTH)


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                         latent_channels=4, sample_size=TINY_LATENT_SIZE * 2)


def tiny_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


def _build_tiny_sd(out_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:  # the source files; save_pretrained rewrites them
        tokenizer = tiny_tokenizer(Path(tmp))
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=unet, scheduler=tiny_ddim_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out_dir)


def _build_tiny_pixel(out_dir: Path) -> None:
    from .pixel import build_tiny_pixel

    build_tiny_pixel(out_dir)


def _build_tiny_sdxl(out_dir: Path) -> None:
    from .tiny_sdxl import build_tiny_sdxl

    build_tiny_sdxl(out_dir)


def _build_tiny_sd3(out_dir: Path) -> None:
    from .tiny_sd3 import build_tiny_sd3

    build_tiny_sd3(out_dir)


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {"sd": _build_tiny_sd, "pixel": _build_tiny_pixel,
                                                    "sdxl": _build_tiny_sdxl, "sd3": _build_tiny_sd3}
"""family → builder writing a complete pipeline folder (tiny_sdxl.py, tiny_sd3.py, pixel.py)."""


def build_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` into `out_dir` (random weights from `seed`)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny preset for model family {family!r} yet; available: "
                         f"{sorted(TINY_BUILDERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # deterministic, without touching the caller's RNG
        torch.manual_seed(seed)
        TINY_BUILDERS[family](out_dir)
    return out_dir


def build_tiny_sd_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny Stable Diffusion 1.x-style pipeline; returns `out_dir`."""
    return build_tiny_pipeline("sd", out_dir, seed)
