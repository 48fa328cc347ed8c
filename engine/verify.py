"""Checking the engine against transformers: tiny checkpoints, local process worlds, the verify report.

* :func:`make_tiny_model` builds a random tiny Qwen3-MoE or Mixtral checkpoint
  offline with transformers' config classes (no download) and saves it with
  ``save_pretrained``.
* :func:`run_world` starts W ranks as local processes (``spawn``, gloo on
  127.0.0.1, one thread each), runs a task on each rank's
  :class:`~moeshard.engine.runtime.EngineRuntime` and returns the results.
* :func:`verify` runs the same prompts through transformers and through an
  EP x TP engine world and reports the max abs logit error and whether greedy
  generation matches (``moeshard engine verify``).
"""

from __future__ import annotations

import json
import math
import queue
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeshard.core.engine_env import EngineEnvironment
from moeshard.core.placement import Placement, initial_placement, placement_from_arrays

TINY_ARCHS = ("qwen3_moe", "mixtral")
DEFAULT_PROMPTS = ([3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [2, 71, 82, 81], [1, 41, 42, 13, 56, 62, 37])
DEFAULT_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- tiny checkpoints

def tiny_config(arch: str, *, top_k: int | None = None, num_experts: int = 8, num_layers: int = 2):
    """A transformers config for a tiny ``arch`` model: hidden 64, vocab 128, 4 query / 2 KV heads, 8 experts.

    Qwen3-MoE defaults to top-4 (norm_topk_prob), Mixtral to top-2.
    """
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=num_experts, num_experts_per_tok=top_k or 4, norm_topk_prob=True,
            max_position_embeddings=256, eos_token_id=None, pad_token_id=None, bos_token_id=None,
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
            num_experts_per_tok=top_k or 2, max_position_embeddings=256, eos_token_id=None, pad_token_id=None,
            bos_token_id=None,
        )
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def make_tiny_model(arch: str, out: str | Path, *, seed: int = 0, **config_kw: Any) -> Path:
    """Build a random tiny ``arch`` model and ``save_pretrained`` it (float32 safetensors) into ``out``.

    Router weights are scaled x50 and embeddings / lm_head x10 after the
    random init: with std-0.02 init, router probabilities are near-uniform and
    logits near-flat, so a 1e-7 rounding difference between two correct
    implementations could flip a top-K or a greedy choice. Scaled, the
    routing and the argmax are decisive and the comparison is meaningful.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kw), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate.weight"):
                param.mul_(50.0)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.mul_(10.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def load_reference(model_dir: str | Path):
    """The transformers model of a checkpoint folder (float32, eval, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()


def reference_outputs(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[Any], list[list[int]]]:
    """transformers' logits [len, V] per prompt and greedy continuations, each prompt run alone (no padding)."""
    import torch

    ref = load_reference(model_dir)
    logits, generated = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(ref(ids).logits[0].float())
            if max_new_tokens:
                out = ref.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=0)
                generated.append(out[0, len(p):].tolist())
            else:
                generated.append([])
    return logits, generated


# --------------------------------------------------------------------------- placements for checks

def replicated_placement(num_layers: int, num_experts: int, world: int, redundant_slots: int, *,
                         uneven: bool = True) -> Placement:
    """A placement with ``redundant_slots`` extra slots per rank, replicas with uneven shares.

    Starts from initial_placement (E/W primaries per rank + replicas of
    experts 0, 1, ...); when ``uneven``, a replicated expert's first replica
    gets 0.7 of its tokens and the rest share 0.3.
    """
    base = initial_placement(num_layers, num_experts, world, math.ceil(num_experts / world) + redundant_slots)
    weights = base.weights.copy()
    if uneven:
        for layer in range(base.num_layers):
            row = base.phy2log[layer]
            for e in range(num_experts):
                slots = np.flatnonzero(row == e)
                if slots.size > 1:
                    weights[layer, slots[0]] = 0.7
                    weights[layer, slots[1:]] = 0.3 / (slots.size - 1)
    return placement_from_arrays(1, base.num_gpus, base.slots_per_gpu, num_experts, base.phy2log, weights)


# --------------------------------------------------------------------------- local worlds

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(model_dir: str | Path, world: int, *, tp: int = 1, gpus_per_domain: int = 8,
              placement_file: str | Path | None = None, device: str = "cpu", port: int | None = None) -> EngineEnvironment:
    """An engine environment for a W-rank group of one pod on this machine (rendezvous on a free port)."""
    return EngineEnvironment(
        deployment="local", namespace="default", replica_index=0, pod_index=0, pods_per_group=1, gpus_per_pod=world,
        gpus_per_domain=gpus_per_domain, attention_tp=tp, expert_ep=world,
        rendezvous=f"127.0.0.1:{port or free_port()}", plan_file="/nonexistent/plan.json",
        placement_file=str(placement_file or "/nonexistent/placement.json"), model_path=str(model_dir), port=8000,
        device=device,
    )


def _runtime_worker(rank: int, env: EngineEnvironment, task: Callable, args: tuple, results) -> None:
    import torch

    torch.set_num_threads(1)
    runtime = None
    try:
        from moeshard.engine.runtime import EngineRuntime

        runtime = EngineRuntime.create(env, local_rank=rank)
        results.put((rank, "ok", task(runtime, *args)))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if runtime is not None:
            try:
                runtime.close()
            except Exception:
                pass


