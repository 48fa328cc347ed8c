"""Serving one engine group: wiring the API layer, the scheduler and the step loop on every rank.

Picture of one group (W ranks, rank 0 leads)::

    API thread (rank 0, aiohttp)               step loop (main thread, every rank)
    POST /v1/completions, /v1/chat/completions rank 0: intake -> Scheduler.schedule() -> StepPlan
      validate (api_schema) -> Intake  ------> broadcast the plan to all ranks
      stream events (SSE) or one answer <---+  all ranks: runtime.execute(plan) (one forward, paged KV)
    GET /healthz /readyz /metrics           |  all ranks: expert-count all-reduce; step boundary
        /v1/models /v1/placement            +- rank 0: output processing (text, stop strings, metrics)

Modules: api_schema (request schema), api_server (HTTP), output (detokenization
and stop strings), scheduler (continuous batching, chunked prefill,
preemption), kv_cache / paged_attention (the paged pool), step_plan (what
rank 0 broadcasts), executor (one step on one rank), step_loop (the loop).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from moeshard.engine.api_schema import ServingLimits
from moeshard.engine.api_server import ApiServer, ServingState
from moeshard.engine.kv_cache import DEFAULT_BLOCK_SIZE
from moeshard.engine.metrics import EngineMetrics, MetricScope
from moeshard.engine.reload import PlacementWatcher
from moeshard.engine.scheduler import Scheduler, SchedulerConfig
from moeshard.engine.step_loop import Intake, StepLoop
from moeshard.engine.step_plan import TorchChannel

log = logging.getLogger("moeshard.engine.serving")


class ServeError(RuntimeError):
    """A rank cannot start serving (for example the HTTP port is taken)."""


@dataclass(frozen=True)
class ServeOptions:
    """Serving knobs (the CLI flags of ``moeshard engine serve``)."""

    host: str = "0.0.0.0"
    port: int | None = None  # None: the environment's MOESHARD_PORT
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    default_max_tokens: int = 16
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # per attention-DP group; None: kv_memory_fraction (CUDA) or enough for
    kv_memory_fraction: float = 0.9  # max_num_seqs x max_model_len capped at 4096 blocks (CPU)
    request_level: bool = False  # the old request-level batching (benchmark baseline)
    idle_interval: float = 0.5
    placement_poll: float = 1.0
    request_timeout: float = 600.0
    stall_timeout: float = 300.0  # /healthz 503 after this long without a step boundary while busy
    model_name: str | None = None
    threads: int | None = None


def model_max_len(model_path: str, default: int = 4096) -> int:
    """``max_position_embeddings`` of the checkpoint's config.json (``default`` when absent)."""
    try:
        with open(os.path.join(model_path, "config.json")) as handle:
            value = json.load(handle).get("max_position_embeddings")
    except (OSError, ValueError):
        return default
    return int(value) if isinstance(value, int) and value > 0 else default


