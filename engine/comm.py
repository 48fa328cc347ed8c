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
    """Cumulative traffic of one rank (all MoE layers, dispatch + combine).

    The per-rank counters stay on the device (a scatter_add per layer, no host
    sync); ``rank_tokens`` / ``rank_pairs`` read them when metrics are published.
    """

    world_size: int
    link_bytes: dict[str, int] = field(default_factory=lambda: {c: 0 for c in LINK_CLASSES})
    # [W] token rows dispatched to each final rank.
    token_counts: torch.Tensor | None = None
    # [W + 1] (token, expert) pairs computed by each rank (slot 0: pairs with no rank).
    pair_counts: torch.Tensor | None = None

    def add_tokens(self, rows_per_rank: torch.Tensor) -> None:
        """Add one layer's rows per final destination rank [W] (a device tensor)."""
        if self.token_counts is None:
            self.token_counts = torch.zeros(self.world_size, dtype=torch.int64, device=rows_per_rank.device)
        self.token_counts += rows_per_rank.to(torch.int64)

    def add_pairs(self, dest_rank: torch.Tensor) -> torch.Tensor:
        """Count this rank's (token, expert) pairs by the rank that computes them (the GEMM load).

        Returns this call's pairs per rank [W] (device), which dispatch sends beside the row counts.
        """
        layer = pairs_per_rank(dest_rank, self.world_size)
        if self.pair_counts is None:
            self.pair_counts = torch.zeros(self.world_size + 1, dtype=torch.int64, device=dest_rank.device)
        self.pair_counts[1:] += layer
        return layer

    @property
    def rank_tokens(self) -> list[int]:
        if self.token_counts is None:
            return [0] * self.world_size
        return self.token_counts.tolist()

    @property
    def rank_pairs(self) -> list[int]:
        if self.pair_counts is None:
            return [0] * self.world_size
        return self.pair_counts[1:].tolist()


def pairs_per_rank(dest_rank: torch.Tensor, world_size: int) -> torch.Tensor:
    """(token, k) pairs per destination rank [W] int64 from dest_rank [T, K] (-1 = no pair); no host sync."""
    index = (dest_rank.reshape(-1) + 1).clamp(min=0)
    counts = torch.zeros(world_size + 1, dtype=torch.int64, device=dest_rank.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))[1:]


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


def _exchange_counts(send: torch.Tensor, group=None) -> tuple[list[list[int]], list[list[int]]]:
    """All-to-all of per-destination counts [G, C] (row j goes to member j) -> (sent, received) on the host.

    The exchange itself stays on the device; the ONE host sync of an uneven
    exchange is the single ``.tolist()`` here, which reads the sent and the
    received counts together (all_to_all_single takes its split sizes as
    host integers). A group of one exchanges with itself without a collective.
    """
    recv = send.clone() if _group_size(group) == 1 else torch.empty_like(send)
    if _group_size(group) > 1:
        dist.all_to_all_single(recv, send.contiguous(), group=group)
    both = torch.stack([send, recv]).tolist()  # HOST SYNC (the one per uneven exchange)
    return both[0], both[1]


def _group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _all_to_all_rows(t: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """Rows of ``t`` [sum(send_counts), ...] grouped by destination -> received rows grouped by source."""
    if _group_size(group) == 1:
        return t.clone()
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


def _all_to_all_equal(t: torch.Tensor, group=None) -> torch.Tensor:
    """Equal-split all-to-all of ``t`` [G * C, ...]: no split sizes on the host, capturable in a CUDA graph."""
    if _group_size(group) == 1:
        return t.clone()
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous(), group=group)
    return out


def row_hits(dest_rank: torch.Tensor, world_size: int) -> torch.Tensor:
    """[W, T] bool: token t has at least one pair on rank r (dest_rank [T, K], -1 = no pair); no host sync."""
    t = dest_rank.shape[0]
    hit = torch.zeros((t, world_size + 1), dtype=torch.bool, device=dest_rank.device)
    hit.scatter_(1, torch.where(dest_rank < 0, world_size, dest_rank), True)
    return hit[:, :world_size].t()


def compact_rows(hit: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_token [N], row_rank [N]) of the set entries of ``hit`` [W, T], by rank then token.

    ``total`` = N, the number of set entries, already known on the host, so
    no ``nonzero`` (whose output size would need a sync): entry j of the
    flattened mask lands at position cumsum - 1, unset entries in a dump slot.
    """
    w, t = hit.shape
    flat = hit.reshape(-1)
    position = torch.where(flat, torch.cumsum(flat, 0) - 1, total)
    rows = torch.empty(total + 1, dtype=torch.int64, device=hit.device)
    rows.scatter_(0, position, torch.arange(w * t, device=hit.device))
    rows = rows[:total]
    return rows % max(t, 1), rows // max(t, 1)


def dedup_rows(dest_rank: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per distinct (token, destination rank) pair, grouped by destination.

    dest_rank: [T, K] int64 destination of each (token, k) pair, -1 = no pair.
    Returns (row_token [N] token index of each row, row_rank [N] its destination,
    counts [W] rows per destination); rows are sorted by destination, then token.
    Reads N on the host (one sync); dispatch gets N from its count exchange instead.
    """
    hit = row_hits(dest_rank, world_size)
    counts = hit.sum(dim=1)
    row_token, row_rank = compact_rows(hit, int(counts.sum()))
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
    exchange: _Exchange | None  # None: the padded (equal-split) exchange
    row_token: torch.Tensor  # [N] token of each sent row
    num_tokens: int
    live_pairs: int | None  # pairs this rank computes, when known on the host without a sync


