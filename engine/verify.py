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
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeshard.core.engine_env import EngineEnvironment
from moeshard.core.layout import fewest_redundant_slots, slots_per_gpu
from moeshard.core.placement import Placement, initial_placement, placement_from_arrays

TINY_ARCHS = ("qwen3_moe", "mixtral")


# --------------------------------------------------------------------------- tiny checkpoints

def tiny_config(arch: str, *, top_k: int | None = None, num_experts: int = 8, num_layers: int = 2,
                vocab_size: int = 128):
    """A transformers config for a tiny ``arch`` model: hidden 64, vocab 128, 4 query / 2 KV heads, 8 experts.

    Qwen3-MoE defaults to top-4 (norm_topk_prob), Mixtral to top-2.
    """
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=num_experts, num_experts_per_tok=top_k or 4, norm_topk_prob=True,
            max_position_embeddings=256, eos_token_id=None, pad_token_id=None, bos_token_id=None,
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
            num_experts_per_tok=top_k or 2, max_position_embeddings=256, eos_token_id=None, pad_token_id=None,
            bos_token_id=None,
        )
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def make_tiny_model(arch: str, out: str | Path, *, seed: int = 0, dtype: str = "float32", **config_kw: Any) -> Path:
    """Build a random tiny ``arch`` model and ``save_pretrained`` it (``dtype`` safetensors) into ``out``.

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
    model = model.to(getattr(torch, dtype))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def load_reference(model_dir: str | Path, dtype: str = "float32"):
    """The transformers model of a checkpoint folder (``dtype``, eval, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                attn_implementation="eager").eval()


def reference_outputs(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, *,
                      eos_token_ids: tuple[int, ...] = (), dtype: str = "float32") -> tuple[list[Any], list[list[int]]]:
    """transformers' logits [len, V] (float32) per prompt and its greedy continuations, each prompt run alone.

    Greedy is the plain argmax of transformers' forward pass, step by step on
    its KV cache: no generation_config processors (repetition penalty,
    suppressed tokens, ``min_new_tokens``) that the engine does not apply. A
    continuation stops after the first token in ``eos_token_ids`` (kept), as
    the engine's stop sets do.
    """
    import torch

    ref = load_reference(model_dir, dtype)
    stops = frozenset(int(t) for t in eos_token_ids)
    logits, generated = [], []
    with torch.inference_mode():
        for p in prompts:
            out = ref(torch.tensor([p]))
            logits.append(out.logits[0].float())
            tokens: list[int] = []
            while len(tokens) < max_new_tokens:
                tokens.append(int(out.logits[0, -1].float().argmax()))
                if tokens[-1] in stops or len(tokens) == max_new_tokens:
                    break
                out = ref(torch.tensor([[tokens[-1]]]), cache=out.cache)
            generated.append(tokens)
    return logits, generated


# --------------------------------------------------------------------------- placements for checks

def replicated_placement(num_layers: int, num_experts: int, world: int, redundant_slots: int, *,
                         uneven: bool = True) -> Placement:
    """A placement with ``redundant_slots`` extra slots per rank, replicas with uneven shares.

    Starts from initial_placement (E/W primaries per rank + replicas of
    experts 0, 1, ...); when ``uneven``, a replicated expert's first replica
    gets 0.7 of its tokens and the rest share 0.3.
    """
    fewest = slots_per_gpu(num_experts, fewest_redundant_slots(num_experts, world), world)
    base = initial_placement(num_layers, num_experts, world, fewest + redundant_slots)
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


class EngineWorldError(RuntimeError):
    """A rank of a local world failed: ``str()`` is one line (rank, exception type, message);
    ``details`` holds the failing rank's full traceback."""

    def __init__(self, rank: int, summary: str, details: str) -> None:
        super().__init__(f"rank {rank}: {summary}")
        self.rank, self.summary, self.details = rank, summary, details


def _failure() -> tuple[str, str]:
    """(one-line summary, full traceback) of the exception being handled."""
    lines = traceback.format_exc().strip().splitlines()
    return (lines[-1] if lines else "unknown error"), "\n".join(lines)


