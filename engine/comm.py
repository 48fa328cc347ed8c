"""Dispatch and combine: moving token rows to the ranks that hold their experts, and back.

    Router -> [ Dispatch ] -> Experts -> [ Combine ]

Communication sits behind one interface, :class:`AllToAll`, apart from expert
compute (moeshard.engine.moe). Two implementations:

* :class:`FlatAllToAll`: one ``all_to_all_single`` with uneven splits over the
  EP group. A token is sent at most once per destination rank, with the list
  of its (local slot, weight) pairs that live there; the destination returns
  one row per token (its experts' weighted sum), so combine moves as many rows
  as dispatch.
* :class:`HierarchicalAllToAll`: when the group spans several NVLink domains
  (consecutive blocks of M ranks). A token crosses the fabric once per remote
  domain it needs, to the peer rank with the same local index there (an
  all-to-all over the *rail* group of those peers), which fans it out over
  NVLink to the ranks of its domain (an all-to-all over the *domain* group,
  again deduplicated). Combine runs the two stages backwards and the
  forwarding rank sums its domain's partial results before sending one row
  back across the fabric.

Byte accounting: every row of activations that leaves a rank is counted, by
link class (``intra_domain`` when source and destination share an NVLink
domain, ``inter_domain`` otherwise), for dispatch and combine. A rank's rows
to itself use no link and are not counted. Only activation rows are counted:
the routing metadata travels beside them in one float32 tensor per exchange
(K slot ids and K weights per row, plus K destination indices in the first
hierarchical stage: 8K or 12K bytes per row; ids are exact in float32 below
2^24).

Shape legend: T tokens on this rank, K top-K, H hidden, R rows received,
W world (EP) size, M ranks per domain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeshard.engine.config import ParallelConfig

LINK_CLASSES = ("intra_domain", "inter_domain")


@dataclass
class CommStats:
    """Cumulative traffic of one rank (all MoE layers, dispatch + combine)."""

    world_size: int
    link_bytes: dict[str, int] = field(default_factory=lambda: {c: 0 for c in LINK_CLASSES})
    rank_tokens: list[int] = field(default_factory=list)  # [W] token rows dispatched to each final rank
    # [W + 1] (token, expert) pairs computed by each rank (slot 0: pairs with no rank), kept on the
    # device so counting them costs no host sync per layer; read by rank_pair_counts().
    pair_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.rank_tokens:
            self.rank_tokens = [0] * self.world_size

    def add_pairs(self, dest_rank: torch.Tensor) -> None:
        """Count this rank's (token, expert) pairs by the rank that computes them (the GEMM load)."""
        if self.pair_counts is None:
            self.pair_counts = torch.zeros(self.world_size + 1, dtype=torch.int64, device=dest_rank.device)
        index = (dest_rank.reshape(-1) + 1).clamp(min=0)
        self.pair_counts.scatter_add_(0, index, torch.ones_like(index))

    @property
    def rank_pairs(self) -> list[int]:
        if self.pair_counts is None:
            return [0] * self.world_size
        return self.pair_counts[1:].tolist()


@dataclass
class _Exchange:
    """One uneven all-to-all of rows over a group: what the reverse direction needs."""

    send_counts: list[int]  # [G] rows sent to each group member
    recv_counts: list[int]  # [G] rows received from each group member
    group: object = None  # None = the whole EP group

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return _all_to_all_rows(t, self.send_counts, self.recv_counts, self.group)

    def backward(self, t: torch.Tensor) -> torch.Tensor:
        return _all_to_all_rows(t, self.recv_counts, self.send_counts, self.group)


def _exchange_counts(send_counts: torch.Tensor, group=None) -> list[int]:
    """All-to-all of per-destination row counts [G] -> per-source counts [G] (G = group size)."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv.tolist()


def _all_to_all_rows(t: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """Rows of ``t`` [sum(send_counts), ...] grouped by destination -> received rows grouped by source."""
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


def dedup_rows(dest_rank: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per distinct (token, destination rank) pair, grouped by destination.

    dest_rank: [T, K] int64 destination of each (token, k) pair, -1 = no pair.
    Returns (row_token [N] token index of each row, row_rank [N] its destination,
    counts [W] rows per destination); rows are sorted by destination, then token.
    """
    t = dest_rank.shape[0]
    hit = torch.zeros((t, world_size + 1), dtype=torch.bool, device=dest_rank.device)
    hit.scatter_(1, torch.where(dest_rank < 0, world_size, dest_rank), True)
    hit = hit[:, :world_size]
    row_rank, row_token = hit.t().nonzero(as_tuple=True)  # row-major over [W, T]: by rank, then token
    counts = hit.sum(dim=0)
    return row_token, row_rank, counts


def _pack(*columns: torch.Tensor) -> torch.Tensor:
    """[N, K] tensors (ids, weights) -> one float32 [N, len * K] metadata tensor (one all-to-all instead of several)."""
    return torch.cat([c.to(torch.float32) for c in columns], dim=1)


