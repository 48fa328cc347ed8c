"""``moeshard demo``: the whole loop on one machine, no cluster and no GPU needed.

1. plan the built-in default deployment (Qwen3-235B-A22B on GB200 NVL72);
2. write a tiny random Qwen3-MoE checkpoint (offline);
3. launch a 4-rank EP group (attention TP 2) on CPU processes, serving HTTP;
4. send skewed traffic and read the per-expert counts from /metrics;
5. rebalance: a new placement from those counts, written to the watched file;
6. the group adopts it without a restart; the same traffic again, and the
   measured per-rank load before and after.

The demo is a client of the engine (it starts ``moeshard engine`` as
processes and talks HTTP), so this module, like the rest of the operator,
never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..api import parse_resource
from ..balancer import rebalance_placement
from moeshard.core.layout import max_over_mean
from moeshard.core.naming import METRIC_EXPERT_TOKENS, METRIC_PLACEMENT_VERSION, METRIC_RANK_PAIRS
from moeshard.core.placement import Placement, gpu_loads, initial_placement, parse_placement
from ..planner import plan_for_spec
from .plan import DEFAULT_DEPLOYMENT, format_table, load_resource

HELP = "Run the whole loop locally on CPU: plan, tiny model, 4-rank engine, skewed traffic, rebalance, reload."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="folder for the checkpoint, placement and logs (default: a temp folder)")
    parser.add_argument("--nproc", type=int, default=4, help="engine ranks (EP), default 4")
    parser.add_argument("--tp", type=int, default=2, help="attention TP, default 2")
    parser.add_argument("--redundant-slots", type=int, default=4, help="extra expert slots for replicas (default 4)")
    parser.add_argument("--requests", type=int, default=24, help="completions per traffic round (default 24)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the group (default 180)")


def _step(number: int, text: str) -> None:
    print(f"[{number}/6] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, payload: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _scrape(base: str) -> dict[str, dict[tuple, float]]:
    """metric name -> {label tuple: value} for the series the demo reads."""
    from prometheus_client.parser import text_string_to_metric_families  # engine extra: the operator image has none
    _, body = _get(f"{base}/metrics")
    wanted = {METRIC_EXPERT_TOKENS: ("layer", "expert"), METRIC_RANK_PAIRS: ("rank",), METRIC_PLACEMENT_VERSION: ()}
    out: dict[str, dict[tuple, float]] = {name: {} for name in wanted}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name in wanted:
                key = tuple(int(sample.labels[k]) for k in wanted[sample.name])
                out[sample.name][key] = sample.value
    return out


def _expert_loads(metrics: dict, layers: int, experts: int) -> np.ndarray:
    loads = np.zeros((layers, experts))
    for (layer, expert), value in metrics[METRIC_EXPERT_TOKENS].items():
        loads[layer, expert] = value
    return loads


def _rank_loads(metrics: dict, ranks: int) -> np.ndarray:
    return np.array([metrics[METRIC_RANK_PAIRS].get((r,), 0.0) for r in range(ranks)])


def _traffic(base: str, requests: int) -> list[list[int]]:
    """Skewed traffic: most prompts repeat a few token patterns, so a few experts run hot."""
    rng = np.random.default_rng(7)
    hot = [[5, 9, 5, 9, 5, 9, 5, 9], [17, 17, 17, 17, 17, 17], [3, 30, 3, 30, 3, 30]]
    outputs = []
    for i in range(requests):
        prompt = hot[i % len(hot)] if i % 4 else [int(t) for t in rng.integers(1, 120, size=6)]
        reply = _post(f"{base}/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        outputs.append(reply["choices"][0].get("token_ids") or reply["choices"][0]["text"])
    return outputs


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="moeshard-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "moeshard.cli.main"]

    plan = plan_for_spec(parse_resource(load_resource(str(DEFAULT_DEPLOYMENT))))
    _step(1, "plan the built-in default deployment")
    print("      " + next(line for line in format_table(plan).splitlines() if line.startswith("chosen:")))

    _step(2, f"write a tiny random Qwen3-MoE checkpoint to {workdir / 'model'}")
    subprocess.run([*cli, "engine", "make-tiny-model", "--arch", "qwen3_moe", "--out", str(workdir / "model")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = json.loads((workdir / "model" / "config.json").read_text())
    layers = config["num_hidden_layers"]
    experts = config.get("num_experts") or config.get("num_local_experts")
    top_k = config["num_experts_per_tok"]
    slots = experts + args.redundant_slots
    if slots % args.nproc:
        raise ValueError(f"--redundant-slots: {experts} experts + {args.redundant_slots} must divide by --nproc {args.nproc}")
    placement_file = workdir / "placement.json"
    placement = initial_placement(layers, experts, args.nproc, slots // args.nproc)
    placement_file.write_text(placement.to_json())
    print(f"      {layers} layers, {experts} experts, top-{top_k}; {args.nproc} ranks x {slots // args.nproc} slots")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(workdir / "engine.log", "w")
    _step(3, f"launch {args.nproc} engine ranks (EP {args.nproc}, attention TP {args.tp}) serving {base}")
    engine = subprocess.Popen(
        [*cli, "engine", "launch", "--nproc", str(args.nproc), "--tp", str(args.tp), "--model", str(workdir / "model"),
         "--port", str(port), "--placement", str(placement_file), "--threads", "1", "--placement-poll", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if engine.poll() is not None:
                raise RuntimeError(f"the engine group exited with {engine.returncode}; see {workdir / 'engine.log'}")
            try:
                if _get(f"{base}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine group was not ready after {args.timeout:.0f} s")
            time.sleep(0.3)

        _step(4, f"send {args.requests} skewed completions and read per-expert counts from /metrics")
        start = _scrape(base)
        first = _traffic(base, args.requests)
        after_first = _scrape(base)
        loads = _expert_loads(after_first, layers, experts) - _expert_loads(start, layers, experts)
        ranks_before = _rank_loads(after_first, args.nproc) - _rank_loads(start, args.nproc)
        print(f"      tokens per expert (layer 0): {loads[0].astype(int).tolist()}")
        print(f"      (token, expert) pairs computed per rank: {ranks_before.astype(int).tolist()} "
              f"(max/mean {max_over_mean(ranks_before):.3f})")

        _step(5, "rebalance: new placement from the measured counts")
        current = parse_placement(placement_file.read_text())
        result = rebalance_placement(loads, args.nproc, current.slots_per_gpu, previous=current)
        new: Placement = result.placement
        predicted_old = gpu_loads(current, loads)
        predicted_new = gpu_loads(new, loads)
        print(f"      predicted max/mean GPU load per layer: {np.round(predicted_old.max(1) / predicted_old.mean(1), 3).tolist()}"
              f" -> {np.round(predicted_new.max(1) / predicted_new.mean(1), 3).tolist()};"
              f" {int(result.moves.sum())} expert copies move")
        tmp = placement_file.with_suffix(".tmp")
        tmp.write_text(new.to_json())
        os.replace(tmp, placement_file)  # atomic, like a ConfigMap update

        _step(6, f"the group adopts placement version {new.version} without a restart; same traffic again")
        while _scrape(base)[METRIC_PLACEMENT_VERSION].get((), 0) < new.version:
            if time.monotonic() > deadline:
                raise TimeoutError("the group did not adopt the new placement")
            time.sleep(0.2)
        before_second = _scrape(base)
        second = _traffic(base, args.requests)
        after_second = _scrape(base)
        ranks_after = _rank_loads(after_second, args.nproc) - _rank_loads(before_second, args.nproc)
        loads_second = _expert_loads(after_second, layers, experts) - _expert_loads(before_second, layers, experts)
        expected = gpu_loads(new, loads_second).sum(axis=0)
        print(f"      expected from the counts and the shares: {np.round(expected).astype(int).tolist()}")
        print(f"      (token, expert) pairs computed per rank: {ranks_after.astype(int).tolist()} "
              f"(max/mean {max_over_mean(ranks_after):.3f}, was {max_over_mean(ranks_before):.3f})")
        same = first == second
        print(f"      completions identical before and after the move: {same}")
        print(f"done; files in {workdir}")
        return 0 if same else 1
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
        log.close()
