"""Per-rank tasks for the placement agreement tests (run by verify.run_ranks in spawned gloo worlds).

Each rank builds its own EngineRuntime from the placement the test gives
IT, so ranks can start on different versions, as after a ConfigMap change
racing a group's start.
"""

from __future__ import annotations

from typing import Any

from support.engine_tasks import _expert_weights_match_checkpoint


def _runtime(rank: int, world: int, model_dir: str, placement_json: str):
    import torch

    from moeshard.engine.config import ParallelConfig
    from moeshard.engine.runtime import EngineRuntime
    from moeshard.core.placement import parse_placement

    torch.set_num_threads(1)
    parallel = ParallelConfig(rank=rank, world_size=world)
    return EngineRuntime(model_dir=model_dir, parallel=parallel, placement=parse_placement(placement_json),
                         dtype=torch.float32)


def _report(runtime, generated) -> dict[str, Any]:
    from moeshard.engine.reload import placement_digest

    return {"version": runtime.placement_version, "digest": placement_digest(runtime.placement),
            "generated": generated, "weights_ok": _expert_weights_match_checkpoint(runtime),
            "rows": runtime.placement.phy2log.tolist()}


def converge_task(rank: int, world: int, model_dir: str, placements: list[str], prompts: list[list[int]],
                  max_new: int) -> dict[str, Any]:
    """Rank r starts on placements[r]; agree before serving, then generate."""
    from moeshard.engine.reload import PlacementSync
    from moeshard.engine.serving import TorchChannel

    runtime = _runtime(rank, world, model_dir, placements[rank])
    started = runtime.placement_version
    PlacementSync(runtime, TorchChannel(), None).agree_before_serving()
    report = _report(runtime, runtime.generate(prompts, max_new))
    return {**report, "started": started}


def aborted_move_task(rank: int, world: int, model_dir: str, start: str, folder: str, prompts: list[list[int]],
                      max_new: int, fault_rank: int, fault_layer: int) -> dict[str, Any]:
    """A staged move (one layer per step boundary) whose stage for ``fault_layer`` fails on ``fault_rank``."""
    from moeshard.engine.reload import PlacementSync, PlacementWatcher
    from moeshard.engine.serving import TorchChannel

    runtime = _runtime(rank, world, model_dir, start)
    before = runtime.generate(prompts, max_new)

    def fault(layers: list[int]) -> None:
        if rank == fault_rank and fault_layer in layers:
            raise ConnectionError(f"injected: transfer of layer {fault_layer} killed")

    runtime.transfer_fault = fault
    watcher = PlacementWatcher(f"{folder}/placement.json", runtime.placement, poll_interval=0.0)
    sync = PlacementSync(runtime, TorchChannel(), watcher, layers_per_step=1, retry_after_s=3600.0)
    adopted = [sync.at_step_boundary() for _ in range(4)]
    after = runtime.generate(prompts, max_new)
    return {**_report(runtime, after), "before": before, "adopted": [a is not None for a in adopted],
            "moving": sync.move is not None}
