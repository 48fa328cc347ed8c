"""Serving: request validation, HTTP handling, batching and the step loop, on one rank.

The runtime here is a small deterministic test double that honours the
EngineRuntime contract (collective generate, per-expert counts); the same
loop against the real runtime and a 4-rank group is in test_serving_group.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from moeshard.engine.metrics import EngineMetrics, MetricScope
from moeshard.engine.reload import PlacementWatcher
from moeshard.engine.serving import (
    CompletionRequest,
    LocalChannel,
    RequestError,
    RequestQueue,
    ServingLimits,
    ServingState,
    StepCommand,
    StepLoop,
    finish_completion,
    parse_completion_request,
    start_http_server,
)
from moeshard.core.naming import METRIC_EXPERT_TOKENS, METRIC_PLACEMENT_VERSION
from moeshard.core.placement import initial_placement

VOCAB, LAYERS, EXPERTS, TOP_K = 50, 2, 4, 2


def next_token(token: int) -> int:
    return (token * 7 + 3) % VOCAB


class FakeRuntime:
    """Greedy 'model': next = (7 t + 3) mod V. Each processed position routes to experts t%E and (t+1)%E."""

    rank, world_size = 0, 1

    def __init__(self, gate: threading.Event | None = None):
        self.placement = initial_placement(LAYERS, EXPERTS, 1, EXPERTS)
        self.gate = gate
        self.entered = threading.Event()  # set when generate starts
        self.calls: list[tuple[list[list[int]], list[int], list[set[int]]]] = []  # (prompts, budgets, stop sets)
        self.counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
        self.applied: list[int] = []

    @property
    def placement_version(self) -> int:
        return self.placement.version

    def generate(self, prompts, max_new_tokens, eos_token_id=None, stop_token_ids=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        stops = [set(s) | ({eos_token_id} if eos_token_id is not None else set())
                 for s in (stop_token_ids or [set() for _ in prompts])]
        self.calls.append((prompts, budgets, stops))
        outputs = []
        for prompt, budget, stop in zip(prompts, budgets, stops):
            seq, new = list(prompt), []
            while len(new) < budget:
                new.append(next_token(seq[-1]))
                seq.append(new[-1])
                if new[-1] in stop:
                    break
            for token in seq[:-1]:  # the last generated token is never fed back
                self.counts[:, token % EXPERTS] += 1
                self.counts[:, (token + 1) % EXPERTS] += 1
            outputs.append(new)
        return outputs

    def expert_token_counts(self):
        return self.counts.copy()

    def rank_token_counts(self):
        return np.array([self.counts[0].sum() // TOP_K])

    def rank_pair_counts(self):
        return np.array([self.counts[0].sum()])

    def apply_placement(self, placement):
        self.applied.append(placement.version)
        self.placement = placement

    def close(self):
        pass


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = next_token(last)
        out.append(last)
    return out


LIMITS = ServingLimits(vocab_size=VOCAB, eos_token_ids=(VOCAB - 1,), max_batch_prompts=8, max_model_len=64,
                       model_name="fake")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": [1, VOCAB]}, "prompt[1]"),
        ({"prompt": [[1], [-1]]}, "prompt[1][0]"),
        ({"prompt": [[1], []]}, "prompt[1]"),
        ({"prompt": "hello"}, "prompt"),  # text without a tokenizer
        ({"prompt": [[1]] * 9}, "prompt"),  # over the batch limit
        ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1], "max_tokens": "3"}, "max_tokens"),
        ({"prompt": [1], "max_tokens": 64}, "max_tokens"),  # 1 + 64 > max_model_len
        ({"prompt": [1], "n": 2}, "n"),
        ({"prompt": [1], "stream": True}, "stream"),
        ({"prompt": [1], "logprobs": 3}, "logprobs"),
        ({"prompt": [1], "stop": "x"}, "stop"),  # stop strings without a tokenizer
        ({"prompt": [1], "stop": [1]}, "stop"),
        ({"prompt": [1], "stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"prompt": [1], "ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(RequestError) as info:
        parse_completion_request(body, LIMITS)
    assert info.value.param == param
    assert info.value.status == 400
    assert info.value.body()["error"]["param"] == param


def test_request_forms():
    one = parse_completion_request({"prompt": [1, 2, 3], "max_tokens": 4}, LIMITS)
    assert one.prompts == ((1, 2, 3),) and one.max_tokens == 4 and VOCAB - 1 in one.stop_token_ids
    many = parse_completion_request({"prompt": [[1], [2, 3]], "ignore_eos": True, "stop_token_ids": [7]}, LIMITS)
    assert many.prompts == ((1,), (2, 3)) and many.max_tokens == LIMITS.default_max_tokens
    assert many.stop_token_ids == frozenset({7})


class CharTokenizer:
    """One token per character, ids = ord(c) - 96 ('a' = 1)."""

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 96) for i in ids)


def test_text_prompts_and_stop_strings():
    limits = ServingLimits(vocab_size=40, tokenizer=CharTokenizer())
    request = parse_completion_request({"prompt": ["ab", "c"], "stop": "de", "max_tokens": 6}, limits)
    assert request.prompts == ((1, 2), (3,)) and request.text_prompt
    tokens, text, reason = finish_completion([3, 4, 5, 6, 7], request, limits.tokenizer)  # "cdefg"
    assert (tokens, text, reason) == ([3, 4, 5], "c", "stop")
    tokens, text, reason = finish_completion([1, 1], request, limits.tokenizer)
    assert (tokens, text, reason) == ([1, 1], "aa", "length")


def test_stop_tokens_cut_the_answer():
    request = CompletionRequest(((1,),), 5, frozenset({9}), (), False)
    assert finish_completion([4, 9, 2], request, None) == ([4], None, "stop")
    assert finish_completion([4, 2, 2, 2, 2], request, None) == ([4, 2, 2, 2, 2], None, "length")


def test_queue_batches_whole_requests_in_order():
    q = RequestQueue()
    sizes = [3, 2, 4, 1]
    for size in sizes:
        q.submit(CompletionRequest(tuple((1,) for _ in range(size)), 1, frozenset(), (), False))
    first = q.take_batch(max_prompts=6, wait=0)
    assert [len(p.request.prompts) for p in first] == [3, 2]
    second = q.take_batch(max_prompts=6, wait=0)
    assert [len(p.request.prompts) for p in second] == [4, 1]
    assert q.empty() and q.take_batch(6, wait=0) == []


def test_a_request_over_the_step_token_cap_is_refused():
    limits = ServingLimits(vocab_size=VOCAB, max_batch_prompts=8, max_model_len=64, max_num_batched_tokens=4)
    assert parse_completion_request({"prompt": [1, 2, 3, 4]}, limits).prompt_tokens == 4
    with pytest.raises(RequestError) as info:
        parse_completion_request({"prompt": [[1, 2], [3, 4, 5]]}, limits)  # 5 tokens across its prompts
    assert info.value.param == "prompt" and "max_num_batched_tokens" in info.value.message


def test_queue_caps_the_prompt_tokens_of_a_batch():
    q = RequestQueue()
    for size in [3, 2, 4, 1]:  # prompt tokens of one-prompt requests
        q.submit(CompletionRequest((tuple(range(size)),), 1, frozenset(), (), False))
    taken = [[p.request.prompt_tokens for p in q.take_batch(max_prompts=8, wait=0, max_tokens=5)] for _ in range(3)]
    assert taken == [[3, 2], [4, 1], []]


def test_a_batch_window_gathers_requests_sent_together():
    q = RequestQueue()
    request = CompletionRequest(((1,),), 1, frozenset(), (), False)
    q.submit(request)
    taken = []
    worker = threading.Thread(target=lambda: taken.extend(q.take_batch(max_prompts=4, wait=1.0, window=5.0)))
    worker.start()
    time.sleep(0.2)  # the worker holds the first request and waits inside its window
    q.submit(request)
    q.submit(request)
    q.submit(request)  # the fourth prompt fills the batch: no need to wait out the window
    worker.join(timeout=10)
    assert not worker.is_alive() and len(taken) == 4
    q.submit(request)
    q.submit(request)
    assert len(q.take_batch(max_prompts=4, wait=0)) == 2  # no window: what is queued now


def test_each_prompt_carries_its_own_stop_set():
    q = RequestQueue()
    stops = parse_completion_request({"prompt": [1]}, LIMITS)
    ignores = parse_completion_request({"prompt": [[2], [3]], "ignore_eos": True, "max_tokens": 3,
                                        "stop_token_ids": [9, 4]}, LIMITS)
    assert StepCommand.for_batch([q.submit(stops)], LIMITS).stop_token_ids == ((VOCAB - 1,),)
    command = StepCommand.for_batch([q.submit(stops), q.submit(ignores)], LIMITS)
    assert command.prompts == ((1,), (2,), (3,)) and command.max_new_tokens == (16, 3, 3)
    assert command.stop_token_ids == ((VOCAB - 1,), (4, 9), (4, 9))  # ignore_eos: no eos for the second request


def test_a_cancelled_request_is_never_taken():
    q = RequestQueue()
    requests = [CompletionRequest(((i,),) * (1 + i // 3), 1, frozenset(), (), False) for i in range(4)]
    first, second, third, fourth = [q.submit(r) for r in requests]  # 1, 1, 1 and 2 prompts
    second.future.cancel()  # its client timed out while it was queued
    assert q.take_batch(max_prompts=3, wait=0) == [first, third]  # the fourth does not fit and is held
    assert not q.empty()
    fourth.future.cancel()  # cancelled while held for the next batch
    assert q.take_batch(max_prompts=3, wait=0) == [] and q.empty() and q.dropped == 2
    assert first.future.running() and not first.future.cancel()  # taken: too late to cancel, it will be answered


# --------------------------------------------------------------------------- HTTP + loop on one rank


class OneRankServer:
    def __init__(self, runtime: FakeRuntime, placement_file: str | None = None, limits: ServingLimits = LIMITS):
        self.runtime = runtime
        self.state = ServingState(request_timeout=20)
        self.metrics = EngineMetrics(MetricScope("dep", "ns", 3), num_layers=LAYERS, num_experts=EXPERTS, world_size=1)
        self.queue = RequestQueue()
        watcher = None
        if placement_file:
            watcher = PlacementWatcher(placement_file, runtime.placement, poll_interval=0.0,
                                       on_reject=lambda _p: self.metrics.count_rejected_placement())
        self.loop = StepLoop(runtime, LocalChannel(), limits=limits, watcher=watcher, metrics=self.metrics,
                             queue=self.queue, idle_interval=0.02, on_placement=self.state.set_placement)
        self.state.limits, self.state.queue, self.state.metrics = limits, self.queue, self.metrics
        self.state.stall_probe = self.loop.stall_seconds
        self.state.set_placement(runtime.placement)
        self.state.world_size, self.state.ready = 1, True
        self.server, _ = start_http_server(self.state, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def close(self):
        self.loop.stop_event.set()
        self.thread.join(timeout=10)
        self.server.shutdown()
        self.server.server_close()
        assert not self.thread.is_alive()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


@pytest.fixture
def one_rank():
    server = OneRankServer(FakeRuntime())
    yield server
    server.close()


def test_completions_over_http(one_rank):
    status, raw = one_rank.request("POST", "/v1/completions", {"prompt": [[5, 6], [7]], "max_tokens": 4, "ignore_eos": True})
    assert status == 200, raw
    body = json.loads(raw)
    assert body["object"] == "text_completion" and body["model"] == "fake"
    assert [c["token_ids"] for c in body["choices"]] == [expected_tokens([5, 6], 4), expected_tokens([7], 4)]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    # Per-expert counts: (prompt + generated - 1) positions x top-K, in every layer.
    metrics = one_rank.request("GET", "/metrics")[1].decode()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith(METRIC_EXPERT_TOKENS + "{") and 'layer="0"' in line)
    assert total == ((2 + 4 - 1) + (1 + 4 - 1)) * TOP_K
    assert 'moeshard_deployment="dep"' in metrics and 'moeshard_replica="3"' in metrics


def test_eos_ends_a_completion(one_rank):
    # From 4: 31, 14, 1, 10, 23, 14, ... no eos; pick a prompt whose chain hits 49 (= eos): 49 = 7 t + 3 mod 50 -> t = 28.
    status, raw = one_rank.request("POST", "/v1/completions", {"prompt": [28], "max_tokens": 5})
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["token_ids"] == [] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status", "param"),
    [
        ("POST", "/v1/completions", None, b"{not json", 400, None),
        ("POST", "/v1/completions", None, b"[1, 2]", 400, None),
        ("POST", "/v1/completions", {"prompt": [1, 99]}, None, 400, "prompt[1]"),
        ("POST", "/v1/completions", {"prompt": [1], "max_tokens": -1}, None, 400, "max_tokens"),
        ("POST", "/v1/chat", {"prompt": [1]}, None, 404, None),
        ("GET", "/v1/completions", None, None, 405, None),
        ("GET", "/nope", None, None, 404, None),
    ],
)
def test_bad_http_requests_get_json_errors_and_the_loop_survives(one_rank, method, path, body, raw, status, param):
    got, answer = one_rank.request(method, path, body, raw)
    assert got == status
    error = json.loads(answer)["error"]
    assert error["param"] == param and error["message"]
    ok, _ = one_rank.request("POST", "/v1/completions", {"prompt": [3], "max_tokens": 2})
    assert ok == 200


def test_health_readiness_and_models(one_rank):
    assert one_rank.request("GET", "/healthz")[0] == 200
    assert json.loads(one_rank.request("GET", "/readyz")[1])["status"] == "ready"
    assert json.loads(one_rank.request("GET", "/v1/models")[1])["data"][0]["id"] == "fake"
    assert json.loads(one_rank.request("GET", "/v1/placement")[1])["version"] == 0
    one_rank.state.accepting = False
    assert one_rank.request("GET", "/readyz")[0] == 503
    assert one_rank.request("POST", "/v1/completions", {"prompt": [1]})[0] == 503


def test_not_ready_while_loading():
    state = ServingState()
    server, _ = start_http_server(state, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
            assert resp.status == 200
        for path in ("/readyz", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url + path, timeout=5)
            assert info.value.code == 503
    finally:
        server.shutdown()
        server.server_close()


def _queue_behind_a_busy_step(server, bodies: list[dict]) -> list[tuple[int, bytes]]:
    """Send [1] first and hold it inside generate (the runtime's gate); queue ``bodies`` behind it,
    then open the gate. Returns every (status, body), the first request's first."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        first = pool.submit(server.request, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2})
        assert server.runtime.entered.wait(timeout=10)  # the first request is inside generate, held by the gate
        rest = [pool.submit(server.request, "POST", "/v1/completions", body) for body in bodies]
        while server.queue._queue.qsize() < len(bodies):
            time.sleep(0.01)
        server.runtime.gate.set()
        return [f.result(timeout=20) for f in [first, *rest]]


def test_requests_that_arrive_together_share_a_step():
    gate = threading.Event()
    server = OneRankServer(FakeRuntime(gate))
    try:
        answers = _queue_behind_a_busy_step(
            server, [{"prompt": [[i], [i + 1]], "max_tokens": 3} for i in (10, 20, 30)])
        assert all(status == 200 for status, _ in answers)
        batch_sizes = [len(prompts) for prompts, _, _ in server.runtime.calls]
        assert batch_sizes == [1, 6]
        for (status, raw), i in zip(answers[1:], (10, 20, 30)):
            assert [c["token_ids"] for c in json.loads(raw)["choices"]] == [expected_tokens([i], 3), expected_tokens([i + 1], 3)]
    finally:
        gate.set()
        server.close()


def test_a_step_never_holds_more_prompt_tokens_than_the_cap():
    gate = threading.Event()
    limits = ServingLimits(vocab_size=VOCAB, max_batch_prompts=8, max_model_len=64, model_name="fake",
                           max_num_batched_tokens=4)
    server = OneRankServer(FakeRuntime(gate), limits=limits)
    try:
        answers = _queue_behind_a_busy_step(
            server, [{"prompt": [[i], [i + 1, i + 2]], "max_tokens": 2} for i in (10, 20, 30)])
        assert all(status == 200 for status, _ in answers)
        # 3 tokens per queued request: two never fit under 4, so each waits for its own step.
        assert [sum(map(len, prompts)) for prompts, _, _ in server.runtime.calls] == [1, 3, 3, 3]
    finally:
        gate.set()
        server.close()


def test_a_request_that_timed_out_is_not_computed_later():
    gate = threading.Event()
    server = OneRankServer(FakeRuntime(gate))
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(server.request, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2})
            assert server.runtime.entered.wait(timeout=10)  # the step loop is busy with the first request
            server.state.request_timeout = 0.2
            status, raw = server.request("POST", "/v1/completions", {"prompt": [2], "max_tokens": 2})
            assert status == 504, raw  # it waited in the queue past the timeout
            server.state.request_timeout = 20
            gate.set()
            assert first.result(timeout=20)[0] == 200
        status, raw = server.request("POST", "/v1/completions", {"prompt": [3], "max_tokens": 2})
        assert status == 200 and json.loads(raw)["choices"][0]["token_ids"] == expected_tokens([3], 2)
        assert [prompts for prompts, _, _ in server.runtime.calls] == [[[1]], [[3]]]  # [2] never reached generate
        assert server.queue.dropped == 1
    finally:
        gate.set()
        server.close()


