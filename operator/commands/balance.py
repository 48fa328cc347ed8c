"""``moeshard balance``: a new expert placement from per-expert loads (the balancer, offline).

    moeshard balance --loads LOADS.json --gpus 16 --slots-per-gpu 9 \\
        [--gpus-per-domain 8] [--previous placement.json] [--max-moves 16] -o json

LOADS.json is ``{"loads": [[tokens per expert] per MoE layer]}``. With
``--previous`` the plan is incremental from that placement (version + 1);
without it, from scratch (version 1). ``-o json`` prints the placement file;
``-o text`` prints a summary per layer.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..balancer import BalancerOptions, check_loads, max_mean, rebalance_placement
from moeshard.core.errors import CommandError
from moeshard.core.placement import PlacementError, parse_placement

HELP = "Compute a new expert placement (hot-expert replication) from per-expert loads."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="LOADS.json",
                        help='JSON file {"loads": [[tokens per expert] per MoE layer]}')
    parser.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs (EP ranks) in one group")
    parser.add_argument("--slots-per-gpu", type=int, required=True, metavar="S", help="expert slots per GPU and layer")
    parser.add_argument("--gpus-per-domain", type=int, default=None, metavar="D", help="GPUs per NVLink domain")
    parser.add_argument("--previous", metavar="PLACEMENT.json", help="live placement to start from (incremental)")
    parser.add_argument("--max-moves", type=int, default=None, metavar="M",
                        help="most expert weight copies per layer (incremental only; default N/4)")
    parser.add_argument("-o", "--output", choices=("json", "text"), default="json", help="output format")


def _read_json(path: str, flag: str) -> object:
    from ..api import SpecError
    from .render import read_input

    try:
        text = read_input(path)
    except SpecError as exc:  # a directory, a missing or unreadable file: one line
        raise CommandError(f"{flag} {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{flag} {path}: not valid JSON: {exc}") from None


def run(args: argparse.Namespace) -> int:
    doc = _read_json(args.loads, "--loads")
    if not isinstance(doc, dict) or "loads" not in doc:
        raise CommandError(f'--loads {args.loads}: loads: required field is missing (expected {{"loads": [[...], ...]}})')
    loads = check_loads(doc["loads"])
    previous = None
    if args.previous:
        try:
            previous = parse_placement(_read_json(args.previous, "--previous"))
        except PlacementError as exc:
            raise PlacementError(f"--previous {args.previous}: {exc}") from None
    if args.max_moves is not None and args.max_moves < 0:
        raise CommandError(f"--max-moves: must be >= 0, got {args.max_moves}")
    result = rebalance_placement(loads, args.gpus, args.slots_per_gpu, args.gpus_per_domain, previous,
                                 BalancerOptions(max_moves=args.max_moves))
    if args.output == "json":
        sys.stdout.write(result.placement.to_json() + "\n")
        return 0
    after = max_mean(result.placement, loads)
    before = max_mean(previous, loads) if previous is not None else None
    print(f"placement v{result.placement.version}: {args.gpus} GPUs x {args.slots_per_gpu} slots, "
          f"{result.placement.num_experts} experts, {result.placement.num_layers} layers")
    print(f"{'layer':>5} {'before':>8} {'after':>8} {'moves':>6} {'replicated':>10}")
    counts = result.placement.replica_counts()
    for layer in range(result.placement.num_layers):
        b = f"{before[layer]:.4f}" if before is not None else "-"
        print(f"{layer:>5} {b:>8} {after[layer]:>8.4f} {int(result.moves[layer]):>6} {int((counts[layer] > 1).sum()):>10}")
    return 0