def _runtime_worker(rank: int, env: EngineEnvironment, task: Callable, args: tuple, results,
                    dtype: str | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    runtime = None
    try:
        from moeshard.engine.runtime import EngineRuntime

        runtime = EngineRuntime.create(env, local_rank=rank, dtype=getattr(torch, dtype) if dtype else None)
        results.put((rank, "ok", task(runtime, *args)))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, "error", _failure()))
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
        results.put((rank, "error", _failure()))
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
    failure: EngineWorldError | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < len(procs):
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:  # died before reporting (killed, or failed to import in the child)
                    failure = EngineWorldError(dead[0], f"process exited with code {procs[dead[0]].exitcode}", "")
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine world timed out after {timeout_s} s ({len(out)} ranks done)") from None
                continue
            if status == "ok":
                out[rank] = value
            else:
                failure = EngineWorldError(rank, *value)
                break  # the others are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if failure is None else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        raise failure
    return [out[r] for r in range(len(procs))]


def run_world(env: EngineEnvironment, task: Callable, *args: Any, timeout_s: float = 240.0,
              dtype: str | None = None) -> list[Any]:
    """Run ``task(runtime, *args)`` on every rank of a local engine world (spawned processes); results by rank.

    Each rank builds its :class:`EngineRuntime` from ``env`` (weights in
    ``dtype``, a torch dtype name; None keeps the checkpoint's). ``task``
    must be importable by the children (a module-level function). Raises
    EngineWorldError (one line; ``details`` has the failing rank's traceback).
    """
    return _spawn(env.expert_ep, _runtime_worker, lambda r, q: (r, env, task, args, q, dtype), timeout_s)


def run_ranks(world: int, task: Callable, *args: Any, timeout_s: float = 240.0) -> list[Any]:
    """Run ``task(rank, world, *args)`` in a plain gloo world of ``world`` local processes; results by rank."""
    port = free_port()
    return _spawn(world, _plain_worker, lambda r, q: (r, world, port, task, args, q), timeout_s)


# --------------------------------------------------------------------------- verify

# Max abs logit error allowed per compute dtype, engine against transformers run in the same dtype.
# float32: both sides agree to rounding: absolute 1e-4 (measured 1.2e-6 / 1.4e-6 on the tiny Qwen3-MoE /
# Mixtral checkpoints, EP 1 and EP 2 x TP 2, CPU).
# bfloat16 / float16: the two sides round differently inside matmuls, norms and softmax, and the error
# scales with the logits, so the bound is relative to the largest reference logit: atol = rel * max|logit|.
# Measured on the same checkpoints (vocab 64, max |logit| ~5.9): bf16 0.031 (0.0053 of it), fp16 0.0039
# (0.00066 of it); rel below is 3x that, leaving room for GPU kernels against the CPU reference.
RELATIVE_TOLERANCE = {"float32": None, "bfloat16": 0.016, "float16": 0.002}
DEFAULT_TOLERANCE = 1e-4  # float32, absolute
VERIFY_DTYPES = tuple(RELATIVE_TOLERANCE)
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class VerifyPlan:
    """Everything verify needs, checked in the parent before any rank starts."""

    model_dir: Path
    config: Any  # moeshard.engine.config.ModelConfig
    prompts: list[list[int]]
    dtype: str
    eos_token_ids: tuple[int, ...]


def default_prompts(vocab_size: int) -> list[list[int]]:
    """Three prompts (11, 4 and 7 tokens) of ids drawn inside ``vocab_size``, the same for every run."""
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(0, vocab_size, size=n)] for n in (11, 4, 7)]


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint stores its embedding in (what the engine computes in by default)."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if "model.embed_tokens.weight" in handle.keys():
                stored = handle.get_slice("model.embed_tokens.weight").get_dtype()
                if stored not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{path.name}: model.embed_tokens.weight is stored as {stored}; "
                                     f"verify runs only {', '.join(_SAFETENSORS_DTYPES)} checkpoints")
                return _SAFETENSORS_DTYPES[stored]
    raise ValueError(f"{model_dir}: no safetensors file holds model.embed_tokens.weight")


