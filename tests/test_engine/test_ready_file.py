"""The ready file: what the readiness probe of every pod of a multi-pod group checks."""

from __future__ import annotations

import dataclasses
import threading
import time

from moeshard.engine.serving import ServeOptions, serve_rank
from moeshard.engine.verify import local_env


def test_ready_file_appears_once_the_group_has_joined_and_goes_on_stop(tiny_checkpoint, tmp_path):
    ready = tmp_path / "ready"
    env = dataclasses.replace(local_env(tiny_checkpoint("qwen3_moe"), 1), ready_file=str(ready))
    stop = threading.Event()
    codes = []
    worker = threading.Thread(
        target=lambda: codes.append(serve_rank(env, 0, ServeOptions(host="127.0.0.1", port=0, threads=1),
                                               stop_event=stop)),
        daemon=True,
    )
    assert not ready.exists()
    worker.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the ready file never appeared"
        assert worker.is_alive(), "serve_rank stopped before it was ready"
        time.sleep(0.05)
    assert ready.read_text().strip() == "1"  # the group's world size
    stop.set()
    worker.join(timeout=60)
    assert codes == [0] and not ready.exists()
