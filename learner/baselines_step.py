"""The baselines of ALGORITHM.md §4 on the diffusion policy, for the one-process trainer.

`method=` in TrainConfig picks the objective: `residual-nabla-db` is learner/nabla_db_step.py; the
others are the learners here, each with `update(trainer) -> dict` (LocalTrainer.update hands over
to it). An update samples with the trainer's components (`trainer.sample`: prompts, text
embeddings, policy trajectories with every ε recorded, the kept steps), scores the terminal latents
through the VAE in float32 (trajectories with a non-finite reward are dropped and counted, as in
`drop_invalid`), then takes AdamW steps over the LoRA — one per `train_batch_trajectories` (0 = all),
each accumulated over chunks of `chunk_trajectories` — with gradient clipping. The losses are the
pure functions of learner/objectives:

- draft     DRaFT-K: the last K steps re-run with θ's graph from the sampled x_{N−K} with the sampled
            noises (recovered from the trajectory), then the VAE and the reward: −β log R(x_N).
- draft-lv  DRaFT-LV: x_N re-noised to state N−1 `lv_draws` times, one policy step each, −β log R.
- refl      ReFL: a uniform late stop state per trajectory, x̂₀ from one policy call, −β log R(x̂₀).
- ddpo      DDPO: PPO-clip on the kept transitions' Gaussian log-prob ratio (behaviour log-probs from
            the recorded ε), advantages normalised per prompt over a per-prompt reward buffer.
- residual-db  zeroth-order residual DB on the kept transitions with a scalar log-flow head
            `LogFlowHead` (plus β log R(x̂₀#(x)) as a guess when residual_db.guess = x0_reward).

Only first-order gradients are taken (DRaFT/ReFL backpropagate through UNet calls, VAE and reward
once), so the default attention kernels work on CPU; no double backward is needed here.
β = objective.reward_scale, η = objective.pretrained_strength.
"""
from __future__ import annotations

import abc
import collections
import math
from typing import Optional, Sequence

import torch
from torch import nn

from nablagfn.common.config import TrainConfig
from nablagfn.common.models.lora import lora_parameters

from .nabla_db_step import PolicyModels
from .objectives.ddpo import per_prompt_advantages, ppo_clip_loss, transition_log_prob
from .objectives.draft import draft_loss, recover_noise, renoise, rollout_last_steps
from .objectives.refl import draw_stop_steps, refl_x0
from .objectives.residual_db import log_flow_value, next_log_flow, residual_db_loss


def _chunks(idx: torch.Tensor, size: int):
    for start in range(0, idx.numel(), size):
        yield idx[start:start + size]


