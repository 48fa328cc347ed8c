"""``moeshard engine verify`` and ``make-tiny-model`` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moeshard.cli.main import main


def test_engine_cli_module_does_not_import_torch():
    code = "import sys, moeshard.engine.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["engine", "make-tiny-model", "--arch", "mixtral", "--out", str(tmp_path / "m"), "--experts", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "mixtral"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert list((tmp_path / "m").glob("*.safetensors"))


VERIFY_MATRIX = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("ep,tp", VERIFY_MATRIX)
def test_verify_passes_for_the_ep_tp_matrix(tiny_checkpoint, capsys, ep, tp):
    """The issue's acceptance check: verify exits 0 for EP 1/2/4 x TP 1/2 (4 new tokens keeps it quick)."""
    code = main(["engine", "verify", "--model", str(tiny_checkpoint("qwen3_moe")), "--ep", str(ep), "--tp", str(tp),
                 "--max-new-tokens", "4", "--redundant-slots", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["max_abs_error"] <= 1e-4 and all(report["generation_matches"])
    assert report["routed_pairs"] == report["expected_routed_pairs"]


def test_verify_two_domains_with_custom_prompts(tiny_checkpoint, capsys):
    code = main(["engine", "verify", "--model", str(tiny_checkpoint("mixtral")), "--ep", "2",
                 "--gpus-per-domain", "1", "--prompts", "1,2,3;4,5,6,7,8;9", "--max-new-tokens", "3"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["prompts"] == 3
    assert sum(r["inter_domain"] for r in report["link_bytes_per_rank"]) > 0


def test_verify_exits_1_when_the_engine_disagrees(tiny_checkpoint, capsys, monkeypatch):
    import moeshard.engine.verify as verify_module

    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: {"ok": False, "max_abs_error": 0.5})
    assert main(["engine", "verify", "--model", str(tiny_checkpoint("mixtral")), "--ep", "1"]) == 1
    assert json.loads(capsys.readouterr().out)["max_abs_error"] == 0.5


def test_verify_refuses_bad_layouts(tiny_checkpoint, capsys):
    assert main(["engine", "verify", "--model", str(tiny_checkpoint("mixtral")), "--ep", "3", "--tp", "2"]) == 2
    assert "--tp (2) must divide --ep (3)" in capsys.readouterr().err


def test_verify_refuses_bad_prompts(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["engine", "verify", "--model", str(tiny_checkpoint("mixtral")), "--ep", "1", "--prompts", "1,x"])
    assert exc.value.code == 2 and "--prompts" in capsys.readouterr().err


@pytest.mark.gpu
def test_verify_on_cuda(tiny_checkpoint, capsys):
    """Opt-in: one NCCL rank on a GPU (Triton expert kernels) against transformers on CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    code = main(["engine", "verify", "--model", str(tiny_checkpoint("qwen3_moe")), "--ep", "1", "--device", "cuda",
                 "--max-new-tokens", "4"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report


# --------------------------------------------------------------------------- verify compares like with like

@pytest.fixture(scope="module")
def small_vocab_checkpoints(tmp_path_factory):
    """Tiny Qwen3-MoE checkpoints with a 64-token vocabulary (below the old hard-coded prompt id 92)."""
    from moeshard.engine.verify import make_tiny_model

    root = tmp_path_factory.mktemp("small_vocab")
    return {dtype: make_tiny_model("qwen3_moe", root / dtype, vocab_size=64, dtype=dtype)
            for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_with_default_prompts_and_the_checkpoint_dtype(small_vocab_checkpoints, capsys, dtype):
    code = main(["engine", "verify", "--model", str(small_vocab_checkpoints[dtype]), "--ep", "1",
                 "--max-new-tokens", "4"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["dtype"] == dtype and report["prompts"] == 3
    assert report["tolerance"] == (1e-4 if dtype == "float32" else pytest.approx(report["tolerance"]))
    assert report["max_abs_error"] <= report["tolerance"]


def test_verify_stops_both_sides_at_the_checkpoint_eos(small_vocab_checkpoints, tmp_path, capsys):
    """A greedy EOS is a match, not a false mismatch: EOS from generation_config.json ends both continuations."""
    import shutil

    from moeshard.engine.verify import default_prompts, reference_outputs

    model = tmp_path / "eos"
    shutil.copytree(small_vocab_checkpoints["float32"], model)
    _, free = reference_outputs(model, default_prompts(64), 6)
    eos = free[0][2]  # the third greedy token of the first prompt becomes an EOS id
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [63, eos]}))
    code = main(["engine", "verify", "--model", str(model), "--ep", "1", "--max-new-tokens", "6"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["eos_token_ids"] == [63, eos]
    assert report["routed_pairs"] == report["expected_routed_pairs"]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeshard engine verify: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("extra,expected", [
    (["--ep", "3", "--tp", "3"], "must divide the model's 4 attention heads"),
    (["--ep", "2", "--gpus-per-domain", "0"], "gpus_per_domain must be >= 1"),
    (["--ep", "1", "--prompts", "1,2;5,64"], "prompts[1]: token id 64 outside 0..63"),
    (["--ep", "1", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--ep", "1", "--tolerance", "nan"], "--tolerance must be a finite number"),
    (["--ep", "0"], "--tp (1) must divide --ep (0)"),
])
def test_verify_bad_arguments_are_one_line_before_ranks_start(small_vocab_checkpoints, capsys, monkeypatch, extra,
                                                              expected):
    import moeshard.engine.verify as verify_module

    monkeypatch.setattr(verify_module, "run_world", lambda *a, **k: pytest.fail("ranks started for bad input"))
    err = _one_line_error(capsys, ["engine", "verify", "--model", str(small_vocab_checkpoints["float32"]), *extra])
    assert expected in err


def test_verify_missing_or_quantized_model_is_one_line(small_vocab_checkpoints, tmp_path, capsys):
    import shutil

    assert "is not a folder" in _one_line_error(capsys, ["engine", "verify", "--model", str(tmp_path / "nope"),
                                                         "--ep", "1"])
    model = tmp_path / "fp8"
    shutil.copytree(small_vocab_checkpoints["float32"], model)
    raw = json.loads((model / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8"}
    (model / "config.json").write_text(json.dumps(raw))
    assert "quantization_config (quant_method 'fp8')" in _one_line_error(
        capsys, ["engine", "verify", "--model", str(model), "--ep", "1"])


def test_a_failing_rank_is_one_line(small_vocab_checkpoints, capsys, monkeypatch):
    import math

    import moeshard.engine.verify as verify_module

    with pytest.raises(verify_module.EngineWorldError) as info:
        verify_module.run_ranks(1, math.log)  # rank 0 runs math.log(0, 1): ValueError
    assert str(info.value) == "rank 0: ValueError: math domain error"
    assert "Traceback" in info.value.details

    def fail(*a, **k):
        raise info.value

    monkeypatch.setattr(verify_module, "verify", fail)
    err = _one_line_error(capsys, ["engine", "verify", "--model", str(small_vocab_checkpoints["float32"]), "--ep", "1"])
    assert err.endswith("engine rank failed: rank 0: ValueError: math domain error")