def _plain_worker(rank: int, world: int, port: int, task: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        results.put((rank, "ok", task(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, target: Callable, make_args: Callable[[int, Any], tuple], timeout_s: float) -> list[Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=make_args(r, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    try:
        while len(out) < len(procs):
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"engine world timed out after {timeout_s} s ({len(out)} ranks done)") from None
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("engine world failed: " + "\n".join(errors))
    return [out[r] for r in range(len(procs))]


def run_world(env: EngineEnvironment, task: Callable, *args: Any, timeout_s: float = 240.0) -> list[Any]:
    """Run ``task(runtime, *args)`` on every rank of a local engine world (spawned processes); results by rank.

    Each rank builds its :class:`EngineRuntime` from ``env``. ``task`` must be
    importable by the children (a module-level function). Raises RuntimeError
    with the failing rank's traceback.
    """
    return _spawn(env.expert_ep, _runtime_worker, lambda r, q: (r, env, task, args, q), timeout_s)


def run_ranks(world: int, task: Callable, *args: Any, timeout_s: float = 240.0) -> list[Any]:
    """Run ``task(rank, world, *args)`` in a plain gloo world of ``world`` local processes; results by rank."""
    port = free_port()
    return _spawn(world, _plain_worker, lambda r, q: (r, world, port, task, args, q), timeout_s)


# --------------------------------------------------------------------------- verify

def _verify_task(runtime, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    logits = runtime.forward_logits(prompts)
    generated = runtime.generate(prompts, max_new_tokens) if max_new_tokens else [[] for _ in prompts]
    return {
        "logits": logits.numpy() if runtime.rank == 0 else None,
        "generated": generated,
        "expert_tokens": runtime.expert_token_counts(),
        "loaded_bytes": runtime.loaded_bytes(),
        "link_bytes": runtime.link_bytes(),
    }


def verify(model_dir: str | Path, *, ep: int, tp: int = 1, redundant_slots: int = 0,
           prompts: list[list[int]] | None = None, max_new_tokens: int = 16, gpus_per_domain: int = 8,
           tolerance: float = DEFAULT_TOLERANCE, device: str = "cpu") -> dict[str, Any]:
    """Compare an EP x TP engine world with transformers on ``prompts``; a JSON-ready report.

    ``ok`` is true when the max abs logit error is within ``tolerance`` and
    every greedy continuation equals transformers' ``generate``.
    """
    from moeshard.engine.config import ModelConfig

    prompts = [list(map(int, p)) for p in (prompts or DEFAULT_PROMPTS)]
    cfg = ModelConfig.from_pretrained(model_dir)
    if ep < 1 or tp < 1 or ep % tp:
        raise ValueError(f"--tp ({tp}) must divide --ep ({ep})")
    if redundant_slots < 0:
        raise ValueError(f"--redundant-slots must be >= 0, got {redundant_slots}")
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < ep:
            raise ValueError(f"--device cuda needs one GPU per rank: --ep {ep}, {torch.cuda.device_count()} GPU(s) visible")
    with tempfile.TemporaryDirectory(prefix="moeshard-verify-") as tmp:
        placement_file = None
        if redundant_slots:
            placement = replicated_placement(cfg.num_moe_layers, cfg.num_experts, ep, redundant_slots)
            placement_file = Path(tmp) / "placement.json"
            placement_file.write_text(placement.to_json())
        env = local_env(model_dir, ep, tp=tp, gpus_per_domain=gpus_per_domain, placement_file=placement_file,
                        device=device)
        results = run_world(env, _verify_task, prompts, max_new_tokens)
    ref_logits, ref_generated = reference_outputs(model_dir, prompts, max_new_tokens)
    engine_logits = results[0]["logits"]
    errors = [float(np.abs(engine_logits[i, : len(p)] - ref_logits[i].numpy()).max()) for i, p in enumerate(prompts)]
    generated = results[0]["generated"]
    same_on_all_ranks = all(r["generated"] == generated for r in results)
    routed = int(sum(r["expert_tokens"].sum() for r in results))
    # forward_logits routes every prompt token; generate routes the prompts again, then B tokens per later step.
    tokens = 2 * sum(len(p) for p in prompts) + len(prompts) * max(max_new_tokens - 1, 0)
    expected_routed = tokens * cfg.top_k * cfg.num_moe_layers
    report = {
        "model": str(model_dir),
        "architecture": cfg.model_type,
        "ep": ep, "tp": tp, "redundant_slots": redundant_slots, "gpus_per_domain": gpus_per_domain, "device": device,
        "prompts": len(prompts),
        "max_abs_error": max(errors),
        "max_abs_error_per_prompt": errors,
        "tolerance": tolerance,
        "generation_matches": [g == r for g, r in zip(generated, ref_generated)],
        "generation_same_on_all_ranks": same_on_all_ranks,
        "max_new_tokens": max_new_tokens,
        "routed_pairs": routed,
        "expected_routed_pairs": expected_routed,
        "expert_bytes_per_rank": [int(r["loaded_bytes"].get("experts", 0)) for r in results],
        "link_bytes_per_rank": [r["link_bytes"] for r in results],
    }
    report["ok"] = bool(report["max_abs_error"] <= tolerance and all(report["generation_matches"]) and same_on_all_ranks
                        and routed == expected_routed)
    return report


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


__all__ = [
    "DEFAULT_PROMPTS", "TINY_ARCHS", "free_port", "load_reference", "local_env", "make_tiny_model",
    "reference_outputs", "replicated_placement", "run_ranks", "run_world", "tiny_config", "verify",
]
