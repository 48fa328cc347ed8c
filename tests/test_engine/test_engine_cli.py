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
