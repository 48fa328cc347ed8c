"""``moeshard crd``: write (or check) the generated MoEDeployment CRD, its chart copy, and the chart's appVersion.

The chart's ``appVersion`` (the operator image's default tag) follows the
package version, as the engine image default of the API does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..crd import crd_yaml
from ..images import VERSION

HELP = "Generate the MoEDeployment CRD from the API models (crds/ and the Helm chart's copy)."

DEFAULT_TARGETS = ("crds/moedeployments.yaml", "charts/moeshard/crds/moedeployments.yaml")
CHART_YAML = "charts/moeshard/Chart.yaml"
APP_VERSION = re.compile(r'^appVersion:.*$', re.MULTILINE)


def with_app_version(chart_yaml: str, version: str = VERSION) -> str:
    """Chart.yaml text with ``appVersion`` set to ``version`` (the line must exist)."""
    if not APP_VERSION.search(chart_yaml):
        raise ValueError(f"{CHART_YAML}: no appVersion line")
    return APP_VERSION.sub(f'appVersion: "{version}"', chart_yaml, count=1)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", action="append", metavar="PATH",
        help=f"file to write (repeatable; default: {' and '.join(DEFAULT_TARGETS)}); '-' prints to stdout",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a target is stale")


def run(args: argparse.Namespace) -> int:
    crd = crd_yaml()
    targets = [(target, crd) for target in args.out or DEFAULT_TARGETS]
    if not args.out and Path(CHART_YAML).exists():
        targets.append((CHART_YAML, with_app_version(Path(CHART_YAML).read_text())))
    stale = []
    for target, text in targets:
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
