"""The library's commands of `rlhf-online`: model, bench, policies, keys, demo, simulate.

The program itself (its parser, `main` and the `serve` command) is services/cli.py: starting a
service is the services layer's job, and the library never imports it. Each `add_*` function
adds one command; a command's module is imported only when that command runs (or shows its help).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rlhf_online import logs
from rlhf_online.errors import ConfigError, RlhfError

BENCHES = {
    "serving": "concurrent gRPC clients vs sequential model.generate",
    "reward": "Score throughput at batch sizes 1, 16, 64",
    "ppo": "PPO update throughput, ours vs TRL 1.12 (needs .venv-bench)",
    "ppo-round": "one RunRound through the three services, timed",
    "ppo-learning": "held-out reward and KL after PPO rounds on a scripted reward, fresh vs kept optimizer",
    "reward-accuracy": "learned reward vs simulated users' hidden preference",
    "canary": "error rates and speed of the canary test on simulated users (no model)",
    "poisoning": "one user flooding opposite feedback: reward accuracy with the per-user cap vs without",
    "soak": "steady generation + feedback load with a swap every minute",
    "ingest": "thumbs ratings per second through the gRPC API into the durable store, vs GetPolicy",
    "store-growth": "per-round store time of the trainer and the reward retraining at 10k, 100k, 1M completions",
    "all": "serving, ingest, reward, ppo-round, ppo, reward-accuracy and canary, collected into all.json / all.md",
}


class LazySubcommands(argparse._SubParsersAction):
    """Subcommands whose flags are added when the subcommand is chosen, so only its module is imported."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flag_adders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_lazy(self, name: str, help: str, add_flags: Callable[[argparse.ArgumentParser], None],
                 **kwargs) -> argparse.ArgumentParser:
        """A subcommand whose flags `add_flags` adds only if it is chosen."""
        self.flag_adders[name] = add_flags
        return self.add_parser(name, help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        """Add the chosen subcommand's flags, then parse its arguments as argparse does."""
        add_flags = self.flag_adders.pop(values[0], None)
        if add_flags is not None:
            add_flags(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def _model_fetch(args: argparse.Namespace) -> int:
    """Provision the built-in default model under the data dir (once)."""
    from rlhf_online.models.provision import fetch_default_model

    path = fetch_default_model(Path(args.data_dir), force=args.force)
    print(path)
    return 0


def add_model(sub: LazySubcommands) -> None:
    """`model fetch`."""
    model = sub.add_parser("model", help="model provisioning")
    msub = model.add_subparsers(dest="model_command", required=True)
    fetch = msub.add_parser("fetch", help="convert the built-in smollm2-135m-instruct into <data-dir>/models")
    fetch.add_argument("--data-dir", default="data")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.set_defaults(fn=_model_fetch)


def _bench_module(name: str):
    """The module of benchmark `name` (`ppo-round` -> rlhf_online.bench.ppo_round)."""
    return importlib.import_module(f"rlhf_online.bench.{name.replace('-', '_')}")


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark and write its JSON and Markdown table."""
    return _bench_module(args.bench_command).main(args)


def add_bench(sub: LazySubcommands) -> None:
    """`bench NAME`: each benchmark's module adds its flags, imported only when it is the one chosen."""
    bench = sub.add_parser("bench", help="benchmarks (JSON + Markdown table)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, action=LazySubcommands)
    for name, help in BENCHES.items():
        bsub.add_lazy(name, help, lambda p, name=name: _bench_module(name).add_arguments(p))
    bench.set_defaults(fn=_bench)


def _policies(args: argparse.Namespace) -> int:
    """List, activate, promote or roll back adapter versions in the registry directory."""
    import json

    from rlhf_online.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(Path(args.adapter_dir or Path(args.data_dir) / "adapters"))
    if args.policies_command == "list":
        current, canary = registry.current(), registry.canary()
        for m in registry.describe():
            mark = "*" if m["version"] == current else "~" if m["version"] == canary else " "
            record = registry.decision(m["version"])
            status = f"  canary={record['outcome']}" if record else ""
            print(f"{mark} {m['version']}  parent={m.get('parent') or '-'}  base={m['base_model']}{status}  "
                  f"metrics={json.dumps(m.get('metrics', {}), sort_keys=True)}")
        print(f"CURRENT = {current or '(bare base)'}")
        print(f"CANARY = {canary or '(none)'}")
    elif args.policies_command == "activate":
        registry.activate(args.version)
        print(f"CURRENT = {args.version or '(bare base)'}")
    elif args.policies_command == "promote":
        print(f"CURRENT = {registry.promote()} (promoted from CANARY)")
    else:
        had_canary = registry.canary()
        stable = registry.rollback()
        print(f"CANARY = (none) ({had_canary} rolled back)" if had_canary else f"CURRENT = {stable or '(bare base)'}")
    return 0


def add_policies(sub: LazySubcommands) -> None:
    """`policies list|activate|promote|rollback` on the adapter registry."""
    policies = sub.add_parser("policies", help="the adapter registry: list, activate, promote, rollback")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    where.add_argument("--adapter-dir", default=os.environ.get("RLHF_ADAPTER_DIR"))
    psub = policies.add_subparsers(dest="policies_command", required=True)
    psub.add_parser("list", parents=[where], help="published versions; * marks CURRENT, ~ CANARY")
    psub.add_parser("activate", parents=[where], help="make VERSION current ('' = bare base)").add_argument("version")
    psub.add_parser("promote", parents=[where], help="make the canary CURRENT now (the controller records it)")
    psub.add_parser("rollback", parents=[where], help="drop the canary if there is one, else activate the newest "
                                                      "version older than CURRENT")
    policies.set_defaults(fn=_policies)


def _keys(args: argparse.Namespace) -> int:
    """Create, list or revoke API keys in the store the services use."""
    import time

    from rlhf_online.auth.keys import create_key
    from rlhf_online.config import CommonSettings
    from rlhf_online.store import open_store

    # The services' own rule for the store: --store-url, else sqlite under --data-dir.
    settings = CommonSettings(data_dir=Path(args.data_dir), store_url=args.store_url or "")
    with open_store(settings.store_url) as store:
        if args.keys_command == "create":
            record, key = create_key(store, args.tenant, args.role)
            print(f"created API key {record.key_id} for tenant {record.tenant!r}, role {record.role}; "
                  "send it as x-api-key (gRPC metadata or HTTP header). It is shown only now:")
            print(key)
        elif args.keys_command == "list":
            for k in store.list_api_keys():
                state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(k.revoked_at))}" \
                    if k.revoked_at is not None else "active"
                print(f"{k.key_id}  tenant={k.tenant}  role={k.role}  "
                      f"created={time.strftime('%Y-%m-%d %H:%M', time.gmtime(k.created_at))}  {state}")
        else:
            changed = store.revoke_api_key(args.key_id)
            print(f"revoked {args.key_id}" if changed else f"{args.key_id} was already revoked")
    return 0


def add_keys(sub: LazySubcommands) -> None:
    """`keys create|list|revoke` on the store's API keys."""
    keys = sub.add_parser("keys", help="API keys for --require-api-key: create, list, revoke")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    where.add_argument("--store-url", default=os.environ.get("RLHF_STORE_URL", ""),
                       help="the services' store (default: sqlite under --data-dir)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", parents=[where], help="a new key; printed once, as the last line")
    create.add_argument("--tenant", required=True, help="whose key: its users' completions and ratings")
    create.add_argument("--role", default="user", choices=("user", "annotator"),
                        help="user: rate what was served to the same tenant and user_id; annotator: rate anything")
    ksub.add_parser("list", parents=[where], help="every key: id, tenant, role, created, revoked")
    ksub.add_parser("revoke", parents=[where], help="stop a key working (within the replicas' key cache time)") \
        .add_argument("key_id")
    keys.set_defaults(fn=_keys)


def _demo_flags(p: argparse.ArgumentParser) -> None:
    from rlhf_online import demo

    demo.add_arguments(p)


def _demo(args: argparse.Namespace) -> int:
    """The end-to-end demo."""
    from rlhf_online import demo

    return demo.main(args)


def add_demo(sub: LazySubcommands) -> None:
    """`demo`: its flags are rlhf_online.demo.DemoConfig's."""
    demo = sub.add_lazy("demo", "the whole loop on the embedded defaults: users, reward, PPO, hot-swaps, report",
                        _demo_flags)
    demo.set_defaults(fn=_demo)


def _simulate(args: argparse.Namespace) -> int:
    """Run simulated users against a Generation service and print their totals."""
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.simulate.users import UserPoolConfig, run_for

    tls = _client_tls(args)
    cfg = UserPoolConfig(users=args.users, personas=tuple(args.personas.split(",")), pair_fraction=args.pair_fraction,
                         rank_n=args.rank_n, rated_fraction=args.rated_fraction, noise=args.noise,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    prompts = [p.prompt for p in load_prompts(args.split)]
    stats = run_for(args.addr, prompts, cfg, args.seconds, Path(args.events) if args.events else None, tls=tls)
    print(f"{stats.requests} requests, {stats.completions} completions, {stats.ratings} rated, thumbs-up rate "
          f"{stats.thumbs_up_rate:.2f}, {stats.preferences} preferences, {stats.rankings} rankings, errors {dict(stats.errors) or 'none'}")
    return 1 if stats.errors else 0


def _client_tls(args: argparse.Namespace):
    """The ClientTLS of --tls-ca/--tls-client-cert/--tls-client-key, checked (None: plaintext)."""
    from rlhf_online.tls import ClientTLS

    paths = [Path(p) if p else None for p in (args.tls_ca, args.tls_client_cert, args.tls_client_key)]
    if not any(paths):
        return None
    if paths[0] is None:
        raise ConfigError("tls_ca: a client certificate is for TLS, which needs the CA bundle; set --tls-ca")
    return ClientTLS(*paths).check(hint="see rlhf-online simulate --help")


def add_simulate(sub: LazySubcommands) -> None:
    """`simulate`: simulated users against a running Generation service."""
    simulate = sub.add_parser("simulate", help="simulated users asking and rating through a Generation service")
    simulate.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the Generation service")
    simulate.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    simulate.add_argument("--users", type=int, default=4, help="concurrent users")
    simulate.add_argument("--personas", default="polite,positive", help="comma-separated personas, round-robin")
    simulate.add_argument("--pair-fraction", type=float, default=0.5, help="share of requests with n=2 + a preference")
    simulate.add_argument("--rank-n", type=int, default=0,
                          help="K in 2..8: those requests ask n=K and send a ranking of all K, not a preference")
    simulate.add_argument("--rated-fraction", type=float, default=1.0,
                          help="probability of rating each reply and of sending a pair's preference (0 < F <= 1)")
    simulate.add_argument("--noise", type=float, default=None, help="rating flip probability (default: the persona's)")
    simulate.add_argument("--max-new-tokens", type=int, default=48)
    simulate.add_argument("--temperature", type=float, default=1.0)
    simulate.add_argument("--split", default="train", help="which prompt split to ask from")
    simulate.add_argument("--events", default=None, help="append one JSON line per answered request here")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--tls-ca", default=os.environ.get("RLHF_TLS_CA"),
                          help="PEM CA bundle verifying a Generation service that serves TLS (unset = plaintext)")
    simulate.add_argument("--tls-client-cert", default=os.environ.get("RLHF_TLS_CLIENT_CERT"),
                          help="PEM client certificate, for a service with --tls-client-ca (mutual TLS)")
    simulate.add_argument("--tls-client-key", default=os.environ.get("RLHF_TLS_CLIENT_KEY"),
                          help="PEM private key of --tls-client-cert")
    simulate.set_defaults(fn=_simulate)


# After `serve` (services/cli.py), in this order in `rlhf-online --help`.
COMMANDS = (add_model, add_bench, add_policies, add_keys, add_demo, add_simulate)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run the chosen command, and turn the library's errors into exit codes (2: configuration)."""
    logs.configure("INFO")
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"rlhf-online: configuration error: {e}", file=sys.stderr)
        return 2
    except RlhfError as e:
        print(f"rlhf-online: {e}", file=sys.stderr)
        return 1
