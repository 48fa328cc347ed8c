"""Placement agreement across real processes (gloo): ranks adopt a version together, or not at all.

Two ranks run the serving StepLoop's step boundary over TorchChannel with a
minimal runtime; each watches its own copy of the placement file, so the test
controls what each rank sees and when (a kubelet that syncs one pod late, or
two pods that see different contents under the same version number).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from moeshard.engine.verify import free_port

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch.distributed as dist
    from moeshard.engine.reload import PlacementWatcher
    from moeshard.engine.serving import RequestQueue, ServingLimits, StepCommand, StepLoop, TorchChannel
    from moeshard.core.placement import initial_placement, placement_from_arrays

    rank, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def version(v, shift):
        base = initial_placement(2, 4, 2, 3)
        row = np.roll(base.phy2log[0], shift)
        counts = np.bincount(row, minlength=4)
        return placement_from_arrays(v, 2, 3, 4, [row] * 2, [1.0 / counts[row]] * 2)

    class Runtime:
        def __init__(self):
            self.placement, self.placement_version, self.applied = version(0, 0), 0, []
            self.step = 0
        def apply_placement(self, p):
            self.applied.append([self.step, p.version])
            self.placement, self.placement_version = p, p.version
        def generate(self, prompts, max_new_tokens, eos_token_id=None, stop_token_ids=None):
            return [[] for _ in prompts]
        def expert_token_counts(self):
            return np.zeros((2, 4), dtype=np.int64)
        def rank_token_counts(self):
            return np.zeros(2, dtype=np.int64)

        def rank_pair_counts(self):
            return np.zeros(2, dtype=np.int64)

    runtime = Runtime()
    path = f"{folder}/rank{rank}.json"
    watcher = PlacementWatcher(path, runtime.placement, poll_interval=0.0)
    channel = TorchChannel()
    loop = StepLoop(runtime, channel, limits=ServingLimits(vocab_size=8), watcher=watcher,
                    queue=RequestQueue() if rank == 0 else None)
    # What each rank's file says before step s (None: unchanged).
    script = {
        0: {0: version(1, 1)},                  # rank 0 sees v1 at once
        1: {3: version(1, 2), 5: version(1, 1)},  # rank 1: nothing, then a different v1, then the same v1
    }[rank]
    for step in range(8):
        runtime.step = step
        if step in script:
            with open(path, "w") as handle:
                handle.write(script[step].to_json())
        command = channel.broadcast_command(StepCommand("idle") if rank == 0 else None)
        loop.step(command)
    print(json.dumps(runtime.applied))
    dist.destroy_process_group()
    """
)


def test_ranks_adopt_together_only_when_all_hold_the_same_placement(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    applied = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # Steps 0-2: rank 1 has no candidate; 3-4: the contents differ (hash check); 5: both hold the same v1.
    assert applied == [[[5, 1]], [[5, 1]]]
