"""Text conditioning per model family, packed into ONE tensor per prompt.

Samplers, trajectories, the learner and the wire format carry the conditioning of a trajectory as one
(B, L, D) float tensor (rows are indexed, concatenated and shipped as such). SD1.x fits that as is
(the text encoder's hidden states). SDXL and SD3 also need a pooled text embedding (B, P), so they use
one extra token:

    packed = [ hidden (B, L, D) ; [pooled (B, P) | 0 … 0] (B, 1, D) ]     → (B, L + 1, D),  P ≤ D

and each family's `network_kwargs` unpacks it into what its network takes:

* "sd"   — hidden states of the text encoder's last layer → `encoder_hidden_states`.
* "sdxl" — the two CLIP encoders' penultimate hidden states concatenated (L = 77, D = 768 + 1280) and
  text_encoder_2's projected pooled output (P = 1280), computed by the pipeline's own `encode_prompt`;
  the UNet gets `encoder_hidden_states` and `added_cond_kwargs = {text_embeds: pooled, time_ids}` with
  SDXL's micro-conditioning time ids (original_size, crops_coords_top_left, target_size) — by default
  (H, W, 0, 0, H, W) of the generated image, as `StableDiffusionXLPipeline` sets them. With the
  pipeline's `force_zeros_for_empty_prompt` (SDXL's default) the empty prompt, i.e. the CFG
  unconditional branch, is all zeros, as in the pipeline.
* "sd3"  — CLIP-L ⊕ CLIP-G penultimate states zero-padded to the T5 width, then the T5 states
  (L = 77 + max_sequence_length, D = joint_attention_dim), pooled = both CLIP projections (P = 2048),
  from the pipeline's `encode_prompt`; the transformer gets `encoder_hidden_states` and
  `pooled_projections`.
* "none" — an unconditional network: zeros (B, 1, 1), nothing is passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[hidden ; pooled padded to D] → (B, L + 1, D)."""
    B, _, D = hidden.shape
    P = pooled.shape[-1]
    if P > D:
        raise ValueError(f"pooled text embedding width {P} exceeds the hidden width {D}: cannot pack")
    last = torch.zeros(B, 1, D, dtype=hidden.dtype, device=hidden.device)
    last[:, 0, :P] = pooled.to(hidden.dtype)
    return torch.cat([hidden, last], dim=1)


def unpack_pooled(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_pooled`: (hidden (B, L, D), pooled (B, P))."""
    if packed.dim() != 3 or packed.shape[1] < 2:
        raise ValueError(f"packed text conditioning must be (B, L + 1, D), got {tuple(packed.shape)}")
    return packed[:, :-1], packed[:, -1, :pooled_dim]


@dataclass
class TextConditioning:
    """Encode prompts of one family into the packed tensor and hand it to the network."""

    kind: str  # "sd", "sdxl", "sd3" or "none"
    width: int  # D of the packed tensor (the network's cross-attention / joint-attention width)
    pooled_dim: int = 0  # P; 0 = no pooled token
    pipe: object = None  # the pipeline whose encode_prompt is used (sdxl, sd3)
    tokenizer: object = None  # sd
    text_encoder: object = None  # sd
    vae_scale_factor: int = 8
    # SDXL micro-conditioning; None = the pipeline's defaults from the image size
    original_size: Optional[tuple[int, int]] = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: Optional[tuple[int, int]] = None
    max_sequence_length: int = 256  # SD3's T5 tokens (the pipeline's default)
    zero_empty_prompt: bool = False  # SDXL force_zeros_for_empty_prompt
    extra: dict = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    # -- encoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """The packed conditioning (B, L', D) in float32."""
        prompts = list(prompts)
        if self.kind == "none":
            return torch.zeros(len(prompts), 1, 1, device=device)
        if self.kind == "sd":
            return self._encode_sd(prompts)
        if self.kind == "sdxl":
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            if self.zero_empty_prompt:
                empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
                hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            return pack_pooled(hidden.float(), pooled.float())
        if self.kind == "sd3":
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
            return pack_pooled(hidden.float(), pooled.float())
        raise ValueError(f"unknown text conditioning kind {self.kind!r}")

    def _encode_sd(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this Denoiser was built without a tokenizer/text encoder")
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        return self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float()

    # -- the network's inputs ---------------------------------------------------------------------
    def time_ids(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's added time ids (B, 6) for latents (B, C, h, w)."""
        size = (int(latents.shape[-2]) * self.vae_scale_factor, int(latents.shape[-1]) * self.vae_scale_factor)
        ids = list(self.original_size or size) + list(self.crops_coords_top_left) + list(self.target_size or size)
        return torch.tensor([ids], dtype=dtype, device=latents.device).expand(latents.shape[0], 6)

    def network_kwargs(self, packed: torch.Tensor, latents: torch.Tensor, dtype: torch.dtype) -> dict:
        """Keyword arguments of the denoising network for packed conditioning rows and latents."""
        if self.kind == "none":
            return {}
        if self.kind == "sd":
            return {"encoder_hidden_states": packed.to(dtype)}
        hidden, pooled = unpack_pooled(packed, self.pooled_dim)
        if self.kind == "sdxl":
            return {"encoder_hidden_states": hidden.to(dtype),
                    "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(latents, dtype)}}
        if self.kind == "sd3":
            return {"encoder_hidden_states": hidden.to(dtype), "pooled_projections": pooled.to(dtype)}
        raise ValueError(f"unknown text conditioning kind {self.kind!r}")


def family_of(pipe) -> str:
    """"sd3" (a transformer pipeline with pooled projections), "sdxl" (text_time UNet), "sd", "none"."""
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3"):
        return "sd3"
    unet = getattr(pipe, "unet", None)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if unet is not None and getattr(unet.config, "cross_attention_dim", None) is not None:
        return "sd"
    return "none"


def conditioning_for_pipeline(pipe) -> TextConditioning:
    """The TextConditioning of a loaded diffusers pipeline (SD, SDXL, SD3 or unconditional)."""
    kind = family_of(pipe)
    vsf = int(getattr(pipe, "vae_scale_factor", None) or 8)
    if kind == "none":
        return TextConditioning("none", width=1, vae_scale_factor=vsf)
    if kind == "sd":
        return TextConditioning("sd", width=int(pipe.unet.config.cross_attention_dim), tokenizer=pipe.tokenizer,
                                text_encoder=pipe.text_encoder, vae_scale_factor=vsf)
    if kind == "sdxl":
        unet = pipe.unet
        pooled = int(unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim)
        return TextConditioning("sdxl", width=int(unet.config.cross_attention_dim), pooled_dim=pooled, pipe=pipe,
                                vae_scale_factor=vsf,
                                zero_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
    tr = pipe.transformer
    return TextConditioning("sd3", width=int(tr.config.joint_attention_dim),
                            pooled_dim=int(tr.config.pooled_projection_dim), pipe=pipe, vae_scale_factor=vsf)
