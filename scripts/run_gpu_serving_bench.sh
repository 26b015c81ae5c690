#!/usr/bin/env bash
# Online serving bench on the GPU machine (no internet): start a radixserve server on the Llama-3.1-8B
# architecture with dummy weights and no tokenizer, drive it with bench_serving --tokenize-prompt
# (token-id prompts of exact lengths), and stop it.
#
#   scripts/build_gpu_wheels.sh          # here, once: fills .whl/ (carry it to the GPU machine)
#   scripts/run_gpu_serving_bench.sh     # there, from the repo root
#
# Writes under ${OUT:-/tmp/out}: serving.jsonl (bench_serving's JSON line), serving_report.txt (its
# printed report and errors), server.log and env.txt. Exits non-zero when the server does not come up,
# the bench fails or times out, or any request failed.
# Knobs (environment variables):
#   NUM_PROMPTS=500 INPUT_LEN=4096 OUTPUT_LEN=2048 RANGE_RATIO=0.0   the random dataset: lengths uniform
#                           in [ratio*len, len] (SGLang's --random-range-ratio; 1.0 makes them exact)
#   REQUEST_RATE=inf        WARMUP_REQUESTS=1   BENCH_ARGS=  (more bench_serving flags, e.g.
#                           "--max-concurrency 64")
#   MODEL=radixserve/configs/llama-3.1-8b  LOAD_FORMAT=dummy  DTYPE=bfloat16  DEVICE=  (--device when set)
#   SERVER_ARGS=            more launch_server flags, e.g. "--disable-overlap-schedule"
#   PORT=30000              STARTUP_TIMEOUT=300 (seconds for /health)
#   TOTAL_TIMEOUT=570       the whole script, inside the device tool's 10-minute limit; the bench gets
#                           what start-up left, less STOP_GRACE=20 for stopping the server
#   INSTALL_WHEELS=1        (DEVICE=cpu DTYPE=float32 INSTALL_WHEELS=0 MODEL=radixserve/configs/tiny-llama
#                           NUM_PROMPTS=8 INPUT_LEN=64 OUTPUT_LEN=16 smoke-tests it on a CPU box)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$SECONDS

NUM_PROMPTS=${NUM_PROMPTS:-500}
INPUT_LEN=${INPUT_LEN:-4096}
OUTPUT_LEN=${OUTPUT_LEN:-2048}
RANGE_RATIO=${RANGE_RATIO:-0.0}
REQUEST_RATE=${REQUEST_RATE:-inf}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-1}
MODEL=${MODEL:-radixserve/configs/llama-3.1-8b}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
DTYPE=${DTYPE:-bfloat16}
PORT=${PORT:-30000}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-570}
STOP_GRACE=${STOP_GRACE:-20}
RESULTS="$OUT/serving.jsonl"
REPORT="$OUT/serving_report.txt"
SERVER_LOG="$OUT/server.log"
rm -f "$RESULTS" "$REPORT" "$SERVER_LOG"  # bench_serving appends; a stale line would pass for this run's

log() { echo "run_gpu_serving_bench: $*" | tee -a "$REPORT" >&2; }

if [[ ${INSTALL_WHEELS:-1} == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { log "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  log "not installing .whl/; using the packages already installed"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keep a wheel folder exported by the caller
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)'
} >"$OUT/env.txt" 2>&1

# ---- the server: its own process group, so a last kill reaches the scheduler and detokenizer too
SERVER_CMD=(python3 -m radixserve.launch_server --model-path "$MODEL" --load-format "$LOAD_FORMAT"
            --dtype "$DTYPE" --host 127.0.0.1 --port "$PORT")
[[ -n ${DEVICE:-} ]] && SERVER_CMD+=(--device "$DEVICE")
# shellcheck disable=SC2206  # SERVER_ARGS is a list of flags, split on purpose
SERVER_CMD+=(${SERVER_ARGS:-})
echo "${SERVER_CMD[*]}" >"$SERVER_LOG"
setsid "${SERVER_CMD[@]}" >>"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

stop_server() {
  [[ -z ${SERVER_PID:-} ]] && return
  # SIGTERM to the server alone (it stops its children); a second one stops it at once rather than after
  # draining; whatever is left after that is killed, children included
  local sig
  for sig in TERM TERM; do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    kill -"$sig" "$SERVER_PID" 2>/dev/null
    for _ in $(seq "$STOP_GRACE"); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
  done
  kill -KILL -- "-$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
trap stop_server EXIT
trap 'log "interrupted"; exit 130' INT TERM

http_ok() {  # $1: path; true when the server answers 200
  python3 - "http://127.0.0.1:$PORT$1" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=60).status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

log "starting the server: ${SERVER_CMD[*]}"
deadline=$((SECONDS + STARTUP_TIMEOUT))
until http_ok /health; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server exited during start-up; last lines of $SERVER_LOG:"
    tail -20 "$SERVER_LOG" | tee -a "$REPORT" >&2
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    log "the server was not healthy after ${STARTUP_TIMEOUT}s; last lines of $SERVER_LOG:"
    tail -20 "$SERVER_LOG" | tee -a "$REPORT" >&2
    exit 1
  fi
  sleep 2
done
# /health is 200 after the server's own warm-up; one more generation proves the whole path works
http_ok /health_generate || { log "/health_generate failed; see $SERVER_LOG"; exit 1; }
log "server healthy after $((SECONDS - START))s"

# ---- the bench, with what is left of the overall budget
BENCH_TIMEOUT=$((TOTAL_TIMEOUT - (SECONDS - START) - STOP_GRACE))
((BENCH_TIMEOUT < 30)) && { log "only ${BENCH_TIMEOUT}s left for the bench; raise TOTAL_TIMEOUT"; exit 1; }
BENCH_CMD=(python3 -m radixserve.bench_serving --backend radixserve --host 127.0.0.1 --port "$PORT"
           --tokenize-prompt --dataset-name random --num-prompts "$NUM_PROMPTS"
           --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --random-range-ratio "$RANGE_RATIO"
           --request-rate "$REQUEST_RATE" --warmup-requests "$WARMUP_REQUESTS" --disable-tqdm
           --output-file "$RESULTS")
# shellcheck disable=SC2206  # BENCH_ARGS is a list of flags, split on purpose
BENCH_CMD+=(${BENCH_ARGS:-})
log "bench (timeout ${BENCH_TIMEOUT}s): ${BENCH_CMD[*]}"
timeout "$BENCH_TIMEOUT" "${BENCH_CMD[@]}" 2>&1 | tee -a "$REPORT"
rc=${PIPESTATUS[0]}
if [[ $rc == 124 ]]; then
  log "the bench ran past ${BENCH_TIMEOUT}s and was stopped: lower NUM_PROMPTS, INPUT_LEN or OUTPUT_LEN"
elif [[ $rc != 0 ]]; then
  log "the bench failed (exit $rc)"
fi
if [[ $rc == 0 ]]; then
  # bench_serving succeeds when any request did; a benchmark with failed requests is not a clean figure
  failed=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["failed"])' \
    "$RESULTS" 2>/dev/null) || failed=unknown
  if [[ $failed != 0 ]]; then
    log "$failed requests failed; see $REPORT and $SERVER_LOG"
    rc=1
  fi
fi
stop_server
log "done in $((SECONDS - START))s (exit $rc); results in $OUT"
exit "$rc"