def test_serving_stops_decoding_at_a_custom_stop_token(one_rank):
    stop = expected_tokens([5], 3)[-1]  # the third token of prompt [5]
    status, raw = one_rank.request("POST", "/v1/completions",
                                   {"prompt": [[5], [7]], "max_tokens": 10, "stop_token_ids": [stop]})
    assert status == 200, raw
    choices = json.loads(raw)["choices"]
    assert choices[0]["token_ids"] == expected_tokens([5], 2) and choices[0]["finish_reason"] == "stop"
    unconstrained = expected_tokens([7], 10)
    want = unconstrained[: unconstrained.index(stop)] if stop in unconstrained else unconstrained
    assert choices[1]["token_ids"] == want  # the same answer finish_completion would cut from a full run
    prompts, budgets, stops = one_rank.runtime.calls[-1]
    assert budgets == [10, 10] and stops == [{stop, VOCAB - 1}] * 2  # custom stop + eos, per prompt


def test_a_deeply_nested_body_gets_400(one_rank):
    depth = 200_000
    status, answer = one_rank.request("POST", "/v1/completions", raw=b"[" * depth + b"]" * depth)
    assert status == 400 and "not valid JSON" in json.loads(answer)["error"]["message"]
    assert one_rank.request("POST", "/v1/completions", {"prompt": [3], "max_tokens": 2})[0] == 200