def limits_from_runtime(runtime: Any, options: ServeOptions, model_path: str) -> ServingLimits:
    """ServingLimits from the runtime's model config, generation_config.json and tokenizer."""
    from moeshard.engine.sampling import GenerationDefaults

    try:
        eos = json.loads(Path(model_path, "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []))
    return ServingLimits(
        vocab_size=int(runtime.config.vocab_size),
        defaults=GenerationDefaults.from_checkpoint(model_path, eos_ids),
        max_model_len=options.max_model_len or model_max_len(model_path),
        default_max_tokens=options.default_max_tokens,
        tokenizer=runtime.tokenizer_or_none,
        model_name=options.model_name or os.path.basename(os.path.normpath(model_path)) or "moeshard",
    )


def kv_blocks(runtime: Any, options: ServeOptions, max_model_len: int, channel: TorchChannel) -> int:
    """Blocks per rank's pool, the same on every rank (MIN over the group). COLLECTIVE."""
    if options.num_kv_blocks is not None:
        mine = options.num_kv_blocks
    elif runtime.device.type == "cuda":
        mine = runtime.kv_blocks_fitting(options.kv_memory_fraction, options.block_size)
    else:
        mine = min(4096, options.max_num_seqs * -(-max_model_len // options.block_size))
    return int(channel.reduce_min(np.array([mine]))[0])


def serve_rank(env: Any, local_rank: int, options: ServeOptions, *, stop_event: threading.Event | None = None) -> int:
    """Run one rank of a group until rank 0 stops it; rank 0 also serves HTTP.

    Returns the process exit code. ``stop_event`` (rank 0) starts a drain:
    /readyz turns 503, running requests finish, then every rank stops.
    """
    from moeshard.engine.runtime import EngineRuntime

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    rank = env.pod_index * env.gpus_per_pod + local_rank
    state = ServingState(options.request_timeout, options.stall_timeout)
    server = None
    if rank == 0:
        port = env.port if options.port is None else options.port
        try:
            server = ApiServer(state, options.host, port).start()
        except OSError as exc:
            raise ServeError(f"cannot serve HTTP on {options.host}:{port}: {exc.strerror or exc}") from None
        host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
        print(f"moeshard engine: rank 0 serving http://{host}:{server.port}/v1/completions "
              f"(group of {env.expert_ep} ranks, loading {env.model_path})", flush=True)
    runtime = None
    try:
        runtime = EngineRuntime.create(env, local_rank)
        channel = TorchChannel()
        limits = limits_from_runtime(runtime, options, env.model_path)
        num_blocks = kv_blocks(runtime, options, limits.max_model_len, channel)  # also: every rank has joined
        if num_blocks < 1:
            raise ServeError("no memory left for the KV cache (0 blocks); lower the load or raise the fraction")
        runtime.init_kv_pool(num_blocks, options.block_size)
        ready_file = getattr(env, "ready_file", "") if local_rank == 0 else ""
        if ready_file:  # the pod's readiness probe: this pod's ranks serve, the whole group has joined
            Path(ready_file).write_text(f"{channel.world_size}\n")
        metrics = scheduler = intake = None
        if rank == 0:
            placement = runtime.placement
            metrics = EngineMetrics(MetricScope.from_env(env), num_layers=placement.num_layers,
                                    num_experts=placement.num_experts, world_size=channel.world_size)
            metrics.set_placement_version(runtime.placement_version)
            scheduler = Scheduler(SchedulerConfig(
                num_blocks=num_blocks, block_size=options.block_size, dp_size=runtime.parallel.dp_size,
                max_num_batched_tokens=options.max_num_batched_tokens, max_num_seqs=options.max_num_seqs,
                request_level=options.request_level))
            intake = Intake()
        watcher = PlacementWatcher(
            env.placement_file, runtime.placement, poll_interval=options.placement_poll,
            on_reject=(lambda _problem: metrics.count_rejected_placement()) if metrics is not None else None,
            log_level=logging.WARNING if rank == 0 else logging.DEBUG,
        )
        loop = StepLoop(runtime, channel, scheduler=scheduler, intake=intake, watcher=watcher, metrics=metrics,
                        idle_interval=options.idle_interval, on_placement=state.set_placement)
        if stop_event is not None and rank == 0:
            loop.stop_event = stop_event
        loop.sync.agree_before_serving()  # one placement on every rank before the first step
        if metrics is not None:
            metrics.set_placement_version(runtime.placement_version)
        if rank == 0:
            state.limits, state.intake, state.metrics = limits, intake, metrics
            state.world_size = channel.world_size
            state.stall_probe = loop.stall_seconds
            state.set_placement(runtime.placement)
            state.ready = True
            log.info("all %d ranks joined; ready (%d KV blocks of %d tokens per attention-DP group)",
                     channel.world_size, num_blocks, options.block_size)
            threading.Thread(target=_drain_on_stop, args=(loop.stop_event, state), daemon=True).start()
        loop.run()
        return 0
    except BaseException as exc:
        state.failed = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if local_rank == 0 and getattr(env, "ready_file", ""):
            Path(env.ready_file).unlink(missing_ok=True)
        if runtime is not None:
            runtime.close()
        if server is not None:
            server.stop()


def _drain_on_stop(stop_event: threading.Event, state: ServingState) -> None:
    stop_event.wait()
    state.accepting = False
