"""EngineRuntime: one rank of an EP group, from the environment contract to greedy generation.

Every public method marked COLLECTIVE must be called by all ranks of the
group with the same arguments, in the same order (the serving layer
broadcasts requests from rank 0 before calling them).

A step is a :class:`~moeshard.engine.step_plan.StepPlan` run by
:class:`~moeshard.engine.executor.StepExecutor` on a paged KV pool: the
serving loop's pool (``init_kv_pool`` + ``execute``), or, for the
request-level ``generate`` / ``forward_logits`` (verify, tests, the
benchmark's baseline), a pool sized for that one batch.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moeshard.engine.comm import LINK_CLASSES, make_all_to_all
from moeshard.engine.config import ModelConfig, ParallelConfig
from moeshard.engine.loading import CheckpointReader
from moeshard.engine.executor import StepExecutor, TokenKeys
from moeshard.core.kv_sizing import blocks_for_tokens, kv_blocks_for_bytes, kv_bytes_per_token_per_rank
from moeshard.engine.model import MoEModel, build_model, load_local_experts
from moeshard.engine.parallel import ProcessGroups, init_world
from moeshard.engine.reload import PlacementMoveAborted, layer_transfers
from moeshard.engine.step_plan import NewSequence, SampledToken, ScheduledChunk, StepPlan
from moeshard.core.layout import fewest_redundant_slots, slots_per_gpu
from moeshard.core.plan_file import PlanFile
from moeshard.core.placement import (
    Placement, PlacementError, PlacementShape, check_fits, initial_placement, parse_placement,
)

log = logging.getLogger("moeshard.engine.runtime")


def default_slots_per_gpu(num_experts: int, world_size: int) -> int:
    """Slots per rank of a group without a plan: every expert once, the fewest extra slots as replicas."""
    return slots_per_gpu(num_experts, fewest_redundant_slots(num_experts, world_size), world_size)


def check_placement(placement: Placement, cfg: ModelConfig, world_size: int) -> None:
    """Raise PlacementError unless the placement fits this model and group (any slots per rank)."""
    check_fits(placement, PlacementShape(num_gpus=world_size, slots_per_gpu=placement.slots_per_gpu,
                                         num_experts=cfg.num_experts, num_layers=cfg.num_moe_layers))


def load_initial_placement(path: str | Path | None, cfg: ModelConfig, world_size: int,
                           plan_slots_per_gpu: int | None = None) -> Placement:
    """The placement file when it exists and fits the model, else the version-0 layout.

    ``plan_slots_per_gpu`` comes from plan.json when the operator wrote one; without a plan, every expert once
    plus the fewest extra slots (default_slots_per_gpu).
    """
    if path is not None and Path(path).is_file():
        try:
            placement = parse_placement(Path(path).read_text())
            check_placement(placement, cfg, world_size)
            return placement
        except PlacementError as exc:
            log.warning("placement file %s refused (%s); using the initial placement", path, exc)
    return initial_placement(cfg.num_moe_layers, cfg.num_experts, world_size,
                             plan_slots_per_gpu or default_slots_per_gpu(cfg.num_experts, world_size))


def load_tokenizer(model_dir: str | Path):
    """A transformers tokenizer when the checkpoint folder has one, else None."""
    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a broken tokenizer must not stop token-id serving
        log.warning("tokenizer in %s could not be loaded: %s", folder, exc)
        return None


DEFAULT_MOVE_TIMEOUT_S = 120.0  # one stage of a placement move; past it the move is aborted


def _layer_span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0]) if layers else "(none)"


class EngineRuntime:
    """One rank: its share of the model, its process groups and its counters."""

    def __init__(self, *, model_dir: str | Path, parallel: ParallelConfig, placement: Placement,
                 dtype: torch.dtype | None = None, comm_mode: str = "auto") -> None:
        self.parallel = parallel
        self.rank, self.world_size = parallel.rank, parallel.world_size
        self.config = ModelConfig.from_pretrained(model_dir)
        check_placement(placement, self.config, self.world_size)
        if parallel.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.groups = ProcessGroups.build(parallel)
        self.comm = make_all_to_all(parallel, placement.slots_per_gpu, comm_mode)
        self.reader = CheckpointReader(model_dir, self.device)
        self.model: MoEModel = build_model(self.reader, self.config, parallel, self.groups, placement, self.comm,
                                           dtype=dtype)
        self.placement = placement
        self.placement_version = placement.version
        # Tokens the group has stepped through so far; every rank runs the same steps,
        # so all agree on it. It offsets the token keys that pick an expert's replica:
        # a key that restarted at 0 every step would send every single-token decode
        # step of an expert to the same replica and ignore the shares.
        self._keys = TokenKeys()  # token-key offset shared by every executor of this runtime
        self.executor: StepExecutor | None = None  # the serving pool's, after init_kv_pool
        # Test hook: called with the layers of a move after staging, before any transfer; raising aborts the move.
        self.transfer_fault = None
        self.tokenizer_or_none = load_tokenizer(model_dir)

    # -- construction ---------------------------------------------------------
    @classmethod
    def create(cls, env, local_rank: int = 0, *, init_process_group: bool = True, dtype: torch.dtype | None = None,
               comm_mode: str = "auto") -> "EngineRuntime":
        """From a moeshard.core.engine_env.EngineEnvironment: join the group, read this rank's share."""
        parallel = ParallelConfig.from_env(env, local_rank)
        cfg = ModelConfig.from_pretrained(env.model_path)
        plan = PlanFile.read(env.plan_file)  # the operator's layout; absent for a local group
        if plan is not None:
            plan.check_environment(env)  # before joining the group: a bad pod fails alone, at once
        if parallel.device == "cuda":
            torch.cuda.set_device(local_rank)
        if init_process_group:
            init_world(parallel, env.rendezvous)
        placement = load_initial_placement(env.placement_file, cfg, parallel.world_size,
                                           plan.slots_per_gpu if plan is not None else None)
        return cls(model_dir=env.model_path, parallel=parallel, placement=placement, dtype=dtype, comm_mode=comm_mode)

    # -- stepping ---------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """KV bytes one cached token takes on this rank (moeshard.core.kv_sizing)."""
        cfg = self.config
        return kv_bytes_per_token_per_rank(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                           head_dim=cfg.head_dim, tp=self.parallel.tp_size,
                                           dtype_bytes=self.model.dtype.itemsize)

    def kv_blocks_fitting(self, memory_fraction: float, block_size: int) -> int:
        """Blocks that fit in ``memory_fraction`` of this GPU's free memory (CUDA only)."""
        if self.device.type != "cuda":
            raise ValueError("a KV memory fraction needs a CUDA device; give the block count on CPU")
        free, _total = torch.cuda.mem_get_info(self.device)
        return kv_blocks_for_bytes(int(free * memory_fraction), bytes_per_token=self.kv_bytes_per_token(),
                                   block_size=block_size)

    def init_kv_pool(self, num_blocks: int, block_size: int) -> StepExecutor:
        """Allocate this rank's paged KV pool once; the executor that serves steps on it."""
        self.executor = self._executor(num_blocks, block_size)
        return self.executor

    def _executor(self, num_blocks: int, block_size: int) -> StepExecutor:
        return StepExecutor(self.model, self.model.new_cache(num_blocks, block_size), dp_rank=self.parallel.dp_rank,
                            tp_rank=self.parallel.tp_rank, device=self.device, keys=self._keys)

    def execute(self, plan: StepPlan) -> list[SampledToken]:
        """COLLECTIVE. One engine step over ``plan`` on the serving pool (see moeshard.engine.executor)."""
        if self.executor is None:
            raise RuntimeError("init_kv_pool must be called before execute")
        return self.executor.execute(plan)

    def _whole_batch_plan(self, prompts: list[list[int]], block_size: int, room: list[int] | None = None) -> StepPlan:
        """Prompts as one chunk each (sequence i in DP group i % dp), blocks for ``room[i]`` more tokens.

        Blocks are laid out one sequence after another in each DP group's pool;
        a prompt with no room (0) is left out.
        """
        dp = self.parallel.dp_size
        room = room if room is not None else [1] * len(prompts)
        new, chunks, next_block = [], [], [0] * dp
        for i, p in enumerate(prompts):
            if room[i] <= 0:
                continue
            blocks = blocks_for_tokens(len(p) + room[i], block_size)
            group = i % dp
            new.append(NewSequence(i, group, tuple(int(t) for t in p)))
            chunks.append(ScheduledChunk(i, 0, len(p), tuple(range(next_block[group], next_block[group] + blocks)),
                                         sample=True))
            next_block[group] += blocks
        return StepPlan("step", tuple(new), tuple(chunks))

    @staticmethod
    def _check_prompts(prompts: list[list[int]], vocab: int) -> None:
        if not prompts:
            raise ValueError("prompts: at least one prompt is needed")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt")
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"prompts[{i}]: token id {bad[0]} outside 0..{vocab - 1}")

    @torch.inference_mode()
    def forward_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """COLLECTIVE. Logits of every prompt position: [B, S_max, V] float32 (padded positions are 0)."""
        self._check_prompts(prompts, self.config.vocab_size)
        size = 16
        blocks = sum(blocks_for_tokens(len(p) + 1, size) for p in prompts)
        executor = self._executor(max(blocks, 1), size)
        plan = self._whole_batch_plan(prompts, size)
        hidden, batch, mine = executor.forward(plan)
        s_max = max(len(p) for p in prompts)
        out = torch.zeros((len(prompts), s_max, self.config.vocab_size), dtype=torch.float32, device=self.device)
        if self.parallel.tp_rank == 0 and mine:
            logits = self.model.logits(hidden).float()
            for j, i in enumerate(mine):
                start, stop = batch.attn.query_starts[j], batch.attn.query_starts[j + 1]
                out[i, : stop - start] = logits[start:stop]
        dist.all_reduce(out)  # one contributor per sequence: a sum is a gather
        return out.cpu()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 eos_token_id: int | None = None,
                 stop_token_ids: list[set[int]] | None = None) -> list[list[int]]:
        """COLLECTIVE. Greedy decoding of a whole batch (request-level); the new tokens of each prompt.

        Sequence i finishes after ``max_new_tokens[i]`` tokens or at the first
        token in its stop set (``stop_token_ids[i]`` plus ``eos_token_id``),
        which is included. All prompts prefill in one step, then every step
        decodes one token of each unfinished sequence, on a pool sized for
        this batch. Every rank must pass the same arguments.
        """
        self._check_prompts(prompts, self.config.vocab_size)
        b = len(prompts)
        limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != b or any(n < 0 for n in limits):
            raise ValueError("max_new_tokens: one non-negative count per prompt (or a single int) is needed")
        if stop_token_ids is not None and len(stop_token_ids) != b:
            raise ValueError(f"stop_token_ids: one set per prompt is needed ({b} prompts, {len(stop_token_ids)} sets)")
        eos = set() if eos_token_id is None else {int(eos_token_id)}
        stops = [eos | {int(t) for t in (stop_token_ids[i] if stop_token_ids else ())} for i in range(b)]
        size = 16
        blocks = sum(blocks_for_tokens(len(p) + n, size) for p, n in zip(prompts, limits))
        executor = self._executor(max(blocks, 1), size)
        plan = self._whole_batch_plan(prompts, size, limits)
        outputs: list[list[int]] = [[] for _ in range(b)]
        while plan.chunks:
            still = []
            for token, chunk in zip(executor.execute(plan), plan.chunks):
                i = chunk.seq_id
                outputs[i].append(token.token)
                if len(outputs[i]) < limits[i] and token.token not in stops[i]:
                    still.append(ScheduledChunk(i, len(prompts[i]) + len(outputs[i]) - 1, 1, chunk.block_table, True))
            plan = StepPlan("step", (), tuple(still))
        return outputs

    # -- counters ---------------------------------------------------------------
    def expert_token_counts(self) -> np.ndarray:
        """[L_moe, E] int64: (token, k) pairs this rank routed to each logical expert since start."""
        return torch.stack([m.counts for m in self.model.moe_layers]).cpu().numpy().astype(np.int64)

    def rank_token_counts(self) -> np.ndarray:
        """[W] int64: token rows this rank dispatched to each rank (deduplicated) since start."""
        return np.asarray(self.comm.stats.rank_tokens, dtype=np.int64)

    def rank_pair_counts(self) -> np.ndarray:
        """[world] (token, expert) pairs of this rank's tokens computed by each rank since start."""
        return np.asarray(self.comm.stats.rank_pairs, dtype=np.int64)

    def link_bytes(self) -> dict[str, int]:
        """Cumulative dispatch + combine activation bytes this rank sent, by link class."""
        return {c: int(self.comm.stats.link_bytes[c]) for c in LINK_CLASSES}

    def loaded_bytes(self) -> dict[str, int]:
        """Checkpoint bytes this rank read, by category (``experts``, ``dense``)."""
        return dict(self.reader.bytes_loaded)

    # -- placement ----------------------------------------------------------------
    @torch.inference_mode()
    def apply_placement(self, placement: Placement, *, old_rows: np.ndarray | None = None,
                        timeout_s: float = DEFAULT_MOVE_TIMEOUT_S) -> None:
        """COLLECTIVE. Adopt ``placement`` in every layer at once (one stage); PlacementMoveAborted on failure.

        ``old_rows`` [L, G*S_old]: what each rank's slots hold when ranks do not
        share one placement (start-up convergence); -1 marks slots whose
        weights are unknown (read from the checkpoint). See ``move_layers``.
        """
        if not self.move_layers(placement, range(placement.num_layers), old_rows=old_rows, timeout_s=timeout_s):
            raise PlacementMoveAborted(f"placement version {placement.version}: the weight transfer was aborted; "
                                       f"the old slots stay in use")

    @torch.inference_mode()
    def move_layers(self, target: Placement, layers, *, old_rows: np.ndarray | None = None,
                    timeout_s: float = DEFAULT_MOVE_TIMEOUT_S) -> bool:
        """COLLECTIVE. Switch ``layers`` to ``target``'s rows: stage, agree, commit. False: aborted, nothing changed.

        1. Stage: every rank computes the same transfer list per layer
           (reload.layer_transfers: unchanged slots keep their weights, a local
           copy when this rank holds the expert, else a point-to-point copy
           from the lowest old slot, else a checkpoint read). New weights go
           into SPARE buffers, one per slot this rank receives; live slots
           are only read. Memory bound: (slots this rank receives in
           ``layers``) x one expert's gate_up + down, on top of the model.
        2. Agree: all ranks all-reduce MIN an ok flag (a failed stage or the
           ``transfer_fault`` test hook on any rank aborts everyone before
           anything is sent), then post all sends/receives of the stage as
           one ``batch_isend_irecv`` and wait at most ``timeout_s``; a second
           ok flag aborts everyone when a transfer failed or timed out.
        3. Commit (only when every rank is ok): the staged slots are copied
           into the live tensors and the layers take ``target``'s tables.

        On abort the live slots of ``layers`` are untouched. Layers not in
        ``layers`` keep their rows: ``self.placement`` is then a mix (the old
        version number, the target's rows in the moved layers) until every
        layer holds the target, when it becomes ``target`` itself. A change
        of slot count must move all layers in one call.
        """
        check_placement(target, self.config, self.world_size)
        layers = [int(li) for li in layers]
        old, me = self.placement, self.rank
        so, sn = old.slots_per_gpu, target.slots_per_gpu
        if old_rows is not None:
            so = old_rows.shape[1] // self.world_size
        rows = old.phy2log if old_rows is None else old_rows
        if sn != old.slots_per_gpu and sorted(layers) != list(range(target.num_layers)):
            raise ValueError(f"layers: a slot count change ({old.slots_per_gpu} -> {sn}) must move every layer at once")
        fault: BaseException | None = None
        staged: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        ops: list = []
        received = 0
        try:
            tag = 0
            for li in layers:
                moe = self.model.moe_layers[li]
                moves = layer_transfers(rows[li], target.phy2log[li], so, sn, self.world_size)
                staged[li], layer_ops = self._stage_layer(li, moe, target, moves, tag)
                ops += layer_ops
                received += sum(1 for src, _, dst, _ in moves if dst == me and src not in (me, -1))
                tag += len(moves)
            if self.transfer_fault is not None:
                self.transfer_fault(layers)
        except Exception as exc:  # noqa: BLE001 - any staging failure aborts the whole group's move
            fault = exc
        if not self._all_ok(fault is None):
            log.error("rank %d: placement version %d move of layers %s aborted before any transfer%s; old slots kept",
                      me, target.version, _layer_span(layers), f" ({fault})" if fault else " (another rank failed)")
            return False
        try:
            for work in dist.batch_isend_irecv(ops) if ops else []:
                if work.wait(timeout=timedelta(seconds=timeout_s)) is False:
                    raise TimeoutError(f"a weight transfer took longer than {timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - a failed or timed-out transfer aborts the move
            fault = exc
        if not self._all_ok(fault is None):
            log.error("rank %d: placement version %d move of layers %s aborted during the transfer%s; old slots kept",
                      me, target.version, _layer_span(layers), f" ({fault})" if fault else " (another rank failed)")
            return False
        self._commit(target, layers, staged)
        if self.placement is target:
            # The serving layer's tests read this line: keep its wording.
            log.info("rank %d adopted placement version %d (%d weight transfers received)", me, target.version, received)
        return True

    def _stage_layer(self, li: int, moe, target: Placement, moves, tag: int):
        """Spare buffers for the slots this rank receives in layer ``li``, and the P2P ops of its transfers."""
        me = self.rank
        buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        ops = []
        from_checkpoint = None
        for n, (src_rank, src_slot, dst_rank, dst_slot) in enumerate(moves):
            t = 2 * (tag + n)
            if dst_rank == me and src_rank == me:
                buffers[dst_slot] = (moe.w_gate_up[src_slot].clone(), moe.w_down[src_slot].clone())
            elif dst_rank == me and src_rank < 0:
                if from_checkpoint is None:
                    from_checkpoint = load_local_experts(self.reader, self.config, target, li, me,
                                                         moe.w_gate_up.device, moe.w_gate_up.dtype)
                buffers[dst_slot] = (from_checkpoint[0][dst_slot], from_checkpoint[1][dst_slot])
            elif dst_rank == me:
                gu, dn = torch.empty_like(moe.w_gate_up[0]), torch.empty_like(moe.w_down[0])
                buffers[dst_slot] = (gu, dn)
                ops.append(dist.P2POp(dist.irecv, gu, src_rank, tag=t))
                ops.append(dist.P2POp(dist.irecv, dn, src_rank, tag=t + 1))
            elif src_rank == me:
                ops.append(dist.P2POp(dist.isend, moe.w_gate_up[src_slot], dst_rank, tag=t))
                ops.append(dist.P2POp(dist.isend, moe.w_down[src_slot], dst_rank, tag=t + 1))
        return buffers, ops

    def _all_ok(self, ok: bool) -> bool:
        """MIN all-reduce of this rank's ok flag over the group: True only when every rank is ok."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64,
                            device=self.device if self.parallel.device == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _commit(self, target: Placement, layers: list[int], staged) -> None:
        """Write the staged slots into the live tensors and switch the layers' tables (no communication)."""
        sn = target.slots_per_gpu
        for li in layers:
            moe, buffers = self.model.moe_layers[li], staged[li]
            gu, dn = moe.w_gate_up, moe.w_down
            if sn != gu.shape[0]:
                gu, dn = gu.new_empty((sn, *gu.shape[1:])), dn.new_empty((sn, *dn.shape[1:]))
                for s in range(min(sn, moe.w_gate_up.shape[0])):
                    if s not in buffers:  # unchanged slot (same index, same expert)
                        gu[s], dn[s] = moe.w_gate_up[s], moe.w_down[s]
            for s, (g, d) in buffers.items():
                gu[s].copy_(g)
                dn[s].copy_(d)
            moe.set_placement(target, gu, dn)
        old = self.placement
        rows, shares = old.phy2log.copy(), old.weights.copy()
        if rows.shape != target.phy2log.shape:
            rows, shares = target.phy2log.copy(), target.weights.copy()
        rows[layers], shares[layers] = target.phy2log[layers], target.weights[layers]
        if np.array_equal(rows, target.phy2log) and np.array_equal(shares, target.weights):
            self.placement, self.placement_version = target, target.version
        else:
            self.placement = Placement(old.version, target.num_gpus, sn, target.num_experts, rows, shares)

    def close(self) -> None:
        """Destroy this rank's process groups (the default one too)."""
        self.groups.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
