"""`moeshard engine launch` / `serve`: the environment each rank gets, the supervisor, the CLI surface."""

from __future__ import annotations

import argparse
import sys
import textwrap
import threading
import time

import pytest

from moeshard.engine.launch import GroupSupervisor, LaunchSpec, child_environ, group_environment, rank_commands
from moeshard.engine.serving_cli import configure_launch, configure_serve, run_launch, run_serve
from moeshard.cli.main import build_parser
from moeshard.core.errors import CommandError
from moeshard.core.engine_env import EngineEnvironment


def test_every_rank_gets_the_engine_environment_contract(tmp_path):
    spec = LaunchSpec(nproc=4, model=str(tmp_path), tp=2, port=0, placement=str(tmp_path / "p.json"), gpus_per_domain=2)
    env = group_environment(spec, "127.0.0.1:1234")
    environ = child_environ(env, threads=1, base={"PATH": "/bin", "MOESHARD_EXPERT_EP": "99"})
    parsed = EngineEnvironment.from_environ(environ)
    assert parsed == env
    assert (parsed.expert_ep, parsed.attention_tp, parsed.gpus_per_pod, parsed.pods_per_group) == (4, 2, 4, 1)
    assert parsed.gpus_per_domain == 2 and parsed.placement_file == str(tmp_path / "p.json")
    assert parsed.port == 8000  # port 0 is passed to rank 0 as --port 0; the contract needs a real port
    assert environ["OMP_NUM_THREADS"] == "1" and environ["PATH"] == "/bin"
    commands = rank_commands(4, ["--port", "0"])
    assert [c[c.index("--local-rank") + 1] for c in commands] == ["0", "1", "2", "3"]
    assert all(c[:4] == [sys.executable, "-m", "moeshard.engine.serving_cli", "serve"] and c[-2:] == ["--port", "0"]
               for c in commands)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nproc": 0}, "--nproc"),
        ({"nproc": 4, "tp": 3}, "--tp"),
        ({"nproc": 4, "gpus_per_domain": 3}, "--gpus-per-domain"),
        ({"nproc": 2, "port": 70000}, "--port"),
    ],
)
def test_bad_launch_specs_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaunchSpec(model="m", **kwargs)


def parse(configure, argv):
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def test_launch_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(CommandError, match="config.json"):
        run_launch(parse(configure_launch, ["--nproc", "2", "--model", str(tmp_path)]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CommandError, match="--tp"):
        run_launch(parse(configure_launch, ["--nproc", "2", "--tp", "3", "--model", str(tmp_path), "--device", "cpu"]))
    with pytest.raises(CommandError, match="--placement"):
        run_launch(parse(configure_launch, ["--nproc", "2", "--model", str(tmp_path), "--placement", str(tmp_path / "x")]))


def test_step_token_cap_and_stall_timeout_flags_reach_the_options_and_the_ranks():
    from moeshard.engine.serving_cli import _serve_options, _serving_argv

    args = parse(configure_serve, ["--max-num-batched-tokens", "512", "--stall-timeout", "30"])
    options = _serve_options(args)
    assert (options.max_num_batched_tokens, options.stall_timeout) == (512, 30.0)
    argv = _serving_argv(args)
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "512" and argv[argv.index("--stall-timeout") + 1] == "30.0"
    launch = parse(configure_launch, ["--nproc", "2", "--model", "m", "--max-num-batched-tokens", "64", "--stall-timeout", "5"])
    assert (launch.max_num_batched_tokens, launch.stall_timeout) == (64, 5.0)
    defaults = _serve_options(parse(configure_serve, []))
    assert (defaults.max_num_batched_tokens, defaults.stall_timeout) == (8192, 300.0)
    for flag, value in (("--max-num-batched-tokens", "0"), ("--stall-timeout", "0")):
        with pytest.raises(CommandError, match=flag):
            _serve_options(parse(configure_serve, [flag, value]))


def test_serve_refuses_a_broken_environment(monkeypatch):
    monkeypatch.setenv("MOESHARD_EXPERT_EP", "3")
    monkeypatch.setenv("MOESHARD_PODS_PER_GROUP", "1")
    with pytest.raises(CommandError, match="MOESHARD_EXPERT_EP"):
        run_serve(parse(configure_serve, []))


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        ("launch", ["--nproc", "--model", "--tp", "--port", "--placement", "--gpus-per-domain", "curl", "Ctrl-C"]),
        ("serve", ["MOESHARD_MODEL_PATH", "--local-rank", "/v1/completions", "/readyz", "/metrics", "placement"]),
    ],
)
def test_help_texts_say_how_to_use_them(capsys, command, needles):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["engine", command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in needles:
        assert needle in text, needle


# --------------------------------------------------------------------------- supervisor


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_one_failed_rank_stops_the_group():
    sleeper = python("import time\nfor _ in range(600): time.sleep(0.1)")
    supervisor = GroupSupervisor([sleeper, python("raise SystemExit(3)"), sleeper], {}, poll=0.05, kill_after=5)
    supervisor.start()
    assert supervisor.wait() == 3
    assert all(proc.poll() is not None for proc in supervisor.procs)


def test_stop_goes_to_rank_0_first_and_the_others_follow_it(tmp_path):
    done, log = tmp_path / "rank0-stopped", tmp_path / "signals"
    rank0 = python(f"""
        import pathlib, signal, time
        def stop(*_):
            open({str(log)!r}, "a").write("0\\n")
            pathlib.Path({str(done)!r}).touch()
            raise SystemExit(0)
        signal.signal(signal.SIGTERM, stop)
        for _ in range(600): time.sleep(0.05)
    """)
    follower = python(f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, lambda *_: open({str(log)!r}, "a").write("1\\n"))
        for _ in range(600):
            if pathlib.Path({str(done)!r}).exists(): raise SystemExit(0)  # rank 0's stop command, in effect
            time.sleep(0.05)
    """)
    supervisor = GroupSupervisor([rank0, follower], {}, poll=0.05, grace=30)
    supervisor.start()
    time.sleep(0.5)  # let both install their handlers
    threading.Timer(0.1, supervisor.request_stop).start()
    assert supervisor.wait() == 0
    assert log.read_text() == "0\n"  # only rank 0 was signalled


def test_serve_on_a_pod_with_several_gpus_starts_its_local_ranks(monkeypatch):
    started = {}

    class Recorder:
        def __init__(self, commands, environ, **_):
            started["commands"], started["environ"] = commands, environ

        def run(self):
            return 0

    monkeypatch.setattr("moeshard.engine.launch.GroupSupervisor", Recorder)
    for name, value in {"MOESHARD_EXPERT_EP": "4", "MOESHARD_PODS_PER_GROUP": "2", "MOESHARD_GPUS_PER_POD": "2",
                        "MOESHARD_POD_INDEX": "1", "MOESHARD_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    assert run_serve(parse(configure_serve, ["--max-batch", "7"])) == 0
    assert [c[c.index("--local-rank") + 1] for c in started["commands"]] == ["0", "1"]
    assert all("--max-batch" in c and c[c.index("--max-batch") + 1] == "7" for c in started["commands"])
    assert EngineEnvironment.from_environ(started["environ"]).pod_index == 1


def test_serve_reports_a_taken_port_in_one_line(monkeypatch):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MOESHARD_DEVICE", "cpu")
        monkeypatch.setattr("moeshard.engine.serving_cli._install_stop_signals", lambda *a, **k: None)  # keep pytest's
        with pytest.raises(CommandError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            run_serve(parse(configure_serve, ["--host", "127.0.0.1", "--port", str(port), "--local-rank", "0"]))
