#!/usr/bin/env bash
# One device call with the open issues' first figures, cheapest first, each step under its own timeout
# (for sessions whose device time is short): the MLA kernels checked and timed (issue 22), batch-1
# decode bf16 against --quantization fp8 on the Llama-3.1-8B config (issue 21), DeepSeek-V2-Lite
# batch 1 and batch 32 (issue 22), and the MoE one-token GEMV A/B on Qwen3-30B-A3B (issue 20).
#
#   scripts/build_gpu_wheels.sh            # here, once: fills .whl/
#   scripts/run_gpu_open_issues.sh         # there, from the repo root; results under $OUT (default /tmp/out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/mla"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
  { echo "installing .whl/ failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
peak=3350
grep -q H200 "$OUT/gpu.txt" && peak=4800
echo "=== mla $(date -u +%T)"
timeout 100 python3 scripts/gpu_mla_bench.py --check --peak-gbs $peak 2>&1 | tail -30 | tee "$OUT/mla/mla.log"
timeout 50 python3 scripts/gpu_mla_bench.py --fp8 --check --peak-gbs $peak 2>&1 | tail -15 | tee "$OUT/mla/mla_fp8.log"
echo "=== fp8 decode $(date -u +%T)"
OUT=$OUT/fp8 PARTS=decode STEP_TIMEOUT=110 bash scripts/run_gpu_fp8_bench.sh 2>&1 | tail -12
echo "=== deepseek-v2-lite $(date -u +%T)"
OUT=$OUT/ds SHAPE=dsv2lite PARTS=one_batch STEP_TIMEOUT=100 \
  RUNS_SPEC="decode-bs1 1 128 256;bs32-in1024 32 1024 16" bash scripts/run_gpu_moe_bench.sh 2>&1 | tail -12
echo "=== moe decode_ab $(date -u +%T)"
OUT=$OUT/moe SHAPE=qwen3moe PARTS=decode_ab STEP_TIMEOUT=100 bash scripts/run_gpu_moe_bench.sh 2>&1 | tail -12
echo "=== done $(date -u +%T)"
