#!/usr/bin/env bash
# Run radixserve's GPU benchmarks on a fresh machine without internet, and write a Markdown summary.
#
#   scripts/build_gpu_wheels.sh          # here, once: fills .whl/ (carry it to the GPU machine)
#   scripts/run_gpu_benchmarks.sh        # there, from the repo root
#
# Writes under ${OUT:-/tmp/out}: gpu_bench.md (each figure beside its physical limit), one_batch.jsonl,
# offline.jsonl (when that bench could run), bench.log (everything printed) and env.txt.
# Knobs (environment variables):
#   QUICK=1                 smaller shapes, for a smoke run of a minute or two
#   MODEL=path|name         default radixserve/configs/llama-3.1-8b (dummy weights, bf16)
#   DTYPE=bfloat16          WARMUP=1          STEP_TIMEOUT=120 (seconds per bench command)
#   DEVICE=cuda             INSTALL_WHEELS=1  (DEVICE=cpu INSTALL_WHEELS=0 MODEL=tiny-llama DTYPE=float32
#                           QUICK=1 smoke-tests this script on a CPU box)
#   ATTENTION_BACKEND=      passed as --attention-backend when set (torch_native, triton)
#   DISABLE_CUDA_GRAPH=0    1 passes --disable-cuda-graph
#   RUNS_SPEC=              "name batch input output;..." instead of the three default runs
#   MEM_FRACTION=           passed as --mem-fraction-static when set
#   PEAK_GBPS= PEAK_TFLOPS=  the limits the figures are compared with (default: bench_one_batch's measured
#                           figures for the GPU found, H100 or H200)
#   OFFLINE=auto|1|0        bench_offline_throughput: auto runs it only if a tiny tokenizer-less
#                           probe passes (the engine's detokenizer needs a tokenizer today)
#   OFFLINE_PROMPTS=64 OFFLINE_INPUT=512 OFFLINE_OUTPUT=128
#   SERVING=1               also run scripts/run_gpu_serving_bench.sh (a server + bench_serving, 500 random
#                           prompts up to 4096 in / 2048 out: about 3 minutes on an H200) into $OUT/serving/;
#                           its knobs (NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, SERVER_ARGS, ...) pass through.
#                           Under a 10-minute command limit, run SERVING=0 here and the serving script alone.
# worst case with SERVING=0, every step timing out: 3 x 120 + 90 + 120 s, inside the device tool's 10-minute limit
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

MODEL=${MODEL:-radixserve/configs/llama-3.1-8b}
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
WARMUP=${WARMUP:-1}
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
OFFLINE=${OFFLINE:-auto}
LOG="$OUT/bench.log"
RESULTS="$OUT/one_batch.jsonl"
OFFLINE_RESULTS="$OUT/offline.jsonl"
rm -f "$LOG" "$RESULTS" "$OFFLINE_RESULTS"

if [[ ${INSTALL_WHEELS:-1} == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "run_gpu_benchmarks: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "run_gpu_benchmarks: not installing .whl/; using the packages already installed" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keep a wheel folder exported by the caller
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)'
} >"$OUT/env.txt" 2>&1

if [[ ${QUICK:-0} == 1 ]]; then
  # (name, batch, input, output)
  RUNS=("decode-bs1 1 128 32" "bs8-in256 8 256 8" "prefill-8x256 8 256 1")
  OFFLINE_PROMPTS=${OFFLINE_PROMPTS:-16} OFFLINE_INPUT=${OFFLINE_INPUT:-256} OFFLINE_OUTPUT=${OFFLINE_OUTPUT:-32}
else
  RUNS=("decode-bs1 1 128 256" "bs32-in1024 32 1024 16" "prefill-32x1024 32 1024 1")
  OFFLINE_PROMPTS=${OFFLINE_PROMPTS:-64} OFFLINE_INPUT=${OFFLINE_INPUT:-512} OFFLINE_OUTPUT=${OFFLINE_OUTPUT:-128}
fi

