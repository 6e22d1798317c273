"""The `nablagfn` command line: subcommands parse arguments and call library functions."""
from __future__ import annotations

import argparse
import json
import sys

from nablagfn.common.config_io import ConfigError, build_config, load_yaml


def _bench_gmm(args) -> int:
    from nablagfn.bench.gmm.bench import run_gmm_bench
    from nablagfn.bench.gmm.run import GMMBenchConfig
    from nablagfn.bench.gmm.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
        layers = [load_yaml(args.config)] if args.config else []
        cli = {"method": args.method}
        if args.seed is not None:
            cli["seed"] = args.seed
        if args.updates is not None:
            cli["updates"] = args.updates
        cfg = build_config(GMMBenchConfig, *layers, cli, overrides=args.overrides)
    except (SpecError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_gmm_bench(spec, cfg, args.out, progress=not args.no_progress)
    brief = {k: summary[k] for k in ("spec", "method", "seed", "tv", "mean_log_reward", "target_mean_log_reward",
                                      "updates", "wall_seconds", "flow_error")}
    brief["pretrained_tv"] = summary["pretrained"]["tv"]
    brief["exact_flow_tv"] = summary["exact_flow"]["tv"]
    print(json.dumps(brief, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nablagfn", description=__doc__,
                                     epilog="Config overrides: append dotted key=value pairs, e.g. objective.gamma=squared")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks (print JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    gmm = bench_sub.add_parser("gmm", help="the exact Gaussian-mixture benchmark (ALGORITHM.md §5)")
    gmm.add_argument("--spec", required=True, help="spec JSON (shared/benchmarks/README.md)")
    gmm.add_argument("--method", default="residual-nabla-db")
    gmm.add_argument("--out", required=True, help="output directory")
    gmm.add_argument("--seed", type=int)
    gmm.add_argument("--updates", type=int)
    gmm.add_argument("--config", help="YAML file with GMMBenchConfig fields")
    gmm.add_argument("--no-progress", action="store_true")
    gmm.set_defaults(func=_bench_gmm)
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
