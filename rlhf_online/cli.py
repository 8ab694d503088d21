"""`rlhf-online` command line: serve, model, bench, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rlhf_online import config, logs
from rlhf_online.errors import ConfigError, RlhfError

log = logging.getLogger("rlhf_online.cli")

SERVICES = {"generation": config.GenerationSettings, "reward": config.RewardSettings,
            "trainer": config.TrainerSettings}


def _serve(args: argparse.Namespace) -> int:
    """Start one service and block until SIGTERM."""
    settings = config.build(SERVICES[args.service], args)
    logs.configure(settings.log_level)
    from services import bootstrap

    return {"generation": bootstrap.run_generation, "reward": bootstrap.run_reward,
            "trainer": bootstrap.run_trainer}[args.service](settings)


def _model_fetch(args: argparse.Namespace) -> int:
    """Provision the built-in default model under the data dir (once)."""
    from rlhf_online.models.provision import fetch_default_model

    path = fetch_default_model(Path(args.data_dir), force=args.force)
    print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark and write its JSON and Markdown table."""
    import importlib

    return importlib.import_module(f"rlhf_online.bench.{args.bench_command.replace('-', '_')}").main(args)


def _policies(args: argparse.Namespace) -> int:
    """List, activate or roll back adapter versions in the registry directory."""
    import json

    from rlhf_online.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(Path(args.adapter_dir or Path(args.data_dir) / "adapters"))
    if args.policies_command == "list":
        current = registry.current()
        for m in registry.describe():
            mark = "*" if m["version"] == current else " "
            print(f"{mark} {m['version']}  parent={m.get('parent') or '-'}  base={m['base_model']}  "
                  f"metrics={json.dumps(m.get('metrics', {}), sort_keys=True)}")
        print(f"CURRENT = {current or '(bare base)'}")
    elif args.policies_command == "activate":
        registry.activate(args.version)
        print(f"CURRENT = {args.version or '(bare base)'}")
    else:
        print(f"CURRENT = {registry.rollback() or '(bare base)'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The end-to-end demo."""
    from rlhf_online import demo

    return demo.main(args)


def _simulate(args: argparse.Namespace) -> int:
    """Run simulated users against a Generation service and print their totals."""
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.simulate.users import UserPoolConfig, run_for

    cfg = UserPoolConfig(users=args.users, personas=tuple(args.personas.split(",")), pair_fraction=args.pair_fraction,
                         noise=args.noise, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed)
    prompts = [p.prompt for p in load_prompts(args.split)]
    stats = run_for(args.addr, prompts, cfg, args.seconds, Path(args.events) if args.events else None)
    print(f"{stats.requests} requests, {stats.completions} completions rated, thumbs-up rate "
          f"{stats.thumbs_up_rate:.2f}, {stats.preferences} preferences, errors {dict(stats.errors) or 'none'}")
    return 1 if stats.errors else 0


def parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    p = argparse.ArgumentParser(prog="rlhf-online", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a service until SIGTERM")
    services = serve.add_subparsers(dest="service", required=True)
    for name, cls in SERVICES.items():
        config.add_arguments(services.add_parser(name, help=cls.__doc__), cls)
    serve.set_defaults(fn=_serve)

    model = sub.add_parser("model", help="model provisioning")
    msub = model.add_subparsers(dest="model_command", required=True)
    fetch = msub.add_parser("fetch", help="convert the built-in smollm2-135m-instruct into <data-dir>/models")
    fetch.add_argument("--data-dir", default="data")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.set_defaults(fn=_model_fetch)

    bench = sub.add_parser("bench", help="benchmarks (JSON + Markdown table)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    from rlhf_online.bench import all as all_benches
    from rlhf_online.bench import ppo, ppo_round, reward, reward_accuracy, serving, soak

    serving.add_arguments(bsub.add_parser("serving", help="concurrent gRPC clients vs sequential model.generate"))
    reward.add_arguments(bsub.add_parser("reward", help="Score throughput at batch sizes 1, 16, 64"))
    ppo.add_arguments(bsub.add_parser("ppo", help="PPO update throughput, ours vs TRL 1.12 (needs .venv-bench)"))
    ppo_round.add_arguments(bsub.add_parser("ppo-round", help="one RunRound through the three services, timed"))
    reward_accuracy.add_arguments(bsub.add_parser("reward-accuracy",
                                                  help="learned reward vs simulated users' hidden preference"))
    soak.add_arguments(bsub.add_parser("soak", help="steady generation + feedback load with a swap every minute"))
    all_benches.add_arguments(bsub.add_parser("all", help="every benchmark above, collected into all.json / all.md"))
    bench.set_defaults(fn=_bench)

    policies = sub.add_parser("policies", help="the adapter registry: list, activate, rollback")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    where.add_argument("--adapter-dir", default=os.environ.get("RLHF_ADAPTER_DIR"))
    psub = policies.add_subparsers(dest="policies_command", required=True)
    psub.add_parser("list", parents=[where], help="published versions; * marks CURRENT")
    psub.add_parser("activate", parents=[where], help="make VERSION current ('' = bare base)").add_argument("version")
    psub.add_parser("rollback", parents=[where], help="activate the newest version older than CURRENT")
    policies.set_defaults(fn=_policies)

    from rlhf_online import demo as demo_module

    demo = sub.add_parser("demo", help="the whole loop on the embedded defaults: users, reward, PPO, hot-swaps, report")
    demo_module.add_arguments(demo)
    demo.set_defaults(fn=_demo)

    simulate = sub.add_parser("simulate", help="simulated users asking and rating through a Generation service")
    simulate.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the Generation service")
    simulate.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    simulate.add_argument("--users", type=int, default=4, help="concurrent users")
    simulate.add_argument("--personas", default="polite,positive", help="comma-separated personas, round-robin")
    simulate.add_argument("--pair-fraction", type=float, default=0.5, help="share of requests with n=2 + a preference")
    simulate.add_argument("--noise", type=float, default=None, help="rating flip probability (default: the persona's)")
    simulate.add_argument("--max-new-tokens", type=int, default=48)
    simulate.add_argument("--temperature", type=float, default=1.0)
    simulate.add_argument("--split", default="train", help="which prompt split to ask from")
    simulate.add_argument("--events", default=None, help="append one JSON line per answered request here")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(fn=_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rlhf-online` console script."""
    logs.configure("INFO")
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"rlhf-online: configuration error: {e}", file=sys.stderr)
        return 2
    except RlhfError as e:
        print(f"rlhf-online: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
