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
  domain it needs, to the peer rank with the same local index there, which
  fans it out over NVLink to the ranks of its domain (again deduplicated).
  Combine runs the two stages backwards and the forwarding rank sums its
  domain's partial results before sending one row back across the fabric.

Byte accounting: every row of activations that leaves a rank is counted, by
link class (``intra_domain`` when source and destination share an NVLink
domain, ``inter_domain`` otherwise), for dispatch and combine. A rank's rows
to itself use no link and are not counted. Only activation rows are counted:
the routing metadata (K int64 slot ids and K weights per row) travels beside
them and is a fixed K x 16 bytes per row.

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

    def __post_init__(self) -> None:
        if not self.rank_tokens:
            self.rank_tokens = [0] * self.world_size


@dataclass
class _Exchange:
    """One uneven all-to-all of rows: what the reverse direction needs."""

    send_counts: list[int]  # [W] rows sent to each rank
    recv_counts: list[int]  # [W] rows received from each rank


def _exchange_counts(send_counts: torch.Tensor) -> list[int]:
    """All-to-all of per-destination row counts [W] -> per-source counts [W]."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts)
    return recv.tolist()


def _all_to_all_rows(t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of ``t`` [sum(send_counts), ...] grouped by destination -> received rows grouped by source."""
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
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

    def _count(self, counts: list[int], row_bytes: int) -> None:
        """Count ``counts[r]`` rows of ``row_bytes`` sent from this rank to rank r, by link class."""
        me = self.parallel.rank
        for r, n in enumerate(counts):
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
        recv_x = _all_to_all_rows(x[row_token], send_counts, recv_counts)
        recv_slot = _all_to_all_rows(_row_pairs(local_slot, dest_rank, row_token, row_rank, -1), send_counts, recv_counts)
        recv_w = _all_to_all_rows(_row_pairs(weights, dest_rank, row_token, row_rank, 0.0), send_counts, recv_counts)
        row_bytes = x.shape[1] * x.element_size()
        self._count(send_counts, row_bytes)
        for r, n in enumerate(send_counts):
            self.stats.rank_tokens[r] += n
        return recv_x, recv_slot, recv_w, _FlatHandle(ex, row_token, x.shape[0])

    def combine(self, y, handle: _FlatHandle):
        ex = handle.exchange
        back = _all_to_all_rows(y, ex.recv_counts, ex.send_counts)
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

    Stage 1 (inter_domain): token t goes to rank ``d * M + (rank % M)`` for
    every domain d holding one of its pairs (to itself for its own domain),
    carrying the pairs of that domain as (destination rank, local slot, weight).
    Stage 2 (intra_domain): each rank fans the rows it received out to the
    ranks of its domain, one row per distinct destination.
    """

    def dispatch(self, x, dest_rank, local_slot, weights):
        p = self.parallel
        w, m, me = p.world_size, p.domain_size, p.rank
        row_bytes = x.shape[1] * x.element_size()
        # 1. Stage 1: one row per (token, domain), addressed to that domain's peer of this rank.
        peer = torch.where(dest_rank < 0, -1, (dest_rank // m) * m + me % m)
        row_token, row_peer, counts1 = dedup_rows(peer, w)
        ex1 = _Exchange(counts1.tolist(), _exchange_counts(counts1))
        keep = (dest_rank[row_token] >= 0) & (dest_rank[row_token] // m == (row_peer // m)[:, None])
        fwd_x = _all_to_all_rows(x[row_token], ex1.send_counts, ex1.recv_counts)
        fwd_dest = _all_to_all_rows(torch.where(keep, dest_rank[row_token], -1), ex1.send_counts, ex1.recv_counts)
        fwd_slot = _all_to_all_rows(torch.where(keep, local_slot[row_token], -1), ex1.send_counts, ex1.recv_counts)
        fwd_w = _all_to_all_rows(torch.where(keep, weights[row_token], 0.0), ex1.send_counts, ex1.recv_counts)
        self._count(ex1.send_counts, row_bytes)
        # 2. Stage 2: rows received in stage 1 fan out inside this domain, deduplicated per rank.
        row_src, row_rank, counts2 = dedup_rows(fwd_dest, w)
        ex2 = _Exchange(counts2.tolist(), _exchange_counts(counts2))
        recv_x = _all_to_all_rows(fwd_x[row_src], ex2.send_counts, ex2.recv_counts)
        recv_slot = _all_to_all_rows(_row_pairs(fwd_slot, fwd_dest, row_src, row_rank, -1), ex2.send_counts, ex2.recv_counts)
        recv_w = _all_to_all_rows(_row_pairs(fwd_w, fwd_dest, row_src, row_rank, 0.0), ex2.send_counts, ex2.recv_counts)
        self._count(ex2.send_counts, row_bytes)
        # Final destinations of this rank's own tokens (what rank_token_counts reports).
        _, _, final_counts = dedup_rows(dest_rank, w)
        for r, n in enumerate(final_counts.tolist()):
            self.stats.rank_tokens[r] += n
        handle = _HierHandle(ex1, row_token, x.shape[0], ex2, row_src, fwd_x.shape[0])
        return recv_x, recv_slot, recv_w, handle

    def combine(self, y, handle: _HierHandle):
        h = y.shape[1]
        row_bytes = h * y.element_size()
        # 1. Stage 2 backwards: partial sums return to the forwarding rank, which adds them per row.
        back2 = _all_to_all_rows(y, handle.intra.recv_counts, handle.intra.send_counts)
        self._count(handle.intra.recv_counts, row_bytes)
        fwd = torch.zeros((handle.num_forwarded, h), dtype=torch.float32, device=y.device)
        fwd.index_add_(0, handle.intra_row_src, back2.float())
        # 2. Stage 1 backwards: one row per (token, domain) crosses the fabric home.
        back1 = _all_to_all_rows(fwd.to(y.dtype), handle.inter.recv_counts, handle.inter.send_counts)
        self._count(handle.inter.recv_counts, row_bytes)
        out = torch.zeros((handle.num_tokens, h), dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.inter_row_token, back1.float())
        return out.to(y.dtype)


def make_all_to_all(parallel: ParallelConfig, slots_per_rank: int, mode: str = "auto") -> AllToAll:
    """``auto``: hierarchical when the group spans more than one NVLink domain, else flat."""
    if mode not in ("auto", "flat", "hierarchical"):
        raise ValueError(f"all-to-all mode must be auto, flat or hierarchical, got {mode!r}")
    if mode == "hierarchical" or (mode == "auto" and parallel.hierarchical):
        return HierarchicalAllToAll(parallel, slots_per_rank)
    return FlatAllToAll(parallel, slots_per_rank)