class FlatAllToAll(AllToAll):
    """One deduplicated all-to-all over the whole EP group.

    ``padded`` (for CUDA-graph capture of bucketed decode steps): every rank
    sends T rows to every rank (its whole batch, slot -1 where a token has no
    pair there) with equal splits, so nothing is read on the host; every rank
    of the group must then step the same T (the bucket). Otherwise rows are
    deduplicated and the split sizes cost one host sync per layer.
    """

    padded: bool = False

    def dispatch(self, x, dest_rank, local_slot, weights):
        if self.padded:
            return self._dispatch_padded(x, dest_rank, local_slot, weights)
        w = self.parallel.world_size
        hit = row_hits(dest_rank, w)
        rows = hit.sum(dim=1)
        pairs = self.stats.add_pairs(dest_rank)
        self.stats.add_tokens(rows)
        sent, received = _exchange_counts(torch.stack([rows, pairs], dim=1))  # the layer's one host sync
        send_counts, recv_counts = [r for r, _ in sent], [r for r, _ in received]
        row_token, row_rank = compact_rows(hit, sum(send_counts))
        ex = _Exchange(send_counts, recv_counts)
        recv_x = ex.forward(x[row_token])
        meta = ex.forward(_pack(_row_pairs(local_slot, dest_rank, row_token, row_rank, -1),
                                _row_pairs(weights, dest_rank, row_token, row_rank, 0.0)))
        slot, wts = _unpack(meta, 2)
        self._count(send_counts, x.shape[1] * x.element_size())
        live = sum(p for _, p in received)
        return recv_x, slot.to(torch.int64), wts.to(x.dtype), _FlatHandle(ex, row_token, x.shape[0], live)

    def _dispatch_padded(self, x, dest_rank, local_slot, weights):
        w, (t, h) = self.parallel.world_size, x.shape
        self.stats.add_pairs(dest_rank)
        self.stats.add_tokens(row_hits(dest_rank, w).sum(dim=1))
        keep = dest_rank.unsqueeze(0) == torch.arange(w, device=x.device).view(w, 1, 1)  # [W, T, K]
        send_x = x.unsqueeze(0).expand(w, t, h).reshape(w * t, h)
        k = dest_rank.shape[1]
        meta = _pack(torch.where(keep, local_slot.unsqueeze(0), -1).reshape(w * t, k),
                     torch.where(keep, weights.unsqueeze(0), 0.0).reshape(w * t, k))
        recv_x = _all_to_all_equal(send_x)
        slot, wts = _unpack(_all_to_all_equal(meta), 2)
        self._count([t] * w, h * x.element_size())  # padded rows do cross the links
        row_token = torch.arange(t, device=x.device).repeat(w)
        return recv_x, slot.to(torch.int64), wts.to(x.dtype), _FlatHandle(None, row_token, t, None)

    def combine(self, y, handle: _FlatHandle):
        if handle.exchange is None:  # padded: row r * T + t of the answer is token t's part from rank r
            w, t = self.parallel.world_size, handle.num_tokens
            back = _all_to_all_equal(y)
            self._count([t] * w, y.shape[1] * y.element_size())
            return back.view(w, t, y.shape[1]).float().sum(dim=0).to(y.dtype)
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
    live_pairs: int  # pairs this rank computes (from the stage-2 count exchange)


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
        # Final destinations of this rank's own tokens and pairs (device counters).
        self.stats.add_pairs(dest_rank)
        self.stats.add_tokens(row_hits(dest_rank, p.world_size).sum(dim=1))
        # 1. Stage 1: one row per (token, destination domain) to this rank's rail member there.
        dest_domain = torch.where(dest_rank < 0, -1, dest_rank // m)
        hit1 = row_hits(dest_domain, d)
        sent1, received1 = _exchange_counts(hit1.sum(dim=1, keepdim=True), self.rail_group)  # host sync 1 of 2
        ex1 = _Exchange([r for r, in sent1], [r for r, in received1], self.rail_group)
        row_token, row_domain = compact_rows(hit1, sum(ex1.send_counts))
        keep = dest_domain[row_token] == row_domain[:, None]
        fwd_x = ex1.forward(x[row_token])
        meta = ex1.forward(_pack(torch.where(keep, dest_rank[row_token] % m, -1),
                                 torch.where(keep, local_slot[row_token], -1),
                                 torch.where(keep, weights[row_token], 0.0)))
        fwd_local, fwd_slot, fwd_w = _unpack(meta, 3)
        fwd_local, fwd_slot = fwd_local.to(torch.int64), fwd_slot.to(torch.int64)
        self._count(ex1.send_counts, row_bytes, self.rail_ranks)
        # 2. Stage 2: rows received in stage 1 fan out inside this domain, deduplicated per rank.
        #    Its split sizes depend on what stage 1 delivered: the second (and last) host sync.
        hit2 = row_hits(fwd_local, m)
        sent2, received2 = _exchange_counts(torch.stack([hit2.sum(dim=1), pairs_per_rank(fwd_local, m)], dim=1),
                                            self.domain_group)  # host sync 2 of 2
        ex2 = _Exchange([r for r, _ in sent2], [r for r, _ in received2], self.domain_group)
        row_src, row_local = compact_rows(hit2, sum(ex2.send_counts))
        recv_x = ex2.forward(fwd_x[row_src])
        meta = ex2.forward(_pack(_row_pairs(fwd_slot, fwd_local, row_src, row_local, -1),
                                 _row_pairs(fwd_w, fwd_local, row_src, row_local, 0.0)))
        slot, w = _unpack(meta, 2)
        recv_slot, recv_w = slot.to(torch.int64), w.to(x.dtype)
        self._count(ex2.send_counts, row_bytes, self.domain_ranks)
        live = sum(pairs for _, pairs in received2)
        handle = _HierHandle(ex1, row_token, x.shape[0], ex2, row_src, fwd_x.shape[0], live)
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