def _unpack(meta: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Inverse of ``_pack``: ``parts`` float32 [N, K] columns blocks."""
    return list(meta.chunk(parts, dim=1))


def _row_pairs(values: torch.Tensor, dest_rank: torch.Tensor, row_token: torch.Tensor, row_rank: torch.Tensor,
               fill: float | int) -> torch.Tensor:
    """[N, K]: values of a row's token, kept where its pair goes to the row's rank, ``fill`` elsewhere."""
    keep = dest_rank[row_token] == row_rank[:, None]
    return torch.where(keep, values[row_token], torch.full_like(values[row_token], fill))


class AllToAll(ABC):
    """Dispatch token rows to expert ranks and combine the results back.

    ``dispatch(x, dest_rank, local_slot, weights)`` returns what this rank must
    compute: rows [R, H], their local slot ids [R, K] (-1 where the pair is
    computed elsewhere) and weights [R, K], plus a handle; ``combine(y, handle)``
    takes this rank's per-row results [R, H] (weighted sums over its slots) and
    returns each original token's sum over all its pairs [T, H].
    """

    def __init__(self, parallel: ParallelConfig, slots_per_rank: int) -> None:
        self.parallel = parallel
        self.slots_per_rank = slots_per_rank
        self.stats = CommStats(parallel.world_size)

    def link_class(self, src: int, dst: int) -> str:
        return "intra_domain" if self.parallel.domain_of(src) == self.parallel.domain_of(dst) else "inter_domain"

    def _count(self, counts: list[int], row_bytes: int, ranks: list[int] | None = None) -> None:
        """Count ``counts[j]`` rows of ``row_bytes`` sent from this rank to rank ``ranks[j]`` (default j), by link."""
        me = self.parallel.rank
        for j, n in enumerate(counts):
            r = j if ranks is None else ranks[j]
            if n and r != me:
                self.stats.link_bytes[self.link_class(me, r)] += n * row_bytes

    @abstractmethod
    def dispatch(self, x: torch.Tensor, dest_rank: torch.Tensor, local_slot: torch.Tensor, weights: torch.Tensor):
        ...

    @abstractmethod
    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        ...


@dataclass
class _FlatHandle:
    exchange: _Exchange
    row_token: torch.Tensor  # [N] token of each sent row
    num_tokens: int


class FlatAllToAll(AllToAll):
    """One deduplicated all-to-all over the whole EP group."""

    def dispatch(self, x, dest_rank, local_slot, weights):
        w = self.parallel.world_size
        row_token, row_rank, counts = dedup_rows(dest_rank, w)
        send_counts = counts.tolist()
        recv_counts = _exchange_counts(counts)
        ex = _Exchange(send_counts, recv_counts)
        recv_x = ex.forward(x[row_token])
        meta = ex.forward(_pack(_row_pairs(local_slot, dest_rank, row_token, row_rank, -1),
                                _row_pairs(weights, dest_rank, row_token, row_rank, 0.0)))
        slot, w = _unpack(meta, 2)
        recv_slot, recv_w = slot.to(torch.int64), w.to(x.dtype)
        row_bytes = x.shape[1] * x.element_size()
        self._count(send_counts, row_bytes)
        for r, n in enumerate(send_counts):
            self.stats.rank_tokens[r] += n
        self.stats.add_pairs(dest_rank)
        return recv_x, recv_slot, recv_w, _FlatHandle(ex, row_token, x.shape[0])

    def combine(self, y, handle: _FlatHandle):
        ex = handle.exchange
        back = ex.backward(y)
        self._count(ex.recv_counts, y.shape[1] * y.element_size())
        out = torch.zeros((handle.num_tokens, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.row_token, back.float())
        return out.to(y.dtype)


@dataclass
class _HierHandle:
    inter: _Exchange
    inter_row_token: torch.Tensor  # [N1] token of each row sent across the fabric (or to self)
    num_tokens: int
    intra: _Exchange
    intra_row_src: torch.Tensor  # [N2] forwarded row (index into stage-1 receives) of each stage-2 row
    num_forwarded: int


class HierarchicalAllToAll(AllToAll):
    """Two-stage dispatch: across the fabric once per remote domain, then inside the domain.

    Groups (built by :func:`build_hierarchy_groups`): the *rail* of this rank,
    the D ranks with the same local index ``rank % M`` in every domain, and its
    *domain*, the M consecutive ranks sharing NVLink.

    Stage 1 (rail all-to-all, inter_domain): token t goes to the rail member in
    every domain holding one of its pairs (itself for its own domain), carrying
    the pairs of that domain as (destination local index, slot, weight).
    Stage 2 (domain all-to-all, intra_domain): each rank fans the rows it
    received out to the ranks of its domain, one row per distinct destination.
    """

    def __init__(self, parallel: ParallelConfig, slots_per_rank: int, groups: tuple[object, object]) -> None:
        super().__init__(parallel, slots_per_rank)
        self.domain_group, self.rail_group = groups
        m, d = parallel.domain_size, parallel.num_domains
        me = parallel.rank
        self.rail_ranks = [dom * m + me % m for dom in range(d)]  # rail member j lives in domain j
        self.domain_ranks = [parallel.domain_of(me) * m + j for j in range(m)]

    def dispatch(self, x, dest_rank, local_slot, weights):
        p = self.parallel
        m, d = p.domain_size, p.num_domains
        row_bytes = x.shape[1] * x.element_size()
        # 1. Stage 1: one row per (token, destination domain) to this rank's rail member there.
        dest_domain = torch.where(dest_rank < 0, -1, dest_rank // m)
        row_token, row_domain, counts1 = dedup_rows(dest_domain, d)
        ex1 = _Exchange(counts1.tolist(), _exchange_counts(counts1, self.rail_group), self.rail_group)
        keep = dest_domain[row_token] == row_domain[:, None]
        fwd_x = ex1.forward(x[row_token])
        meta = ex1.forward(_pack(torch.where(keep, dest_rank[row_token] % m, -1),
                                 torch.where(keep, local_slot[row_token], -1),
                                 torch.where(keep, weights[row_token], 0.0)))
        fwd_local, fwd_slot, fwd_w = _unpack(meta, 3)
        fwd_local, fwd_slot = fwd_local.to(torch.int64), fwd_slot.to(torch.int64)
        self._count(ex1.send_counts, row_bytes, self.rail_ranks)
        # 2. Stage 2: rows received in stage 1 fan out inside this domain, deduplicated per rank.
        row_src, row_local, counts2 = dedup_rows(fwd_local, m)
        ex2 = _Exchange(counts2.tolist(), _exchange_counts(counts2, self.domain_group), self.domain_group)
        recv_x = ex2.forward(fwd_x[row_src])
        meta = ex2.forward(_pack(_row_pairs(fwd_slot, fwd_local, row_src, row_local, -1),
                                 _row_pairs(fwd_w, fwd_local, row_src, row_local, 0.0)))
        slot, w = _unpack(meta, 2)
        recv_slot, recv_w = slot.to(torch.int64), w.to(x.dtype)
        self._count(ex2.send_counts, row_bytes, self.domain_ranks)
        # Final destinations of this rank's own tokens (what rank_token_counts reports).
        _, _, final_counts = dedup_rows(dest_rank, p.world_size)
        for r, n in enumerate(final_counts.tolist()):
            self.stats.rank_tokens[r] += n
        self.stats.add_pairs(dest_rank)
        handle = _HierHandle(ex1, row_token, x.shape[0], ex2, row_src, fwd_x.shape[0])
        return recv_x, recv_slot, recv_w, handle

    def combine(self, y, handle: _HierHandle):
        h = y.shape[1]
        row_bytes = h * y.element_size()
        # 1. Stage 2 backwards: partial sums return to the forwarding rank, which adds them per row.
        back2 = handle.intra.backward(y)
        self._count(handle.intra.recv_counts, row_bytes, self.domain_ranks)
        fwd = torch.zeros((handle.num_forwarded, h), dtype=torch.float32, device=y.device)
        fwd.index_add_(0, handle.intra_row_src, back2.float())
        # 2. Stage 1 backwards: one row per (token, domain) crosses the fabric home.
        back1 = handle.inter.backward(fwd.to(y.dtype))
        self._count(handle.inter.recv_counts, row_bytes, self.rail_ranks)
        out = torch.zeros((handle.num_tokens, h), dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.inter_row_token, back1.float())
        return out.to(y.dtype)


def build_hierarchy_groups(parallel: ParallelConfig) -> tuple[object, object]:
    """(domain group, rail group) of this rank. COLLECTIVE: every rank creates every group, same order."""
    m, d = parallel.domain_size, parallel.num_domains
    backend = "nccl" if parallel.device == "cuda" else "gloo"
    domain_group = rail_group = None
    for dom in range(d):
        group = dist.new_group(ranks=list(range(dom * m, (dom + 1) * m)), backend=backend)
        if dom == parallel.domain_of(parallel.rank):
            domain_group = group
    for local in range(m):
        group = dist.new_group(ranks=[dom * m + local for dom in range(d)], backend=backend)
        if local == parallel.rank % m:
            rail_group = group
    return domain_group, rail_group


def dispatch_mode(parallel: ParallelConfig, mode: str = "auto") -> str:
    """``flat`` or ``hierarchical``: ``auto`` is hierarchical when the group spans several NVLink domains."""
    if mode not in ("auto", "flat", "hierarchical"):
        raise ValueError(f"all-to-all mode must be auto, flat or hierarchical, got {mode!r}")
    if mode == "auto":
        return "hierarchical" if parallel.hierarchical else "flat"
    return mode


def make_all_to_all(parallel: ParallelConfig, slots_per_rank: int, mode: str = "auto") -> AllToAll:
    """The dispatcher for ``dispatch_mode(parallel, mode)``. COLLECTIVE for hierarchical (builds groups)."""
    if dispatch_mode(parallel, mode) == "hierarchical":
        return HierarchicalAllToAll(parallel, slots_per_rank, build_hierarchy_groups(parallel))
    return FlatAllToAll(parallel, slots_per_rank)
