"""Run a diffusion policy through the sampling MDP (ALGORITHM.md §1), recording what the learner needs.

`sample_trajectories` is the sampler actor's whole job in one pure function: from x_0 ~ N(0, I) it
takes N guided steps x_i → x_{i+1} = μ(x_i) + σ_i z_i with the policy's ε (LoRA on, CFG), under
no_grad, and returns every state, the behaviour ε at every step and the policy's one-step x̂₀ (free:
it comes with ε). Nothing here trains or scores.

Random numbers: one `torch.Generator` draws x_0 (B, C, H, W) first and then one (B, C, H, W) noise
per step, in that order, on the generator's device (CPU by default, then moved to the model's
device), so a run is reproducible across devices and, for DDIM, draws exactly what diffusers'
`StableDiffusionPipeline` draws with the same generator (x_0, then one variance noise per step).
The draws depend on the batch size: a trajectory is reproduced by re-running the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .samplers import get_transition
from .schedule import SamplingSchedule


@dataclass
class Trajectories:
    """states (B, N+1, C, H, W): x_0 (noise) … x_N (clean latent), float32.

    eps (B, S, …): ε_behaviour, the guided ε the sampler used at state i; x0 (B, S, …): the
    policy's x̂₀ at state i. S = N, or K with `keep_idx` (B, K) given: then eps[:, k] and x0[:, k]
    belong to state keep_idx[:, k] (the states themselves are always all kept: the λ-return Stein
    targets walk whole trajectories).
    """

    states: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor
    keep_idx: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.states.shape[1]) - 1

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


def latent_shape_of(denoiser, resolution: int = 0, vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(C, H, W) of the UNet's latents; `resolution` > 0 overrides the native size (pixels)."""
    cfg = denoiser.unet.config
    size = resolution // vae_scale_factor if resolution else cfg.sample_size
    if isinstance(size, (tuple, list)):
        return (int(cfg.in_channels), int(size[0]), int(size[1]))
    return (int(cfg.in_channels), int(size), int(size))


def pipeline_latent_shape(pipe, denoiser, resolution: int = 0) -> tuple[int, int, int]:
    """`latent_shape_of` with the pipeline's own VAE scale factor (2^(levels−1) when it has none)."""
    vae_scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return latent_shape_of(denoiser, resolution, vae_scale)


@torch.no_grad()
def sample_trajectories(denoiser, schedule: SamplingSchedule, cond_emb: torch.Tensor,
                        uncond_emb: Optional[torch.Tensor], guidance_scale: float, sampler_kind: str,
                        eta: float, generator: Optional[torch.Generator], keep_idx: Optional[torch.Tensor] = None,
                        adapter: bool = True, latent_shape: Optional[tuple[int, int, int]] = None,
                        ) -> Trajectories:
    """Sample B = cond_emb.shape[0] trajectories of `denoiser` (ε with CFG) through the MDP.

    cond_emb (B, L, D): text embeddings per trajectory; uncond_emb (1|B, L, D) or None (no CFG).
    adapter=True is the policy (LoRA on), False the pretrained model. latent_shape (C, H, W)
    defaults to the UNet's native size. keep_idx (B, K): record ε / x̂₀ only at those states.
    """
    step_fn = get_transition(sampler_kind)
    device = denoiser.device
    B = int(cond_emb.shape[0])
    N = schedule.num_steps
    shape = (B,) + tuple(latent_shape or latent_shape_of(denoiser))
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def noise() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)

    alpha = schedule.alpha_bar.to(device=device, dtype=torch.float32)
    timesteps = schedule.timesteps.to(device)
    cond_emb = cond_emb.to(device)
    if uncond_emb is not None:
        uncond_emb = uncond_emb.to(device)

    x = noise()
    states, eps_all, x0_all = [x], [], []
    for i in range(N):
        t = timesteps[i].expand(B)
        eps = denoiser.eps(x, t, cond_emb, uncond_emb, guidance_scale, adapter=adapter)
        st = step_fn(x, eps, alpha[i].expand(B), alpha[i + 1].expand(B), eta)
        x = st.sample(noise())
        states.append(x)
        eps_all.append(eps)
        x0_all.append(st.x0)
    states_t = torch.stack(states, dim=1)
    eps_t, x0_t = torch.stack(eps_all, dim=1), torch.stack(x0_all, dim=1)
    if keep_idx is not None:
        keep_idx = keep_idx.to(device).long()
        if keep_idx.shape[0] != B or keep_idx.dim() != 2:
            raise ValueError(f"keep_idx must be (B={B}, K), got {tuple(keep_idx.shape)}")
        if int(keep_idx.min()) < 0 or int(keep_idx.max()) >= N:
            raise ValueError(f"keep_idx must index steps 0..{N - 1}")
        rows = torch.arange(B, device=device)[:, None]
        eps_t, x0_t = eps_t[rows, keep_idx], x0_t[rows, keep_idx]
    return Trajectories(states=states_t, eps=eps_t, x0=x0_t, keep_idx=keep_idx)


def sample_training_batch(denoiser, schedule: SamplingSchedule, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                          sampler, subsample, sample_gen: Optional[torch.Generator],
                          subsample_gen: Optional[torch.Generator], latent_shape, device
                          ) -> tuple[Trajectories, torch.Tensor]:
    """Policy trajectories for `cond` (ε at every step) and the kept steps of each (B, K): what the
    one-process trainer and a sampler actor draw per batch — one function, so that the two draw the
    same batch from the same generators. `sampler` / `subsample`: SamplerConfig / SubsampleConfig."""
    from .subsample import subsample_steps

    traj = sample_trajectories(denoiser, schedule, cond, uncond, sampler.guidance_scale, sampler.kind, sampler.eta,
                               sample_gen, latent_shape=latent_shape)
    keep = subsample_steps(cond.shape[0], sampler.num_steps, subsample.timestep_fraction, subsample.low_variance,
                           subsample.keep_last, subsample_gen).to(device)
    return traj, keep
