"""The official ``openai`` client against a local 2-rank group (EP 2, gloo, CPU) with a tokenizer.

The tiny Qwen3-MoE checkpoint gets a character-level tokenizer with a chat
template (tests/support/tiny_tokenizer.py). The group runs with a small KV
pool (24 blocks of 4 tokens per rank) and a step budget of 8 tokens, so
concurrent requests wait for blocks and prompts are prefilled in chunks;
every greedy answer must still equal transformers' argmax. (Preemption by
recomputation is checked exactly in test_serving_paged.py and
test_scheduler.py.)
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from moeshard.engine.verify import make_tiny_model, reference_outputs
from support.tiny_tokenizer import save_tiny_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [[5, 14, 15, 22, 65, 9, 31], [2, 71, 8], list(range(10, 30))]
NEW_TOKENS = 8


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name' or 'name{label="value"}': value}, without the scope labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = [f'{k}="{v}"' for k, v in re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")
                      if not k.startswith("moeshard_")]
            samples[match.group(1) + ("{" + ",".join(labels) + "}" if labels else "")] = float(match.group(3))
    return samples


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    make_tiny_model("qwen3_moe", root / "tiny")
    save_tiny_tokenizer(root / "tiny")
    log_path = root / "launch.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeshard.engine.serving_cli", "launch", "--nproc", "2", "--model", str(root / "tiny"),
         "--port", "0", "--threads", "1", "--idle-interval", "0.05", "--block-size", "4", "--num-kv-blocks", "24",
         "--max-num-batched-tokens", "8", "--grace", "20"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=str(root),
    )
    _, reference = reference_outputs(root / "tiny", PROMPTS, NEW_TOKENS)
    url = None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving (http://127\.0\.0\.1:\d+)/v1/completions", log_path.read_text())
        url = found.group(1) if found else None
        try:
            if url and urllib.request.urlopen(url + "/readyz", timeout=5).status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the group did not become ready:\n{log_path.read_text()[-4000:]}")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"url": url, "client": client, "model": "tiny", "reference": reference}
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=40) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()


def _greedy(client, prompt, **extra):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}, **extra)


def test_models_and_greedy_completions_equal_transformers(group):
    client = group["client"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for prompt, want in zip(PROMPTS, group["reference"]):
        answer = _greedy(client, prompt)
        assert answer.choices[0].model_extra["token_ids"] == want
        assert answer.usage.completion_tokens == NEW_TOKENS and answer.choices[0].finish_reason == "length"


def test_streamed_completion_equals_the_whole_answer_and_reports_usage(group):
    client = group["client"]
    whole = _greedy(client, "Hello there")
    chunks = list(_greedy(client, "Hello there", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == NEW_TOKENS and not chunks[-1].choices


def test_chat_with_template_streaming_and_not(group):
    client = group["client"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 6
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_n_choices_with_a_seed_are_reproducible(group):
    client = group["client"]
    runs = [client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, n=2, seed=1234,
                                      temperature=1.0, extra_body={"ignore_eos": True}) for _ in range(2)]
    ids = [[c.model_extra["token_ids"] for c in sorted(run.choices, key=lambda c: c.index)] for run in runs]
    assert ids[0] == ids[1] and len(ids[0]) == 2
    assert ids[0][0] != ids[0][1]  # the two choices draw from different generators


def test_logprobs_for_completions_and_chat(group):
    client = group["client"]
    answer = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    lp = answer.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - v) < 1e-5 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 3 for entry in content)


def test_stop_string_ends_generation_there(group):
    client = group["client"]
    free = client.completions.create(model="tiny", prompt="The cat", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="The cat", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < free.usage.completion_tokens  # stopped, not cut afterwards
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The cat", max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == cut.choices[0].text


def test_bad_fields_and_wrong_model_are_named(group):
    client = group["client"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", extra_body={"temperature": "hot"})
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="tiny", prompt="x", extra_body={"temprature": 1})
    assert unknown.value.body["param"] == "temprature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert "tiny" in missing.value.body["message"]


def test_fifty_concurrent_mixed_requests_on_a_small_pool_all_finish_correctly(group):
    client, reference = group["client"], group["reference"]

    def one(i: int):
        kind = i % 4
        if kind == 0:  # greedy token ids: must equal transformers despite waiting / preemption
            answer = _greedy(client, PROMPTS[i % 3])
            return answer.choices[0].model_extra["token_ids"] == reference[i % 3]
        if kind == 1:
            chunks = list(_greedy(client, PROMPTS[i % 3], stream=True))
            return sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks) == NEW_TOKENS
        if kind == 2:
            chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}],
                                                  max_tokens=5, extra_body={"ignore_eos": True})
            return chat.usage.completion_tokens == 5
        parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * i}],
                                                    max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
        return parts[-1].choices[0].finish_reason == "length"

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(results), results
    metrics = scrape(group["url"])
    assert metrics['moeshard_kv_blocks{state="used"}'] == 0  # every finished sequence gave its blocks back
    assert metrics["moeshard_time_to_first_token_seconds_count"] >= 50
    assert metrics["moeshard_request_queue_seconds_count"] >= 50 and "moeshard_preemptions_total" in metrics


def test_a_client_that_disconnects_frees_its_blocks(group):
    client, url = group["client"], group["url"]
    stream = client.completions.create(model="tiny", prompt=list(range(1, 40)), max_tokens=50, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # generation has started: it holds blocks
    stream.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = scrape(url)
        if metrics['moeshard_kv_blocks{state="used"}'] == 0 and metrics["moeshard_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert metrics['moeshard_kv_blocks{state="used"}'] == 0
    assert metrics["moeshard_generation_tokens_total"] > 0
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
