"""``moeshard crd``: write (or check) the generated MoEDeployment CRD and its chart copy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..crd import crd_yaml

HELP = "Generate the MoEDeployment CRD from the API models (crds/ and the Helm chart's copy)."

DEFAULT_TARGETS = ("crds/moedeployments.yaml", "charts/moeshard/crds/moedeployments.yaml")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", action="append", metavar="PATH",
        help=f"file to write (repeatable; default: {' and '.join(DEFAULT_TARGETS)}); '-' prints to stdout",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a target is stale")


def run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    targets = args.out or list(DEFAULT_TARGETS)
    stale = []
    for target in targets:
        if target == "-":
            sys.stdout.write(text)
            continue
        path = Path(target)
        current = path.read_text() if path.exists() else None
        if args.check:
            if current != text:
                stale.append(target)
            continue
        if current != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {target}", file=sys.stderr)
        else:
            print(f"{target} is up to date", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(stale)} (run `moeshard crd`)", file=sys.stderr)
        return 1
    return 0
