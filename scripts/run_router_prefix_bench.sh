#!/usr/bin/env bash
# What the router's cache_aware policy buys over round_robin in prefix-cache reuse (issue 18): two
# radixserve servers (data-parallel replicas) behind radixserve's router, driven by bench_serving's
# generated-shared-prefix dataset, the same seed and workload for each policy.
#
#   scripts/run_router_prefix_bench.sh        # from anywhere; uses the python on PATH (the venv's)
#
# round_robin deals a group's prompts out to both servers, so each server computes each system prompt
# once; cache_aware sends a group to the server whose router-side prefix tree holds its system prompt,
# so it is computed once in all. The servers start once; before each policy both caches are flushed
# and a fresh router (fresh prefix tree) is started, so neither run inherits the other's cache.
#
# Writes under ${OUT:-/tmp/router_prefix_bench}: results.jsonl (bench_serving's JSON line per policy,
# plus "policy" and "per_server": each server's /metrics counter deltas over the run, warm-up included),
# report.md (the table), bench_<policy>.txt, router_<policy>.log, server_{a,b}.log and env.txt.
# Knobs (environment variables):
#   NUM_GROUPS=8 PROMPTS_PER_GROUP=4 SYSTEM_PROMPT_LEN=256 QUESTION_LEN=16 OUTPUT_LEN=8   the dataset
#   MAX_CONCURRENCY=4  SEED=1  WARMUP_REQUESTS=1  TOKENIZE_PROMPT=1 (token ids: exact lengths; 0: text)
#   POLICIES="round_robin cache_aware"   BENCH_ARGS=  (more bench_serving flags)
#   DTYPE=float32  SERVER_THREADS=1 (torch threads per server: two servers share the cores)
#   SERVER_ARGS=  (more launch_server flags)   ROUTER_ARGS=  (more launch_router flags)
#   PORT_A=31101 PORT_B=31102 ROUTER_PORT=31110 PROMETHEUS_PORT=31111
#   STARTUP_TIMEOUT=300  BENCH_TIMEOUT=900 (seconds, each policy's bench)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/router_prefix_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# NUM_GROUPS, not GROUPS: bash keeps the user's group ids in $GROUPS
NUM_GROUPS=${NUM_GROUPS:-8}
PROMPTS_PER_GROUP=${PROMPTS_PER_GROUP:-4}
SYSTEM_PROMPT_LEN=${SYSTEM_PROMPT_LEN:-256}
QUESTION_LEN=${QUESTION_LEN:-16}
OUTPUT_LEN=${OUTPUT_LEN:-8}
MAX_CONCURRENCY=${MAX_CONCURRENCY:-4}
SEED=${SEED:-1}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-1}
TOKENIZE_PROMPT=${TOKENIZE_PROMPT:-1}
POLICIES=${POLICIES:-round_robin cache_aware}
DTYPE=${DTYPE:-float32}
SERVER_THREADS=${SERVER_THREADS:-1}
PORT_A=${PORT_A:-31101}
PORT_B=${PORT_B:-31102}
ROUTER_PORT=${ROUTER_PORT:-31110}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-31111}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}
HOST=127.0.0.1
URL_A=http://$HOST:$PORT_A
URL_B=http://$HOST:$PORT_B
ROUTER_URL=http://$HOST:$ROUTER_PORT
RESULTS=$OUT/results.jsonl
rm -f "$RESULTS" "$OUT"/bench_*.jsonl "$OUT/report.md"  # bench_serving appends: no stale lines

log() { echo "run_router_prefix_bench: $*" >&2; }

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "nproc $(nproc)"
  python -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
  echo "tree $(git describe --always --dirty 2>/dev/null)"  # -dirty: uncommitted edits ran too
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

