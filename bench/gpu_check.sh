#!/usr/bin/env bash
# One prepared GPU check for a lent H200 (issue 11 item 9): prints ONE JSON summary on stdout and
# writes it to $OUT/gpu_check.json (with the parts' logs in $OUT/gpu_check_logs.txt) when $OUT is set.
#
# Parts, each under its own timeout; a failure is recorded in the JSON, never fatal:
#   setup           versions, the GPU, and whether moeshard imports                       30 s
#   pytest_gpu      pytest -m gpu over tests/test_kernels and tests/test_engine            140 s
#   verify          moeshard engine verify --device cuda on a tiny model, fp32 and bf16     90 s
#   kernel_twins    bf16 Triton kernels against their torch twins (align, permute,          45 s
#                   combine, fused expert FFN): exact for indices, relative error for floats
#   expert_ffn      bench/bench_expert_ffn.py --quick: Triton as a fraction of roofline    110 s
#   cuda_graph      capture + replay of a bucketed decode step of the MoE layer             45 s
#                   (padded exchange), and proof that the deduplicated exchange refuses
# Worst case about 460 s plus start-up: under 8 minutes.
#
# The device image (see /work/.library/device/KINDS.md) has python3 with torch, triton, transformers,
# safetensors, numpy, pyyaml, pytest, aiohttp, but not pydantic. Carry it as wheels: once, here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection
# (pydantic-core must be the version the pydantic wheel pins), then run with carry [".whl"]:
#   bash bench/gpu_check.sh
# moeshard is not installed there: the script links the repo's folders into an import shim.
#
# GPU_CHECK_DRY_RUN=1 runs nothing but the assembly (the CPU test checks the JSON shape);
# GPU_CHECK_ONLY=setup,verify runs only the named parts; GPU_CHECK_PYTHON picks the interpreter
# (default python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${GPU_CHECK_PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
PARTS="$WORK/parts.jsonl"
: >"$PARTS"
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
T0="$(date +%s)"
cd "$REPO" || exit 1

# --------------------------------------------------------------------------- environment
SHIM="$WORK/shim/moeshard"
mkdir -p "$SHIM"
for pkg in operator engine kernels core; do
  if [ -d "$REPO/$pkg" ]; then ln -s "$REPO/$pkg" "$SHIM/$pkg"; fi
