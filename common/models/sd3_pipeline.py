"""The "sd3" model family: diffusers' StableDiffusion3Pipeline, with `unet` naming its transformer.

The trainer, the LoRA code and the learner address "the denoising network" as `pipe.unet` (SD1.x,
SDXL, pixel). `SD3Pipeline` is StableDiffusion3Pipeline plus a read-only `unet` property returning
`transformer` — nothing else changes: `from_pretrained` loads any StableDiffusion3Pipeline folder
(or hub id), `save_lora_weights` / `load_lora_weights` are SD3's (keys "transformer.<peft key>"),
and a folder it writes loads in plain StableDiffusion3Pipeline. The transformer predicts a
velocity; the Denoiser turns it into ε (common/flow_matching.py).
"""
from __future__ import annotations

from diffusers import StableDiffusion3Pipeline


class SD3Pipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose `unet` is its SD3Transformer2DModel."""

    @property
    def unet(self):
        return self.transformer
