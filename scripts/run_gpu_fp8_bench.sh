#!/usr/bin/env bash
# Issue 21's GPU figures: FP8 beside bf16 on one GPU, Llama-3.1-8B architecture, dummy weights.
#
#   scripts/build_gpu_wheels.sh                 # here, once: fills .whl/
#   PARTS="check decode" scripts/run_gpu_fp8_bench.sh   # there, from the repo root
#
# PARTS, any of (default: check kernels decode prefill):
#   check    the FP8 kernels against the torch reference on the GPU (scripts/gpu_fp8_gemm_bench.py --check)
#   kernels  time block_fp8_linear / fp8_gemv against bf16 on the 8B's projection shapes (--sweep)
#   moe      the FP8 fused MoE against the bf16 one on Mixtral-8x7B and Qwen3-30B-A3B expert shapes,
#            1 / 32 / 256 / 4096 tokens, after a --check against the torch reference (scripts/gpu_moe_fp8_bench.py)
#   decode   bench_one_batch batch 1 (128 in / 256 out): bf16, then --quantization fp8
#   prefill  bench_one_batch prefill 32 x 1024: bf16, then --quantization fp8
#   kv       bench_one_batch batch 32 (1024 in, 16 steps): bf16 KV, then --kv-cache-dtype fp8_e4m3 (fp8 weights)
#   serving  bench_serving, 500 random prompts (1024 in / 256 out), server with --quantization fp8
#            --kv-cache-dtype fp8_e4m3 (run the bf16 baseline with scripts/run_gpu_serving_bench.sh)
# Results under $OUT/<part>/ (default OUT=/tmp/out); one_batch.jsonl lines are named by run.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-check kernels decode prefill}
MODEL=${MODEL:-radixserve/configs/llama-3.1-8b}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "run_gpu_fp8_bench: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

one_batch() {  # name, batch, input, output, extra flags...
  local name=$1 bs=$2 input=$3 output=$4
  shift 4
  timeout "${STEP_TIMEOUT:-150}" python3 -m radixserve.bench_one_batch --model-path "$MODEL" --load-format dummy \
    --dtype bfloat16 --batch-size "$bs" --input-len "$input" --output-len "$output" --warmup 2 --run-name "$name" \
    --result-file "$OUT/one_batch.jsonl" "$@" 2>&1 | tail -4
}

failed=0
for part in $PARTS; do
  mkdir -p "$OUT/$part"
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    check) python3 scripts/gpu_fp8_gemm_bench.py --check --out "$OUT/$part" 2>&1 | tail -20 ;;
    kernels) timeout 300 python3 scripts/gpu_fp8_gemm_bench.py --sweep --out "$OUT/$part" 2>&1 | tail -40 ;;
    moe) timeout 600 python3 scripts/gpu_moe_fp8_bench.py --check --out "$OUT/$part" 2>&1 | tail -40 ;;
    decode) one_batch bf16-bs1 1 128 256 && one_batch fp8-bs1 1 128 256 --quantization fp8 ;;
    prefill) one_batch bf16-prefill 32 1024 1 && one_batch fp8-prefill 32 1024 1 --quantization fp8 ;;
    kv) one_batch fp8w-bs32 32 1024 16 --quantization fp8 &&
        one_batch fp8w-fp8kv-bs32 32 1024 16 --quantization fp8 --kv-cache-dtype fp8_e4m3 ;;
    serving) OUT="$OUT/$part" MODEL="$MODEL" INSTALL_WHEELS=0 NUM_PROMPTS=${NUM_PROMPTS:-500} INPUT_LEN=1024 \
        OUTPUT_LEN=256 RANGE_RATIO=1.0 SERVER_ARGS="--quantization fp8 --kv-cache-dtype fp8_e4m3" \
        bash scripts/run_gpu_serving_bench.sh ;;
    *) echo "run_gpu_fp8_bench: unknown part $part" >&2; false ;;
  esac
  rc=$?  # pipefail: a failing bench fails its pipeline
  [[ $rc != 0 ]] && { echo "=== $part failed (exit $rc)"; failed=1; }
done
exit $failed
