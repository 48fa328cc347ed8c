"""The balancer's per-layer decision (acceptance.py), relabelling, the CLI's --previous view, the size guard."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from moeshard.operator.acceptance import (
    DEFER, KEEP, MOVE, SKIP, AcceptanceOptions, choose_candidate, decide_placement,
)
from moeshard.operator.balancer import rebalance_placement
from moeshard.cli.main import main
from moeshard.core.placement import (
    CONFIG_MAP_LIMIT_BYTES, PlacementError, check_config_map_size, initial_placement, parse_placement,
    placement_from_arrays, round_shares,
)
from moeshard.core.architectures import PRESETS
from moeshard.operator.api import LoadBalancingSpec
from moeshard.operator.grouped import domains_hold_whole_groups, grouped_plan, grouped_routing
from moeshard.operator.rebalance import adoption, plan_cycle
from moeshard.operator.relabel import relabel_onto

L, E, G, S = 24, 32, 8, 5
ROOT = Path(__file__).resolve().parents[2]


def sample(shares: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(pairs, row / row.sum()) for row in shares]).astype(float)


@pytest.fixture(scope="module")
def live():
    """A placement fitted to uniform traffic (balanced for it)."""
    return rebalance_placement(sample(np.ones((L, E)), 400_000, 1), G, S, 4).placement.with_version(3)


def test_a_hot_layer_among_many_is_taken_alone(live):
    shares = np.ones((L, E))
    shares[11, :3] = 10.0  # layer 11 turns hot
    decision = decide_placement(live, sample(shares, 400_000, 2), 4)
    assert decision.moved_layers == [11]
    assert decision.layers[11].gain > 0.2 and "gain" in decision.layers[11].reason
    new = decision.placement
    assert new is not None and new.version == 4
    others = [li for li in range(L) if li != 11]
    # Layers that do not move keep their rows and shares verbatim.
    assert np.array_equal(new.phy2log[others], live.phy2log[others])
    assert np.array_equal(new.weights[others], live.weights[others])
    assert decision.moves[11] == (new.phy2log[11] != live.phy2log[11]).sum() and decision.moves[others].sum() == 0


def test_noise_only_windows_are_rejected(live):
    for seed in range(3):
        decision = decide_placement(live, sample(np.ones((L, E)), 400_000, 10 + seed), 4)
        assert decision.placement is None and all(d.decision == KEEP for d in decision.layers)
        assert all("< threshold" in d.reason for d in decision.layers)


def test_few_tokens_are_skipped_with_a_reason(live):
    shares = np.ones((L, E))
    shares[:, :3] = 10.0  # a real skew, but seen through too few tokens
    decision = decide_placement(live, sample(shares, 1_000, 3), 4)
    assert decision.placement is None and decision.skipped is not None and "too few" in decision.skipped
    assert {d.decision for d in decision.layers} == {SKIP}
    # One quiet layer among busy ones: only that layer is skipped, with its count.
    loads = sample(shares, 400_000, 4)
    loads[5] = sample(shares[5:6], 1_000, 5)[0]
    decision = decide_placement(live, loads, 4)
    assert decision.layers[5].decision == SKIP and "tokens per GPU" in decision.layers[5].reason
    assert decision.layers[6].decision == MOVE


def test_lost_scrapes_skip_the_window(live):
    shares = np.ones((L, E))
    shares[:, :3] = 10.0
    decision = decide_placement(live, sample(shares, 400_000, 6), 4, coverage=0.6)
    assert decision.placement is None and "coverage 60%" in decision.skipped


def test_move_budget_takes_the_largest_gains_first(live):
    shares = np.ones((L, E))
    shares[2, :3] = 20.0  # hottest
    shares[9, :3] = 6.0
    loads = sample(shares, 400_000, 7)
    free = decide_placement(live, loads, 4)
    assert set(free.moved_layers) == {2, 9}
    budget = int(free.moves[2])
    capped = decide_placement(live, loads, 4, AcceptanceOptions(move_budget=budget))
    assert capped.moved_layers == [2] and capped.layers[9].decision == DEFER
    assert "move budget" in capped.layers[9].reason and capped.moves.sum() <= budget


def test_scratch_plan_taken_when_its_gain_per_copy_is_better():
    # The incremental plan is stuck below the threshold: the scratch plan is taken.
    assert choose_candidate({"incremental": 0.01, "scratch": 0.03}, {"incremental": 2, "scratch": 40}, 0.015) == "scratch"
    # Both qualify: gain per copy decides.
    assert choose_candidate({"incremental": 0.05, "scratch": 0.06}, {"incremental": 4, "scratch": 40}, 0.015) \
        == "incremental"
    assert choose_candidate({"incremental": 0.02, "scratch": 0.30}, {"incremental": 2, "scratch": 12}, 0.015) \
        == "scratch"
    # A per-layer copy cap rules the scratch plan out; nothing qualifies: None.
    assert choose_candidate({"incremental": 0.01, "scratch": 0.03}, {"incremental": 2, "scratch": 40}, 0.015, 8) is None


def test_relabelling_needs_fewer_copies_than_the_plan_as_built():
    loads = sample(np.random.default_rng(1).pareto(1.5, (6, 64)) + 0.2, 1_000_000, 9)
    live = rebalance_placement(loads, 16, 5, 8).placement
    drifted = sample(np.random.default_rng(2).pareto(1.5, (6, 64)) + 0.2, 1_000_000, 10)
    plan = rebalance_placement(drifted, 16, 5, 8).placement
    perm = relabel_onto(live.phy2log, plan.phy2log, 16, 5, 64)
    relabelled = np.take_along_axis(plan.phy2log, perm, 1)
    naive = (plan.phy2log != live.phy2log).sum(axis=1)
    smart = (relabelled != live.phy2log).sum(axis=1)
    assert (smart <= naive).all() and smart.sum() < 0.8 * naive.sum()
    # Same per-GPU expert multisets: the balance is the plan's.
    per_gpu = lambda p: np.sort(np.sort(p.reshape(6, 16, 5), axis=2).reshape(6, 16, 5), axis=1)  # noqa: E731
    assert sorted(map(tuple, np.sort(relabelled.reshape(6, 16, 5), axis=2)[0])) == \
        sorted(map(tuple, np.sort(plan.phy2log.reshape(6, 16, 5), axis=2)[0]))
    assert per_gpu(relabelled).shape == per_gpu(plan.phy2log).shape


def test_cli_previous_prints_per_layer_decisions(live, tmp_path, capsys):
    shares = np.ones((L, E))
    shares[11, :3] = 10.0
    loads = sample(shares, 400_000, 2)
    (tmp_path / "loads.json").write_text(json.dumps({"loads": loads.tolist()}))
    (tmp_path / "live.json").write_text(live.to_json())
    args = ["balance", "--loads", str(tmp_path / "loads.json"), "--gpus", str(G), "--slots-per-gpu", str(S),
            "--gpus-per-domain", "4", "--previous", str(tmp_path / "live.json")]
    assert main(args + ["-o", "text"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line.split() for line in lines if line.split() and line.split()[0].isdigit()}
    assert len(rows) == L
    assert rows[11][3] == MOVE and all(rows[li][3] == KEEP for li in rows if li != 11)
    decision = decide_placement(live, loads, 4)  # the CLI prints exactly the operator's decision
    assert [float(rows[li][1]) for li in range(L)] == pytest.approx([d.before for d in decision.layers], abs=1e-4)
    assert main(args) == 0
    printed = parse_placement(capsys.readouterr().out)
    assert printed.to_json() == decision.placement.to_json()


def test_rounded_shares_stay_valid_and_small():
    rng = np.random.default_rng(3)
    big = rebalance_placement(sample(rng.pareto(1.2, (94, 256)) + 0.1, 4_000_000, 11), 32, 12, 8).placement
    assert big.num_slots == 384
    assert np.abs(big.weights - np.round(big.weights, 6)).max() < 1e-12  # the balancer writes rounded shares
    size = check_config_map_size(big)
    assert size < CONFIG_MAP_LIMIT_BYTES / 2
    raw = placement_from_arrays(0, 32, 12, 256, big.phy2log, big.weights + 0.0)
    again = round_shares(raw.phy2log, raw.weights + rng.uniform(-4e-7, 4e-7, raw.weights.shape) * (raw.weights < 1))
    placement_from_arrays(0, 32, 12, 256, raw.phy2log, again)  # the sum-to-one invariant holds
    with pytest.raises(PlacementError, match="exceed the 1048576-byte ConfigMap limit"):
        check_config_map_size(big, other_bytes=CONFIG_MAP_LIMIT_BYTES - size + 1)


class FakeKube:
    """The three calls balance_once makes, on in-memory objects."""

    def __init__(self, config_map):
        self.config_map, self.patches, self.status = config_map, [], {}

    def get(self, api_version, plural, namespace, name):
        return self.config_map

    def patch(self, *args):
        self.patches.append(args)

    def patch_status(self, api_version, plural, body, build):
        new = build(self.status)
        if new is not None:
            self.status.update(new)


class Source:
    def __init__(self, url):
        self.url = url

    def expert_loads(self, name, namespace, window, layers, experts):
        loads = np.full((layers, experts), 20_000.0)
        loads[:, :2] = 200_000.0
        return loads

    def coverage(self, *args):
        return 1.0

    def group_versions(self, *args):
        return {"0": (0, False), "1": (0, False)}


def test_a_placement_over_the_config_map_limit_is_not_written():
    from moeshard.operator.balancer_handlers import balance_once

    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"] = {"name": "big", "namespace": "default", "generation": 1}
    experts = int(body["spec"]["model"]["architecture"]["numExperts"])
    live = initial_placement(2, experts, 4, (experts + 3) // 4 + 1)
    body["spec"]["loadBalancing"] = {"interval": "1m", "window": "1m"}
    config_map = {"metadata": {"resourceVersion": "7"},
                  "data": {"placement.json": live.to_json(), "plan.json": "x" * (CONFIG_MAP_LIMIT_BYTES - 60)}}
    kube = FakeKube(config_map)
    run = balance_once(kube, body, Source)
    assert run.action == "kept" and kube.patches == []
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    assert conditions["Balanced"]["status"] == "False" and conditions["Balanced"]["reason"] == "PlacementTooLarge"
    assert "ConfigMap limit" in conditions["Balanced"]["message"]
    assert kube.status["groupPlacementVersions"] == {"0": 0, "1": 0}


def test_adoption_conditions():
    status, cond = adoption(5, {"0": (5, False), "1": (4, False)})
    assert status == {"groupPlacementVersions": {"0": 5, "1": 4}}
    assert (cond["status"], cond["reason"]) == ("False", "GroupsBehind") and "group 1 (v4)" in cond["message"]
    _, cond = adoption(5, {"0": (5, False), "1": (4, True)})
    assert cond["reason"] == "Rejected" and "1" in cond["message"]
    _, cond = adoption(5, {"0": (5, False), "1": (5, False)})
    assert (cond["status"], cond["reason"]) == ("True", "AllGroupsAdopted")
    assert adoption(5, {})[1]["status"] == "Unknown"


def test_grouped_routers_keep_every_group_inside_one_domain(capsys, tmp_path):
    """DeepSeek-V3-style groups: the decision's plans (and the CLI's) hold each group's replicas in one domain."""
    rng = np.random.default_rng(5)
    loads = sample(rng.pareto(1.5, (4, 64)) + 0.2, 2_000_000, 13)
    live = initial_placement(4, 64, 16, 5)
    decision = decide_placement(live, loads, 8, AcceptanceOptions(expert_groups=8))
    assert decision.moved_layers == [0, 1, 2, 3]
    assert domains_hold_whole_groups(decision.placement.phy2log, 64, 8, 8 * 5)
    assert not domains_hold_whole_groups(live.phy2log, 64, 8, 8 * 5)
    # Relabelling moved whole domains: still grouped, fewer copies than the plan as built.
    rows, _ = grouped_plan(loads, 16, 5, 8, 8)
    assert (decision.placement.phy2log != live.phy2log).sum() <= (rows != live.phy2log).sum()
    (tmp_path / "loads.json").write_text(json.dumps({"loads": loads.tolist()}))
    assert main(["balance", "--loads", str(tmp_path / "loads.json"), "--gpus", "16", "--slots-per-gpu", "5",
                 "--gpus-per-domain", "8", "--expert-groups", "8"]) == 0
    printed = parse_placement(capsys.readouterr().out)
    assert domains_hold_whole_groups(printed.phy2log, 64, 8, 40)
    with pytest.raises(PlacementError, match="expertGroups"):
        grouped_plan(loads, 16, 5, 8, 6)


