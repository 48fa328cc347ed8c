"""``moeshard engine serve`` and ``moeshard engine launch``: argument parsing and process wiring.

``serve`` is what an engine pod runs: its ranks come from the MOESHARD_*
environment (moeshard.core.engine_env). ``launch`` starts a whole group on
this machine. moeshard.engine.cli registers both under ``moeshard engine``;
``python -m moeshard.engine.serving_cli serve|launch`` runs them directly
(that is how ``launch`` starts its ranks). No torch at module level.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from moeshard.core.errors import CommandError
from moeshard.core.engine_env import PREFIX, EngineEnvironment

SERVE_HELP = "run this pod's engine ranks from the MOESHARD_* environment (what an engine pod runs)"
LAUNCH_HELP = "start every rank of one engine group as local processes and serve its HTTP API"

_SERVE_EPILOG = f"""\
environment (set by the operator; see moeshard.core.engine_env):
  {PREFIX}MODEL_PATH, {PREFIX}EXPERT_EP, {PREFIX}ATTENTION_TP, {PREFIX}PODS_PER_GROUP,
  {PREFIX}GPUS_PER_POD, {PREFIX}POD_INDEX, {PREFIX}RENDEZVOUS, {PREFIX}PLACEMENT_FILE,
  {PREFIX}PORT, {PREFIX}DEVICE, ... A rank's index is POD_INDEX x GPUS_PER_POD + local rank.

API on rank 0 of the group:
  POST /v1/completions   OpenAI-style; "prompt": token ids, a list of token-id lists, or text
                         (when the checkpoint has a tokenizer); "max_tokens", "stop",
                         "stop_token_ids", "ignore_eos". Decoding is greedy.
  GET  /healthz /readyz /metrics /v1/models /v1/placement

The placement file is re-read every --placement-poll seconds; a new valid
version is adopted by all ranks at the same step; an invalid one is refused
with one log line and moeshard_placement_rejected_total.
"""

_LAUNCH_EPILOG = """\
example (4 CPU ranks, attention TP 2, a placement file you can edit while it serves):
  moeshard engine launch --nproc 4 --tp 2 --model ./tiny-qwen3-moe --port 8000 --placement placement.json
  curl -s localhost:8000/v1/completions -d '{"prompt": [1, 2, 3], "max_tokens": 8}'