# ---- processes: each in its own process group (setsid), so stopping one reaches its children too
PIDS=()
stop() {  # $1: pid; TERM to the leader (servers stop their scheduler and detokenizer), then KILL the
  # group, which also reaches children left behind by a leader that already exited
  local pid=$1
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

start() {  # $1: log file, then the command; sets STARTED to its pid
  echo "$*" >"$1"
  local logfile=$1
  shift
  setsid "$@" >>"$logfile" 2>&1 &
  STARTED=$!
  PIDS+=("$STARTED")
}

http_ok() {  # $1: URL; true when it answers 200
  curl -sf -o /dev/null --max-time 60 "$1"
}

wait_ok() {  # $1: URL, $2: pid that must stay alive, $3: its log
  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  until http_ok "$1"; do
    if ! kill -0 "$2" 2>/dev/null; then
      log "exited while starting; last lines of $3:"; tail -20 "$3" >&2; return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$1 not ready after ${STARTUP_TIMEOUT}s; last lines of $3:"; tail -20 "$3" >&2; return 1
    fi
    sleep 2
  done
}

metrics_json() {  # the radixserve: counters of both servers as one JSON object, for the per-server deltas
  python - "$URL_A" "$URL_B" <<'EOF'
import json, sys, urllib.request
out = {}
for url in sys.argv[1:]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    counts = {}
    for line in text.splitlines():
        for name in ("prompt_tokens", "cached_tokens", "num_requests"):
            if line.startswith(f"radixserve:{name}_total"):
                counts[name] = counts.get(name, 0) + int(float(line.rsplit(" ", 1)[1]))
    out[url] = counts
print(json.dumps(out))
EOF
}

# ---- the two servers, started together (each loads in ~20-30 s)
SERVER_CMD=(python -m radixserve.launch_server --host "$HOST" --dtype "$DTYPE")
# shellcheck disable=SC2206  # a list of flags, split on purpose
SERVER_CMD+=(${SERVER_ARGS:-})
export OMP_NUM_THREADS=$SERVER_THREADS  # torch's intra-op threads in each server
start "$OUT/server_a.log" "${SERVER_CMD[@]}" --port "$PORT_A"; PID_A=$STARTED
start "$OUT/server_b.log" "${SERVER_CMD[@]}" --port "$PORT_B"; PID_B=$STARTED
unset OMP_NUM_THREADS
wait_ok "$URL_A/health" "$PID_A" "$OUT/server_a.log" || exit 1
wait_ok "$URL_B/health" "$PID_B" "$OUT/server_b.log" || exit 1
log "servers ready at $URL_A and $URL_B"

BENCH_CMD=(python -m radixserve.bench_serving --backend radixserve --base-url "$ROUTER_URL"
           --dataset-name generated-shared-prefix --gsp-num-groups "$NUM_GROUPS"
           --gsp-prompts-per-group "$PROMPTS_PER_GROUP" --gsp-system-prompt-len "$SYSTEM_PROMPT_LEN"
           --gsp-question-len "$QUESTION_LEN" --gsp-output-len "$OUTPUT_LEN"
           --max-concurrency "$MAX_CONCURRENCY" --seed "$SEED" --warmup-requests "$WARMUP_REQUESTS"
           --disable-tqdm)
[[ $TOKENIZE_PROMPT == 1 ]] && BENCH_CMD+=(--tokenize-prompt)
# shellcheck disable=SC2206  # a list of flags, split on purpose
BENCH_CMD+=(${BENCH_ARGS:-})

rc=0
for policy in $POLICIES; do
  for url in "$URL_A" "$URL_B"; do
    curl -sf -o /dev/null --max-time 60 -X POST "$url/flush_cache" || { log "flush_cache of $url failed"; exit 1; }
  done
  router_log=$OUT/router_$policy.log
  # shellcheck disable=SC2206  # a list of flags, split on purpose
  start "$router_log" python -m radixserve.launch_router --worker-urls "$URL_A" "$URL_B" --host "$HOST" \
    --port "$ROUTER_PORT" --prometheus-port "$PROMETHEUS_PORT" --policy "$policy" ${ROUTER_ARGS:-}
  router_pid=$STARTED
  wait_ok "$ROUTER_URL/readiness" "$router_pid" "$router_log" || exit 1
  before=$(metrics_json) || { log "reading /metrics failed"; exit 1; }
  log "$policy: ${BENCH_CMD[*]} --output-file $OUT/bench_$policy.jsonl"
  timeout "$BENCH_TIMEOUT" "${BENCH_CMD[@]}" --output-file "$OUT/bench_$policy.jsonl" 2>&1 \
    | tee "$OUT/bench_$policy.txt"
  bench_rc=${PIPESTATUS[0]}
  after=$(metrics_json) || { log "reading /metrics failed"; exit 1; }
  stop "$router_pid"
  if [[ $bench_rc != 0 ]]; then
    log "$policy: the bench failed (exit $bench_rc); see $OUT/bench_$policy.txt and $router_log"
    rc=1
    continue
  fi
  # one line per policy: the bench's, tagged, with what each server counted over the run
  python - "$policy" "$OUT/bench_$policy.jsonl" "$before" "$after" >>"$RESULTS" <<'EOF'
import json, sys
policy, path, before, after = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
row = json.loads(open(path).readlines()[-1])
per_server = {url: {k: after[url].get(k, 0) - before[url].get(k, 0) for k in after[url]} for url in after}
print(json.dumps({"policy": policy, **row, "per_server": per_server}))
EOF
done

# ---- the table
[[ -s $RESULTS ]] || { log "no results"; exit 1; }
python - "$RESULTS" <<'EOF' | tee "$OUT/report.md"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| policy | requests | cache hit rate | cached / prompt tokens | request/s | output tok/s | mean TTFT "
      "| per server: requests, cached / prompt tokens |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    servers = "; ".join(f"{s.get('num_requests', 0)}, {s.get('cached_tokens', 0):,} / {s.get('prompt_tokens', 0):,}"
                        for s in r["per_server"].values())
    hit = "n/a" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.1f}%"
    print(f"| {r['policy']} | {r['completed']} (failed {r['failed']}) | {hit} | "
          f"{r['total_cached_tokens'] or 0:,} / {r['total_input_tokens']:,} | {r['request_throughput']:.2f} | "
          f"{r['output_throughput']:.1f} | {r['mean_ttft_ms']:.0f} ms | {servers} |")
EOF
log "results in $OUT (exit $rc)"
exit "$rc"