# RUNS_SPEC="name bs in out;name bs in out" replaces the runs above
[[ -n ${RUNS_SPEC:-} ]] && IFS=';' read -ra RUNS <<<"$RUNS_SPEC"
EXTRA=()
[[ -n ${ATTENTION_BACKEND:-} ]] && EXTRA+=(--attention-backend "$ATTENTION_BACKEND")
[[ ${DISABLE_CUDA_GRAPH:-0} == 1 ]] && EXTRA+=(--disable-cuda-graph)
[[ -n ${MEM_FRACTION:-} ]] && EXTRA+=(--mem-fraction-static "$MEM_FRACTION")
[[ -n ${PEAK_GBPS:-} ]] && EXTRA+=(--peak-gbps "$PEAK_GBPS")
[[ -n ${PEAK_TFLOPS:-} ]] && EXTRA+=(--peak-tflops "$PEAK_TFLOPS")

failed=0
for run in "${RUNS[@]}"; do
  read -r name bs input output <<<"$run"
  echo "=== bench_one_batch $name: batch $bs, input $input, output $output" | tee -a "$LOG"
  # the prefill-only run gets an extra warm-up: its one timed pass is the whole figure
  warm=$WARMUP
  [[ $output == 1 ]] && warm=$((WARMUP + 1))
  timeout "$STEP_TIMEOUT" python3 -m radixserve.bench_one_batch --model-path "$MODEL" --load-format dummy \
    --dtype "$DTYPE" --device "$DEVICE" --batch-size "$bs" --input-len "$input" --output-len "$output" \
    --warmup "$warm" --run-name "$name" --result-file "$RESULTS" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [[ $rc != 0 ]]; then
    echo "=== $name failed (exit $rc)" | tee -a "$LOG"
    failed=1
  fi
done

offline_note=""
if [[ $OFFLINE == auto ]]; then
  echo "=== probing bench_offline_throughput on a tokenizer-less dummy model" | tee -a "$LOG"
  if timeout 90 python3 -m radixserve.bench_offline_throughput --model-path radixserve/configs/tiny-llama \
      --load-format dummy --device "$DEVICE" --num-prompts 2 --input-len 8 --output-len 2 --hf-batch1-prompts 0 \
      >>"$LOG" 2>&1; then
    OFFLINE=1
  else
    OFFLINE=0
    offline_note="skipped: the tokenizer-less probe failed ($(grep -E 'Error|error' "$LOG" | tail -1 | cut -c1-160))"
  fi
fi
if [[ $OFFLINE == 1 ]]; then
  echo "=== bench_offline_throughput: $OFFLINE_PROMPTS prompts, input $OFFLINE_INPUT, output $OFFLINE_OUTPUT" \
    | tee -a "$LOG"
  timeout "$STEP_TIMEOUT" python3 -m radixserve.bench_offline_throughput --model-path "$MODEL" \
    --load-format dummy --dtype "$DTYPE" --device "$DEVICE" --num-prompts "$OFFLINE_PROMPTS" \
    --input-len "$OFFLINE_INPUT" --output-len "$OFFLINE_OUTPUT" --hf-batch1-prompts 0 \
    --result-file "$OFFLINE_RESULTS" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [[ $rc != 0 ]] && { offline_note="failed (exit $rc); see bench.log"; failed=1; }
elif [[ -z $offline_note ]]; then
  offline_note="skipped (OFFLINE=0)"
fi

if [[ ${SERVING:-1} == 1 ]]; then
  echo "=== serving: scripts/run_gpu_serving_bench.sh -> $OUT/serving" | tee -a "$LOG"
  # the wheels (if any) are installed and on PYTHONPATH already
  if [[ ${QUICK:-0} == 1 ]]; then
    export NUM_PROMPTS=${NUM_PROMPTS:-16} INPUT_LEN=${INPUT_LEN:-256} OUTPUT_LEN=${OUTPUT_LEN:-32}
  fi
  OUT="$OUT/serving" INSTALL_WHEELS=0 MODEL="$MODEL" DTYPE="$DTYPE" DEVICE="$DEVICE" \
    bash scripts/run_gpu_serving_bench.sh 2>&1 | tee -a "$LOG"
  [[ ${PIPESTATUS[0]} != 0 ]] && failed=1
fi

python3 - "$OUT" "$offline_note" <<'EOF'
import json, os, sys

out, offline_note = sys.argv[1], sys.argv[2]

def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

def num(value, spec):
    return "-" if value is None else format(value, spec)

def pct(value, limit):
    return "-" if value is None or not limit else f"{100 * value / limit:.0f}%"

