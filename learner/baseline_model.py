"""`BaselineLearnerModel`: the baselines (DRaFT-K, DRaFT-LV, ReFL, DDPO, residual DB) as the model a
distributed learner trains (`LearnerModel` of learner/learner_actor.py).

The same learners as the one-process trainer (learner/baselines_step.py `learn`), fed from scored
records instead of the trainer's own sampling: the samplers carry what each method reads
(`common.policy.baseline_path`: DRaFT's last K states and ε, ReFL's stop states; the kept
transitions for DDPO and residual DB), the reward workers give log R(x_N) (DDPO's advantages,
residual DB's terminal flow, the logged reward). The first-order methods (DRaFT, DRaFT-LV, ReFL)
backpropagate through the reward at points the learner creates with θ's graph, so this learner
holds the VAE and the reward model itself, as their original implementations do; residual DB's
guess β log R(x̂₀#) is computed here too. A record sampled at version v is trained at version
≤ v + max_policy_lag: for DDPO the PPO ratio is taken against the recorded behaviour ε (the
sampling policy's), which is what makes its off-policy step correct.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.transport import ScoredRecord

from .checkpoint import Checkpoint


def full_eps_table(eps: torch.Tensor, keep: torch.Tensor, keep_idx: Optional[torch.Tensor],
                   num_steps: int) -> torch.Tensor:
    """(B, N, *S) behaviour ε by step: `eps` itself when it is already by step (keep_idx None),
    else the kept rows (B, K, *S) scattered to their steps, zero elsewhere."""
    if keep_idx is None:
        return eps
    B = eps.shape[0]
    full = eps.new_zeros((B, num_steps) + tuple(eps.shape[2:]))
    full[torch.arange(B, device=eps.device)[:, None], keep.to(eps.device)] = eps
    return full


class BaselineLearnerModel:
    """Pipeline + LoRA, the VAE and reward, and the baseline learner of `cfg.method`."""

    def __init__(self, cfg: TrainConfig, cache_dir: Optional[str] = None):
        from nablagfn.common.models import Denoiser, add_lora, load_pipeline
        from nablagfn.common.schedule import make_schedule
        from nablagfn.rewards_service.rewards import build_reward

        from .baselines_step import build_baseline_learner
        from .learner_actor import learner_device, model_shapes
        from .local_trainer import reward_vae
        from .nabla_db_step import PolicyModels

        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = learner_device(cfg.device)
        torch.manual_seed(cfg.seed)  # LoRA initialisation, as in the one-process trainer
        self.pipe = load_pipeline(cfg.model, cache_dir=cache_dir, device=self.device)
        add_lora(self.pipe.unet, cfg.lora)
        self.denoiser = Denoiser.from_pipeline(self.pipe)
        sc = cfg.sampler
        self.schedule = make_schedule(dict(self.pipe.scheduler.config), sc.num_steps, sc.kind)
        self.models = PolicyModels(self.denoiser, None, self.schedule, self.denoiser.encode_prompts([""]),
                                   sc.guidance_scale, self.device)
        self.learner = build_baseline_learner(cfg, self.models, reward_vae(self.pipe),
                                              build_reward(cfg.reward, self.device))
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

    def train(self, records: list[ScoredRecord]) -> dict[str, Any]:
        """One baseline update on the records' trajectories (`learn` of learner/baselines_step.py)."""
        from .record_batch import update_data

        data = update_data(records, self.device)
        tr = data.traj
        eps = full_eps_table(tr.eps, data.keep, tr.keep_idx, self.cfg.sampler.num_steps)
        log_r = torch.tensor([r.log_reward for r in records], dtype=torch.float32, device=self.device)
        return self.learner.learn(tr.states, eps, data.keep, data.cond, data.prompts, log_r)

    def policy_state(self) -> dict[str, torch.Tensor]:
        from nablagfn.common.models import lora_state_dict

        return lora_state_dict(self.pipe.unet)

    def _head(self) -> Optional[torch.nn.Module]:
        return getattr(self.learner, "log_flow", None)  # residual DB's scalar log-flow head f_ψ

    def checkpoint(self) -> Checkpoint:
        head = self._head()
        return Checkpoint(lora=self.policy_state(), flow={} if head is None else head.state_dict(),
                          flow_bar={}, optimizer=self.learner.opt.state_dict())

    def restore(self, ckpt: Checkpoint) -> None:
        from nablagfn.common.models import load_lora_state_dict

        load_lora_state_dict(self.pipe.unet, {k: v.to(self.device) for k, v in ckpt.lora.items()})
        head = self._head()
        if head is not None:
            head.load_state_dict(ckpt.flow)
        self.learner.opt.load_state_dict(ckpt.optimizer)

    def finalize(self, run_dir: Path) -> dict[str, str]:
        """The final LoRA (`lora/`, diffusers format) and, for residual DB, f_ψ (`flow_net.safetensors`),
        as the one-process trainer writes them."""
        from safetensors.torch import save_file

        from nablagfn.common.models import save_lora_diffusers

        out = {"lora": str(save_lora_diffusers(self.pipe, run_dir / "lora"))}
        flow = self.learner.flow_state_dict()
        if flow:
            save_file(flow, str(run_dir / "flow_net.safetensors"))
            out["flow_net"] = str(run_dir / "flow_net.safetensors")
        return out
