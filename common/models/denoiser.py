"""ε predictions with classifier-free guidance from a pipeline's UNet, for policy and pretrained.

The samplers and objectives work in ε units and float32 (ALGORITHM.md §1); this wrapper hides the
UNet's prediction_type (ε or v, converted through common/prediction.py with the scheduler's ᾱ_t),
its weight dtype, and CFG, which is one UNet call on the concatenated [uncond, cond] batch. No
no_grad inside `eps`: callers take VJPs through it (backward scores, Stein targets, DRaFT).
An unconditional UNet (no cross-attention: the pixel family's UNet2DModel) ignores prompts: their
"embeddings" are zeros (B, 1, 1) and CFG is skipped (ε_u = ε_c, so the guided ε is ε itself).

SDXL and SD3 conditioning (two/three text encoders, pooled embeddings, SDXL's added time ids) is
packed into the same one tensor per prompt and unpacked for the network by text_conditioning.py.
A flow-matching network (SD3's transformer, prediction_type "flow" from a
FlowMatchEulerDiscreteScheduler) predicts a velocity: the Denoiser takes VP-rescaled states x̃ and
float timesteps t·T (common/flow_matching.py), calls the network at x_t = c_t x̃, and returns
ε̂ = x_t + (1 − t) v̂ — so samplers and objectives see an ε-model on the VP-equivalent path.
"""
from __future__ import annotations

import contextlib

import torch

from ..flow_matching import alpha_bar_from_sigma, eps_from_velocity, to_native
from ..prediction import eps_from_output
from .lora import adapters_disabled
from .text_conditioning import TextConditioning, conditioning_for_pipeline


class Denoiser:
    """ε_θ (adapter=True) and ε# (adapter=False) of one UNet, with CFG; outputs are float32."""

    def __init__(self, unet, scheduler, tokenizer=None, text_encoder=None,
                 conditioning: TextConditioning | None = None):
        self.unet = unet  # the denoising network: a UNet, or SD3's transformer
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        if conditioning is None:
            width = getattr(unet.config, "cross_attention_dim", None)
            conditioning = (TextConditioning("sd", width=int(width), tokenizer=tokenizer, text_encoder=text_encoder)
                            if width is not None else TextConditioning("none", width=1))
        self.text = conditioning
        self.conditional = conditioning.conditional
        self.is_transformer = conditioning.kind == "sd3"
        if not hasattr(scheduler, "alphas_cumprod") and "shift" in scheduler.config:  # FlowMatchEuler*
            self.prediction_type = "flow"
            self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
            self.alphas_cumprod = None
            return
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not "
                             "supported: expected epsilon or v_prediction")
        # ᾱ per training timestep, float64 so the ε/v conversion loses nothing before the cast.
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64).cpu()

    @classmethod
    def from_pipeline(cls, pipe) -> "Denoiser":
        net = getattr(pipe, "unet", None)
        net = pipe.transformer if net is None else net
        return cls(net, pipe.scheduler, getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None),
                   conditioning=conditioning_for_pipeline(pipe))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at model timesteps t (any shape; integer, or t·T floats for a flow model), float64 on t's device."""
        if self.prediction_type == "flow":
            return alpha_bar_from_sigma(self.sigma(t))
        return self.alphas_cumprod[t.detach().long().cpu()].to(t.device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """A flow model's noise level t·T / T of model timesteps, float64."""
        return t.detach().to(torch.float64) / self.num_train_timesteps

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Packed text conditioning (B, L, D) in float32, as the family's pipeline computes it
        (text_conditioning.py); zeros (B, 1, 1) for an unconditional UNet."""
        return self.text.encode(list(prompts), self.device)

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The raw network output (ε, v or a velocity per prediction_type) in float32; adapters as set."""
        kwargs = self.text.network_kwargs(emb, x, self.dtype) if self.conditional else {}
        if self.is_transformer:
            out = self.unet(hidden_states=x.to(self.dtype), timestep=t.float(), return_dict=False, **kwargs)[0]
        else:
            out = self.unet(x.to(self.dtype), t, return_dict=False, **kwargs)[0]
        return out.float()

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
            uncond_emb: torch.Tensor | None = None, guidance_scale: float = 1.0,
            adapter: bool = True) -> torch.Tensor:
        """Guided ε = ε_u + w (ε_c − ε_u) at latents x (B, C, H, W) and integer timesteps t (B,).

        `uncond_emb` may have batch 1 (broadcast). With w == 1 or no uncond_emb a single
        conditional call is made. adapter=False gives the pretrained ε# of the same UNet.
        """
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = (t.double() if self.prediction_type == "flow" else t.long()).reshape(-1).expand(B)
        cond_emb = cond_emb.expand(B, *cond_emb.shape[1:])
        guided = self.conditional and uncond_emb is not None and guidance_scale != 1.0
        if self.prediction_type == "flow":  # the network sees the native state x_t = c_t x̃
            sig = self.sigma(t)
            x = to_native(x.float(), sig)
        ctx = contextlib.nullcontext() if adapter else adapters_disabled(self.unet)
        with ctx:
            if guided:
                uncond_emb = uncond_emb.expand(B, *uncond_emb.shape[1:])
                out = self.unet_output(torch.cat([x, x]), torch.cat([t, t]),
                                       torch.cat([uncond_emb, cond_emb]))
            else:
                out = self.unet_output(x, t, cond_emb)
        xx = torch.cat([x, x]) if guided else x
        if self.prediction_type == "flow":
            eps = eps_from_velocity(out, xx.float(), torch.cat([sig, sig]) if guided else sig)
        else:
            eps = eps_from_output(out, xx.float(), self.alpha_bar(torch.cat([t, t]) if guided else t),
                                  self.prediction_type)
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)
