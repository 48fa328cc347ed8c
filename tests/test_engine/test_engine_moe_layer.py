"""The EP MoE layer in real gloo worlds: numerics against a dense reference, exact byte counts, token counts.

Each world runs several cases (one world per topology keeps the suite fast).
The reference for every check is computed here in the parent, independently:
outputs with a naive per-expert loop over the full expert weights, bytes from
the routing decisions of the numpy reference ``placement.replica_slot``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.engine_tasks import moe_layer_task, moe_layer_weights

from moeshard.engine.moe import route_topk
from moeshard.engine.verify import replicated_placement, run_ranks
from moeshard.core.placement import initial_placement, replica_slot

H, I, E = 16, 8, 8
ROW_BYTES = H * 4  # float32 activations


def reference_out(x: np.ndarray, case: dict) -> np.ndarray:
    """Naive per-expert loop (the way transformers computes an MoE block) over the full weights."""
    router, w_gu, w_dn = moe_layer_weights(case["seed"], E, H, I)
    xt = torch.from_numpy(x)
    weights, experts = route_topk(F.linear(xt, router), case["top_k"], case["model_type"], True)
    out = torch.zeros_like(xt)
    for e in range(E):
        tok, k = torch.where(experts == e)
        if tok.numel():
            gate, up = F.linear(xt[tok], w_gu[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(gate) * up, w_dn[e]) * weights[tok, k, None])
    return out.numpy()


def routing(x: np.ndarray, keys: np.ndarray, case: dict, placement) -> tuple[np.ndarray, np.ndarray]:
    """(experts [T, K], destination rank [T, K]) from the numpy reference replica_slot."""
    router, _, _ = moe_layer_weights(case["seed"], E, H, I)
    _, experts = route_topk(F.linear(torch.from_numpy(x), router), case["top_k"], case["model_type"], True)
    experts = experts.numpy()
    slots = replica_slot(placement, 0, np.broadcast_to(keys[:, None], experts.shape), experts)
    return experts, slots // placement.slots_per_gpu


def expected_link_bytes(dests_by_rank: list[np.ndarray], world: int, m: int, hierarchical: bool) -> list[dict]:
    """Bytes each rank sends per link class (dispatch + combine), from the routing decisions alone.

    Flat: token t of rank r sends one row to each distinct destination d != r
    and gets one row back from it. Hierarchical: one row to the peer
    f = D*m + r%m of every remote domain D it needs (and one back), then f
    (r itself for its own domain) sends one row to each distinct destination
    in D other than itself (and gets one back).
    """
    out = [{"intra_domain": 0, "inter_domain": 0} for _ in range(world)]

    def link(a: int, b: int) -> str:
        return "intra_domain" if a // m == b // m else "inter_domain"

    for r, dests in enumerate(dests_by_rank):
        for row in dests:
            targets = sorted(set(row.tolist()))
            if not hierarchical:
                for d in targets:
                    if d != r:
                        out[r][link(r, d)] += ROW_BYTES  # dispatch r -> d
                        out[d][link(d, r)] += ROW_BYTES  # combine d -> r
                continue
            for dom in sorted({d // m for d in targets}):
                f = dom * m + r % m
                if f != r:
                    out[r]["inter_domain"] += ROW_BYTES
                    out[f]["inter_domain"] += ROW_BYTES
                for d in targets:
                    if d // m == dom and d != f:
                        out[f]["intra_domain"] += ROW_BYTES
                        out[d]["intra_domain"] += ROW_BYTES
    return out


def _cases(world: int, m: int) -> list[dict]:
    plain = initial_placement(1, E, world, E // world)
    replicated = replicated_placement(1, E, world, 1)  # 3 slots per rank, uneven replica shares
    cases = []
    for mode in (["flat", "hierarchical"] if world > m else ["flat"]):
        cases += [
            # T not a power of two, different per rank, one rank with a single token.
            dict(mode=mode, placement=plain.to_json(), counts=[7, 1, 13, 5][:world], top_k=2, model_type="mixtral", seed=1),
            # Replicas with uneven shares, top-4, one rank with no tokens at all.
            dict(mode=mode, placement=replicated.to_json(), counts=[9, 0, 6, 11][:world], top_k=4,
                 model_type="qwen3_moe", seed=2),
            # Every token routes to the same experts (identical rows).
            dict(mode=mode, placement=plain.to_json(), counts=[6, 3, 4, 2][:world], top_k=2, model_type="mixtral",
                 seed=3, same_row=True),
        ]
    for c in cases:
        c.update(hidden=H, inter=I, gpus_per_domain=m)
    return cases


def _run(world: int, m: int, extra: list[dict] = ()) -> tuple[list[dict], list[list[dict]]]:
    """All cases of one topology in ONE spawned world; (cases, results[case][rank])."""
    cases = _cases(world, m) + list(extra)
    by_rank = run_ranks(world, moe_layer_task, cases)
    return cases, [[by_rank[r][ci] for r in range(world)] for ci in range(len(cases))]


def _check(cases: list[dict], results_by_case: list[list[dict]], world: int, m: int) -> None:
    from moeshard.core.placement import parse_placement

    for case, results in zip(cases, results_by_case):
        placement = parse_placement(case["placement"])
        dests, experts_all = [], []
        for r, res in enumerate(results):
            # 1. Numerics: the EP layer equals the dense per-expert loop.
            if res["x"].shape[0]:
                np.testing.assert_allclose(res["out"], reference_out(res["x"], case), atol=1e-5, rtol=0)
            experts, dest = routing(res["x"], res["keys"], case, placement)
            dests.append(dest)
            experts_all.append(experts)
            # 2. Per-expert counts: this rank's (token, k) pairs by logical expert.
            np.testing.assert_array_equal(res["counts"], np.bincount(experts.reshape(-1), minlength=E))
            # 3. Rank token counts: one row per (token, distinct destination rank).
            expect_rows = np.zeros(world, dtype=np.int64)
            for row in dest:
                expect_rows[sorted(set(row.tolist()))] += 1
            np.testing.assert_array_equal(res["rank_tokens"], expect_rows)
        # 4. Bytes per link class, per rank, exactly as the formula from the routing decisions.
        expected = expected_link_bytes(dests, world, m, case["mode"] == "hierarchical")
        assert [res["link_bytes"] for res in results] == expected, case["mode"]
        total_pairs = sum(e.size for e in experts_all)
        assert sum(res["counts"].sum() for res in results) == total_pairs
        if case.get("same_row"):
            hit = np.flatnonzero(sum(res["counts"] for res in results))
            assert hit.size == case["top_k"]  # all tokens on the same K experts; the other experts get none


_BIG = dict(placement=initial_placement(1, E, 4, 2).to_json(), counts=[32, 32, 32, 32], top_k=4,
            model_type="qwen3_moe", seed=5, hidden=H, inter=I, gpus_per_domain=2)


@pytest.fixture(scope="module")
def two_domains():
    return _run(4, 2, [dict(_BIG, mode="flat"), dict(_BIG, mode="hierarchical")])


def test_moe_layer_two_domains_of_two(two_domains):
    """EP=4 as 2 NVLink domains of 2 ranks: flat and hierarchical dispatch, replicas, T=0/1/odd."""
    _check(*two_domains, world=4, m=2)


def test_hierarchical_crosses_the_fabric_less_than_flat(two_domains):
    """Same routing, 2 domains of 2: hierarchical sends fewer inter-domain bytes than flat (dedup per domain)."""
    flat, hier = two_domains[1][-2], two_domains[1][-1]
    inter = lambda rs: sum(r["link_bytes"]["inter_domain"] for r in rs)  # noqa: E731
    assert inter(hier) < inter(flat)
    for a, b in zip(flat, hier):
        np.testing.assert_allclose(a["out"], b["out"], atol=1e-5, rtol=0)


def test_moe_layer_one_domain():
    _check(*_run(2, 8), world=2, m=8)
