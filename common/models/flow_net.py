"""g_φ: the learned correction of the flow gradient ∇ log F̃ (ALGORITHM.md §2).

A small UNet2DConditionModel with the latent's channels in and out, conditioned on the integer
timestep and, for prompt-dependent rewards, on the text embeddings (cross-attention of the text
encoder's width). Its output convolution starts at zero, so g_φ ≡ 0 at init and ∇ log F̃ starts as
the reward guess alone. For prompt-independent rewards the text input is replaced by zeros, so the
flow cannot depend on the prompt. Always float32: it is trained, never frozen.

For SDXL / SD3 pipelines the text input is the Denoiser's packed conditioning (text_conditioning.py):
prompt-conditioned, g_φ cross-attends to the hidden states and takes the pooled embedding as well —
SDXL-style (`addition_embed_type="text_time"`: pooled text + the same added time ids) for SDXL, as a
projected class embedding added to the timestep embedding for SD3.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import FlowNetConfig

NO_TEXT_DIM = 8  # cross-attention width when the pipeline has no text encoder (its input is zeros)
FLOW_TIME_ID_DIM = 8  # sinusoids per SDXL added time id in a prompt-conditioned g_φ (SDXL's UNet: 256)


def _block_types(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """SD's layout: cross-attention at every resolution but the lowest (all of them if n == 1)."""
    if n == 1:
        return ("CrossAttnDownBlock2D",), ("CrossAttnUpBlock2D",)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return down, up


class FlowNet(torch.nn.Module):
    """g_φ(x, t, c) with the shape of x; exactly zero at initialisation."""

    def __init__(self, cfg: FlowNetConfig, latent_channels: int, cross_attention_dim: int,
                 sample_size: int | None = None, conditioning=None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        cfg.validate()
        self.prompt_conditioned = cfg.prompt_conditioned
        self.cross_attention_dim = cross_attention_dim
        # packed SDXL / SD3 conditioning (text_conditioning.TextConditioning), used when prompt-conditioned
        # (a copy without the pipeline/encoders: only the kind, widths and SDXL micro-conditioning)
        self.conditioning = None
        if cfg.prompt_conditioned and conditioning is not None and conditioning.pooled_dim:
            self.conditioning = dataclasses.replace(conditioning, pipe=None, tokenizer=None, text_encoder=None)
        extra = {}
        if self.conditioning is not None and self.conditioning.kind == "sdxl":
            extra = dict(addition_embed_type="text_time", addition_time_embed_dim=FLOW_TIME_ID_DIM,
                         projection_class_embeddings_input_dim=self.conditioning.pooled_dim + 6 * FLOW_TIME_ID_DIM)
        elif self.conditioning is not None:
            extra = dict(class_embed_type="projection",
                         projection_class_embeddings_input_dim=self.conditioning.pooled_dim)
        down, up = _block_types(len(cfg.block_out_channels))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups, attention_head_dim=cfg.attention_heads, **extra)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.float()

    @classmethod
    def from_pipeline(cls, cfg: FlowNetConfig, pipe) -> "FlowNet":
        """Sized for `pipe`: latent channels of its UNet, cross-attention of its text encoder
        (a pipeline without one, e.g. the pixel family, gets an 8-wide zero token); for SDXL / SD3
        the width of the packed conditioning, and its pooled embedding when prompt-conditioned."""
        from .text_conditioning import conditioning_for_pipeline

        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None and cfg.prompt_conditioned:
            raise ValueError("flow_net.prompt_conditioned needs a text encoder; this pipeline has none")
        text = conditioning_for_pipeline(pipe)
        if text.kind in ("sdxl", "sd3"):
            dim = text.width
        else:
            dim = encoder.config.hidden_size if encoder is not None else NO_TEXT_DIM
        return cls(cfg, pipe.unet.config.out_channels, dim, pipe.unet.config.sample_size, conditioning=text)

    def flow(self, x: torch.Tensor, t: torch.Tensor,
             cond_emb: torch.Tensor | None = None) -> torch.Tensor:
        """g_φ at latents x (B, C, H, W), integer timesteps t (B,) or scalar, text (B|1, L, D)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        if self.prompt_conditioned:
            if cond_emb is None:
                raise ValueError("this flow network is prompt_conditioned: pass cond_emb")
            emb = cond_emb.float().expand(B, *cond_emb.shape[1:])
        else:  # one zero token: the cross-attention then gives the same output for every prompt
            emb = x.new_zeros(B, 1, self.cross_attention_dim, dtype=torch.float32)
        if self.conditioning is None:
            return self.unet(x.float(), t, encoder_hidden_states=emb, return_dict=False)[0]
        from .text_conditioning import unpack_pooled

        hidden, pooled = unpack_pooled(emb, self.conditioning.pooled_dim)
        if self.conditioning.kind == "sdxl":
            kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.conditioning.time_ids(x, torch.float32)}}
        else:
            kwargs = {"class_labels": pooled}
        return self.unet(x.float(), t, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]

    forward = flow