class BaselineLearner(abc.ABC):
    """The LoRA's AdamW (and `extra_params` groups), the reward calls, and the update skeleton."""

    def __init__(self, cfg: TrainConfig, models: PolicyModels, vae, reward,
                 extra_params: Optional[list[dict]] = None):
        self.cfg, self.models, self.vae, self.reward = cfg, models, vae, reward
        o = cfg.optim
        self.lora_params = lora_parameters(models.denoiser.unet)
        if not self.lora_params:
            raise ValueError("the policy UNet has no LoRA parameters: call add_lora first")
        groups = [{"params": self.lora_params, "lr": o.lr, "weight_decay": o.weight_decay}] + (extra_params or [])
        self.opt = torch.optim.AdamW(groups, betas=tuple(o.betas))
        self.gen = torch.Generator().manual_seed(cfg.seed + 2)  # the method's own draws (stop steps, LV noise)
        self.beta = cfg.objective.reward_scale
        self.steps = 0

    # -- rewards ---------------------------------------------------------------------------------
    def log_reward(self, latents: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """log R(decode(latents)) (B,), float32, with graph when grad is enabled, chunked."""
        from nablagfn.rewards_service.rewards import decode_latents

        c = self.cfg.reward.chunk_size
        out = [self.reward(decode_latents(latents[s:s + c].float(), self.vae), list(prompts[s:s + c])).float()
               for s in range(0, latents.shape[0], c)]
        return torch.cat(out)

    # -- optimisation ----------------------------------------------------------------------------
    def groups(self, n: int) -> list[torch.Tensor]:
        """Trajectory indices of each optimizer step (train_batch_trajectories each, 0 = all)."""
        per = self.cfg.train_batch_trajectories or max(n, 1)
        return list(_chunks(torch.arange(n), per))

    def clip_and_step(self, *param_lists: list) -> float:
        """Clip each parameter list's gradient norm to optim.grad_clip, step; the first list's norm."""
        clip = self.cfg.optim.grad_clip
        norms = [float(torch.nn.utils.clip_grad_norm_(p, clip if clip > 0 else math.inf)) for p in param_lists]
        self.opt.step()
        self.steps += 1
        return norms[0]

    def flow_state_dict(self) -> dict[str, torch.Tensor]:
        """The baselines have no g_φ: nothing is written to flow_net.safetensors (residual DB: f_ψ)."""
        return {}

    # -- the update --------------------------------------------------------------------------------
    def update(self, trainer) -> dict:
        """Sample → terminal rewards → drop non-finite → learn; the trainer's counters and timer."""
        cfg, t = self.cfg, trainer.timer
        t.reset()
        with t("sampling"):
            traj, keep, cond, prompts = trainer.sample(cfg.batch_trajectories)
        with t("reward"), torch.no_grad():
            log_r = self.log_reward(traj.final, prompts)
        valid = torch.isfinite(log_r).to(log_r.device)
        v = valid.to(traj.states.device)
        kept_prompts = [p for p, ok in zip(prompts, valid.tolist()) if ok]
        with t("learner"):
            if bool(valid.any()):
                logs = self.learn(traj.states[v], traj.eps[v], keep[v.to(keep.device)], cond[v], kept_prompts,
                                  log_r[valid].to(traj.states.device))
            else:
                logs = {"loss": float("nan"), "optimizer_steps": 0}
        trainer.update_count += 1
        skipped = int((~valid).sum())
        trainer.skipped_total += skipped
        ok = log_r[valid]
        return {"update": trainer.update_count, "method": cfg.method,
                "reward_mean": float(ok.mean()) if ok.numel() else float("nan"),
                "reward_std": float(ok.std(unbiased=False)) if ok.numel() else float("nan"),
                "valid": int(valid.sum()), "skipped": skipped, "skipped_total": trainer.skipped_total,
                **logs, "seconds": sum(t.seconds.values()), **{f"seconds_{k}": s for k, s in t.seconds.items()}}

    @abc.abstractmethod
    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        """The method's optimizer steps on B valid trajectories: states (B, N+1, …), the behaviour ε
        (B, N, …), kept steps (B, K), text embeddings (B, L, D), prompts, terminal log R (B,)."""

    def _reward_loss_steps(self, n: int, loss_fn) -> dict:
        """Optimizer steps over groups of trajectories for a reward-maximising loss: loss_fn(rows) ->
        log R (rows,) with graph; rows whose log R is not finite are left out (that chunk re-run
        without them, so a NaN cannot reach the shared gradient)."""
        logs = {"loss": 0.0, "grad_norm_lora": 0.0, "dropped_in_loss": 0}
        groups = self.groups(n)
        for group in groups:
            self.opt.zero_grad(set_to_none=True)
            for rows in _chunks(group, self.cfg.chunk_trajectories):
                log_r = loss_fn(rows)
                finite = torch.isfinite(log_r.detach())
                if not bool(finite.all()):
                    logs["dropped_in_loss"] += int((~finite).sum())
                    rows = rows[finite.cpu()]
                    if rows.numel() == 0:
                        continue
                    log_r = loss_fn(rows)
                loss = draft_loss(log_r, self.beta) * (rows.numel() / group.numel())
                loss.backward()
                logs["loss"] += float(loss.detach()) / len(groups)
            logs["grad_norm_lora"] += self.clip_and_step(self.lora_params) / len(groups)
        logs["optimizer_steps"] = len(groups)
        return logs


class DraftLearner(BaselineLearner):
    """DRaFT-K: the last K steps from the sampled x_{N−K} with the sampled noises, −β log R(x_N)."""

    def num_steps_with_grad(self, N: int) -> int:
        return min(self.cfg.draft.k, N)

    @torch.no_grad()
    def noises(self, states: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B, K, …) the noises z of the last K steps, recovered from the trajectories."""
        m, sc = self.models, self.cfg.sampler
        B, N = states.shape[0], states.shape[1] - 1
        a = m.alpha_bar
        return torch.stack([recover_noise(states[:, i], states[:, i + 1], eps[:, i], a[i].expand(B),
                                          a[i + 1].expand(B), sc.kind, sc.eta)
                            for i in range(N - self.num_steps_with_grad(N), N)], dim=1)

    def rollout(self, states: torch.Tensor, z: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x_N of trajectories `rows` re-run from x_{N−K} by the current policy, with θ's graph."""
        m, sc = self.models, self.cfg.sampler
        N, K = states.shape[1] - 1, z.shape[1]
        r = rows.to(states.device)
        return rollout_last_steps(states[r, N - K], N - K, z[r], m.eps(cond[r], adapter=True), m.alpha_bar,
                                  sc.kind, sc.eta)

    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        z = self.noises(states, eps)
        return self._reward_loss_steps(
            states.shape[0], lambda rows: self.log_reward(self.rollout(states, z, cond, rows),
                                                          [prompts[i] for i in rows.tolist()]))


class DraftLVLearner(BaselineLearner):
    """DRaFT-LV: x_N re-noised to state N−1 `lv_draws` times; one policy step each; −β log R."""

    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        m, sc = self.models, self.cfg.sampler
        B, N, n = states.shape[0], states.shape[1] - 1, self.cfg.draft.lv_draws
        a = m.alpha_bar
        shape = states.shape[2:]
        noise = torch.randn((B, n, 2) + tuple(shape), generator=self.gen).to(states.device)

        def rows_log_r(rows):
            r = rows.to(states.device)
            xN = states[r, N].repeat_interleave(n, 0)
            nz = noise[r].flatten(0, 1)  # (rows·n, 2, …): re-noising ε, then the step's z
            x_prev = renoise(xN, a[N - 1], a[N], nz[:, 0])
            x_new = rollout_last_steps(x_prev, N - 1, nz[:, 1:], m.eps(cond[r].repeat_interleave(n, 0), adapter=True),
                                       a, sc.kind, sc.eta)
            log_r_draws = self.log_reward(x_new, [prompts[i] for i in rows.tolist() for _ in range(n)])
            return log_r_draws.view(-1, n).mean(1)  # one value per trajectory: the mean over its draws

        return self._reward_loss_steps(B, rows_log_r)


class ReflLearner(BaselineLearner):
    """ReFL: a uniform stop state in [⌊f·N⌋, N−1] per trajectory, −β log R(x̂₀) from one policy call."""

    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        m = self.models
        B, N = states.shape[0], states.shape[1] - 1
        stop = draw_stop_steps(B, N, self.cfg.refl.min_step_fraction, self.gen).to(states.device)

        def rows_log_r(rows):
            r = rows.to(states.device)
            idx = stop[r]
            x = states[r, idx]
            x0 = refl_x0(x, m.eps(cond[r], adapter=True)(x, idx), m.alpha_bar[idx])
            return self.log_reward(x0, [prompts[i] for i in rows.tolist()])

        logs = self._reward_loss_steps(B, rows_log_r)
        logs["stop_step_mean"] = float(stop.float().mean())
        return logs


def _kept_rows(keep: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(trajectory, step) of every kept transition, trajectory-major."""
    B, K = keep.shape
    return (torch.arange(B, device=device)[:, None].expand(B, K).reshape(-1), keep.to(device).reshape(-1))


class DDPOLearner(BaselineLearner):
    """DDPO: PPO-clip on the kept transitions, per-prompt normalised β log R, `inner_epochs` passes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.history: dict[str, collections.deque] = {}

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        d = self.cfg.ddpo
        adv = per_prompt_advantages(rewards, prompts, d.min_count, self.history if d.buffer_size else None)
        if d.buffer_size:
            for p, r in zip(prompts, rewards.tolist()):
                self.history.setdefault(p, collections.deque(maxlen=d.buffer_size)).append(r)
        return adv

    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        m, sc, d = self.models, self.cfg.sampler, self.cfg.ddpo
        B = states.shape[0]
        adv = self.advantages(self.beta * log_r, prompts).to(states.device)
        traj_of, idx = _kept_rows(keep, states.device)
        a_t, a_n = m.alpha_bar[idx], m.alpha_bar[idx + 1]
        x, x_next = states[traj_of, idx], states[traj_of, idx + 1]
        old = transition_log_prob(x, x_next, eps[traj_of, idx], a_t, a_n, sc.kind, sc.eta)
        sums = collections.Counter()
        n_steps = 0
        for _ in range(d.inner_epochs):
            perm = torch.randperm(B, generator=self.gen)
            for group in self.groups(B):
                trajs = perm[group].to(states.device)
                g_rows = torch.isin(traj_of, trajs).nonzero(as_tuple=True)[0]
                self.opt.zero_grad(set_to_none=True)
                for chunk in _chunks(trajs, self.cfg.chunk_trajectories):
                    r = torch.isin(traj_of, chunk).nonzero(as_tuple=True)[0]
                    new = transition_log_prob(x[r], x_next[r], m.eps(cond[traj_of[r]], adapter=True)(x[r], idx[r]),
                                              a_t[r], a_n[r], sc.kind, sc.eta)
                    terms = ppo_clip_loss(new, old[r], adv[traj_of[r]], d.clip, d.adv_clip_max)
                    w = r.numel() / g_rows.numel()
                    (terms["loss"] * w).backward()
                    for k, v in terms.items():
                        sums[k] += w * float(v.detach())
                sums["grad_norm_lora"] += self.clip_and_step(self.lora_params)
                n_steps += 1
        out = {k: v / n_steps for k, v in sums.items()}
        out["optimizer_steps"] = n_steps
        return out


class LogFlowHead(nn.Module):
    """f_ψ(x_t, t): a scalar log-flow from a latent — two convolutions, the timestep's sinusoidal
    embedding added in between, a global mean pool and a linear output initialised to zero."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        emb = self.time(get_timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]), self.width).to(x.device))
        h = nn.functional.silu(self.conv1(x.float())) + emb[:, :, None, None]
        h = nn.functional.silu(self.conv2(h)).mean(dim=(2, 3))
        return self.out(nn.functional.silu(h)).squeeze(-1)


class ResidualDBLearner(BaselineLearner):
    """Zeroth-order residual DB on the kept transitions with the scalar head f_ψ (and the guess)."""

    def __init__(self, cfg: TrainConfig, models: PolicyModels, vae, reward):
        channels = int(models.denoiser.unet.config.in_channels)
        self.log_flow = LogFlowHead(channels, cfg.residual_db.flow_width).to(models.device)
        o = cfg.optim
        super().__init__(cfg, models, vae, reward, [{"params": list(self.log_flow.parameters()), "lr": o.flow_lr,
                                                     "weight_decay": o.flow_weight_decay}])

    def flow_state_dict(self) -> dict[str, torch.Tensor]:
        """f_ψ, written to flow_net.safetensors (residual DB's flow network)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.log_flow.state_dict().items()}

    @torch.no_grad()
    def guesses(self, x: torch.Tensor, idx: torch.Tensor, cond: torch.Tensor, prompts: list[str]) -> Optional[torch.Tensor]:
        """β log R(x̂₀#(x)) per row (pretrained one-step prediction), or None (guess=none)."""
        if self.cfg.residual_db.guess == "none":
            return None
        c = self.cfg.chunk_trajectories
        x0 = torch.cat([self.models.x0_fn("pretrained", cond[s:s + c], idx[s:s + c])(x[s:s + c])
                        for s in range(0, x.shape[0], c)])
        return self.beta * self.log_reward(x0, prompts).to(x.device)

    def learn(self, states, eps, keep, cond, prompts, log_r) -> dict:
        m, sc, ob = self.models, self.cfg.sampler, self.cfg.objective
        N = states.shape[1] - 1
        traj_of, idx = _kept_rows(keep, states.device)
        x, x_next = states[traj_of, idx], states[traj_of, idx + 1]
        is_last = idx == N - 1
        row_prompts = [prompts[i] for i in traj_of.tolist()]
        guess = self.guesses(x, idx, cond[traj_of], row_prompts)
        guess_next, ok = None, torch.ones_like(is_last)
        if guess is not None:  # at x' only where x' is not terminal (there log F̃ = β log R(x_N) exactly)
            inner = (~is_last).nonzero(as_tuple=True)[0]
            guess_next = torch.zeros_like(guess)
            if inner.numel():
                guess_next[inner] = self.guesses(x_next[inner], idx[inner] + 1, cond[traj_of[inner]],
                                                 [row_prompts[i] for i in inner.tolist()])
            ok &= torch.isfinite(guess) & torch.isfinite(guess_next)  # rows with a non-finite guess sit out
        terminal = self.beta * log_r[traj_of]
        a_t, a_n = m.alpha_bar[idx], m.alpha_bar[idx + 1]
        sums = collections.Counter()
        groups = self.groups(states.shape[0])
        n_steps = 0
        for group in groups:
            g_rows = (torch.isin(traj_of, group.to(states.device)) & ok).nonzero(as_tuple=True)[0]
            if g_rows.numel() == 0:
                continue
            n_steps += 1
            self.opt.zero_grad(set_to_none=True)
            for chunk in _chunks(group.to(states.device), self.cfg.chunk_trajectories):
                r = (torch.isin(traj_of, chunk) & ok).nonzero(as_tuple=True)[0]
                if r.numel() == 0:
                    continue
                c = cond[traj_of[r]]
                lp_pol = transition_log_prob(x[r], x_next[r], m.eps(c, adapter=True)(x[r], idx[r]),
                                             a_t[r], a_n[r], sc.kind, sc.eta)
                with torch.no_grad():
                    lp_pre = transition_log_prob(x[r], x_next[r], m.eps(c, adapter=False)(x[r], idx[r]),
                                                 a_t[r], a_n[r], sc.kind, sc.eta)
                lf = log_flow_value(self.log_flow(x[r], m.state_t[idx[r]]), None if guess is None else guess[r])
                lf_next = next_log_flow(self.log_flow(x_next[r], m.state_t[idx[r] + 1]),
                                        None if guess_next is None else guess_next[r],
                                        terminal[r], is_last[r])
                terms = residual_db_loss(lp_pol, lp_pre, lf, lf_next, ob.pretrained_strength)
                w = r.numel() / g_rows.numel()
                (terms["loss"] * w).backward()
                for k, v in terms.items():
                    sums[k] += w * float(v.detach()) / len(groups)
            sums["grad_norm_lora"] += self.clip_and_step(self.lora_params, list(self.log_flow.parameters())) / len(groups)
        out = dict(sums)
        out["optimizer_steps"] = n_steps
        return out


LEARNERS = {"draft": DraftLearner, "draft-lv": DraftLVLearner, "refl": ReflLearner, "ddpo": DDPOLearner,
            "residual-db": ResidualDBLearner}


def build_baseline_learner(cfg: TrainConfig, models: PolicyModels, vae, reward) -> BaselineLearner:
    """The learner of baseline `cfg.method` (see LEARNERS)."""
    try:
        cls = LEARNERS[cfg.method]
    except KeyError:
        raise ValueError(f"method {cfg.method!r} is not a baseline; known: {sorted(LEARNERS)}") from None
    return cls(cfg, models, vae, reward)
