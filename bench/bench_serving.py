"""Benchmark: continuous batching vs the old request-level batching under the same Poisson load.

One process runs both modes, one after the other, on the same seeded trace:
a local group (``moeshard engine launch``, gloo on CPU, one thread per rank)
on a tiny random Qwen3-MoE checkpoint built offline (max_position_embeddings
raised to 4096), requests arriving as a Poisson process with prompt lengths
drawn log-uniformly in 16..2,000 tokens and outputs in 2..256 tokens, every
request streamed (SSE) so the client sees each token when it is produced.

* baseline: ``--request-level`` (the old serving: a batch of whole prompts,
  up to 8,192 prompt tokens, runs to its end before the next is admitted);
* subject: the iteration-level scheduler (``--max-num-batched-tokens 512``:
  chunked prefill, decodes first, requests join between steps).

Reported per mode: output tokens/s over the trace, p50/p99 time to first
token, p50/p99 inter-token latency, p99 TTFT of the short requests (prompt
<= 64, output <= 16) in the trace, and of the same short requests sent alone
to the idle group, and how many requests failed. Nothing passes or fails on
time.

    .venv/bin/python bench/bench_serving.py [--quick] [--nproc 4] [--requests 40] [--rate 1.0] [--out PATH]
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import standard_parser, write_result  # noqa: E402
from moeshard.engine.verify import make_tiny_model  # noqa: E402

SHORT_PROMPT, SHORT_OUTPUT = 64, 16


def make_trace(count: int, rate: float, seed: int) -> list[dict]:
    """Seeded arrivals: [{at, prompt, max_tokens}], prompt 16..2000 and output 2..256 tokens (log-uniform)."""
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0 / rate, count)) - 0.0
    prompts = np.exp(rng.uniform(np.log(16), np.log(2000), count)).astype(int)
    outputs = np.exp(rng.uniform(np.log(2), np.log(256), count)).astype(int)
    return [{"at": float(at[i]), "prompt": [int(t) for t in rng.integers(1, 127, prompts[i])],
             "max_tokens": int(outputs[i])} for i in range(count)]


def is_short(item: dict) -> bool:
    return len(item["prompt"]) <= SHORT_PROMPT and item["max_tokens"] <= SHORT_OUTPUT


def stream_one(url: str, item: dict) -> dict:
    """Send one streamed completion; token arrival times relative to the send."""
    body = {"prompt": item["prompt"], "max_tokens": item["max_tokens"], "ignore_eos": True, "temperature": 0,
            "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start, times, tokens = time.monotonic(), [], 0
    try:
        with urllib.request.urlopen(request, timeout=900) as resp:
            for line in resp:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                count = len(chunk["choices"][0]["token_ids"]) if chunk["choices"] else 0
                if count:
                    times.append(time.monotonic() - start)
                    tokens += count
    except OSError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": tokens == item["max_tokens"], "times": times, "tokens": tokens, "sent": start}


def run_trace(url: str, trace: list[dict]) -> list[dict]:
    results: list[dict] = [{} for _ in trace]
    t0 = time.monotonic()

    def worker(i: int) -> None:
        delay = trace[i]["at"] - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)
        results[i] = stream_one(url, trace[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(trace))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(trace: list[dict], results: list[dict], alone: list[dict]) -> dict:
    ok = [r for r in results if r.get("ok")]
    ttft = [r["times"][0] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    span = max(r["sent"] + r["times"][-1] for r in ok) - min(r["sent"] for r in ok) if ok else None
    short = [i for i, item in enumerate(trace) if is_short(item)]
    short_ttft = [results[i]["times"][0] for i in short if results[i].get("ok")]
    alone_ttft = [r["times"][0] for r in alone if r.get("ok")]
    p99_short, p99_alone = percentile(short_ttft, 99), percentile(alone_ttft, 99)
    return {
        "requests": len(trace), "failed": len(trace) - len(ok),
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / span if span else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "short_requests": len(short), "short_ttft_p99_in_trace_s": p99_short, "short_ttft_p99_alone_s": p99_alone,
        "short_ttft_ratio": p99_short / p99_alone if p99_short and p99_alone else None,
    }


def start_group(model: Path, nproc: int, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeshard.engine.serving_cli", "launch", "--nproc", str(nproc), "--model", str(model),
         "--port", "0", "--threads", "1", "--log-level", "WARNING", "--idle-interval", "0.05", *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving (http://127\.0\.0\.1:\d+)/", log.read_text())
        if found:
            try:
                with urllib.request.urlopen(found.group(1) + "/readyz", timeout=5):
                    return proc, found.group(1)
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the group did not start:\n{log.read_text()[-3000:]}")


MODES = {
    "request_level": ["--request-level", "--max-num-batched-tokens", "8192"],
    "continuous": ["--max-num-batched-tokens", "512"],
}


def main() -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks in the group (default %(default)s)")
    parser.add_argument("--requests", type=int, default=40, help="requests in the trace (default %(default)s)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (default %(default)s)")
    args = parser.parse_args()
    count = 12 if args.quick else args.requests
    trace = make_trace(count, args.rate, args.seed)
    short = [item for item in trace if is_short(item)]
    if not short:  # always measure a few short requests alone
        short = [{"at": 0.0, "prompt": list(range(1, 33)), "max_tokens": 8}]
    modes = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("qwen3_moe", Path(tmp) / "model")
        config = json.loads((model / "config.json").read_text())
        config["max_position_embeddings"] = 4096
        (model / "config.json").write_text(json.dumps(config))
        for name, flags in MODES.items():
            proc, url = start_group(model, args.nproc, Path(tmp) / f"{name}.log", flags)
            try:
                stream_one(url, {"prompt": [1, 2, 3], "max_tokens": 2})  # warm-up
                alone = [stream_one(url, item) for item in short]
                results = run_trace(url, trace)
                modes[name] = summarize(trace, results, alone)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
            print(name, json.dumps(modes[name]), flush=True)
    base, new = modes["request_level"], modes["continuous"]
    result = {
        "config": {"nproc": args.nproc, "requests": count, "rate_per_s": args.rate, "seed": args.seed,
                   "prompt_tokens": "16-2000 log-uniform", "output_tokens": "2-256 log-uniform",
                   "model": "tiny qwen3_moe", "device": "cpu", "threads_per_rank": 1, "modes": MODES},
        "modes": modes,
        "throughput_ratio": (new["output_tokens_per_s"] / base["output_tokens_per_s"]
                             if new["output_tokens_per_s"] and base["output_tokens_per_s"] else None),
    }
    path = write_result("serving_load", result, args.out)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