done
export PYTHONPATH="$WORK/shim:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
if [ "$DRY" != 1 ] && [ -d "$REPO/.whl" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$REPO"/.whl/*.whl \
    >"$WORK/wheels.log" 2>&1 && export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
export REPO PY WORK
moeshard_cli() { "$PY" -c 'import sys; from moeshard.operator.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

# run_part NAME TIMEOUT_S CMD...: runs CMD under its timeout with GPU_CHECK_DETAIL naming a JSON file
# the part may write; appends one record (status, rc, seconds, result, log tail on failure) to $PARTS.
run_part() {
  local name="$1" limit="$2"
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then return 0; fi
  local log="$WORK/$name.log" detail="$WORK/$name.json" start end rc
  start="$(date +%s.%N)"
  if [ "$DRY" = 1 ]; then
    printf 'dry run: %s\n' "$*" >"$log"
    printf '{"dry_run": true}\n' >"$detail"
    rc=0
  else
    if [ "$(type -t "$1")" = function ]; then  # a part written as a shell function runs in a child bash
      set -- bash -c "$(declare -f "$1" moeshard_cli); $1"
    fi
    GPU_CHECK_DETAIL="$detail" timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
  fi
  end="$(date +%s.%N)"
  "$PY" - "$name" "$rc" "$start" "$end" "$limit" "$log" "$detail" >>"$PARTS" <<'EOF'
import json, os, sys
name, rc, start, end, limit, log, detail = sys.argv[1:]
rc = int(rc)
record = {"name": name, "status": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed"), "rc": rc,
          "seconds": round(float(end) - float(start), 1), "timeout_s": int(limit)}
if os.path.exists(detail):
    try:
        with open(detail) as f:
            record["result"] = json.load(f)
    except ValueError as exc:
        record["result_error"] = f"unreadable part result: {exc}"
if rc != 0 and os.path.exists(log):
    with open(log, errors="replace") as f:
        record["log_tail"] = f.read().splitlines()[-15:]
print(json.dumps(record))
EOF
}

# --------------------------------------------------------------------------- part scripts
cat >"$WORK/setup.py" <<'EOF'
import json, os, platform, subprocess
import torch, triton, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
    info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["driver"] = f"unknown ({exc})"
import moeshard.engine.moe, moeshard.kernels.fused_moe  # noqa: E401,F401  the package imports
info["moeshard_imports"] = True
json.dump(info, open(os.environ["GPU_CHECK_DETAIL"], "w"))
print(json.dumps(info))
raise SystemExit(0 if info["cuda_available"] else 1)
EOF

cat >"$WORK/junit.py" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
summary = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s
                     if c.find("failure") is not None or c.find("error") is not None][:20]
json.dump(summary, open(os.environ["GPU_CHECK_DETAIL"], "w"))
EOF

cat >"$WORK/twins.py" <<'EOF'
"""bf16 Triton kernels against their torch twins on random routing (indices exact, floats by relative error)."""
import json, os
import torch
from moeshard.kernels import fused_moe, moe_align, moe_combine, moe_permute
dev, dt = torch.device("cuda"), torch.bfloat16
rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
out = {}
for t, k, e, h, i in ((1, 8, 16, 256, 128), (187, 8, 32, 512, 256), (2048, 2, 8, 1024, 512)):
    g = torch.Generator(device=dev).manual_seed(t)
    ids = torch.randint(-1, e, (t, k), device=dev, generator=g)
    w = torch.rand((t, k), device=dev, generator=g).to(dt)
    x = torch.randn((t, h), device=dev, generator=g).to(dt)
    wgu = (torch.randn((e, 2 * i, h), device=dev, generator=g) / h**0.5).to(dt)
    wd = (torch.randn((e, h, i), device=dev, generator=g) / i**0.5).to(dt)
    case = {}
    ra, rt = moe_align.moe_align_block_size_triton(ids, e, 64), moe_align.moe_align_block_size_torch(ids, e, 64)
    case["align_exact"] = all(torch.equal(v, vars(rt)[n]) for n, v in vars(ra).items() if isinstance(v, torch.Tensor))
    case["permute_rel"] = rel(moe_permute.moe_permute_triton(x, rt, k), moe_permute.moe_permute_torch(x, rt, k))
    y = torch.randn((t, k, h), device=dev, generator=g).to(dt)
    case["combine_rel"] = rel(moe_combine.moe_combine_triton(y, ids, w, num_experts=e),
                              moe_combine.moe_combine_torch(y, ids, w, num_experts=e))
    case["fused_expert_ffn_rel"] = rel(fused_moe.fused_expert_ffn_triton(x, ids, w, wgu, wd),
                                       fused_moe.fused_expert_ffn_torch(x, ids, w, wgu, wd))
    out[f"T{t}_K{k}_E{e}_H{h}_I{i}"] = case
ok = all(c["align_exact"] and max(v for n, v in c.items() if n.endswith("_rel")) < 2e-2 for c in out.values())
out["tolerance_rel"] = 2e-2
out["ok"] = ok
json.dump(out, open(os.environ["GPU_CHECK_DETAIL"], "w"))
print(json.dumps(out))
raise SystemExit(0 if ok else 1)
EOF

cat >"$WORK/bench_summary.py" <<'EOF'
import json, os, sys
full = json.load(open(sys.argv[1]))
keep = ("median_ms", "roofline_ms", "roofline_fraction", "achieved_TFLOPs", "achieved_GBps", "bucket", "skipped")
cases = [{k: v for k, v in c.items() if k in keep or not isinstance(v, (dict, list))} for c in full.get("cases", [])]
fractions = [c["roofline_fraction"]["triton"] for c in cases if "triton" in c.get("roofline_fraction", {})]
summary = {"device_ceilings": full.get("device_ceilings"), "cases": cases,
           "triton_roofline_fraction": {"min": min(fractions), "median": sorted(fractions)[len(fractions) // 2],
                                        "max": max(fractions)} if fractions else None}
json.dump(summary, open(os.environ["GPU_CHECK_DETAIL"], "w"))
EOF

cat >"$WORK/graph.py" <<'EOF'
"""CUDA-graph capture of one bucketed decode step of the MoE layer (one rank, bf16, padded exchange)."""
import json, os
import torch
from moeshard.engine.comm import FlatAllToAll
from moeshard.engine.config import ParallelConfig
from moeshard.engine.moe import MoELayer
from moeshard.operator.placement import initial_placement

dev, dt = torch.device("cuda"), torch.bfloat16
E, H, I, K = 32, 1024, 512, 4
g = torch.Generator(device=dev).manual_seed(0)


def layer(padded: bool) -> MoELayer:
    placement = initial_placement(1, E, 1, E)
    comm = FlatAllToAll(ParallelConfig(rank=0, world_size=1, device="cuda"), E)
    comm.padded = padded
    gen = torch.Generator(device=dev).manual_seed(1)
    return MoELayer(moe_index=0, router_weight=torch.randn(E, H, device=dev, generator=gen).to(dt),
                    w_gate_up=(torch.randn(E, 2 * I, H, device=dev, generator=gen) / H**0.5).to(dt),
                    w_down=(torch.randn(E, H, I, device=dev, generator=gen) / I**0.5).to(dt),
                    placement=placement, rank=0, comm=comm, top_k=K, model_type="qwen3_moe", norm_topk_prob=True)


result = {"buckets": {}}
for bucket in (1, 8, 64, 512):
    moe = layer(padded=True)
    x = torch.randn(bucket, H, device=dev, generator=g).to(dt)
    keys = torch.arange(bucket, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            moe.forward(x, keys)  # warm-up: Triton compilation and lazily made counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe.forward(x, keys)
    fresh = torch.randn(bucket, H, device=dev, generator=g).to(dt)
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    eager = layer(padded=False).forward(fresh, keys)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    err = float((y.float() - eager.float()).norm() / eager.float().norm())
    result["buckets"][str(bucket)] = {"captured": True, "rel_err_vs_eager_dedup": err,
                                      "replay_us": start.elapsed_time(stop) * 1e3 / 50}
try:  # the deduplicated exchange reads split sizes on the host: capture must refuse it
    moe = layer(padded=False)
    x = torch.randn(8, H, device=dev, generator=g).to(dt)
    moe.forward(x, torch.arange(8, device=dev))
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        moe.forward(x, torch.arange(8, device=dev))
    result["dedup_capture"] = "captured (unexpected: it has a host sync)"
except Exception as exc:  # noqa: BLE001  the expected refusal, recorded
    result["dedup_capture"] = f"refused as expected: {type(exc).__name__}"
result["ok"] = all(b["rel_err_vs_eager_dedup"] < 2e-2 for b in result["buckets"].values())
json.dump(result, open(os.environ["GPU_CHECK_DETAIL"], "w"))
print(json.dumps(result))
raise SystemExit(0 if result["ok"] else 1)
EOF

part_pytest() {
  "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$WORK/pytest.xml" tests/test_kernels tests/test_engine
  local rc=$?
  [ -f "$WORK/pytest.xml" ] && "$PY" "$WORK/junit.py" "$WORK/pytest.xml"
  return $rc
}

part_verify() {
  local rc=0
  moeshard_cli engine make-tiny-model --arch qwen3_moe --out "$WORK/tiny" || return 1
  for dtype in float32 bfloat16; do
    moeshard_cli engine verify --model "$WORK/tiny" --ep 1 --device cuda --dtype "$dtype" \
      --max-new-tokens 8 >"$WORK/verify_$dtype.out" || rc=1
  done
  "$PY" - "$WORK" <<'EOF'
import json, os, sys
out = {}
for dtype in ("float32", "bfloat16"):
    path = os.path.join(sys.argv[1], f"verify_{dtype}.out")
    try:
        report = json.load(open(path))
        out[dtype] = {k: report.get(k) for k in ("ok", "max_abs_error", "tolerance", "generation_matches", "dtype")}
    except (OSError, ValueError) as exc:
        out[dtype] = {"ok": False, "error": str(exc)}
json.dump(out, open(os.environ["GPU_CHECK_DETAIL"], "w"))
EOF
  return $rc
}

part_bench() {
  "$PY" bench/bench_expert_ffn.py --quick --out "$WORK/expert_ffn_full.json" || return 1
  "$PY" "$WORK/bench_summary.py" "$WORK/expert_ffn_full.json"
}

# --------------------------------------------------------------------------- run
run_part setup 30 "$PY" "$WORK/setup.py"
run_part pytest_gpu 140 part_pytest
run_part verify 90 part_verify
run_part kernel_twins 45 "$PY" "$WORK/twins.py"
run_part expert_ffn 110 part_bench
run_part cuda_graph 45 "$PY" "$WORK/graph.py"

# --------------------------------------------------------------------------- summary
SUMMARY="$("$PY" - "$PARTS" "$STARTED" "$T0" "$DRY" <<'EOF'
import json, sys, time
parts_file, started, t0, dry = sys.argv[1:]
parts = [json.loads(line) for line in open(parts_file) if line.strip()]
summary = {"gpu_check": 1, "started_utc": started, "dry_run": dry == "1",
           "total_seconds": round(time.time() - int(t0), 1),
           "ok": bool(parts) and all(p["status"] == "ok" for p in parts),
           "failed_parts": [p["name"] for p in parts if p["status"] != "ok"],
           "parts": {p.pop("name"): p for p in parts}}
print(json.dumps(summary, indent=1))
EOF
)"
printf '%s\n' "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  printf '%s\n' "$SUMMARY" >"$OUT/gpu_check.json"
  for log in "$WORK"/*.log; do
    printf '===== %s\n' "$(basename "$log")"
    tail -n 200 "$log"
  done >"$OUT/gpu_check_logs.txt" 2>/dev/null
fi
rm -rf "$WORK"
