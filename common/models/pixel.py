"""The "pixel" model family: an unconditional diffusers `UNet2DModel` denoising pixels directly.

A folder in diffusers' `DDPMPipeline` layout (model_index.json, unet/, scheduler/) loads through
`PixelDiffusionPipeline.from_pretrained`, which puts the UNet in `PixelUNet2DModel` — the same
weights plus diffusers' own `PeftAdapterMixin` (add_adapter, disable_adapters, load_lora_adapter),
which `UNet2DModel` lacks. The pipeline exposes what the SD code paths read: `vae` is an identity
`PixelDecoder` (latents are the pixels in [-1, 1]; grey is repeated to RGB), there is no
tokenizer/text encoder (prompts are ignored), `vae_scale_factor` is 1. LoRA goes through
`StableDiffusionLoraLoaderMixin`, so `save_lora_weights` / `load_lora_weights` write and read the
same diffusers file (keys "unet.<peft key>", adapter metadata in the header). Keys stay in peft's
form: diffusers' SD renaming covers only attention projections and would mix two formats here.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.loaders import PeftAdapterMixin, StableDiffusionLoraLoaderMixin

PIXEL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]
"""Default LoRA targets of a UNet2DModel: attention projections and every ResNet's convs and
time projection (the 8×8 level has no attention, so attention alone cannot reshape strokes)."""


class PixelUNet2DModel(UNet2DModel, PeftAdapterMixin):
    """A UNet2DModel that takes peft adapters the diffusers way (loads any UNet2DModel folder)."""


class PixelDecoder(torch.nn.Module):
    """The identity "VAE": decode(z).sample = z on RGB channels (grey repeated), float32."""

    def __init__(self, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"a pixel decoder maps 1 or 3 channels to RGB, got {channels}")
        self.register_buffer("rgb", torch.ones(3, 1, 1, 1) if channels == 1 else torch.eye(3)[:, :, None, None])
        # A frozen parameter, so that next(vae.parameters()) gives the device and dtype.
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_channels=channels,
                                      block_out_channels=(channels,))

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        x = torch.nn.functional.conv2d(z, self.rgb.to(z.dtype)) + self.anchor.to(z.dtype)
        return SimpleNamespace(sample=x) if return_dict else (x,)


class PixelDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """unet (PixelUNet2DModel) + scheduler; vae is the identity, no text encoder, prompts ignored."""

    model_cpu_offload_seq = "unet"
    _lora_loadable_modules = ["unet"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.vae = PixelDecoder(int(unet.config.out_channels)).to(unet.device)
        self.tokenizer = None
        self.text_encoder = None
        self.vae_scale_factor = 1

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        """A DDPMPipeline folder (or hub id); the UNet is loaded as PixelUNet2DModel."""
        unet = kwargs.pop("unet", None)
        if unet is None:
            unet_kw = {k: kwargs[k] for k in ("revision", "local_files_only", "cache_dir") if k in kwargs}
            if "dtype" in kwargs:
                unet_kw["torch_dtype"] = kwargs["dtype"]
            unet = PixelUNet2DModel.from_pretrained(source, subfolder="unet", **unet_kw)
        return super().from_pretrained(source, unet=unet, **kwargs)

    def load_lora_weights(self, source, adapter_name: str | None = None, **kwargs) -> None:
        """Load a `save_lora_weights` folder (or state dict) into the UNet (no text encoder here)."""
        kwargs["return_lora_metadata"] = True
        state_dict, alphas, metadata = self.lora_state_dict(source, **kwargs)
        self.load_lora_into_unet(state_dict, network_alphas=alphas, unet=self.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=self)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self.vae.to(self.unet.device)
        return self


def save_pixel_pipeline(unet, scheduler, out_dir: str | Path) -> Path:
    """Write `unet` + `scheduler` as a plain diffusers DDPMPipeline folder (loads anywhere)."""
    from diffusers import DDPMPipeline

    if type(unet) is not UNet2DModel:  # save the plain class name, not our subclass'
        plain = UNet2DModel.from_config(unet.config)
        plain.load_state_dict(unet.state_dict())
        unet = plain
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir)
    return Path(out_dir)


def tiny_pixel_unet(sample_size: int = 8, channels: int = 1, widths=(32, 64, 64)):
    """A small pixel-space UNet2DModel: ResNet blocks at full size, attention below it."""
    n = len(widths)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(widths), down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), norm_num_groups=8,
        attention_head_dim=16)


def build_tiny_pixel(out_dir: Path) -> None:
    """The "tiny" preset of the pixel family: random 8×8 grey UNet2DModel, SD's DDIM schedule."""
    from diffusers import DDIMScheduler

    from ..schedule import SD_SCHEDULER_CONFIG

    save_pixel_pipeline(tiny_pixel_unet(widths=(16, 32)), DDIMScheduler(**SD_SCHEDULER_CONFIG), out_dir)
