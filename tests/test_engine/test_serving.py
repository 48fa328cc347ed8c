"""The serving stack on one rank without a model: request schema, HTTP API, step loop, shutdown.

A fake runtime stands in for the model (next token = last token + 1), so
these checks run in-process in a second: the schema names the bad field,
the API answers every route with JSON, stop tokens and max_tokens end a
choice, the step loop serves requests that arrive while others run, a
stalled loop turns /healthz 503, and a drain answers what is running.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from moeshard.engine.api_schema import RequestError, ServingLimits, parse_request
from moeshard.engine.api_server import ApiServer, ServingState
from moeshard.engine.sampling import GenerationDefaults
from moeshard.engine.scheduler import Scheduler, SchedulerConfig
from moeshard.engine.step_loop import Intake, StepLoop
from moeshard.engine.step_plan import LocalChannel, SampledToken

VOCAB = 32
LIMITS = ServingLimits(vocab_size=VOCAB, defaults=GenerationDefaults(eos_token_ids=(VOCAB - 1,)), max_model_len=64,
                       model_name="fake")


class FakeRuntime:
    """Samples last token + 1 (mod VOCAB) for every sampling chunk; ``gate`` holds a step until set."""

    placement, placement_version = None, 0

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.last, self.steps = gate, {}, 0

    def execute(self, plan):
        if self.gate is not None:
            self.gate.wait(30)
        self.steps += 1
        for new in plan.new:
            self.last[new.seq_id] = new.prompt[-1]
        out = []
        for chunk in plan.chunks:
            if chunk.sample:
                self.last[chunk.seq_id] = (self.last[chunk.seq_id] + 1) % VOCAB
                out.append(SampledToken(chunk.seq_id, self.last[chunk.seq_id], -0.5))
        return out

    def expert_token_counts(self):
        return np.zeros((1, 2), dtype=np.int64)

    def rank_token_counts(self):
        return np.zeros(1, dtype=np.int64)

    rank_pair_counts = rank_token_counts


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, VOCAB]}, "prompt[1]"),
    ({"prompt": [[1], [-1]]}, "prompt[1][0]"),
    ({"prompt": "hello"}, "prompt"),  # text without a tokenizer
    ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1], "max_tokens": 64}, "max_tokens"),  # 1 + 64 > max_model_len
    ({"prompt": [1], "n": 0}, "n"),
    ({"prompt": [1], "stream": "yes"}, "stream"),
    ({"prompt": [1], "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": [1], "temperature": "hot"}, "temperature"),
    ({"prompt": [1], "top_p": 0}, "top_p"),
    ({"prompt": [1], "logprobs": True}, "logprobs"),
    ({"prompt": [1], "stop": "x"}, "stop"),  # stop strings without a tokenizer
    ({"prompt": [1], "stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"prompt": [1], "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": [1], "tempreature": 0.5}, "tempreature"),  # unknown field
    ({"prompt": [1], "echo": True}, "echo"),
])
def test_bad_completion_requests_name_the_field(body, param):
    with pytest.raises(RequestError) as error:
        parse_request(body, LIMITS, chat=False)
    assert error.value.param == param and error.value.status == 400


def test_chat_needs_a_template_and_a_wrong_model_is_404():
    with pytest.raises(RequestError) as error:
        parse_request({"messages": [{"role": "user", "content": "x"}]}, LIMITS, chat=True)
    assert error.value.param == "messages"
    with pytest.raises(RequestError) as wrong:
        parse_request({"prompt": [1], "model": "other"}, LIMITS, chat=False)
    assert wrong.value.status == 404 and "'fake'" in wrong.value.message


def test_request_fields_become_a_generation_request():
    spec = parse_request({"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 5, "stop_token_ids": [7], "seed": 3,
                          "temperature": 0.5, "stream": True, "stream_options": {"include_usage": True}},
                         LIMITS, chat=False)
    assert spec.prompts == ((1, 2), (3,)) and spec.n == 2 and spec.max_tokens == 5
    assert spec.stop_token_ids == {7, VOCAB - 1} and spec.params.seed == 3 and spec.include_usage
    assert parse_request({"prompt": [1], "ignore_eos": True}, LIMITS, chat=False).stop_token_ids == frozenset()


class OneRank:
    """An API server and a one-rank step loop around a FakeRuntime, in threads of this process."""

    def __init__(self, runtime: FakeRuntime, num_blocks: int = 64):
        self.runtime = runtime
        self.state = ServingState(request_timeout=30, stall_timeout=0.3)
        self.intake = Intake()
        self.loop = StepLoop(runtime, LocalChannel(), scheduler=Scheduler(SchedulerConfig(num_blocks=num_blocks,
                                                                                            block_size=4)),
                             intake=self.intake, idle_interval=0.02)
        self.state.limits, self.state.intake, self.state.ready = LIMITS, self.intake, True
        self.state.stall_probe = self.loop.stall_seconds
        self.server = ApiServer(self.state, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def request(self, path: str, body=None, method: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def close(self):
        self.loop.stop_event.set()
        self.thread.join(timeout=10)
        self.server.stop()


@pytest.fixture
def one_rank():
    server = OneRank(FakeRuntime())
    yield server
    server.close()


def test_completions_stop_tokens_and_max_tokens(one_rank):
    status, raw = one_rank.request("/v1/completions", {"prompt": [[3, 4], [VOCAB - 3]], "max_tokens": 4})
    assert status == 200, raw
    choices = json.loads(raw)["choices"]
    assert choices[0]["token_ids"] == [5, 6, 7, 8] and choices[0]["finish_reason"] == "length"
    assert choices[1]["token_ids"] == [VOCAB - 2] and choices[1]["finish_reason"] == "stop"  # EOS not shown
    status, raw = one_rank.request("/v1/completions", {"prompt": [3], "max_tokens": 4, "stop_token_ids": [5]})
    assert json.loads(raw)["choices"][0]["token_ids"] == [4]


def test_routes_answer_json(one_rank):
    assert one_rank.request("/healthz")[0] == 200 and one_rank.request("/readyz")[0] == 200
    assert json.loads(one_rank.request("/v1/models")[1])["data"][0]["id"] == "fake"
    status, raw = one_rank.request("/v1/nothing")
    assert status == 404 and "error" in json.loads(raw)
    status, raw = one_rank.request("/v1/completions", method="GET")
    assert status == 405 and "error" in json.loads(raw)
    status, raw = one_rank.request("/v1/completions", {"prompt": [1], "temperature": "hot"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "temperature"


def test_requests_join_while_others_run_and_a_stalled_loop_fails_healthz():
    gate = threading.Event()
    server = OneRank(FakeRuntime(gate))
    try:
        answers = []
        threads = [threading.Thread(target=lambda p=p: answers.append(server.request(
            "/v1/completions", {"prompt": [p], "max_tokens": 3}))) for p in (1, 10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.loop.stall_seconds() <= 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.request("/healthz")[0] == 503  # a step is held: no boundary for longer than the timeout
        gate.set()
        for t in threads:
            t.join(30)
        assert sorted(json.loads(raw)["choices"][0]["token_ids"] for _, raw in answers) == [[2, 3, 4], [11, 12, 13]]
        assert server.request("/healthz")[0] == 200
    finally:
        gate.set()
        server.close()
