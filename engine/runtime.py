"""EngineRuntime: one rank of an EP group, from the environment contract to greedy generation.

Every public method marked COLLECTIVE must be called by all ranks of the
group with the same arguments, in the same order (the serving layer
broadcasts requests from rank 0 before calling them).

A step (prefill or one decode token) runs like this on every rank:

1. All ranks know every sequence's state (prompt, tokens so far, finished).
   Attention-DP group d takes the active sequences with ``i % dp == d``.
2. Each token gets a key = its index in the whole group's step batch (sequence
   order, then position), so replica choice is the same for any EP/TP layout.
3. The model runs: attention on the DP group's sequences (TP inside), MoE over
   the whole EP group (every rank takes part, possibly with zero tokens).
4. The next token of each sequence (greedy argmax) is shared with every rank
   by an all-reduce(MAX) over the world, so all ranks keep the same state.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moeshard.engine.comm import LINK_CLASSES, make_all_to_all
from moeshard.engine.config import ModelConfig, ParallelConfig
from moeshard.engine.loading import CheckpointReader
from moeshard.engine.model import MoEModel, StepBatch, build_model
from moeshard.engine.moe import expert_transfers
from moeshard.engine.parallel import ProcessGroups, init_world
from moeshard.core.placement import Placement, PlacementError, initial_placement, parse_placement

log = logging.getLogger("moeshard.engine.runtime")


def default_slots_per_gpu(num_experts: int, world_size: int) -> int:
    return math.ceil(num_experts / world_size)


def check_placement(placement: Placement, cfg: ModelConfig, world_size: int) -> None:
    """Raise PlacementError unless the placement fits this model and group."""
    if placement.num_gpus != world_size:
        raise PlacementError(f"numGpus: placement has {placement.num_gpus}, the EP group has {world_size} ranks")
    if placement.num_experts != cfg.num_experts:
        raise PlacementError(f"numExperts: placement has {placement.num_experts}, the model has {cfg.num_experts}")
    if placement.num_layers != cfg.num_moe_layers:
        raise PlacementError(f"layers: placement has {placement.num_layers}, the model has {cfg.num_moe_layers} MoE layers")


def load_initial_placement(path: str | Path | None, cfg: ModelConfig, world_size: int) -> Placement:
    """The placement file when it exists and fits the model, else the version-0 layout (E/EP slots per rank)."""
    if path is not None and Path(path).is_file():
        try:
            placement = parse_placement(Path(path).read_text())
            check_placement(placement, cfg, world_size)
            return placement
        except PlacementError as exc:
            log.warning("placement file %s refused (%s); using the initial placement", path, exc)
    return initial_placement(cfg.num_moe_layers, cfg.num_experts, world_size,
                             default_slots_per_gpu(cfg.num_experts, world_size))


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


def stop_sets(batch: int, eos_token_id: int | None, stop_token_ids: list[set[int]] | None) -> list[frozenset[int]]:
    """One stop set per prompt: ``stop_token_ids[i]`` plus ``eos_token_id`` when given."""
    if stop_token_ids is None:
        stop_token_ids = [set() for _ in range(batch)]
    if len(stop_token_ids) != batch:
        raise ValueError(f"stop_token_ids: one set per prompt is needed ({batch} prompts, {len(stop_token_ids)} sets)")
    eos = frozenset() if eos_token_id is None else frozenset([int(eos_token_id)])
    return [frozenset(int(t) for t in s) | eos for s in stop_token_ids]


KEY_MODULUS = 2**31  # token keys stay below 2^31 so the 32-bit replica hash never sees an overflowing product


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
        self._tokens_seen = 0
        self.tokenizer_or_none = load_tokenizer(model_dir)

    # -- construction ---------------------------------------------------------
    @classmethod
    def create(cls, env, local_rank: int = 0, *, init_process_group: bool = True, dtype: torch.dtype | None = None,
               comm_mode: str = "auto") -> "EngineRuntime":
        """From a moeshard.core.engine_env.EngineEnvironment: join the group, read this rank's share."""
        parallel = ParallelConfig.from_env(env, local_rank)
        if parallel.device == "cuda":
            torch.cuda.set_device(local_rank)
        if init_process_group:
            init_world(parallel, env.rendezvous)
        cfg = ModelConfig.from_pretrained(env.model_path)
        placement = load_initial_placement(env.placement_file, cfg, parallel.world_size)
        return cls(model_dir=env.model_path, parallel=parallel, placement=placement, dtype=dtype, comm_mode=comm_mode)

    # -- stepping ---------------------------------------------------------------
    def _local(self, active: list[int]) -> list[int]:
        """Indices (into ``active``) of the sequences this rank's attention-DP group runs.

        Sequence i always belongs to DP group ``i % dp`` (its KV cache lives there).
        """
        dp, d = self.parallel.dp_size, self.parallel.dp_rank
        return [j for j, i in enumerate(active) if i % dp == d]

    def _step(self, active: list[int], past: list[int], new_tokens: list[list[int]],
              cache, cache_row: dict[int, int]) -> tuple[list[int], torch.Tensor]:
        """Run one step for sequences ``active`` (global ids); returns (local positions, hidden [T_local, H])."""
        mine = self._local(active)
        offsets = np.concatenate([[0], np.cumsum([len(new_tokens[j]) for j in range(len(active))])])
        dev = self.device
        tokens = [tok for j in mine for tok in new_tokens[j]]
        base = self._tokens_seen
        keys = [base + k for j in mine for k in range(int(offsets[j]), int(offsets[j + 1]))]
        self._tokens_seen = (base + int(offsets[-1])) % KEY_MODULUS
        step = StepBatch(
            cache_rows=torch.tensor([cache_row[active[j]] for j in mine], dtype=torch.int64, device=dev),
            past_lens=torch.tensor([past[j] for j in mine], dtype=torch.int64, device=dev),
            new_lens=torch.tensor([len(new_tokens[j]) for j in mine], dtype=torch.int64, device=dev),
            tokens=torch.tensor(tokens, dtype=torch.int64, device=dev),
            token_keys=torch.tensor(keys, dtype=torch.int64, device=dev),
            max_new=max((len(new_tokens[j]) for j in mine), default=0),
            max_kv=max((past[j] + len(new_tokens[j]) for j in mine), default=0),
        )
        return mine, self.model.forward(step, cache)

    def _new_cache(self, prompts: list[list[int]], extra: int):
        mine = self._local(list(range(len(prompts))))
        cache_row = {i: row for row, i in enumerate(mine)}
        capacity = max([len(prompts[i]) + extra for i in mine], default=1)
        return self.model.new_cache(max(len(mine), 1), capacity), cache_row

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
        cache, cache_row = self._new_cache(prompts, 0)
        active = list(range(len(prompts)))
        mine, hidden = self._step(active, [0] * len(prompts), prompts, cache, cache_row)
        s_max = max(len(p) for p in prompts)
        out = torch.zeros((len(prompts), s_max, self.config.vocab_size), dtype=torch.float32, device=self.device)
        if self.parallel.tp_rank == 0 and mine:
            logits = self.model.logits(hidden).float()
            start = 0
            for j in mine:
                n = len(prompts[j])
                out[j, :n] = logits[start:start + n]
                start += n
        dist.all_reduce(out)  # one contributor per sequence: a sum is a gather
        return out.cpu()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 eos_token_id: int | None = None,
                 stop_token_ids: list[set[int]] | None = None) -> list[list[int]]:
        """COLLECTIVE. Greedy decoding; returns the new tokens of each prompt (its stop token included when produced).

        Sequence i finishes after ``max_new_tokens[i]`` tokens or at the first
        token in its stop set: ``stop_token_ids[i]`` (one set per prompt)
        plus ``eos_token_id`` when given. A finished sequence leaves the step
        batch at once; the others go on. Every rank must pass the same
        arguments (the set of active sequences is replicated state).
        """
        self._check_prompts(prompts, self.config.vocab_size)
        b = len(prompts)
        limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != b or any(n < 0 for n in limits):
            raise ValueError("max_new_tokens: one non-negative count per prompt (or a single int) is needed")
        stops = stop_sets(b, eos_token_id, stop_token_ids)
        outputs: list[list[int]] = [[] for _ in range(b)]
        if max(limits) == 0:
            return outputs
        cache, cache_row = self._new_cache(prompts, max(limits))
        active = [i for i in range(b) if limits[i] > 0]
        past = {i: 0 for i in range(b)}
        new_tokens = {i: list(prompts[i]) for i in range(b)}
        while active:
            # Every rank keeps the same `active` list, so all take the same number of steps.
            mine, hidden = self._step(active, [past[i] for i in active], [new_tokens[i] for i in active],
                                      cache, cache_row)
            picked = torch.full((len(active),), -1, dtype=torch.int64, device=self.device)
            if self.parallel.tp_rank == 0 and mine:
                last = torch.cumsum(torch.tensor([len(new_tokens[active[j]]) for j in mine], device=self.device), 0) - 1
                picked[torch.tensor(mine, device=self.device)] = self.model.logits(hidden[last]).argmax(dim=-1)
            dist.all_reduce(picked, op=dist.ReduceOp.MAX)
            still = []
            for i, tok in zip(active, picked.tolist()):  # one device-to-host copy per step
                outputs[i].append(tok)
                past[i] += len(new_tokens[i])
                new_tokens[i] = [tok]
                if len(outputs[i]) < limits[i] and tok not in stops[i]:
                    still.append(i)
            active = still
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
    def apply_placement(self, placement: Placement) -> None:
        """COLLECTIVE. Adopt a new placement; expert weights move by point-to-point transfers.

        Every rank computes the same transfer list (moe.expert_transfers): a
        slot whose logical expert is unchanged keeps its weights, a local copy
        is used when this rank already holds the expert, else the weights come
        from the holder with the lowest old slot. All sends and receives of all
        layers go out as one ``batch_isend_irecv``.

        Memory: with an unchanged slot count, slots are updated in place and
        only slots that are both read (sent or copied) and overwritten on this
        rank are first cloned; when the slot count changes, new slot tensors
        are built beside the old ones (expert memory peaks at old + new).
        """
        check_placement(placement, self.config, self.world_size)
        old, me = self.placement, self.rank
        ops, finish = [], []
        tag = 0
        for li, moe in enumerate(self.model.moe_layers):
            moves = expert_transfers(old, placement, li)
            tag_base, tag = tag, tag + len(moves)
            gu, dn, sources = self._placement_targets(moe, placement.slots_per_gpu, moves)
            for n, (src_rank, src_slot, dst_rank, dst_slot) in enumerate(moves):
                if dst_rank == me and src_rank == me:
                    gu[dst_slot], dn[dst_slot] = sources(src_slot)
                elif dst_rank == me:
                    ops.append(dist.P2POp(dist.irecv, gu[dst_slot], src_rank, tag=2 * (tag_base + n)))
                    ops.append(dist.P2POp(dist.irecv, dn[dst_slot], src_rank, tag=2 * (tag_base + n) + 1))
                elif src_rank == me:
                    send_gu, send_dn = sources(src_slot)
                    ops.append(dist.P2POp(dist.isend, send_gu, dst_rank, tag=2 * (tag_base + n)))
                    ops.append(dist.P2POp(dist.isend, send_dn, dst_rank, tag=2 * (tag_base + n) + 1))
            finish.append((moe, gu, dn))
        # One batch: NCCL groups the sends/receives (no ordering deadlock between pairs); gloo posts them all.
        # The barrier first: NCCL needs its communicator up before a batch some ranks may not join.
        dist.barrier()
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        for moe, gu, dn in finish:
            moe.set_placement(placement, gu, dn)
        dist.barrier()
        self.placement = placement
        self.placement_version = placement.version
        received = sum(1 for op in ops if op.op is dist.irecv) // 2  # experts (gate_up + down each)
        # The serving layer's tests read this line: keep its wording.
        log.info("rank %d adopted placement version %d (%d weight transfers received)", me, placement.version, received)

    def _placement_targets(self, moe, slots: int, moves: list[tuple[int, int, int, int]]):
        """Slot tensors to write the new layout into, and a reader of the OLD weights of a local slot.

        Same slot count: write in place; a slot that is read (source of a send or
        local copy) and also overwritten here is cloned first. New slot count:
        fresh tensors, unchanged slots copied over, old tensors read directly.
        """
        me = self.rank
        old_gu, old_dn = moe.w_gate_up, moe.w_down
        read = {src_slot for src_rank, src_slot, _, _ in moves if src_rank == me}
        written = {dst_slot for _, _, dst_rank, dst_slot in moves if dst_rank == me}
        if slots == old_gu.shape[0]:
            stash = {s: (old_gu[s].clone(), old_dn[s].clone()) for s in read & written}
            return old_gu, old_dn, lambda s: stash.get(s, (old_gu[s], old_dn[s]))
        gu = old_gu.new_empty((slots, *old_gu.shape[1:]))
        dn = old_dn.new_empty((slots, *old_dn.shape[1:]))
        for s in range(min(slots, old_gu.shape[0])):
            if s not in written:  # unchanged slot (same index, same expert)
                gu[s], dn[s] = old_gu[s], old_dn[s]
        return gu, dn, lambda s: (old_gu[s], old_dn[s])

    def close(self) -> None:
        """Destroy this rank's process groups (the default one too)."""
        self.groups.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
