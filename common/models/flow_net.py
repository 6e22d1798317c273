"""g_φ: the learned correction of the flow gradient ∇ log F̃ (ALGORITHM.md §2).

A small UNet2DConditionModel with the latent's channels in and out, conditioned on the integer
timestep and, for prompt-dependent rewards, on the text embeddings (cross-attention of the text
encoder's width). Its output convolution starts at zero, so g_φ ≡ 0 at init and ∇ log F̃ starts as
the reward guess alone. For prompt-independent rewards the text input is replaced by zeros, so the
flow cannot depend on the prompt. Always float32: it is trained, never frozen.
"""
from __future__ import annotations

import torch

from ..config import FlowNetConfig

NO_TEXT_DIM = 8  # cross-attention width when the pipeline has no text encoder (its input is zeros)


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
                 sample_size: int | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        cfg.validate()
        self.prompt_conditioned = cfg.prompt_conditioned
        self.cross_attention_dim = cross_attention_dim
        down, up = _block_types(len(cfg.block_out_channels))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups, attention_head_dim=cfg.attention_heads)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.float()

    @classmethod
    def from_pipeline(cls, cfg: FlowNetConfig, pipe) -> "FlowNet":
        """Sized for `pipe`: latent channels of its UNet, cross-attention of its text encoder
        (a pipeline without one, e.g. the pixel family, gets an 8-wide zero token)."""
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None and cfg.prompt_conditioned:
            raise ValueError("flow_net.prompt_conditioned needs a text encoder; this pipeline has none")
        dim = encoder.config.hidden_size if encoder is not None else NO_TEXT_DIM
        return cls(cfg, pipe.unet.config.out_channels, dim, pipe.unet.config.sample_size)

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
        return self.unet(x.float(), t, encoder_hidden_states=emb, return_dict=False)[0]

    forward = flow