def test_the_operators_cycle_keeps_a_group_limited_routers_groups_in_their_domains():
    """The cycle takes the router's groups from the model (DeepSeek-V3: 8) when the EP group spans domains."""
    assert PRESETS["deepseek-v3"].expert_groups == 8
    assert all(p.expert_groups == 1 for name, p in PRESETS.items() if name != "deepseek-v3")
    # Nothing to keep: routing not group-limited, one NVLink domain, or groups that cannot split whole.
    assert grouped_routing(1, 64, 16, 5, 8) is None
    assert grouped_routing(8, 64, 16, 5, 16) is None and grouped_routing(8, 64, 16, 5, None) is None
    assert grouped_routing(3, 48, 16, 5, 8) is None  # 3 groups over 2 domains
    assert grouped_routing(8, 64, 16, 5, 8) == 8
    assert grouped_routing(8, 256, 16, 17, 8) == 8  # DeepSeek-V3 at EP 16 across two HGX nodes
    rng = np.random.default_rng(5)
    loads = sample(rng.pareto(1.5, (4, 64)) + 0.2, 2_000_000, 13)
    live = initial_placement(4, 64, 16, 5)
    grouped = plan_cycle(live, loads, LoadBalancingSpec(), 8, datetime.now(timezone.utc), expert_groups=8)
    plain = plan_cycle(live, loads, LoadBalancingSpec(), 8, datetime.now(timezone.utc))
    assert grouped.placement is not None and plain.placement is not None
    assert domains_hold_whole_groups(grouped.placement.phy2log, 64, 8, 8 * 5)
    assert not domains_hold_whole_groups(plain.placement.phy2log, 64, 8, 8 * 5)
