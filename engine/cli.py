"""``moeshard engine``: run and check the EP/TP engine.

Sub-commands:

* ``verify``: compare an EP x TP engine world (local processes, gloo) with
  transformers on a checkpoint; prints JSON, exits 1 above tolerance.
* ``make-tiny-model``: write a tiny random Qwen3-MoE or Mixtral checkpoint
  (offline, with transformers' config classes), for demos and CI.
* ``serve`` / ``launch``: serving (moeshard.engine.serving_cli), when present.

No torch import at module level (``moeshard --help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

HELP = "run and check the EP/TP MoE engine (verify, make-tiny-model, serve, launch)"


def _serving_cli():
    """moeshard.engine.serving_cli when it is built in this checkout, else None."""
    try:
        return importlib.import_module("moeshard.engine.serving_cli")
    except ModuleNotFoundError as exc:
        if exc.name == "moeshard.engine.serving_cli":
            return None
        raise


def _prompts(text: str) -> list[list[int]]:
    """``--prompts``: JSON list of token-id lists, or prompts separated by ';' with ids separated by ','."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [[int(t) for t in p.split(",") if t.strip()] for p in text.split(";") if p.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--prompts: expected '1,2,3;4,5' or JSON [[1,2,3],[4,5]], got {text!r}")
    if not isinstance(value, list) or not value or not all(isinstance(p, list) and p for p in value):
        raise argparse.ArgumentTypeError("--prompts: a non-empty list of non-empty token-id lists")
    if not all(isinstance(t, int) for p in value for t in p):
        raise argparse.ArgumentTypeError("--prompts: token ids must be integers")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="engine_command", metavar="ENGINE_COMMAND", required=True)

    v = sub.add_parser("verify", help="compare an EP x TP engine world with transformers (prints JSON)")
    v.add_argument("--model", required=True, help="checkpoint folder (config.json + *.safetensors)")
    v.add_argument("--ep", type=int, required=True, help="expert-parallel ranks (local processes)")
    v.add_argument("--tp", type=int, default=1, help="attention tensor-parallel size (divides --ep)")
    v.add_argument("--redundant-slots", type=int, default=0,
                   help="extra expert slots per rank holding replicas (uneven shares)")
    v.add_argument("--gpus-per-domain", type=int, default=8,
                   help="ranks per NVLink domain; fewer than --ep exercises hierarchical dispatch")
    v.add_argument("--prompts", type=_prompts, default=None, help="'1,2,3;4,5' or JSON [[1,2,3],[4,5]]")
    v.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared with transformers.generate")
    v.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit error allowed (default per dtype: 1e-4 for float32, 1.6%% of the largest "
                        "logit for bfloat16, 0.2%% for float16; see moeshard.engine.verify.RELATIVE_TOLERANCE)")
    v.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype of the engine AND of the transformers reference (default: the checkpoint's)")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: NCCL ranks, one GPU each (transformers runs on CPU)")
    v.set_defaults(_engine_run=_run_verify)

    t = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint (offline) for demos and tests")
    t.add_argument("--arch", required=True, choices=("qwen3_moe", "mixtral"))
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=None, help="default: 4 for qwen3_moe, 2 for mixtral")
    t.add_argument("--layers", type=int, default=2)
    t.set_defaults(_engine_run=_run_make_tiny)

    f = sub.add_parser("fetch", help="download a hf:// checkpoint into a folder (the operator's download Job)")
    f.add_argument("--uri", required=True, help="hf://ORG/NAME")
    f.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    f.add_argument("--out", required=True, help="model folder (kept when it already holds a complete checkpoint)")
    f.set_defaults(_engine_run=_run_fetch)

    serving = _serving_cli()
    if serving is not None:
        s = sub.add_parser("serve", help="run one engine rank from the MOESHARD_* environment")
        serving.configure_serve(s)
        s.set_defaults(_engine_run=serving.run_serve)
        la = sub.add_parser("launch", help="run all ranks of a group as local processes")
        serving.configure_launch(la)
        la.set_defaults(_engine_run=serving.run_launch)


def _run_verify(args: argparse.Namespace) -> int:
    from moeshard.engine.verify import report_json, verify

    report = verify(
        args.model, ep=args.ep, tp=args.tp, redundant_slots=args.redundant_slots, prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, gpus_per_domain=args.gpus_per_domain, tolerance=args.tolerance,
        device=args.device, dtype=args.dtype,
    )
    print(report_json(report))
    return 0 if report["ok"] else 1


def _run_fetch(args: argparse.Namespace) -> int:
    from moeshard.engine.fetch import fetch_checkpoint

    fetch_checkpoint(args.uri, args.out, args.revision)
    return 0


def _run_make_tiny(args: argparse.Namespace) -> int:
    from moeshard.engine.verify import make_tiny_model

    out = make_tiny_model(args.arch, args.out, seed=args.seed, num_experts=args.experts, top_k=args.top_k,
                          num_layers=args.layers)
    print(json.dumps({"model": str(out), "arch": args.arch}))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one engine sub-command; a user error prints ``moeshard engine CMD: error: ...`` (one line), exit 2."""
    try:
        return int(args._engine_run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Bad figures (--ep/--tp, config.json, prompts, a missing folder) are user errors.
        message = str(exc) or type(exc).__name__
    except RuntimeError as exc:
        # A rank of a local world failed (EngineWorldError: "rank R: Type: message"); the rank's
        # traceback goes to the log at debug level, not to the terminal.
        details = getattr(exc, "details", None)
        if details is None:
            raise
        logging.getLogger("moeshard.engine.cli").debug("%s", details)
        message = f"engine rank failed: {exc}"
    first_line = message.strip().splitlines()[0]
    print(f"moeshard engine {args.engine_command}: error: {first_line}", file=sys.stderr)
    return 2
