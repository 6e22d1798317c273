"""The `nablagfn` command line: subcommands parse arguments and call library functions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nablagfn.common.config_io import ConfigError, build_config, load_yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """A preset by name (nablagfn/presets/<name>.yaml) or by path to a YAML file."""
    path = PRESET_DIR / f"{name}.yaml"
    if path.is_file():
        return load_yaml(path)
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return load_yaml(name)
    raise ConfigError(f"preset: unknown preset {name!r}; known: {preset_names()} (or a path to a YAML file)")


def _train_config(args):
    """TrainConfig from: defaults <- preset <- --config <- CLI flags <- key=value overrides."""
    from nablagfn.common.config import TrainConfig

    layers = [load_preset(args.preset)] if args.preset else []
    if args.config:
        layers.append(load_yaml(args.config))
    cli: dict = {}
    if args.reward is not None:
        cli["reward"] = {"name": args.reward}
    for key in ("updates", "seed", "run_dir"):
        if getattr(args, key, None) is not None:
            cli[key] = getattr(args, key)
    if getattr(args, "no_progress", False):
        cli["progress"] = False
    return build_config(TrainConfig, *layers, cli, overrides=args.overrides)


def _load_errors() -> tuple:
    from nablagfn.common.models import ModelLoadError
    from nablagfn.common.prompts import PromptError
    from nablagfn.rewards_service.rewards import RewardError

    return (ConfigError, ModelLoadError, PromptError, RewardError)


DEFAULT_TRAIN_PRESET = "digits"  # `nablagfn train` with neither --preset nor --config: the CPU demo
DEFAULT_BENCH_PRESET = "tiny"  # the service benchmarks: the tiny SD pipeline (text conditioning, VAE)


# Fields a resumed run must keep (the checkpoint, the records in Redis and the LoRA shapes depend on
# them); everything else (updates, sizes, resources, timeouts, ...) may be overridden on --resume.
RESUME_FIXED = ("model.", "lora.", "flow_net.", "sampler.", "subsample.", "objective.", "optim.", "reward.",
                "prompts.", "method", "seed", "run_dir", "distributed.namespace", "distributed.redis.num_shards",
                "distributed.latent_dtype")
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped cleanly on SIGTERM, resumable, not finished


def _resume_config(args):
    """TrainConfig of `train --resume RUN_DIR`: RUN_DIR/config.yaml <- --updates <- safe overrides."""
    from nablagfn.common.config import TrainConfig

    run_dir = Path(args.resume)
    if args.preset or args.config:
        raise ConfigError("--resume: the run's own config.yaml is used; drop --preset/--config")
    if args.mode != "distributed":
        raise ConfigError("--resume: only distributed runs resume (--mode distributed)")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: run dir {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir / 'config.yaml'} is missing: not a run dir of `nablagfn train`")
    if not (run_dir / "checkpoint" / "state.json").is_file():
        raise ConfigError(f"--resume: {run_dir / 'checkpoint'} has no checkpoint (state.json): nothing to resume "
                          "(the run stopped before its first checkpoint, or distributed.checkpoint_every=0)")
    fixed = [o for o in args.overrides if o.split("=", 1)[0].startswith(RESUME_FIXED)]
    if fixed or args.seed is not None or args.reward is not None:
        bad = fixed + (["--seed"] if args.seed is not None else []) + (["--reward"] if args.reward else [])
        raise ConfigError(f"--resume: {', '.join(bad)} cannot change on a resumed run (the checkpoint and "
                          f"the queued records depend on it); fixed: {', '.join(RESUME_FIXED)}")
    cli: dict = {"run_dir": str(run_dir)}
    if args.updates is not None:
        cli["updates"] = args.updates
    if args.no_progress:
        cli["progress"] = False
    cfg = build_config(TrainConfig, load_yaml(run_dir / "config.yaml"), cli, overrides=args.overrides)
    url = cfg.distributed.redis.url
    if url and ":***@" in url and not args.redis_url:  # config.yaml is written without the password
        raise ConfigError(f"--resume: the run used Redis at {url}; its password is not stored in config.yaml: "
                          "give the full URL again with --redis-url (or distributed.redis.url=...)")
    return cfg


def _train_distributed(args) -> int:
    from nablagfn.driver import DriverError, train_distributed

    errors = _load_errors()
    try:
        cfg = _resume_config(args) if args.resume else _train_config(args)
        summary = train_distributed(cfg, redis_url=args.redis_url, ray_address=args.ray_address,
                                    print_table=cfg.progress)
    except errors + (DriverError,) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.get("stopped"):
        print(f"stopped on SIGTERM after update {summary['updates']}; continue with: "
              f"nablagfn train --resume {cfg.run_dir}", file=sys.stderr)
    brief = {k: summary[k] for k in ("mode", "updates", "seed", "reward", "reward_first", "reward_last",
                                     "reward_gain", "lag_max", "dead_letters", "optimizer_steps",
                                     "wall_seconds", "learner_busy_fraction")}
    brief["final_version"] = summary["learner"]["version"]
    brief["run_dir"] = str(cfg.run_dir)
    brief["stopped"] = summary["stopped"]
    brief["restarts"] = summary["restarts"]
    brief["unaccounted"] = summary["accounting"]["unaccounted"]
    print(json.dumps(brief, indent=2))
    return EXIT_STOPPED if summary["stopped"] else 0


def _train(args) -> int:
    from nablagfn.learner.local_trainer import LocalTrainer

    if args.resume:
        return _train_distributed(args)
    if args.preset is None and args.config is None:
        args.preset = DEFAULT_TRAIN_PRESET
    if args.mode == "distributed":
        return _train_distributed(args)
    errors = _load_errors()
    try:
        cfg = _train_config(args)
        trainer = LocalTrainer(cfg)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = trainer.run()
    brief = {k: summary[k] for k in ("updates", "seed", "reward", "eval_reward_gain", "skipped_total",
                                     "optimizer_steps", "wall_seconds", "device")}
    brief["eval_reward_start"] = summary["eval_start"]["reward_mean"]
    brief["eval_reward_end"] = summary["eval_end"]["reward_mean"]
    brief["run_dir"] = str(cfg.run_dir)
    print(json.dumps(brief, indent=2))
    return 0


def _json_result(compute, errors: tuple, ok=lambda result: True) -> int:
    """Run a benchmark: an expected error is printed as `error: ...` (exit 2); the result is printed
    as JSON (exit 0, or 1 when `ok(result)` is False)."""
    try:
        result = compute()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0 if ok(result) else 1


def _bench_step(args) -> int:
    from nablagfn.bench.step import bench_step

    import tempfile

    def compute():
        cfg = _train_config(args)
        if args.run_dir is not None:
            return bench_step(cfg, warmup=args.warmup)
        with tempfile.TemporaryDirectory(prefix="nablagfn-bench-step-") as tmp:  # nothing worth keeping
            cfg.run_dir = tmp
            return bench_step(cfg, warmup=args.warmup)

    return _json_result(compute, _load_errors())


def _bench_gmm(args) -> int:
    from nablagfn.bench.gmm.bench import run_gmm_bench
    from nablagfn.bench.gmm.baselines import METHOD_DEFAULTS, GMMMethodsConfig
    from nablagfn.common.config import METHODS
    from nablagfn.bench.gmm.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
        layers = [load_yaml(args.config)] if args.config else []
        cli = {}
        if args.seed is not None:
            cli["seed"] = args.seed
        if args.updates is not None:
            cli["updates"] = args.updates
        if args.model_family is not None:
            cli["model_family"] = args.model_family
        methods = list(METHODS) if args.method == "all" else [args.method]
        # per-method defaults (baselines.METHOD_DEFAULTS) <- --config <- flags <- the method <- overrides
        cfgs = {m: build_config(GMMMethodsConfig, METHOD_DEFAULTS.get(m, {}), *layers, cli, {"method": m},
                                overrides=args.overrides) for m in methods}
        for cfg in cfgs.values():  # the spec's β defines the target: the objective's β is that one
            cfg.objective.reward_scale = spec.beta
    except (SpecError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.method == "all":
        return _bench_gmm_all(spec, cfgs, args)
    cfg = cfgs[args.method]
    if getattr(args, "distributed", False):
        return _bench_gmm_distributed(spec, cfg, args)
    summary = run_gmm_bench(spec, cfg, args.out, progress=not args.no_progress)
    brief = {k: summary[k] for k in ("spec", "method", "seed", "tv", "mean_log_reward", "target_mean_log_reward",
                                      "updates", "wall_seconds", "flow_error")}
    brief["pretrained_tv"] = summary["pretrained"]["tv"]
    brief["exact_flow_tv"] = summary["exact_flow"]["tv"]
    brief["model_family"] = cfg.model_family
    print(json.dumps(brief, indent=2))
    return 0


def _eval(args) -> int:
    """`nablagfn eval RUN_DIR ...` (nablagfn/evaluate.py). argparse puts trailing key=value
    overrides into the positional list: those that are not existing paths are EvalConfig overrides."""
    from nablagfn.common.config import EvalConfig
    from nablagfn.common.evaluation import CheckpointError, FeatureError, HeldoutError
    from nablagfn.evaluate import run_eval

    runs = [r for r in args.runs if "=" not in r or Path(r).exists()]
    overrides = [r for r in args.runs if r not in runs] + list(args.overrides)
    cli = {k: getattr(args, k) for k in ("prompts", "samples", "seed", "features", "features_model_path",
                                         "max_prompts", "out", "device") if getattr(args, k) is not None}
    if args.no_progress:
        cli["progress"] = False
    try:
        cfg = build_config(EvalConfig, cli, overrides=overrides)
        summary = run_eval(cfg, runs)
    except (*_load_errors(), CheckpointError, FeatureError, HeldoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("csv", "plots", "prompts_source", "features", "samples_per_prompt")}
    brief["rows"] = [{k: r[k] for k in ("run", "method", "update", "reward_mean", "reward_std", "diversity",
                                        "prior_drift")} for r in summary["rows"]]
    print(json.dumps(brief, indent=2))
    return 0


def _bench_gmm_all(spec, cfgs: dict, args) -> int:
    """`--method all`: each method once into OUT/<method>/, one table, OUT/comparison.json."""
    from nablagfn.bench.gmm.baselines import comparison_row, format_table
    from nablagfn.bench.gmm.bench import run_gmm_bench

    out = Path(args.out)
    rows, refs = [], {}
    for method, cfg in cfgs.items():
        summary = run_gmm_bench(spec, cfg, out / method, progress=not args.no_progress)
        rows.append(comparison_row(summary))
        refs = {"pretrained": summary["pretrained"], "exact_flow": summary["exact_flow"]}
    comparison = {"spec": spec.name, "methods": rows, **refs}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    print(format_table(rows, refs))
    print(f"written: {out / 'comparison.json'}")
    return 0


def _bench_gmm_distributed(spec, cfg, args) -> int:
    """`bench gmm --distributed`: bench/distributed_gmm.py (the one-process run too with --compare-local)."""
    from nablagfn.bench.distributed_gmm import run_gmm_distributed

    try:
        summary = run_gmm_distributed(spec, cfg, args.out, progress=not args.no_progress,
                                      compare_local=args.compare_local)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = ("spec", "method", "mode", "seed", "tv", "mean_log_reward", "target_mean_log_reward", "updates",
            "final_version", "train_seconds", "wall_seconds", "policy_lag", "one_process_tv", "tv_difference",
            "within_tolerance", "tolerance", "one_process_train_seconds")
    brief = {k: summary[k] for k in keys if k in summary}
    brief["pretrained_tv"] = summary["pretrained"]["tv"]
    brief["exact_flow_tv"] = summary["exact_flow"]["tv"]
    brief["dropped_stale"] = summary["learner"]["dropped_stale"]
    print(json.dumps(brief, indent=2))
    return 0


def _bench_transport(args) -> int:
    from nablagfn.common.transport import RecordError, TransportError, bench_transport

    return _json_result(lambda: bench_transport(args.n, url=args.url, batch=args.batch),
                        (RecordError, TransportError, ValueError))


def _bench_distributed(args) -> int:
    """bench sampler | learner | lora-sync: the distributed service's figures (bench/distributed.py)."""
    from nablagfn.bench import distributed as bd
    from nablagfn.common.transport import TransportError

    if args.preset is None and args.config is None:
        args.preset = DEFAULT_BENCH_PRESET

    def compute():
        cfg = _train_config(args)
        if args.bench == "sampler":
            return bd.bench_sampler(cfg, rounds=args.rounds, warmup=args.warmup, url=args.url)
        if args.bench == "learner":
            return bd.bench_learner(cfg, updates=args.rounds, warmup=args.warmup, url=args.url)
        return bd.bench_lora_sync(cfg, publishes=args.rounds, interval_s=args.interval, url=args.url)

    return _json_result(compute, _load_errors() + (TransportError,))


