"""``moeshard`` command line: one entry point, one module per subcommand.

This is the composition root: it is the only module that names both planes
(``moeshard.operator`` and ``moeshard.engine``), and only as strings, loaded
when the parser is built. The operator image has no torch, so no subcommand
module may import torch at module level.

Each subcommand module exposes ``HELP`` (one line), ``configure(parser)`` and
``run(args) -> int``; ``moeshard --help`` stays fast because nothing heavy is
imported before a subcommand runs. Any ``moeshard.core.errors.UserError`` is
printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moeshard.core.errors import UserError

COMMANDS: dict[str, str] = {
    "plan": "moeshard.operator.commands.plan",
    "crd": "moeshard.operator.commands.crd",
    "render": "moeshard.operator.commands.render",
    "operator": "moeshard.operator.commands.run_operator",
    "balance": "moeshard.operator.commands.balance",
    "engine": "moeshard.engine.cli",
    "demo": "moeshard.operator.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeshard",
        description="Serve Mixture-of-Experts models on Kubernetes: plan parallelism, render and operate "
        "MoEDeployments, run the EP/TP engine, rebalance hot experts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not built in this checkout
                continue
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UserError, FileNotFoundError) as exc:
        print(f"moeshard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moeshard plan -o json | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