def test_healthz_turns_503_when_the_step_loop_stalls_with_work_pending():
    gate = threading.Event()  # generate blocks like rank 0 waiting in a collective on a dead rank
    server = OneRankServer(FakeRuntime(gate))
    server.state.stall_timeout = 0.2
    try:
        # Idle for any length of time is healthy.
        assert server.loop.stall_seconds(now=server.loop.boundary_at + 1e6) == 0.0
        assert server.request("GET", "/healthz")[0] == 200
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(server.request, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2})
            assert server.runtime.entered.wait(timeout=10)
            assert server.loop.stall_seconds(now=server.loop.boundary_at + 1.0) >= 1.0
            status, raw = server.request("GET", "/healthz")
            while status == 200:  # the threshold passes a fraction of a second later
                time.sleep(0.05)
                status, raw = server.request("GET", "/healthz")
            assert status == 503 and json.loads(raw)["status"] == "stalled"
            gate.set()
            assert answer.result(timeout=20)[0] == 200
        while server.loop.stall_seconds() > 0:  # the loop reaches its next step boundary
            time.sleep(0.01)
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        gate.set()
        server.close()


def test_placement_reload_and_refusal_on_one_rank(tmp_path, caplog):
    path = tmp_path / "placement.json"
    runtime = FakeRuntime()
    server = OneRankServer(runtime, str(path))
    try:
        moved = runtime.placement.phy2log[:, ::-1].copy()  # same experts, reversed slots
        new = initial_placement(LAYERS, EXPERTS, 1, EXPERTS)
        new_json = json.loads(new.to_json())
        new_json["version"] = 1
        for layer in new_json["layers"]:
            layer["phy2log"] = [int(e) for e in moved[0]]
        path.write_text(json.dumps(new_json))
        deadline = time.monotonic() + 10
        while runtime.applied != [1] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runtime.applied == [1]
        assert json.loads(server.request("GET", "/v1/placement")[1])["layers"][0]["phy2log"] == [3, 2, 1, 0]
        assert f"{METRIC_PLACEMENT_VERSION}{{" in server.request("GET", "/metrics")[1].decode()
        assert server.metrics.registry.get_sample_value(
            METRIC_PLACEMENT_VERSION, {"moeshard_deployment": "dep", "moeshard_namespace": "ns", "moeshard_replica": "3"}) == 1

        caplog.set_level(logging.WARNING, logger="moeshard.engine.reload")
        new_json["version"] = 2
        new_json["numGpus"], new_json["slotsPerGpu"] = 2, EXPERTS // 2  # valid file, wrong group
        path.write_text(json.dumps(new_json))
        deadline = time.monotonic() + 10
        labels = {"moeshard_deployment": "dep", "moeshard_namespace": "ns", "moeshard_replica": "3"}
        while not server.metrics.registry.get_sample_value("moeshard_placement_rejected_total", labels):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # more polls of the same bad file: still one refusal
        assert server.metrics.registry.get_sample_value("moeshard_placement_rejected_total", labels) == 1
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and "numGpus" in refusals[0].getMessage()
        assert runtime.applied == [1] and runtime.placement_version == 1
        assert server.request("POST", "/v1/completions", {"prompt": [4], "max_tokens": 2})[0] == 200
    finally:
        server.close()


def char_level_hf_tokenizer():
    """A real transformers fast tokenizer, built offline: one token per lowercase letter or space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_text_completions_with_a_transformers_tokenizer():
    tokenizer = char_level_hf_tokenizer()
    limits = ServingLimits(vocab_size=VOCAB, max_batch_prompts=8, max_model_len=64, tokenizer=tokenizer, model_name="fake")
    server = OneRankServer(FakeRuntime(), limits=limits)
    try:
        status, raw = server.request("POST", "/v1/completions", {"prompt": ["hi", "ok"], "max_tokens": 3})
        assert status == 200, raw
        body = json.loads(raw)
        for choice, text in zip(body["choices"], ["hi", "ok"]):
            expected = expected_tokens(tokenizer.encode(text), 3)
            assert choice["token_ids"] == expected
            assert choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert body["choices"][0]["text"] == "jqp"  # h i -> 9 16 15
        assert body["usage"]["prompt_tokens"] == 4
        status, raw = server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3, "stop": ["qp", "x"]})
        choice = json.loads(raw)["choices"][0]
        assert status == 200 and choice["finish_reason"] == "stop"
        assert choice["text"] == "j" and choice["token_ids"] == [9, 16, 15]
    finally:
        server.close()
