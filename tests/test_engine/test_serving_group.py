"""A real 4-rank group (gloo, CPU) started by `launch`, checked over HTTP.

One group is launched per module (attention TP 2, EP 4, a tiny random
Qwen3-MoE checkpoint, 3 slots per rank) and reused by every check:

* completions equal transformers' greedy generation, and /metrics counts
  exactly tokens x top-K per MoE layer;
* the placement file (mounted Kubernetes-style: a symlink swapped atomically)
  changes under load: all ranks adopt it, experts move, no request fails and
  every answer is still what the model computes; corrupt or mismatched files
  change nothing and are counted;
* SIGTERM to the launcher drains and stops every rank with exit code 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from moeshard.core.naming import (
    METRIC_EXPERT_TOKENS,
    METRIC_PLACEMENT_REJECTED,
    METRIC_PLACEMENT_VERSION,
    METRIC_RANK_PAIRS,
    METRIC_RANK_TOKENS,
    METRIC_REQUEST_LATENCY,
)
from moeshard.core.placement import initial_placement, placement_from_arrays
from moeshard.engine.verify import reference_outputs
from support.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

NPROC, TP, LAYERS, EXPERTS, TOP_K, SLOTS = 4, 2, 2, 8, 4, 3
PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82], [1, 41, 42, 13, 56, 62, 37], [7]]
NEW_TOKENS = 6


# --------------------------------------------------------------------------- helpers


class MountedFile:
    """A file published the way the kubelet publishes a ConfigMap key.

    ``dir/placement.json -> ..data/placement.json`` and ``..data -> ..<n>``;
    an update writes a new ``..<n>`` and renames a fresh ``..data`` link over
    the old one (one atomic step).
    """

    def __init__(self, folder, name: str = "placement.json"):
        self.folder, self.name, self.generation = str(folder), name, 0
        os.makedirs(self.folder, exist_ok=True)

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)

    def publish(self, text: str) -> None:
        self.generation += 1
        target = f"..{self.generation}"
        os.makedirs(os.path.join(self.folder, target))
        with open(os.path.join(self.folder, target, self.name), "w") as handle:
            handle.write(text)
        tmp = os.path.join(self.folder, "..data_tmp")
        os.symlink(target, tmp)
        os.replace(tmp, os.path.join(self.folder, "..data"))
        if not os.path.islink(self.path):
            os.symlink(os.path.join("..data", self.name), self.path)


def http(url: str, body=None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(name, sorted label items): value}."""
    status, raw = http(url + "/metrics")
    assert status == 200
    samples = {}
    for line in raw.decode().splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric(samples, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, items), v in samples.items() if n == name and want.items() <= dict(items).items())


def complete(url: str, prompts, **extra):
    return http(url + "/v1/completions", {"prompt": prompts, "max_tokens": NEW_TOKENS, "ignore_eos": True, **extra})


def moved_placement(version: int):
    """A valid placement for this group that moves most experts to other ranks, with uneven replica shares."""
    base = initial_placement(LAYERS, EXPERTS, NPROC, SLOTS)
    rng = np.random.default_rng(version)
    rows, weights = [], []
    for _ in range(LAYERS):
        row = rng.permutation(base.phy2log[0])
        w = np.zeros(row.size)
        for expert in range(EXPERTS):
            slots = np.flatnonzero(row == expert)
            w[slots] = 1.0 / slots.size if slots.size == 1 else np.r_[0.8, np.full(slots.size - 1, 0.2 / (slots.size - 1))]
        rows.append(row)
        weights.append(w)
    return placement_from_arrays(version, NPROC, SLOTS, EXPERTS, rows, weights)


# --------------------------------------------------------------------------- the group


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    model = make_tiny_model("qwen3_moe", root / "model", num_experts=EXPERTS, num_layers=LAYERS, top_k=TOP_K)
    mounted = MountedFile(root / "config")
    mounted.publish(initial_placement(LAYERS, EXPERTS, NPROC, SLOTS).to_json())
    log_path = root / "launch.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeshard.engine.serving_cli", "launch", "--nproc", str(NPROC), "--tp", str(TP),
         "--model", str(model), "--port", "0", "--placement", mounted.path, "--threads", "1",
         "--placement-poll", "0.2", "--idle-interval", "0.1", "--grace", "20", "--log-level", "INFO"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=str(root),
    )
    # The reference while the ranks load (transformers, one prompt at a time, no padding).
    _, reference = reference_outputs(model, PROMPTS, NEW_TOKENS)
    url = None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if url is None:
            found = re.search(r"serving (http://127\.0\.0\.1:\d+)/v1/completions", log_path.read_text())
            url = found.group(1) if found else None
        if url is not None and http(url + "/readyz", timeout=5)[0] == 200:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the group did not become ready:\n{log_path.read_text()[-4000:]}")
    info = {"url": url, "proc": proc, "log": log_path, "mounted": mounted, "reference": reference}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_file.close()


