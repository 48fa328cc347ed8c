"""Greedy outputs through the scheduler and the paged KV pool equal transformers' argmax.

Each world runs the same deterministic scheduler on every rank with
requests joining mid-flight, prompts longer than the step budget (chunked
prefill) and, in the small-pool cases, preemption by recomputation. The
matrix covers both architectures, EP 4 x TP 2, EP 2 x TP 1 and attention TP
above the KV head count (tiny models have 2 KV heads; TP 4 replicates them).
"""

from __future__ import annotations

import pytest
from moeshard.engine.verify import local_env, reference_outputs, run_world
from support.engine_tasks import scheduled_generate_task

pytestmark = pytest.mark.slow

PROMPTS = [[3, 14, 15, 92, 65], list(range(5, 45)), [2, 71, 82], [1, 41, 42, 13, 56, 62, 37, 9, 8, 7, 6, 5],
           [7]]
JOIN_AT = [0, 0, 2, 3, 5]  # the step before which each prompt arrives
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = reference_outputs(tiny_checkpoint(arch), PROMPTS, NEW_TOKENS)[1]
        return cache[arch]

    return get


@pytest.mark.parametrize("arch, ep, tp, num_blocks", [
    ("qwen3_moe", 4, 2, 64),
    ("mixtral", 2, 1, 64),
    ("qwen3_moe", 4, 4, 64),  # TP above the 2 KV heads: each KV head on 2 ranks
    ("mixtral", 4, 4, 13),  # one DP group, a pool of 52 tokens: preemption and waiting
])
def test_scheduled_greedy_matches_transformers(tiny_checkpoint, references, arch, ep, tp, num_blocks):
    model = tiny_checkpoint(arch)
    env = local_env(model, ep, tp=tp)
    results = run_world(env, scheduled_generate_task, PROMPTS, NEW_TOKENS, JOIN_AT, num_blocks, 4, 16)
    first = results[0]
    assert first["outputs"] == references(arch)
    assert all(r["outputs"] == first["outputs"] for r in results)
    assert first["partial_prefill_steps"] >= 2  # the 40-token prompt took three steps of 16
    assert all(r["registry_left"] == 0 for r in results)  # finished sequences are forgotten everywhere
    if num_blocks == 13:
        assert first["preemptions"] >= 1
