#!/usr/bin/env bash
# The GPU acceptance run on the lent GPU machine (no registry there): install the carried wheels (.whl/, made by
# scripts/make_gpu_wheels.sh), then benchmarks/gpu_acceptance.py under a wall-clock budget. Everything lands in
# $OUT (the device tool's output folder) or the folder given as the first argument:
#   gpu_acceptance.json, gpu_acceptance.txt, gpu_tests.xml, gpu_tests.log, run.log, nvidia-smi.txt
#
#   bash benchmarks/gpu_acceptance.sh                       # $OUT, budget 420 s
#   BUDGET_S=300 bash benchmarks/gpu_acceptance.sh /tmp/acc --sections tests,throughput
#   INSTALL_WHEELS=0 bash benchmarks/gpu_acceptance.sh /tmp/acc --dry-run   # here, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu-acceptance}}
[ $# -gt 0 ] && shift
budget=${BUDGET_S:-420}
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}   # deterministic cuBLAS for the resume tests
mkdir -p "$out"

if [ "${INSTALL_WHEELS:-1}" = 0 ]; then
  echo "INSTALL_WHEELS=0: using the packages already installed" >&2
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { echo "installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ here: the DeepSpeed tests will be skipped (bash scripts/make_gpu_wheels.sh, then carry .whl)" >&2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv >"$out/nvidia-smi.txt" 2>&1 || true

# The script keeps to its budget section by section; the hard limit only catches a hang (the JSON is rewritten
# after every section, so what was measured before it still comes back).
timeout --kill-after=15 $((budget + 90)) python3 -m benchmarks.gpu_acceptance --out "$out" --budget-s "$budget" "$@" \
  2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
