"""Benchmark: what batching requests that arrive together buys a served group.

Launches a local group (``moeshard engine launch``, gloo on CPU, one thread
per rank) on a tiny random checkpoint built offline, then alternates, round by
round over HTTP:

* subject: B completion requests sent at once from B client threads (the step
  loop batches them into one or a few ``runtime.generate`` calls);
* baseline: the same B requests sent one after another (one step each).

Both return the same tokens (checked). Medians of the wall time per round and
the ratio; requests per second. Nothing passes or fails on time.

    .venv/bin/python bench/bench_serving.py [--quick] [--nproc 4] [--batch 8] [--out PATH]
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import alternate, standard_parser, write_result  # noqa: E402

from moeshard.engine.verify import make_tiny_model  # noqa: E402


def post(url: str, body: dict) -> list[int]:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["token_ids"]


def start_group(model: Path, nproc: int, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeshard.engine.serving_cli", "launch", "--nproc", str(nproc), "--model", str(model),
         "--port", "0", "--threads", "1", "--log-level", "WARNING"],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"serving (http://127\.0\.0\.1:\d+)/", log.read_text())
        if found:
            try:
                with urllib.request.urlopen(found.group(1) + "/readyz", timeout=5):
                    return proc, found.group(1)
            except OSError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the group did not start:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks in the group (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="requests per round (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default %(default)s)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("qwen3_moe", Path(tmp) / "model")
        proc, url = start_group(model, args.nproc, Path(tmp) / "launch.log")
        try:
            bodies = [{"prompt": [1 + i, 17 + i, 33 + i, 49 + i], "max_tokens": args.max_tokens, "ignore_eos": True}
                      for i in range(args.batch)]
            pool = ThreadPoolExecutor(args.batch)
            together = lambda: list(pool.map(lambda b: post(url, b), bodies))  # noqa: E731
            one_by_one = lambda: [post(url, b) for b in bodies]  # noqa: E731
            same = together() == one_by_one()
            timing = alternate(together, one_by_one, repeats=repeats, warmup=1)
            pool.shutdown()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    result = {
        "config": {"nproc": args.nproc, "batch": args.batch, "max_tokens": args.max_tokens, "model": "tiny qwen3_moe",
                   "device": "cpu", "threads_per_rank": 1},
        "same_tokens": same,
        "together_median_s": timing["subject_median_s"],
        "one_by_one_median_s": timing["baseline_median_s"],
        "speedup": timing["speedup"],
        "together_requests_per_s": args.batch / timing["subject_median_s"],
        "one_by_one_requests_per_s": args.batch / timing["baseline_median_s"],
        "repeats": timing["repeats"],
    }
    path = write_result("serving_batching", result, args.out)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
