"""`PipelinePolicyModel`: what every diffusion `LearnerModel` (learner/learner_actor.py) shares — the
pipeline with its LoRA policy, the sampling schedule, the record gate, the published weights, the
LoRA part of checkpoint/restore and the final files. Subclasses add their learner (`self.learner`,
with `steps`, `opt`, `flow_state_dict()`) and `train`: residual ∇-DB in learner_actor.py, the
baselines in baseline_model.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.transport import ScoredRecord


def learner_device(device: str) -> torch.device:
    """cfg.device inside the learner: auto = the GPU Ray assigned it (if any), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_shapes(pipe, denoiser, cfg: TrainConfig) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(latent (C, H, W), text embedding (L, D)) of the learner's model: a record of another size is
    dead-lettered (`check_record`), never batched."""
    from nablagfn.common.trajectories import pipeline_latent_shape

    emb = denoiser.encode_prompts([""])
    return pipeline_latent_shape(pipe, denoiser, cfg.model.resolution), tuple(emb.shape[-2:])


class PipelinePolicyModel:
    """Pipeline + LoRA (initialised from cfg.seed, as in the one-process trainer) and the schedule."""

    learner: Any  # set by the subclass

    def __init__(self, cfg: TrainConfig, cache_dir: Optional[str] = None):
        from nablagfn.common.models import Denoiser, add_lora, load_pipeline
        from nablagfn.common.schedule import make_schedule

        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = learner_device(cfg.device)
        torch.manual_seed(cfg.seed)  # LoRA (then g_φ / f_ψ) initialisation, as in the one-process trainer
        self.pipe = load_pipeline(cfg.model, cache_dir=cache_dir, device=self.device)
        add_lora(self.pipe.unet, cfg.lora)
        self.denoiser = Denoiser.from_pipeline(self.pipe)
        self.schedule = make_schedule(dict(self.pipe.scheduler.config), cfg.sampler.num_steps, cfg.sampler.kind)
        self.shapes = model_shapes(self.pipe, self.denoiser, cfg)

    @property
    def optimizer_steps(self) -> int:
        return self.learner.steps

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        self.learner.steps = int(value)

    def check(self, rec: ScoredRecord, run_id: str) -> None:
        from .record_batch import check_record

        check_record(rec, self.cfg, self.schedule.timesteps, run_id, self.shapes)

    def policy_state(self) -> dict[str, torch.Tensor]:
        from nablagfn.common.models import lora_state_dict

        return lora_state_dict(self.pipe.unet)

    def restore_policy(self, lora: dict[str, torch.Tensor], optimizer: dict) -> None:
        from nablagfn.common.models import load_lora_state_dict

        load_lora_state_dict(self.pipe.unet, {k: v.to(self.device) for k, v in lora.items()})
        self.learner.opt.load_state_dict(optimizer)

    def finalize(self, run_dir: Path) -> dict[str, str]:
        """Write the final LoRA (diffusers format, `lora/`) and the learner's flow network, if it has
        one (`flow_net.safetensors`: g_φ, or residual DB's f_ψ), as the one-process trainer does."""
        from safetensors.torch import save_file

        from nablagfn.common.models import save_lora_diffusers

        out = {"lora": str(save_lora_diffusers(self.pipe, run_dir / "lora"))}
        flow = self.learner.flow_state_dict()
        if flow:
            save_file(flow, str(run_dir / "flow_net.safetensors"))
            out["flow_net"] = str(run_dir / "flow_net.safetensors")
        return out
