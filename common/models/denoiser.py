"""ε predictions with classifier-free guidance from a pipeline's UNet, for policy and pretrained.

The samplers and objectives work in ε units and float32 (ALGORITHM.md §1); this wrapper hides the
UNet's prediction_type (ε or v, converted through common/prediction.py with the scheduler's ᾱ_t),
its weight dtype, and CFG, which is one UNet call on the concatenated [uncond, cond] batch. No
no_grad inside `eps`: callers take VJPs through it (backward scores, Stein targets, DRaFT).
An unconditional UNet (no cross-attention: the pixel family's UNet2DModel) ignores prompts: their
"embeddings" are zeros (B, 1, 1) and CFG is skipped (ε_u = ε_c, so the guided ε is ε itself).
"""
from __future__ import annotations

import contextlib

import torch

from ..prediction import eps_from_output
from .lora import adapters_disabled


class Denoiser:
    """ε_θ (adapter=True) and ε# (adapter=False) of one UNet, with CFG; outputs are float32."""

    def __init__(self, unet, scheduler, tokenizer=None, text_encoder=None):
        self.unet = unet
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.conditional = getattr(unet.config, "cross_attention_dim", None) is not None
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not "
                             "supported: expected epsilon or v_prediction")
        # ᾱ per training timestep, float64 so the ε/v conversion loses nothing before the cast.
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64).cpu()

    @classmethod
    def from_pipeline(cls, pipe) -> "Denoiser":
        return cls(pipe.unet, pipe.scheduler, pipe.tokenizer, pipe.text_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps t (any shape), float64 on t's device."""
        return self.alphas_cumprod[t.detach().long().cpu()].to(t.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D) in float32, as StableDiffusionPipeline computes;
        zeros (B, 1, 1) for an unconditional UNet."""
        if not self.conditional:
            return torch.zeros(len(prompts), 1, 1, device=self.device)
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this Denoiser was built without a tokenizer/text encoder")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        return self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float()

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The raw UNet output (ε or v per prediction_type) in float32; adapters as they are set."""
        if not self.conditional:
            return self.unet(x.to(self.dtype), t, return_dict=False)[0].float()
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype),
                        return_dict=False)[0]
        return out.float()

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
            uncond_emb: torch.Tensor | None = None, guidance_scale: float = 1.0,
            adapter: bool = True) -> torch.Tensor:
        """Guided ε = ε_u + w (ε_c − ε_u) at latents x (B, C, H, W) and integer timesteps t (B,).

        `uncond_emb` may have batch 1 (broadcast). With w == 1 or no uncond_emb a single
        conditional call is made. adapter=False gives the pretrained ε# of the same UNet.
        """
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(B)
        cond_emb = cond_emb.expand(B, *cond_emb.shape[1:])
        guided = self.conditional and uncond_emb is not None and guidance_scale != 1.0
        ctx = contextlib.nullcontext() if adapter else adapters_disabled(self.unet)
        with ctx:
            if guided:
                uncond_emb = uncond_emb.expand(B, *uncond_emb.shape[1:])
                out = self.unet_output(torch.cat([x, x]), torch.cat([t, t]),
                                       torch.cat([uncond_emb, cond_emb]))
            else:
                out = self.unet_output(x, t, cond_emb)
        xx = torch.cat([x, x]) if guided else x
        eps = eps_from_output(out, xx.float(), self.alpha_bar(torch.cat([t, t]) if guided else t),
                              self.prediction_type)
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)
