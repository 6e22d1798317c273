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

from typing import Any, Optional

import torch

from nablagfn.common.config import TrainConfig
from nablagfn.common.transport import ScoredRecord

from .checkpoint import Checkpoint
from .policy_model import PipelinePolicyModel


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


class BaselineLearnerModel(PipelinePolicyModel):
    """Pipeline + LoRA, the VAE and reward, and the baseline learner of `cfg.method`."""

    def __init__(self, cfg: TrainConfig, cache_dir: Optional[str] = None):
        from nablagfn.rewards_service.rewards import build_reward

        from .baselines_step import build_baseline_learner
        from .local_trainer import reward_vae
        from .nabla_db_step import PolicyModels

        super().__init__(cfg, cache_dir)
        self.models = PolicyModels(self.denoiser, None, self.schedule, self.denoiser.encode_prompts([""]),
                                   cfg.sampler.guidance_scale, self.device)
        self.learner = build_baseline_learner(cfg, self.models, reward_vae(self.pipe),
                                              build_reward(cfg.reward, self.device))

    def train(self, records: list[ScoredRecord]) -> dict[str, Any]:
        """One baseline update on the records' trajectories (`learn` of learner/baselines_step.py)."""
        from .record_batch import update_data

        data = update_data(records, self.device)
        tr = data.traj
        eps = full_eps_table(tr.eps, data.keep, tr.keep_idx, self.cfg.sampler.num_steps)
        log_r = torch.tensor([r.log_reward for r in records], dtype=torch.float32, device=self.device)
        return self.learner.learn(tr.states, eps, data.keep, data.cond, data.prompts, log_r)

    def _head(self) -> Optional[torch.nn.Module]:
        return getattr(self.learner, "log_flow", None)  # residual DB's scalar log-flow head f_ψ

    def checkpoint(self) -> Checkpoint:
        head = self._head()
        return Checkpoint(lora=self.policy_state(), flow={} if head is None else head.state_dict(),
                          flow_bar={}, optimizer=self.learner.opt.state_dict())

    def restore(self, ckpt: Checkpoint) -> None:
        self.restore_policy(ckpt.lora, ckpt.optimizer)
        head = self._head()
        if head is not None:
            head.load_state_dict(ckpt.flow)