rows = load("one_batch.jsonl")
lines = ["# radixserve GPU benchmarks", ""]
env = open(os.path.join(out, "env.txt"), encoding="utf-8").read().strip()
lines += ["```", env, "```", ""]
if rows:
    r0 = rows[0]
    gbps, tflops = r0.get("peak_gbps"), r0.get("peak_tflops")
    params = r0["params"]
    size = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    lines += [
        f"Model `{r0['model_path']}` ({size} params, dummy weights), {r0['dtype']}, "
        f"attention `{r0['attention_backend_class']}`, torch {r0['torch']}, on {r0.get('gpu', r0['device'])}.",
        "",
        (f"Limits: {gbps:g} GB/s memory bandwidth, {tflops:g} TFLOP/s dense. A floor is the step's unavoidable "
         "work at that limit: a decode step must read every weight once plus the batch's KV; a prefill must do "
         "2 FLOPs per weight per token (LM head once per request) plus causal attention.")
        if gbps else "Not on CUDA: no limits to compare with.",
        "",
        "## bench_one_batch (static batch, no scheduler)", "",
        "| run | batch | input | output | prefill s (floor) | prefill tok/s (limit) | prefill TFLOP/s (% of limit) "
        "| decode ms/step, median (floor) | decode tok/s (limit) | decode GB/s (% of limit) | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run_name']} | {r['batch_size']} | {r['input_len']} | {r['output_len']} | "
                         f"failed: {r['error'][:80]} ||||||| ")
            continue
        bs, inp = r["batch_size"], r["input_len"]
        p_floor, d_floor = r.get("prefill_floor_s"), r.get("decode_floor_ms")
        p_limit = bs * inp / p_floor if p_floor else None
        d_limit = bs / (d_floor / 1e3) if d_floor else None
        lines.append(
            f"| {r['run_name']} | {bs} | {inp} | {r['output_len']} "
            f"| {num(r['prefill_latency_s'], '.4f')} ({num(p_floor, '.4f')}) "
            f"| {num(r['prefill_throughput_tok_s'], ',.0f')} ({num(p_limit, ',.0f')}) "
            f"| {num(r['prefill_achieved_tflops'], '.1f')} ({pct(r['prefill_achieved_tflops'], tflops)}) "
            f"| {num(r['decode_median_ms'], '.2f')} ({num(d_floor, '.2f')}) "
            f"| {num(r['decode_throughput_tok_s'], ',.0f')} ({num(d_limit, ',.0f')}) "
            f"| {num(r['decode_achieved_gbps'], ',.0f')} ({pct(r['decode_achieved_gbps'], gbps)}) "
            f"| {num(r['total_latency_s'], '.3f')} |")
else:
    lines += ["## bench_one_batch", "", "No results: see bench.log."]
lines += ["", "## bench_offline_throughput (engine, continuous batching)", ""]
offline = load("offline.jsonl")
if offline:
    rec = offline[-1]
    cfg = rec["config"]
    lines += [f"{cfg['num_prompts']} prompts, input {cfg['input_len']}, output {cfg['output_len']}; engine "
              f"{rec['engine']}.", "",
              "| system | mode | requests | output tok/s | total tok/s | req/s | seconds |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for m in rec["results"]:
        lines.append(f"| {m['system']} | {m['mode']} | {m['num_requests']} | {m['output_tok_s']:,.1f} | "
                     f"{m['total_tok_s']:,.1f} | {m['requests_s']:.2f} | {m['seconds']:.2f} |")
else:
    lines.append(offline_note or "no results: see bench.log")
serving = load(os.path.join("serving", "serving.jsonl"))
if serving:
    r = serving[-1]
    lines += ["", "## bench_serving (server, random dataset, token-id prompts)", "",
              f"{r['completed']} of {r['num_prompts']} requests done ({r['failed']} failed), inputs up to "
              f"{r['random_input_len']} and outputs up to {r['random_output_len']} tokens (range ratio "
              f"{r['random_range_ratio']}), request rate {r['request_rate']}.", "",
              "| output tok/s | total tok/s | duration s | mean TTFT ms | median ITL ms | mean TPOT ms |",
              "|---:|---:|---:|---:|---:|---:|",
              f"| {r['output_throughput']:,.1f} | {r['total_throughput']:,.1f} | {r['duration']:.1f} | "
              f"{r['mean_ttft_ms']:,.0f} | {r['median_itl_ms']:.1f} | {r['mean_tpot_ms']:.1f} |"]
with open(os.path.join(out, "gpu_bench.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $failed