Ctrl-C (or SIGTERM) lets rank 0 finish the queued requests and stop every rank.
"""


def _add_serving_options(parser: argparse.ArgumentParser, *, host_default: str) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument("--host", default=host_default, help="address rank 0's HTTP server binds (default %(default)s)")
    group.add_argument("--max-batch", type=int, default=32, metavar="N",
                       help="most prompts in one engine step; requests that arrive together share a step (default %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=8192, metavar="TOKENS",
                       help="most prompt tokens in one engine step; a request with more gets 400, requests that "
                            "would overflow a step wait for the next (default %(default)s)")
    group.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="longest prompt + max_tokens accepted (default: max_position_embeddings of config.json)")
    group.add_argument("--default-max-tokens", type=int, default=16, metavar="N",
                       help="max_tokens of a request that does not say (default %(default)s)")
    group.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the \"model\" in responses (default: the checkpoint folder's name)")
    group.add_argument("--placement-poll", type=float, default=1.0, metavar="SECONDS",
                       help="how often each rank re-reads the placement file (default %(default)s)")
    group.add_argument("--idle-interval", type=float, default=0.5, metavar="SECONDS",
                       help="with no requests, rank 0 still starts a step this often, so an idle group "
                            "adopts a new placement (default %(default)s)")
    group.add_argument("--batch-window", type=float, default=0.005, metavar="SECONDS",
                       help="after the first request of a step, wait this long for others to join it (default %(default)s)")
    group.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="a request waiting longer gets 504 (default %(default)s)")
    group.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="rank 0's /healthz answers 503 when requests are pending and no engine step has "
                            "finished for this long (a rank died; Kubernetes restarts the pod) (default %(default)s)")
    group.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="(default %(default)s)")


def _serving_argv(args: argparse.Namespace) -> list[str]:
    """The serving options of ``args`` as command-line flags for child ranks."""
    argv = ["--host", args.host, "--max-batch", str(args.max_batch),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--default-max-tokens", str(args.default_max_tokens), "--placement-poll", str(args.placement_poll),
            "--idle-interval", str(args.idle_interval), "--batch-window", str(args.batch_window),
            "--request-timeout", str(args.request_timeout), "--stall-timeout", str(args.stall_timeout),
            "--log-level", args.log_level]
    if args.served_model_name:
        argv += ["--served-model-name", args.served_model_name]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


# --------------------------------------------------------------------------- serve


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = SERVE_HELP
    parser.epilog = _SERVE_EPILOG
    parser.add_argument("--local-rank", type=int, default=None, metavar="I",
                        help="run only local rank I of this pod (default: start all "
                             f"{PREFIX}GPUS_PER_POD local ranks, in this process when there is one)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"HTTP port of rank 0 (default: {PREFIX}PORT; 0 picks a free port and prints it)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads per rank")
    _add_serving_options(parser, host_default="0.0.0.0")


def _serve_options(args: argparse.Namespace):
    from .serving import ServeOptions

    for name in ("max_batch", "max_num_batched_tokens", "max_model_len", "default_max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("placement_poll", "idle_interval", "request_timeout", "stall_timeout"):
        if getattr(args, name) <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be > 0")
    if args.batch_window < 0:
        raise CommandError("--batch-window must be >= 0")
    return ServeOptions(
        host=args.host, port=args.port, max_batch_prompts=args.max_batch,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens, idle_interval=args.idle_interval, batch_window=args.batch_window,
        placement_poll=args.placement_poll, request_timeout=args.request_timeout, stall_timeout=args.stall_timeout,
        model_name=args.served_model_name, threads=args.threads,
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        env = EngineEnvironment.from_environ(os.environ)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s [%(process)d] %(levelname)s %(message)s")
    options = _serve_options(args)
    if args.local_rank is None and env.gpus_per_pod > 1:
        from .launch import GroupSupervisor, child_environ, rank_commands

        argv = _serving_argv(args) + (["--port", str(args.port)] if args.port is not None else [])
        supervisor = GroupSupervisor(rank_commands(env.gpus_per_pod, argv), child_environ(env, args.threads))
        return supervisor.run()
    local_rank = args.local_rank or 0
    if not 0 <= local_rank < env.gpus_per_pod:
        raise CommandError(f"--local-rank {local_rank} outside 0..{env.gpus_per_pod - 1} ({PREFIX}GPUS_PER_POD)")
    from .serving import ServeError, serve_rank

    stop_event = threading.Event()
    _install_stop_signals(stop_event, leader=env.pod_index * env.gpus_per_pod + local_rank == 0)
    try:
        return serve_rank(env, local_rank, options, stop_event=stop_event)
    except ServeError as exc:
        raise CommandError(str(exc)) from None


def _install_stop_signals(stop_event: threading.Event, *, leader: bool) -> None:
    """First SIGTERM/SIGINT: rank 0 drains and stops the group; the others wait for its stop.

    A second signal exits at once.
    """

    def handler(signum: int, _frame: object) -> None:
        if stop_event.is_set():
            raise SystemExit(128 + signum)
        stop_event.set()
        logging.getLogger("moeshard.engine.serving").warning(
            "signal %d: %s", signum, "draining, then stopping every rank" if leader else "waiting for rank 0 to stop the group")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


# --------------------------------------------------------------------------- launch


def configure_launch(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (LAUNCH_HELP + ".\nSets the MOESHARD_* environment of a one-pod group (gloo on CPU, NCCL "
                          "with --device cuda),\nforwards Ctrl-C/SIGTERM, exits when the ranks exit, and prints where "
                          "rank 0 serves.")
    parser.epilog = _LAUNCH_EPILOG
    parser.add_argument("--nproc", type=int, required=True, metavar="N", help="ranks in the group (= expert parallelism)")
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1, metavar="M", help="attention tensor parallelism; divides N (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of rank 0; 0 picks a free one (default %(default)s)")
    parser.add_argument("--placement", default=None, metavar="FILE",
                        help="placement JSON to start from and watch for new versions (default: the initial placement, no reload)")
    parser.add_argument("--plan", default=None, metavar="FILE", help="plan JSON to pass on (optional)")
    parser.add_argument("--gpus-per-domain", type=int, default=None, metavar="D",
                        help="ranks per NVLink domain; fewer than N switches on hierarchical dispatch (default: N)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when torch sees enough GPUs, else cpu (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads per rank (default: CPU cores / N, at least 1)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="after Ctrl-C, how long rank 0 may drain before every rank is terminated (default %(default)s)")
    _add_serving_options(parser, host_default="127.0.0.1")


def _pick_device(choice: str, nproc: int) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "cpu"


def run_launch(args: argparse.Namespace) -> int:
    from .launch import GroupSupervisor, LaunchSpec, child_environ, free_port, group_environment, rank_commands

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CommandError(f"--model {args.model}: no config.json there")
    if args.placement is not None and not os.path.isfile(args.placement):
        raise CommandError(f"--placement {args.placement}: no such file")
    try:
        spec = LaunchSpec(nproc=args.nproc, model=args.model, tp=args.tp, port=args.port, placement=args.placement,
                          plan=args.plan, gpus_per_domain=args.gpus_per_domain,
                          device=_pick_device(args.device, args.nproc))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // spec.nproc)
    _serve_options(args)  # validate the serving flags before starting anything
    env = group_environment(spec, f"127.0.0.1:{free_port()}")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    where = f"http://{host}:{spec.port}" if spec.port else "a free port (rank 0 prints it)"
    print(f"moeshard engine launch: {spec.nproc} ranks (attention TP {spec.tp}, {spec.device}), model {env.model_path}; "
          f"rank 0 serves {where}", flush=True)
    serve_argv = _serving_argv(args) + ["--port", str(spec.port)]
    supervisor = GroupSupervisor(rank_commands(spec.nproc, serve_argv), child_environ(env, args.threads),
                                 grace=args.grace)
    return supervisor.run()


# --------------------------------------------------------------------------- python -m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.engine.serving_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_serve(sub.add_parser("serve", help=SERVE_HELP))
    configure_launch(sub.add_parser("launch", help=LAUNCH_HELP))
    args = parser.parse_args(argv)
    try:
        return run_serve(args) if args.command == "serve" else run_launch(args)
    except CommandError as exc:
        print(f"moeshard engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
