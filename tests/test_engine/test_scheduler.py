"""The iteration-level scheduler on its own (no processes): budget, decodes first, chunking, preemption."""

from __future__ import annotations

import pytest
from moeshard.engine.scheduler import Scheduler, SchedulerConfig, Sequence
from moeshard.engine.step_plan import SampledToken


def _run_step(scheduler: Scheduler, token: int = 7):
    """Plan a step and pretend every sampling chunk produced ``token``."""
    plan = scheduler.schedule()
    done = scheduler.on_step([SampledToken(c.seq_id, token, 0.0) for c in plan.chunks if c.sample])
    return plan, done


def test_budget_is_respected_and_long_prompts_are_chunked():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=10))
    long = scheduler.add(Sequence(tuple(range(25)), max_tokens=2))
    plans = [_run_step(scheduler)[0] for _ in range(3)]
    assert [[(c.start, c.num_tokens, c.sample) for c in p.chunks] for p in plans] == [
        [(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]
    assert all(p.num_tokens <= 10 for p in plans)
    assert long.outputs == [7] and len(long.blocks) == 7  # 26 tokens' worth: room for the next decode
    assert plans[0].new[0].prompt == tuple(range(25)) and not plans[1].new  # the prompt travels once


def test_decodes_go_first_and_new_prompts_fill_the_rest_of_the_budget():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8))
    a = scheduler.add(Sequence((1, 2, 3), max_tokens=5))
    _run_step(scheduler)  # a prefilled, one token out
    b = scheduler.add(Sequence(tuple(range(20)), max_tokens=5))
    plan, _ = _run_step(scheduler)
    assert [(c.seq_id, c.start, c.num_tokens) for c in plan.chunks] == [(a.seq_id, 3, 1), (b.seq_id, 0, 7)]
    plan, _ = _run_step(scheduler)  # a decodes again while b's prefill continues
    assert [(c.seq_id, c.num_tokens) for c in plan.chunks] == [(a.seq_id, 1), (b.seq_id, 7)]


def test_finished_sequences_free_their_blocks_and_are_forgotten_by_the_ranks():
    scheduler = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_num_batched_tokens=64))
    seq = scheduler.add(Sequence((1, 2, 3, 4, 5), max_tokens=2, stop_token_ids=frozenset({9})))
    _run_step(scheduler, token=3)
    assert scheduler.blocks_used == 2
    _, done = _run_step(scheduler, token=9)  # stop token
    assert seq.finish_reason == "stop" and done[0][0] is seq and scheduler.blocks_used == 0
    plan = scheduler.schedule()
    assert plan.kind == "step" and plan.finished == (seq.seq_id,) and not plan.chunks
    assert scheduler.schedule().kind == "idle" and not scheduler.has_work


def test_full_pool_preempts_the_newest_running_sequence_for_recomputation():
    scheduler = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_num_batched_tokens=64))
    old = scheduler.add(Sequence(tuple(range(8)), max_tokens=6))
    new = scheduler.add(Sequence(tuple(range(8)), max_tokens=6))
    _run_step(scheduler)  # 2 blocks each: the pool is full
    plan, _ = _run_step(scheduler)  # old needs a third block: new is preempted, its blocks freed
    assert [c.seq_id for c in plan.chunks] == [old.seq_id]
    assert scheduler.preemptions == 1 and new.computed == 0 and list(scheduler.waiting) == [new]
    while old.finish_reason is None:
        _run_step(scheduler)
    plan, _ = _run_step(scheduler)  # new comes back: prompt + its generated token recomputed in one chunk
    assert [(c.seq_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [(new.seq_id, 0, 9, True)]
    assert not plan.new  # the ranks still know it
    while new.finish_reason is None:
        _run_step(scheduler)
    assert len(new.outputs) == 6 and scheduler.blocks_used == 0


def test_a_waiting_request_waits_for_blocks_instead_of_failing():
    scheduler = Scheduler(SchedulerConfig(num_blocks=3, block_size=4, max_num_batched_tokens=64))
    first = scheduler.add(Sequence(tuple(range(8)), max_tokens=3))
    second = scheduler.add(Sequence(tuple(range(6)), max_tokens=3))
    plan, _ = _run_step(scheduler)
    assert [c.seq_id for c in plan.chunks] == [first.seq_id] and list(scheduler.waiting) == [second]
    while first.finish_reason is None or second.finish_reason is None:
        _run_step(scheduler)
    assert scheduler.preemptions == 0 and len(second.outputs) == 3


def test_a_sequence_that_can_never_fit_is_refused_and_cancel_frees_blocks():
    scheduler = Scheduler(SchedulerConfig(num_blocks=2, block_size=4, max_num_batched_tokens=64))
    with pytest.raises(ValueError, match="exceeds the KV pool"):
        scheduler.add(Sequence(tuple(range(8)), max_tokens=4))
    seq = scheduler.add(Sequence(tuple(range(5)), max_tokens=3))
    _run_step(scheduler)
    scheduler.finish(seq, "abort")
    assert scheduler.blocks_free == 2 and scheduler.schedule().finished == (seq.seq_id,)


def test_sequences_spread_over_dp_groups_with_their_own_pools():
    scheduler = Scheduler(SchedulerConfig(num_blocks=2, block_size=4, max_num_batched_tokens=64, dp_size=2))
    a, b = (scheduler.add(Sequence(tuple(range(6)), max_tokens=2)) for _ in range(2))
    plan, _ = _run_step(scheduler)
    assert {n.dp_group for n in plan.new} == {0, 1} and a.blocks == [0, 1] and b.blocks == [0, 1]


def test_request_level_mode_admits_only_when_nothing_runs():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8,
                                          request_level=True))
    a = scheduler.add(Sequence(tuple(range(20)), max_tokens=3))
    plan, _ = _run_step(scheduler)
    assert [(c.num_tokens, c.sample) for c in plan.chunks] == [(20, True)]  # whole prompt, over the budget
    b = scheduler.add(Sequence((1,), max_tokens=1))
    while a.finish_reason is None:
        plan, _ = _run_step(scheduler)
        assert b.seq_id not in [c.seq_id for c in plan.chunks]
    _run_step(scheduler)
    assert b.finish_reason == "length"
