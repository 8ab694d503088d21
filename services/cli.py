"""`rlhf-online` command line: serve, model, bench, demo."""

from __future__ import annotations

import argparse
import sys

from rlhf_online import cli, config, logs

SERVICES = {"generation": config.GenerationSettings, "reward": config.RewardSettings,
            "trainer": config.TrainerSettings}


def _serve(args: argparse.Namespace) -> int:
    """Start one service and block until SIGTERM."""
    settings = config.build(SERVICES[args.service], args)
    logs.configure(settings.log_level)
    from services import bootstrap

    return {"generation": bootstrap.run_generation, "reward": bootstrap.run_reward,
            "trainer": bootstrap.run_trainer}[args.service](settings)


def add_serve(sub: cli.LazySubcommands) -> None:
    """`serve SERVICE`: one flag per setting of that service (rlhf_online.config)."""
    serve = sub.add_parser("serve", help="run a service until SIGTERM")
    services = serve.add_subparsers(dest="service", required=True)
    for name, cls in SERVICES.items():
        config.add_arguments(services.add_parser(name, help=cls.__doc__), cls)
    serve.set_defaults(fn=_serve)


def parser() -> argparse.ArgumentParser:
    """The full argument parser: `serve`, then the library's commands."""
    p = argparse.ArgumentParser(prog="rlhf-online", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, action=cli.LazySubcommands)
    for add in (add_serve, *cli.COMMANDS):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rlhf-online` console script."""
    return cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
