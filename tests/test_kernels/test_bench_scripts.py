"""The expert-FFN benchmark and tuner scripts: routing generator, a tiny run, CPU refusal."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    """Import a bench/ script as a module (registered, as dataclasses need)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))  # the tuner imports the benchmark module
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("m,local,experts,k", [(16, 16, 128, 8), (187, 4, 8, 2), (64, 32, 256, 8)])
def test_rank_routing_invariants(skewed, m, local, experts, k):
    bench = _load("bench_expert_ffn")
    ids, weights = bench.rank_routing(m, local, experts, k, skewed, seed=1)
    live = ids >= 0
    assert ids.shape[1] == k and int(ids.max()) < local
    assert int(live.sum()) == ids.shape[0] * max(1, round(k * local / experts))
    assert abs(int(live.sum()) - m * local) < max(1, round(k * local / experts))
    for row, mask in zip(ids, live):  # distinct live experts per token
        assert len(set(row[mask].tolist())) == int(mask.sum())
    torch.testing.assert_close(weights.sum(1), torch.ones(ids.shape[0]))
    counts = torch.bincount(ids[live], minlength=local).float()
    if skewed:
        assert counts[0] > 2 * counts.mean()  # Zipf: expert 0 is hot
    elif m >= 64:
        assert counts.max() < 1.5 * counts.mean()


def test_bench_tiny_run_writes_json(tmp_path):
    bench = _load("bench_expert_ffn")
    out = tmp_path / "r.json"
    argv = ["--layouts", "qwen3-235b:32", "--tokens", "16", "--cpu-scale", "64", "--rounds", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["inputs"]["shape_scale"] == 64 and result["environment"]["torch"] == torch.__version__
    assert [c["routing"] for c in result["cases"]] == ["balanced", "skewed"]
    case = result["cases"][0]
    assert (case["hidden"], case["intermediate"], case["local_experts"]) == (64, 24, 4)
    assert set(case["median_ms"]) >= {"naive", "loop"}
    assert all(d < 1e-2 for d in case["max_abs_diff_vs_loop"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tuner_refuses_without_gpu(capsys, tmp_path):
    tuner = _load("tune_expert_ffn")
    assert tuner.main(["--model", "qwen3-235b", "--ep", "8", "--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tuner_grid_fits_each_bucket():
    tuner = _load("tune_expert_ffn")
    for bucket in ("small", "medium", "large"):
        grid = tuner.candidate_configs(bucket, quick=True)
        assert grid and len(set(grid)) == len(grid)
    assert all(c.block_m <= 32 for c in tuner.candidate_configs("small"))
    assert any(c.split_k > 1 for c in tuner.candidate_configs("small"))


def test_roofline_formulas_give_perf_md_crossover():
    """PERF.md: Qwen3 (H 4096, I 1536, bf16) turns compute-bound near 240 tokens per expert on H200."""
    bench = _load("bench_expert_ffn")
    peak, bandwidth = 989e12, 4.8e12

    def compute_bound(m):
        flops = bench.gemm_flops(m, 4096, 1536)
        return flops / peak >= bench.gemm_bytes(m, 1, 4096, 1536, 2) / bandwidth

    crossover = next(m for m in range(1, 2000) if compute_bound(m))
    assert 230 <= crossover <= 250
    assert bench.roofline(2e12, 1e9, 1e12, 1e12) == 2.0