def test_completions_equal_the_model_and_metrics_count_tokens_times_top_k(group):
    url = group["url"]
    before = scrape(url)
    status, raw = complete(url, PROMPTS)
    assert status == 200, raw
    body = json.loads(raw)
    assert [c["token_ids"] for c in body["choices"]] == group["reference"]
    assert body["usage"]["completion_tokens"] == NEW_TOKENS * len(PROMPTS)
    single = [complete(url, p) for p in PROMPTS[:2]]  # one prompt per request (two more steps)
    assert [json.loads(raw)["choices"][0]["token_ids"] for _, raw in single] == group["reference"][:2]

    after = scrape(url)
    # Every prompt position and every generated token but the last goes through each MoE layer once.
    sent = PROMPTS + PROMPTS[:2]
    positions = sum(len(p) + NEW_TOKENS - 1 for p in sent)
    for layer in range(LAYERS):
        counted = metric(after, METRIC_EXPERT_TOKENS, layer=layer) - metric(before, METRIC_EXPERT_TOKENS, layer=layer)
        assert counted == positions * TOP_K
    experts = {dict(items)["expert"] for (name, items) in after if name == METRIC_EXPERT_TOKENS}
    ranks = {dict(items)["rank"] for (name, items) in after if name == METRIC_RANK_TOKENS}
    assert experts == {str(e) for e in range(EXPERTS)} and ranks == {str(r) for r in range(NPROC)}
    assert metric(after, METRIC_RANK_TOKENS) > metric(before, METRIC_RANK_TOKENS)
    # Pairs computed per rank: over the ranks, every (position, k) of every MoE layer once.
    pairs = metric(after, METRIC_RANK_PAIRS) - metric(before, METRIC_RANK_PAIRS)
    assert pairs == positions * TOP_K * LAYERS
    # A token row carries one or more pairs: rows <= pairs.
    assert metric(after, METRIC_RANK_TOKENS) - metric(before, METRIC_RANK_TOKENS) <= pairs
    count = METRIC_REQUEST_LATENCY + "_count"
    assert metric(after, count) - metric(before, count) == 3
    scope = {"moeshard_deployment": "local", "moeshard_namespace": "default", "moeshard_replica": "0"}
    assert metric(after, METRIC_PLACEMENT_VERSION, **scope) == 0
    assert all(scope.items() <= dict(items).items() for (name, items) in after if name.startswith("moeshard_"))


def test_bad_request_gets_a_json_error_and_the_group_keeps_serving(group):
    status, raw = http(group["url"] + "/v1/completions", {"prompt": [1, 128]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt[1]"
    status, raw = http(group["url"] + "/v1/completions", {"prompt": [1, 2], "max_tokens": 255})  # > 256 positions
    assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens"
    status, raw = complete(group["url"], PROMPTS[3])
    assert status == 200 and json.loads(raw)["choices"][0]["token_ids"] == group["reference"][3]


def test_placement_change_under_load_moves_experts_without_failing_a_request(group):
    url, reference = group["url"], group["reference"]
    results: list[tuple[int, int, list[int] | bytes]] = []
    stop = threading.Event()

    def client() -> None:
        for i in range(400):  # bounded; stops earlier when told
            if stop.is_set():
                return
            which = i % len(PROMPTS)
            status, raw = complete(url, PROMPTS[which])
            results.append((which, status, json.loads(raw)["choices"][0]["token_ids"] if status == 200 else raw))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    while len(results) < 4:
        time.sleep(0.05)
    new = moved_placement(1)
    group["mounted"].publish(new.to_json())
    deadline = time.monotonic() + 60
    while metric(scrape(url), METRIC_PLACEMENT_VERSION) != 1:
        assert time.monotonic() < deadline, "version 1 was not adopted"
        time.sleep(0.1)
    adopted_at = len(results)
    while len(results) < adopted_at + 4:
        assert all(t.is_alive() for t in threads) or len(results) >= adopted_at + 4
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    failures = [r for r in results if r[1] != 200]
    assert not failures, failures[:3]
    assert all(tokens == reference[which] for which, _, tokens in results)
    served = json.loads(http(url + "/v1/placement")[1])
    assert served["version"] == 1 and served["layers"] == new.to_dict()["layers"]
    text = group["log"].read_text()
    assert "placement version 1 adopted by all 4 ranks" in text
    # Each rank's runtime reports the weights it received; experts did move between ranks.
    received = [int(n) for n in re.findall(r"rank \d adopted placement version 1 \((\d+) weight transfers received\)", text)]
    assert len(received) == NPROC and sum(received) > 0


def test_corrupt_or_mismatched_placement_changes_nothing(group):
    url, mounted = group["url"], group["mounted"]
    current = json.loads(http(url + "/v1/placement")[1])
    before = metric(scrape(url), METRIC_PLACEMENT_REJECTED)
    wrong_group = moved_placement(2).to_dict()
    wrong_group["numGpus"], wrong_group["slotsPerGpu"] = 2, 2 * SLOTS  # same slots, a 2-rank group
    bad_shares = moved_placement(3).to_dict()
    bad_shares["layers"][1]["weights"][0] += 0.5
    for k, text in enumerate(['{"version": 9, "numGpus": ', json.dumps(wrong_group), json.dumps(bad_shares)], start=1):
        mounted.publish(text)
        deadline = time.monotonic() + 30
        while metric(scrape(url), METRIC_PLACEMENT_REJECTED) < before + k:
            assert time.monotonic() < deadline, f"refusal {k} was not counted"
            time.sleep(0.1)
    time.sleep(0.5)  # several more polls of the last bad file: counted once
    samples = scrape(url)
    assert metric(samples, METRIC_PLACEMENT_REJECTED) == before + 3
    assert metric(samples, METRIC_PLACEMENT_VERSION) == current["version"]
    assert json.loads(http(url + "/v1/placement")[1]) == current
    status, raw = complete(url, PROMPTS[0])
    assert status == 200 and json.loads(raw)["choices"][0]["token_ids"] == group["reference"][0]
    refusals = [line for line in group["log"].read_text().splitlines() if "refused, keeping version" in line]
    assert len(refusals) == 3, refusals  # one line each (rank 0 logs; the other ranks log at debug)
    assert "not valid JSON" in refusals[0] and "numGpus" in refusals[1] and "shares of expert" in refusals[2]


def test_sigterm_drains_and_stops_every_rank(group):
    proc = group["proc"]
    status, _ = complete(group["url"], PROMPTS[1])
    assert status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    text = group["log"].read_text()
    assert "Traceback" not in text, text[-3000:]
