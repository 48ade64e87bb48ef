#!/usr/bin/env bash
# Every GPU check in one script (one H100: about 6 minutes). Writes into $OUT (default
# benchmarks/results/gpu/) four files, updated after every part so that a run cut short still
# leaves its results: summary.md, device_check.json (every part's JSON), status.txt, logs.txt.
#
#   bash benchmarks/device_check.sh              # everything
#   PARTS="kernels parity" bash benchmarks/device_check.sh
#
# Parts: env, pytest (the kernel test suite on CUDA), kernels (long-context kernel checks),
# parity (greedy tokens = HF on CUDA), attention (decode bandwidth), fused (fused-op
# microbenchmark), e2e_qwen3, e2e_llama (offline throughput against HF transformers, async
# scheduling on), e2e_qwen3_sync (the same without async scheduling), tp (tensor parallel
# size 2 against 1 over NCCL; it reports itself skipped with fewer than 2 GPUs).
# A failing part is recorded and the rest still run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-part JSON files; $OUT gets only the four files above
PARTS=${PARTS:-"env parity kernels attention e2e_qwen3 e2e_llama e2e_qwen3_sync fused tp pytest"}
# pytest may be missing from the GPU image: benchmarks/device_check.sh's caller can carry a
# `pip install --target .gpu_deps pytest pluggy iniconfig`.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu_deps ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

part() {  # part NAME TIMEOUT_S COMMAND...: stdout's last line is the part's JSON
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
    { echo "===== $name (rc=$rc)"; tail -n 200 "$WORK/$name.log"; } >>"$OUT/logs.txt"
    tail -n 1 "$WORK/$name.log" | python -c 'import json,sys
line = sys.stdin.read()
try: json.loads(line); print(line, end="")
except ValueError: pass' >"$WORK/$name.json"
    [ -s "$WORK/$name.json" ] || rm -f "$WORK/$name.json"
    cp "$OUT/status.txt" "$WORK/status.txt"
    python benchmarks/device_report.py "$WORK" "$OUT" >/dev/null 2>&1
}

: >"$OUT/status.txt"
: >"$OUT/logs.txt"
part env 30 python -c 'import json, torch, triton, transformers, importlib.util as u
import pagedserve.engine, pagedserve.kernels.paged_attention  # the engine must import without the server deps
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
  "transformers": transformers.__version__, "device": torch.cuda.get_device_name(),
  "fastapi_installed": u.find_spec("fastapi") is not None}))'
# Most informative first: a part cut off by the machine's time limit loses least there.
part parity 120 python benchmarks/gpu_checks.py parity
part kernels 90 python benchmarks/gpu_checks.py kernels
part attention 60 python benchmarks/gpu_checks.py attention
part e2e_qwen3 150 python benchmarks/gpu_throughput.py --config benchmarks/configs/qwen3-0.6b.json
part e2e_llama 150 python benchmarks/gpu_throughput.py --config benchmarks/configs/llama-3.2-1b.json
# The same Qwen3 workload with synchronous steps: what async scheduling hides.
part e2e_qwen3_sync 90 python benchmarks/gpu_throughput.py --config benchmarks/configs/qwen3-0.6b.json --skip-hf --no-async-scheduling
part fused 40 python benchmarks/gpu_checks.py fused
part tp 120 python benchmarks/gpu_checks.py tp
part pytest 150 python -m pytest -q -p no:cacheprovider tests/kernels
cat "$OUT/status.txt"