def _bench_soak(args) -> int:
    """bench soak: the distributed run with a sampler and a reward worker killed every --kill-every s;
    exit 1 when a record is unaccounted for or trained twice."""
    from nablagfn.bench.soak import run_soak
    from nablagfn.driver import DriverError

    if args.preset is None and args.config is None:
        args.preset = DEFAULT_BENCH_PRESET
    return _json_result(
        lambda: run_soak(_train_config(args), args.minutes, args.kill_every, seed=args.seed or 0,
                         run_dir=args.run_dir),
        _load_errors() + (DriverError, ValueError),
        ok=lambda r: r["unaccounted"] == 0 and r["trained_twice"] == 0)


def _bench_metrics(args) -> int:
    from nablagfn.bench.metrics_overhead import measure, step_times_from_run

    steps = {"sampler_step_s": args.sampler_step_s, "learner_step_s": args.learner_step_s}
    if args.run_dir:
        try:
            steps = {**step_times_from_run(args.run_dir), **{k: v for k, v in steps.items() if v}}
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --run-dir: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(measure(**steps, batch=args.batch, repeats=args.repeats), indent=2))
    return 0


def _add_distributed_benches(bench_sub) -> None:
    tr = bench_sub.add_parser("transport", help="encode + XADD + XREADGROUP + decode of SD1.5-sized records: MB/s")
    tr.add_argument("--n", type=int, default=20, help="records per measurement")
    tr.add_argument("--batch", type=int, default=4, help="records per XREADGROUP")
    tr.add_argument("--url", help="Redis URL (default: an embedded server)")
    tr.set_defaults(func=_bench_transport)
    helps = {"sampler": ("sampler actor trajectories/s over a bare loop of the same UNet calls", 5),
             "learner": ("learner busy fraction on a pre-filled scored stream", 3),
             "lora-sync": ("LoRA publish -> all sampler actors updated, p50/p99 (Ray actors)", 10)}
    for name, (text, rounds) in helps.items():
        b = bench_sub.add_parser(name, help=text)
        b.add_argument("--preset", help=f"a preset name or YAML path (default {DEFAULT_BENCH_PRESET})")
        b.add_argument("--config", help="YAML file with TrainConfig fields (over the preset)")
        b.add_argument("--reward", help="reward name (reward.name)")
        b.add_argument("--seed", type=int)
        b.add_argument("--rounds", type=int, default=rounds,
                       help="sampler rounds / learner updates / LoRA publishes measured")
        b.add_argument("--warmup", type=int, default=1)
        b.add_argument("--interval", type=float, default=1.0, help="lora-sync: seconds between publishes")
        b.add_argument("--url", help="Redis URL (default: an embedded server)")
        b.set_defaults(func=_bench_distributed, updates=None, run_dir=None, no_progress=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nablagfn", description=__doc__,
                                     epilog="Config overrides: append dotted key=value pairs, e.g. objective.gamma=squared")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks (print JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    gmm = bench_sub.add_parser("gmm", help="the exact Gaussian-mixture benchmark (ALGORITHM.md §5)")
    gmm.add_argument("--spec", required=True, help="spec JSON (shared/benchmarks/README.md)")
    from nablagfn.common.config import METHODS
    gmm.add_argument("--method", default="residual-nabla-db", choices=[*METHODS, "all"],
                     help="the objective, or all: each method once and a comparison table")
    gmm.add_argument("--out", required=True, help="output directory")
    gmm.add_argument("--seed", type=int)
    gmm.add_argument("--updates", type=int)
    gmm.add_argument("--model-family", dest="model_family", choices=["ddpm", "flow"],
                     help="pretrained model: ddpm (ε, SD schedule; default) or flow (rectified flow, flow-SDE sampler)")
    gmm.add_argument("--config", help="YAML file with GMMBenchConfig fields")
    gmm.add_argument("--no-progress", action="store_true")
    gmm.add_argument("--distributed", action="store_true",
                     help="run through the service: Ray sampler actors, a reward worker and the learner over Redis")
    gmm.add_argument("--compare-local", dest="compare_local", action="store_true",
                     help="with --distributed: also run the one-process benchmark and report the TV difference")
    gmm.set_defaults(func=_bench_gmm)

    step = bench_sub.add_parser("step", help="wall time and peak memory of one training update, per phase")
    step.add_argument("--preset", default="tiny", help="a preset name or YAML path (default tiny)")
    step.add_argument("--config", help="YAML file with TrainConfig fields (over the preset)")
    step.add_argument("--reward", help="reward name (reward.name)")
    step.add_argument("--seed", type=int)
    step.add_argument("--run-dir", dest="run_dir", help="run directory (default: a temporary one)")
    step.add_argument("--warmup", type=int, default=1, help="updates run before the measured one")
    step.set_defaults(func=_bench_step, updates=None, no_progress=True)

    _add_distributed_benches(bench_sub)

    soak = bench_sub.add_parser("soak", help="the distributed run for --minutes, killing a random sampler and reward "
                                             "worker every --kill-every s; JSON accounting (unaccounted must be 0)")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--kill-every", dest="kill_every", type=float, default=60.0, help="seconds between kills")
    soak.add_argument("--preset", help=f"a preset name or YAML path (default {DEFAULT_BENCH_PRESET})")
    soak.add_argument("--config", help="YAML file with TrainConfig fields (over the preset)")
    soak.add_argument("--reward", help="reward name (reward.name)")
    soak.add_argument("--seed", type=int, help="seed of the run and of the choice of actors to kill")
    soak.add_argument("--run-dir", dest="run_dir", help="keep the run here (default: a temporary dir)")
    soak.set_defaults(func=_bench_soak, updates=None, no_progress=True)

    mb = bench_sub.add_parser("metrics", help="Prometheus hook time per sampler round / learner update vs step time")
    mb.add_argument("--run-dir", dest="run_dir", help="a finished distributed run: step times from its metrics")
    mb.add_argument("--sampler-step-s", dest="sampler_step_s", type=float, help="sampler round time (s)")
    mb.add_argument("--learner-step-s", dest="learner_step_s", type=float, help="learner update compute time (s)")
    mb.add_argument("--batch", type=int, default=64, help="trajectories per learner update (lag observations)")
    mb.add_argument("--repeats", type=int, default=2000)
    mb.set_defaults(func=_bench_metrics)

    train = sub.add_parser("train", help="fine-tune a diffusion model with residual nabla-DB")
    train.add_argument("--mode", choices=["distributed", "local"], default="distributed",
                       help="distributed: Ray sampler actors, reward workers and a learner over Redis "
                            "Streams (default); local: everything in this process, for debugging")
    train.add_argument("--redis-url", dest="redis_url",
                       help="redis:// or rediss:// URL (default: an embedded server in the run dir)")
    train.add_argument("--ray-address", dest="ray_address",
                       help="Ray cluster address host:port or ray://host:port (default: a local runtime)")
    train.add_argument("--preset", help=f"a preset name or YAML path (default {DEFAULT_TRAIN_PRESET} "
                                        "when no --config is given)")
    train.add_argument("--config", help="YAML file with TrainConfig fields (over the preset)")
    train.add_argument("--reward", help="reward name (reward.name)")
    train.add_argument("--updates", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--run-dir", dest="run_dir", help="output directory (run_dir)")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped distributed run: its config.yaml, checkpoint and embedded Redis "
                            "(add --updates N for the new total; other key=value overrides where safe)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate run checkpoints: reward, diversity, prior drift; CSV + Pareto PNGs")
    ev.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `nablagfn train`")
    ev.add_argument("--prompts", help="held-out prompts: heldout (default: the split the runs did not "
                                      "train on), a built-in source name, or a text file")
    ev.add_argument("--samples", type=int, help="samples per prompt (>= 2; default 8)")
    ev.add_argument("--max-prompts", dest="max_prompts", type=int, help="use the first N prompts (0 = all)")
    ev.add_argument("--seed", type=int, help="noise seed (prompt i: SeedSequence((seed, i)))")
    ev.add_argument("--features", help="auto | clip | dreamsim | package.module:factory")
    ev.add_argument("--features-model", dest="features_model_path",
                    help="the feature extractor's local weights (clip: a CLIPModel dir); default: the "
                         "run's reward.model_path")
    ev.add_argument("--out", help="output directory (default runs/eval)")
    ev.add_argument("--device", help="auto, cpu, cuda[:N]")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Anything left of the form dotted.key=value is a config override, wherever it stands.
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
