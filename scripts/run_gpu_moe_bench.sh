#!/usr/bin/env bash
# Issue 20's GPU figures for one MoE architecture (dummy bf16 weights), on a machine without internet.
#
#   scripts/build_gpu_wheels.sh                          # here, once: fills .whl/
#   SHAPE=mixtral PARTS="one_batch peer" scripts/run_gpu_moe_bench.sh      # there, from the repo root
#
# SHAPE: mixtral (radixserve/configs/mixtral-8x7b: 93 GB of weights, needs an H200), qwen3moe
# (radixserve/configs/qwen3-30b-a3b: 61 GB), dsv2lite (radixserve/configs/deepseek-v2-lite: 31 GB, MLA) or
# dsv3 (radixserve/configs/deepseek-v3, FP8 block weights: 671 GB, so always with LAYERS=, e.g. 6 = three
# dense layers and three MoE layers). RUNS_SPEC="name bs in out;..." replaces one_batch's three runs.
# PARTS, any of:
#   kernel     scripts/gpu_moe_kernel_bench.py for the shape (times the fused MoE kernel against the torch
#              loop; TUNE=1 also searches tile configs and writes them under $OUT/kernel)
#   one_batch  bench_one_batch: batch 1 (128 in / 256 out), batch 32 (1024 in, 16 steps), prefill 32 x 1024,
#              each beside its floor (the experts a step reaches; bench_one_batch's ModelCost)
#   decode_ab  bench_one_batch batch 1 (128 in / 256 out) twice: RADIXSERVE_MOE_DECODE_GEMV=0 (the sort +
#              grouped GEMM kernels), then =1 (layers/moe/triton_moe_decode.py's one-token GEMVs, the default)
#   router_ab  bench_one_batch batch 1 (128 in / 256 out) with RADIXSERVE_TRITON_ROUTER=0 (torch's six routing
#              kernels) and =1 (layers/moe/triton_router.py's one)
#   peer       benchmarks/peers/gptfast_style_mixtral.py at batch 1, 128 in / 256 out (Mixtral only)
#   serving    a server + bench_serving, 500 random prompts (NUM_PROMPTS, INPUT_LEN=1024, OUTPUT_LEN=256,
#              RANGE_RATIO=1.0)
# Each part writes under $OUT/<part>/ (default OUT=/tmp/out). Exits non-zero when a part failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-qwen3moe}
PARTS=${PARTS:-one_batch serving}
export PYTHONUNBUFFERED=1
case $SHAPE in  # MODEL= overrides the config folder (a CPU smoke run: a tiny MoE, DEVICE=cpu DTYPE=float32 QUICK=1)
  mixtral) MODEL=${MODEL:-radixserve/configs/mixtral-8x7b} ;;
  qwen3moe) MODEL=${MODEL:-radixserve/configs/qwen3-30b-a3b} ;;
  dsv2lite) MODEL=${MODEL:-radixserve/configs/deepseek-v2-lite} ;;
  dsv3) MODEL=${MODEL:-radixserve/configs/deepseek-v3} ;;
  *) echo "run_gpu_moe_bench: SHAPE is mixtral, qwen3moe, dsv2lite or dsv3, not $SHAPE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
if [[ -n ${LAYERS:-} ]]; then  # the same shape cut to LAYERS layers (full Mixtral does not fit an H100)
  cut="/tmp/$(basename "$MODEL")-${LAYERS}l"
  rm -rf "$cut" && cp -r "$MODEL" "$cut" || exit 1
  python3 -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c['num_hidden_layers']=int(sys.argv[2]); json.dump(c,open(p,'w'),indent=1)" "$cut" "$LAYERS" || exit 1
  MODEL=$cut
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "run_gpu_moe_bench: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

bs1_ab() {  # env var, run-name prefix, result folder: batch 1 (128 in / 256 out) with the var at 0, then 1
  local var=$1 prefix=$2 dir=$3 value rc=0
  for value in 0 1; do
    env "$var=$value" timeout "${STEP_TIMEOUT:-240}" python3 -m radixserve.bench_one_batch --model-path "$MODEL" \
      --load-format dummy --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 256 --warmup 2 \
      --run-name "$prefix$value-bs1" --result-file "$dir/one_batch.jsonl" 2>&1 | tail -4 || rc=1
  done
  return $rc
}

failed=0
for part in $PARTS; do
  dir="$OUT/$part"
  mkdir -p "$dir"
  echo "=== $part ($SHAPE) $(date -u +%H:%M:%S)"
  case $part in
    kernel)
      tune=()
      [[ ${TUNE:-0} == 1 ]] && tune=(--tune)
      timeout "${KERNEL_TIMEOUT:-300}" python3 scripts/gpu_moe_kernel_bench.py --shape "$SHAPE" "${tune[@]}" \
        --out "$dir" 2>&1 | tee "$dir/kernel.log"
      rc=${PIPESTATUS[0]} ;;
    one_batch)
      OUT="$dir" MODEL="$MODEL" SERVING=0 OFFLINE=0 INSTALL_WHEELS=0 STEP_TIMEOUT=${STEP_TIMEOUT:-240} \
        bash scripts/run_gpu_benchmarks.sh
      rc=$? ;;
    decode_ab)
      bs1_ab RADIXSERVE_MOE_DECODE_GEMV gemv "$dir"
      rc=$? ;;
    router_ab)
      bs1_ab RADIXSERVE_TRITON_ROUTER router "$dir"
      rc=$? ;;
    peer)
      timeout "${PEER_TIMEOUT:-540}" python3 benchmarks/peers/gptfast_style_mixtral.py --config "$MODEL" \
        --input-len 128 --output-len 256 --runs "${PEER_RUNS:-3}" --out "$dir/peer.json" 2>&1 | tee "$dir/peer.log"
      rc=${PIPESTATUS[0]} ;;
    serving)
      OUT="$dir" MODEL="$MODEL" INSTALL_WHEELS=0 NUM_PROMPTS=${NUM_PROMPTS:-500} INPUT_LEN=${INPUT_LEN:-1024} \
        OUTPUT_LEN=${OUTPUT_LEN:-256} RANGE_RATIO=${RANGE_RATIO:-1.0} bash scripts/run_gpu_serving_bench.sh
      rc=$? ;;
    *) echo "run_gpu_moe_bench: unknown part $part" >&2; rc=2 ;;
  esac
  [[ $rc != 0 ]] && { echo "=== $part failed (exit $rc)"; failed=1; }
done
exit $failed
