"""``moeshard balance``: a new expert placement from per-expert loads (the balancer, offline).

    moeshard balance --loads LOADS.json --gpus 16 --slots-per-gpu 9 \\
        [--gpus-per-domain 8] [--previous placement.json] [--max-moves 16] \\
        [--floor 0.015] [--noise-k 1] [--min-tokens-per-gpu 256] [--move-budget N] [--expert-groups Q] \\
        -o json|text

LOADS.json is ``{"loads": [[tokens per expert] per MoE layer]}``. With
``--previous`` the CLI makes exactly the operator's decision
(acceptance.decide_placement, same defaults; the flags change them): per
layer, scored out of sample, kept or moved, copies budgeted. Layers that do
not move keep the previous rows verbatim; when none moves the previous
placement is printed unchanged. Without ``--previous`` the plan is built
from scratch (version 1). ``-o json`` prints the placement file; ``-o text``
prints per layer: before, predicted after, decision and reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from moeshard.core.errors import CommandError
from moeshard.core.placement import PlacementError, layer_imbalance, parse_placement, placement_from_arrays

from ..acceptance import AcceptanceOptions, decide_placement
from ..balancer import check_loads, rebalance_placement
from ..grouped import grouped_plan

HELP = "Compute a new expert placement (hot-expert replication) from per-expert loads."
DEFAULTS = AcceptanceOptions()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="LOADS.json",
                        help='JSON file {"loads": [[tokens per expert] per MoE layer]}')
    parser.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs (EP ranks) in one group")
    parser.add_argument("--slots-per-gpu", type=int, required=True, metavar="S", help="expert slots per GPU and layer")
    parser.add_argument("--gpus-per-domain", type=int, default=None, metavar="D", help="GPUs per NVLink domain")
    parser.add_argument("--previous", metavar="PLACEMENT.json",
                        help="live placement: decide per layer as the operator does")
    parser.add_argument("--max-moves", type=int, default=None, metavar="M",
                        help="most expert weight copies per layer (with --previous; default: no cap)")
    parser.add_argument("--move-budget", type=int, default=None, metavar="B",
                        help="most expert weight copies over all layers (with --previous; default: no cap)")
    parser.add_argument("--floor", type=float, default=DEFAULTS.floor, metavar="F",
                        help=f"least relative gain per layer (default {DEFAULTS.floor})")
    parser.add_argument("--noise-k", type=float, default=DEFAULTS.noise_k, metavar="K",
                        help=f"gain must beat K / sqrt(tokens per GPU) (default {DEFAULTS.noise_k})")
    parser.add_argument("--min-tokens-per-gpu", type=float, default=DEFAULTS.min_tokens_per_gpu, metavar="T",
                        help=f"skip layers with fewer tokens per GPU (default {DEFAULTS.min_tokens_per_gpu:g})")
    parser.add_argument("--expert-groups", type=int, default=None, metavar="Q",
                        help="router expert groups (DeepSeek-V3: 8): keep each group's replicas in one NVLink domain")
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


def _options(args: argparse.Namespace) -> AcceptanceOptions:
    for flag, value in (("--max-moves", args.max_moves), ("--move-budget", args.move_budget)):
        if value is not None and value < 0:
            raise CommandError(f"{flag}: must be >= 0, got {value}")
    for flag, value in (("--floor", args.floor), ("--noise-k", args.noise_k),
                        ("--min-tokens-per-gpu", args.min_tokens_per_gpu)):
        if not value >= 0:
            raise CommandError(f"{flag}: must be >= 0, got {value}")
    if args.expert_groups is not None and args.expert_groups < 1:
        raise CommandError(f"--expert-groups: must be >= 1, got {args.expert_groups}")
    return AcceptanceOptions(floor=args.floor, noise_k=args.noise_k, min_tokens_per_gpu=args.min_tokens_per_gpu,
                             max_moves=args.max_moves, move_budget=args.move_budget, expert_groups=args.expert_groups)


def run(args: argparse.Namespace) -> int:
    doc = _read_json(args.loads, "--loads")
    if not isinstance(doc, dict) or "loads" not in doc:
        raise CommandError(f'--loads {args.loads}: loads: required field is missing (expected {{"loads": [[...], ...]}})')
    loads = check_loads(doc["loads"])
    options = _options(args)
    if not args.previous:
        if options.expert_groups is not None:
            rows, shares = grouped_plan(loads, args.gpus, args.slots_per_gpu, args.gpus_per_domain or args.gpus,
                                        options.expert_groups)
            placement = placement_from_arrays(1, args.gpus, args.slots_per_gpu, loads.shape[1], rows, shares)
        else:
            placement = rebalance_placement(loads, args.gpus, args.slots_per_gpu, args.gpus_per_domain).placement
        if args.output == "json":
            sys.stdout.write(placement.to_json() + "\n")
            return 0
        print(f"placement v{placement.version} from scratch: {args.gpus} GPUs x {args.slots_per_gpu} slots, "
              f"{placement.num_experts} experts, {placement.num_layers} layers")
        print(f"{'layer':>5} {'after':>8}")
        for layer, value in enumerate(layer_imbalance(placement, loads)):
            print(f"{layer:>5} {value:>8.4f}")
        return 0
    try:
        previous = parse_placement(_read_json(args.previous, "--previous"))
    except PlacementError as exc:
        raise PlacementError(f"--previous {args.previous}: {exc}") from None
    if (previous.num_gpus, previous.slots_per_gpu) != (args.gpus, args.slots_per_gpu):
        raise CommandError(f"--previous {args.previous}: {previous.num_gpus} GPUs x {previous.slots_per_gpu} slots, "
                           f"--gpus/--slots-per-gpu say {args.gpus} x {args.slots_per_gpu}")
    decision = decide_placement(previous, loads, args.gpus_per_domain, options)
    placement = decision.placement or previous
    if args.output == "json":
        sys.stdout.write(placement.to_json() + "\n")
        return 0
    moved = decision.moved_layers
    changed = f"{len(moved)} layer{'s' if len(moved) != 1 else ''} moved"
    print(f"placement v{placement.version} ({'unchanged' if decision.placement is None else changed}"
          f", {int(decision.moves.sum())} expert copies): {args.gpus} GPUs x {args.slots_per_gpu} slots, "
          f"{placement.num_experts} experts, {placement.num_layers} layers")
    if decision.skipped:
        print(f"window skipped: {decision.skipped}")
    print("before/after: max/mean GPU load on the held-out half of the window")
    print(f"{'layer':>5} {'before':>8} {'after':>8} {'decision':>8} {'copies':>6}  reason")
    for d in decision.layers:
        print(f"{d.layer:>5} {d.before:>8.4f} {d.after:>8.4f} {d.decision:>8} {d.moves:>6}  {d.reason}")
    return 0