def tolerance_for(dtype: str, ref_logits: list[Any]) -> float:
    """The documented bound of RELATIVE_TOLERANCE for ``dtype``, given the reference logits."""
    rel = RELATIVE_TOLERANCE[dtype]
    if rel is None:
        return DEFAULT_TOLERANCE
    return rel * max(float(t.abs().max()) for t in ref_logits)


def check_verify_args(model_dir: str | Path, *, ep: int, tp: int, redundant_slots: int,
                      prompts: list[list[int]] | None, max_new_tokens: int, gpus_per_domain: int,
                      tolerance: float | None, device: str, dtype: str | None) -> VerifyPlan:
    """Check every verify argument against the checkpoint with the ranks' own checks; ValueError is one line.

    Runs in the parent, so that bad input never starts a world: the model
    folder and config.json (ModelConfig, which refuses quantized
    checkpoints), the group layout (ParallelConfig), attention TP against
    the KV heads (kv_sizing.check_attention_tp, what the model builder
    runs), the placement against the model, and the prompt ids (the
    runtime's own prompt check).
    """
    from moeshard.engine.config import ModelConfig, ParallelConfig
    from moeshard.core.kv_sizing import check_attention_tp
    from moeshard.engine.runtime import EngineRuntime, check_placement
    from moeshard.engine.sampling import GenerationDefaults

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"--model: {folder} is not a folder")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"--model: {folder} holds no *.safetensors file")
    cfg = ModelConfig.from_pretrained(folder)
    if ep < 1 or tp < 1 or ep % tp:
        raise ValueError(f"--tp ({tp}) must divide --ep ({ep})")
    if redundant_slots < 0:
        raise ValueError(f"--redundant-slots must be >= 0, got {redundant_slots}")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    try:
        ParallelConfig(rank=0, world_size=ep, tp_size=tp, gpus_per_domain=gpus_per_domain, device=device,
                       gpus_per_pod=ep)
        check_attention_tp(cfg.num_attention_heads, cfg.num_kv_heads, tp)
        check_placement(_verify_placement(cfg, ep, redundant_slots), cfg, ep)
    except ValueError as exc:
        raise ValueError(f"--ep {ep} --tp {tp}: {exc}") from None
    chosen = [list(p) for p in prompts] if prompts else default_prompts(cfg.vocab_size)
    try:
        EngineRuntime._check_prompts(chosen, cfg.vocab_size)  # the ranks' own check, run before they start
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    if dtype is not None and dtype not in VERIFY_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(VERIFY_DTYPES)}, got {dtype!r}")
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < ep:
            raise ValueError(f"--device cuda needs one GPU per rank: --ep {ep}, {torch.cuda.device_count()} GPU(s) visible")
    eos = GenerationDefaults.from_checkpoint(folder, cfg.eos_token_id).eos_token_ids
    return VerifyPlan(model_dir=folder, config=cfg, prompts=chosen, dtype=dtype or checkpoint_dtype(folder),
                      eos_token_ids=eos)


def _verify_placement(cfg: Any, ep: int, redundant_slots: int) -> Placement:
    if redundant_slots:
        return replicated_placement(cfg.num_moe_layers, cfg.num_experts, ep, redundant_slots)
    return initial_placement(cfg.num_moe_layers, cfg.num_experts, ep, math.ceil(cfg.num_experts / ep))


def _verify_task(runtime, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: tuple[int, ...]) -> dict[str, Any]:
    logits = runtime.forward_logits(prompts)
    stops = [set(eos_token_ids) for _ in prompts]
    generated = runtime.generate(prompts, max_new_tokens, stop_token_ids=stops) if max_new_tokens else [[] for _ in prompts]
    return {
        "logits": logits.float().cpu().numpy() if runtime.rank == 0 else None,
        "generated": generated,
        "expert_tokens": runtime.expert_token_counts(),
        "loaded_bytes": runtime.loaded_bytes(),
        "link_bytes": runtime.link_bytes(),
    }


