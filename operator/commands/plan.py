"""``moeshard plan``: the parallelism plan for a MoEDeployment or a preset, with its reasoning."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..api import API_VERSION, KIND, SpecError, WorkloadSpec, parse_resource
from moeshard.core.architectures import PRESETS, architecture_from_hf_config, get_preset
from moeshard.core.hardware import PROFILES, get_profile
from .render import read_input
from ..planner import Candidate, Plan, PlanError, gemm_crossover_tokens, plan_for_spec, plan_parallelism

DEFAULT_DEPLOYMENT = Path(__file__).resolve().parent.parent / "presets" / "default-deployment.yaml"

HELP = "Choose attention TP, expert EP and DP replicas for a model on a cluster, and show why."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  moeshard plan examples/qwen3-235b-gb200.yaml\n"
        "  moeshard plan --preset qwen3-235b-a22b --hardware h100-hgx --tokens 6000\n"
        "  moeshard plan --preset qwen3-235b-a22b --hardware gb200-nvl72 -o json\n"
        "  moeshard plan --config path/to/config.json --hardware h200-hgx --plot steps.png\n"
        "\n"
        "The table shows, for each EP, its best attention TP; --all shows every (TP, EP).\n"
        "Times are per MoE layer; the cost model is documented in moeshard/operator/planner.py."
    )
    parser.add_argument(
        "file", nargs="?",
        help="a MoEDeployment YAML (the first MoEDeployment document is used); without FILE, --preset or "
        "--config: the built-in default, Qwen3-235B-A22B on gb200-nvl72",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (instead of FILE)")
    parser.add_argument("--config", metavar="CONFIG_JSON", help="a Hugging Face config.json (instead of FILE or --preset)")
    parser.add_argument("--hardware", choices=sorted(PROFILES), help="hardware profile (with --preset or --config)")
    parser.add_argument("--tokens", type=int, help="prefill tokens per batch of one replica (default 6000)")
    parser.add_argument("--decode-batch", type=int, help="concurrent decoding sequences per replica (default 64)")
    parser.add_argument("--context", type=int, help="KV-cache tokens per sequence (default 4096)")
    parser.add_argument("--ep", type=int, help="fix expert-parallel size")
    parser.add_argument("--tp", type=int, help="fix attention tensor-parallel size")
    parser.add_argument("--replicas", type=int, default=None, help="DP replicas (default 1)")
    parser.add_argument("--redundant-slots", type=int, default=None, help="extra expert slots per layer for hot-expert replicas")
    parser.add_argument(
        "--allow-cross-domain", action="store_true",
        help="allow EP groups larger than one NVLink domain (they are always estimated and shown)",
    )
    parser.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table", help="output format")
    parser.add_argument("--all", action="store_true", help="table: show every (TP, EP) candidate")
    parser.add_argument("--plot", metavar="FILE.png", help="draw estimated step time versus EP, by part")


def load_resource(path: str) -> dict[str, Any]:
    """The first MoEDeployment document of a YAML file; SpecError names the file when there is none."""
    text = read_input(path)
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(path, f"not valid YAML{where}") from None
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == KIND:
            return document
    raise SpecError(path, f"has no {KIND} document (apiVersion {API_VERSION})")


def _plan_from_args(args: argparse.Namespace) -> Plan:
    if args.file:
        if args.preset or args.config or args.hardware:
            raise SpecError("--preset/--config/--hardware", "give either FILE or a preset/config with --hardware")
        body = load_resource(args.file)
        spec_dict = body.get("spec")
        # Command-line sizes override the file's, as a what-if.
        if isinstance(spec_dict, dict):
            overrides = {
                ("workload", "prefillTokens"): args.tokens,
                ("workload", "decodeBatch"): args.decode_batch,
                ("workload", "contextLength"): args.context,
                ("parallelism", "expertEP"): args.ep,
                ("parallelism", "attentionTP"): args.tp,
                ("parallelism", "replicas"): args.replicas,
                ("loadBalancing", "redundantSlots"): args.redundant_slots,
            }
            for (section, key), value in overrides.items():
                if value is not None:
                    spec_dict.setdefault(section, {})[key] = value
            if args.allow_cross_domain:
                spec_dict.setdefault("parallelism", {})["allowCrossDomain"] = True
        return plan_for_spec(parse_resource(body))
    if not (args.preset or args.config or args.hardware):
        print(f"moeshard plan: no FILE given, planning the built-in default ({DEFAULT_DEPLOYMENT.name}: "
              "Qwen3-235B-A22B on gb200-nvl72)", file=sys.stderr)
        args.file = str(DEFAULT_DEPLOYMENT)
        return _plan_from_args(args)
    if not (args.preset or args.config):
        raise SpecError("--preset", "give --preset NAME or --config config.json with --hardware (or a FILE)")
    if args.preset and args.config:
        raise SpecError("--preset/--config", "give one of them, not both")
    if not args.hardware:
        raise SpecError("--hardware", f"required with --preset/--config (one of: {', '.join(sorted(PROFILES))})")
    if args.preset:
        model = get_preset(args.preset)
    else:
        try:
            config = json.loads(read_input(args.config))
        except json.JSONDecodeError as exc:
            raise SpecError(args.config, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
        model = architecture_from_hf_config(config, name=Path(args.config).parent.name or "custom")
    try:
        workload = WorkloadSpec.model_validate({
            k: v for k, v in {
                "prefillTokens": args.tokens, "decodeBatch": args.decode_batch, "contextLength": args.context,
            }.items() if v is not None
        })
    except ValidationError as exc:  # name the flag, not the spec field
        error = exc.errors()[0]
        flag = {"prefillTokens": "--tokens", "decodeBatch": "--decode-batch", "contextLength": "--context"}
        raise SpecError(flag[str(error["loc"][0])], error["msg"]) from None
    for flag, value in (("--ep", args.ep), ("--tp", args.tp), ("--replicas", args.replicas), ("--redundant-slots", args.redundant_slots)):
        if value is not None and value < (0 if flag in ("--replicas", "--redundant-slots") else 1):
            raise SpecError(flag, f"must be positive, got {value}")
    try:
        return plan_parallelism(
            model, get_profile(args.hardware), workload,
            attention_tp=args.tp, expert_ep=args.ep, replicas=1 if args.replicas is None else args.replicas,
            redundant_slots=args.redundant_slots or 0, allow_cross_domain=args.allow_cross_domain,
        )
    except PlanError as exc:  # name the flag, not the spec field
        flag = _FLAG_OF_FIELD.get(exc.field, exc.field)
        raise SpecError(flag, exc.message) from None


_FLAG_OF_FIELD = {
    "spec.parallelism.expertEP": "--ep",
    "spec.parallelism.attentionTP": "--tp",
    "spec.parallelism.allowCrossDomain": "--allow-cross-domain",
    "spec.hardware": "--hardware",
}


def _rows(plan: Plan, show_all: bool) -> list[Candidate]:
    if show_all:
        return plan.candidates
    best: dict[int, Candidate] = {}
    for c in plan.candidates:
        current = best.get(c.expert_ep)
        key = (not c.chosen, not c.feasible, c.decode_attention_us)
        if current is None or key < (not current.chosen, not current.feasible, current.decode_attention_us):
            best[c.expert_ep] = c
    return [best[ep] for ep in sorted(best)]


def format_table(plan: Plan, show_all: bool = False) -> str:
    m, hw, w = plan.model, plan.hardware, plan.workload
    crossover = gemm_crossover_tokens(m, hw)
    header = (
        f"{m.name} on {hw.name}: E={m.num_experts} top-{m.top_k} H={m.hidden_size} I={m.expert_intermediate_size}; "
        f"prefill {w['prefillTokens']} tokens, decode {w['decodeBatch']} x {w['contextLength']} ctx; "
        f"NVLink domain {hw.gpus_per_domain} GPUs; GEMM crossover m* = {crossover:.0f} tokens/expert"
    )
    columns = [
        ("", 1), ("TP", 3), ("EP", 4), ("DP", 3), ("pods x GPUs", 11), ("domains", 7), ("tokens/expert", 13),
        ("dispatch us", 11), ("GEMM us", 8), ("combine us", 10), ("MoE step us", 11), ("decode attn us", 14),
        ("GB/GPU", 7), ("verdict", 0),
    ]
    lines = [header, ""]
    lines.append("  ".join(name.rjust(width) if width else name for name, width in columns))
    for c in _rows(plan, show_all):
        if c.feasible:
            verdict = f"sweet spot ({c.bottleneck})" if c.chosen else c.bottleneck
        else:
            verdict = f"infeasible: {c.reason} [{c.bottleneck}]"
        domains = f"{c.domains_per_replica}{'*' if c.crosses_fabric else ''}"
        pods = f"{c.pods_per_replica} x {c.gpus_per_pod}" if c.pods_per_replica else "-"
        cells = [
            "*" if c.chosen else " ", str(c.attention_tp), str(c.expert_ep), str(c.replicas), pods, domains,
            f"{c.tokens_per_expert:,.0f}", f"{c.dispatch_us:,.1f}", f"{c.gemm_us:,.1f}", f"{c.combine_us:,.1f}",
            f"{c.moe_step_us:,.1f}", f"{c.decode_attention_us:,.1f}", f"{c.memory_per_gpu_bytes / 1e9:,.1f}", verdict,
        ]
        lines.append("  ".join(cell.rjust(width) if width else cell for cell, (_, width) in zip(cells, columns)))
    chosen = plan.chosen
    lines += [
        "",
        f"chosen: attention TP {chosen.attention_tp}, EP {chosen.expert_ep}, {chosen.replicas} replica(s) of "
        f"{chosen.pods_per_replica} pod(s) x {chosen.gpus_per_pod} GPUs, {chosen.slots_per_gpu} expert slots per GPU",
    ]
    if any(c.crosses_fabric for c in plan.candidates):
        lines.append("domains marked *: the group spans NVLink domains; its all-to-all crosses the fabric (hierarchical)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plot_plan(plan: Plan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(plan, show_all=False)
    labels = [f"EP {c.expert_ep}\nTP {c.attention_tp}" + ("\n(fabric)" if c.crosses_fabric else "") for c in rows]
    parts = [
        ("dispatch", [c.dispatch_us for c in rows]),
        ("expert GEMM", [c.gemm_us for c in rows]),
        ("combine", [c.combine_us for c in rows]),
        ("decode attention", [c.decode_attention_us for c in rows]),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for name, values in parts:
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, c in enumerate(rows):
        mark = "chosen" if c.chosen else ("infeasible" if not c.feasible else "")
        if mark:
            ax.annotate(mark, (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("estimated time per layer (us)")
    ax.set_title(f"{plan.model.name} on {plan.hardware.name}, {plan.workload['prefillTokens']} prefill tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)
    if args.output == "json":
        print(json.dumps(plan.to_json(), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(plan.to_json(), sort_keys=False), end="")
    else:
        print(format_table(plan, show_all=args.all))
    if args.plot:
        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