def verify(model_dir: str | Path, *, ep: int, tp: int = 1, redundant_slots: int = 0,
           prompts: list[list[int]] | None = None, max_new_tokens: int = 16, gpus_per_domain: int = 8,
           tolerance: float | None = None, device: str = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """Compare an EP x TP engine world with transformers on ``prompts``; a JSON-ready report.

    Both sides compute in ``dtype`` (default: the checkpoint's stored dtype)
    and stop a greedy continuation at the checkpoint's EOS ids
    (generation_config.json, else config.json). ``ok`` is true when the max
    abs logit error is within ``tolerance`` (default: the per-dtype bound of
    RELATIVE_TOLERANCE) and every greedy continuation equals transformers'.
    Bad arguments raise ValueError (one line) before any rank starts.
    """
    plan = check_verify_args(model_dir, ep=ep, tp=tp, redundant_slots=redundant_slots, prompts=prompts,
                             max_new_tokens=max_new_tokens, gpus_per_domain=gpus_per_domain, tolerance=tolerance,
                             device=device, dtype=dtype)
    cfg, prompts = plan.config, plan.prompts
    with tempfile.TemporaryDirectory(prefix="moeshard-verify-") as tmp:
        placement_file = None
        if redundant_slots:
            placement_file = Path(tmp) / "placement.json"
            placement_file.write_text(_verify_placement(cfg, ep, redundant_slots).to_json())
        env = local_env(model_dir, ep, tp=tp, gpus_per_domain=gpus_per_domain, placement_file=placement_file,
                        device=device)
        results = run_world(env, _verify_task, prompts, max_new_tokens, plan.eos_token_ids, dtype=plan.dtype)
    ref_logits, ref_generated = reference_outputs(model_dir, prompts, max_new_tokens, eos_token_ids=plan.eos_token_ids,
                                                  dtype=plan.dtype)
    bound = tolerance if tolerance is not None else tolerance_for(plan.dtype, ref_logits)
    engine_logits = results[0]["logits"]
    errors = [float(np.abs(engine_logits[i, : len(p)] - ref_logits[i].numpy()).max()) for i, p in enumerate(prompts)]
    generated = results[0]["generated"]
    same_on_all_ranks = all(r["generated"] == generated for r in results)
    routed = int(sum(r["expert_tokens"].sum() for r in results))
    # forward_logits routes every prompt token; generate routes the prompts again, then every generated
    # token but a sequence's last one (it is never fed back).
    tokens = sum(len(p) for p in prompts)
    if max_new_tokens:
        tokens += sum(len(p) for p in prompts) + sum(max(len(g) - 1, 0) for g in generated)
    expected_routed = tokens * cfg.top_k * cfg.num_moe_layers
    report = {
        "model": str(model_dir),
        "architecture": cfg.model_type,
        "ep": ep, "tp": tp, "redundant_slots": redundant_slots, "gpus_per_domain": gpus_per_domain, "device": device,
        "dtype": plan.dtype,
        "prompts": len(prompts),
        "max_abs_error": max(errors),
        "max_abs_error_per_prompt": errors,
        "tolerance": bound,
        "eos_token_ids": list(plan.eos_token_ids),
        "generation_matches": [g == r for g, r in zip(generated, ref_generated)],
        "generation_same_on_all_ranks": same_on_all_ranks,
        "max_new_tokens": max_new_tokens,
        "routed_pairs": routed,
        "expected_routed_pairs": expected_routed,
        "expert_bytes_per_rank": [int(r["loaded_bytes"].get("experts", 0)) for r in results],
        "link_bytes_per_rank": [r["link_bytes"] for r in results],
    }
    report["ok"] = bool(report["max_abs_error"] <= bound and all(report["generation_matches"]) and same_on_all_ranks
                        and routed == expected_routed)
    return report


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


__all__ = [
    "EngineWorldError", "TINY_ARCHS", "check_verify_args", "default_prompts", "free_port", "load_reference", "local_env", "make_tiny_model",
    "reference_outputs", "replicated_placement", "run_ranks", "run_world", "tiny_config", "verify",
]
