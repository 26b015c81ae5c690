#!/usr/bin/env bash
# PD serving bench on one GPU machine (no internet): a prefill and a decode server (1P1D) on the one GPU,
# each with its share of the memory, moving KV through Mooncake's transfer engine (TCP over loopback,
# staged through host memory), SGLang's router in front of them, and bench_serving --tokenize-prompt
# through the router; then each server's /metrics, and the TTFT split into prefill, KV transfer and
# first decode step. The same bench on one ordinary server is scripts/run_gpu_serving_bench.sh with the
# same NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN and RANGE_RATIO.
#
#   WHEEL_SET=pd scripts/build_gpu_wheels.sh   # here, once: fills build/whl-pd/ (carry it; 57 MB of the
#                                              # device tool's 64 MiB)
#   scripts/run_gpu_pd_bench.sh                # there, from the repo root
#
# Before the servers it checks that Mooncake imports (it links libibverbs.so.1, libmlx5.so.1,
# libnuma.so.1 and libcurl.so.4: those the machine lacks are taken from SYSLIBS, a tarball of them, when
# given) and that it moves device memory: one process writes PROBE_BYTES of GPU memory into another's
# through Mooncake in 2 MiB copies, and the receiver compares them (PD_CHECK_ONLY=1 stops there).
#
# Writes under ${OUT:-/tmp/out} (6 files, inside the device tool's 8): pd_report.txt (this script's log,
# the probe's and bench_serving's reports, the summary table), pd_serving.jsonl (bench_serving's JSON
# line), pd_metrics.txt (/metrics of the prefill server, the decode server and the router, before and
# after the timed run), pd_summary.json, pd_logs.tar.gz (the servers', the router's and the probe's logs)
# and env.txt. Exits non-zero when a part does not come up, the bench fails or times out, or any request
# failed.
# Knobs (environment variables):
#   NUM_PROMPTS=500 INPUT_LEN=1024 OUTPUT_LEN=256 RANGE_RATIO=1.0   the random dataset (lengths uniform in
#                           [ratio*len, len]; 1.0 makes them exact)
#   REQUEST_RATE=inf        WARMUP_REQUESTS=1 (the timed bench's own, as run_gpu_serving_bench.sh's)
#   PD_WARMUP_PROMPTS=16    an untimed bench of that many prompts first    BENCH_ARGS=  (more bench flags)
#   MODEL=radixserve/configs/llama-3.1-8b  LOAD_FORMAT=dummy  DTYPE=bfloat16  DEVICE=  (--device when set)
#   PREFILL_MEM_FRACTION=0.4  DECODE_MEM_FRACTION=0.85   --mem-fraction-static of each. As in SGLang it is
#                           a bound on the whole GPU's use, other processes' memory included, and the
#                           prefill server starts first: the decode server gets what lies between the two
#                           (0.45 of the GPU less the prefill server's context and graphs), and 0.15 is left
#                           for the decode server's own activations
#   SERVER_ARGS=            more launch_server flags for both; PREFILL_ARGS= DECODE_ARGS= for one
#   PORT=30000              the prefill server; the decode server PORT+1, the router PORT+2 (its
#                           Prometheus port PORT+3), the prefill server's bootstrap port PORT+4
#   ROUTER_ARGS="--policy round_robin"   more sglang_router.launch_router flags
#   MC_FORCE_TCP=1          exported to both servers (Mooncake's TCP transport, as the tests use); set
#                           empty to leave it unset
#   STARTUP_TIMEOUT=300     seconds for each server's /health and the router's readiness
#   TOTAL_TIMEOUT=570       the whole script, inside the device tool's 10-minute limit; the bench gets
#                           what start-up left, less STOP_GRACE=20 for stopping
#   WHEELS=build/whl-pd INSTALL_WHEELS=1   SYSLIBS=build/syslibs.tar.gz (used only when it exists)
#   MOONCAKE_CHECK=1 PROBE_BYTES=1073741824 PROBE_PROTOCOL=tcp (the probe's initialize() protocol; the
#                           servers' is tcp without --disaggregation-ib-device) PROBE_TIMEOUT=120 PD_CHECK_ONLY=0
#   (DEVICE=cpu DTYPE=float32 INSTALL_WHEELS=0 MODEL=radixserve/configs/tiny-llama NUM_PROMPTS=8
#   INPUT_LEN=64 OUTPUT_LEN=16 smoke-tests it on a CPU box; the probe then writes host memory)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$SECONDS

NUM_PROMPTS=${NUM_PROMPTS:-500}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
RANGE_RATIO=${RANGE_RATIO:-1.0}
REQUEST_RATE=${REQUEST_RATE:-inf}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-1}
MODEL=${MODEL:-radixserve/configs/llama-3.1-8b}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
DTYPE=${DTYPE:-bfloat16}
PREFILL_MEM_FRACTION=${PREFILL_MEM_FRACTION:-0.4}
DECODE_MEM_FRACTION=${DECODE_MEM_FRACTION:-0.85}
PORT=${PORT:-30000}
PREFILL_PORT=$PORT
DECODE_PORT=$((PORT + 1))
ROUTER_PORT=$((PORT + 2))
ROUTER_METRICS_PORT=$((PORT + 3))
BOOTSTRAP_PORT=$((PORT + 4))
ROUTER_ARGS=${ROUTER_ARGS:---policy round_robin}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-570}
STOP_GRACE=${STOP_GRACE:-20}
WHEELS=${WHEELS:-build/whl-pd}
SYSLIBS=${SYSLIBS:-build/syslibs.tar.gz}
PROBE_BYTES=${PROBE_BYTES:-1073741824}
MC_FORCE_TCP=${MC_FORCE_TCP-1}
if [[ -n $MC_FORCE_TCP ]]; then export MC_FORCE_TCP; else unset MC_FORCE_TCP; fi  # Mooncake reads "set"
PROBE_PROTOCOL=${PROBE_PROTOCOL:-tcp}

REPORT="$OUT/pd_report.txt"
RESULTS="$OUT/pd_serving.jsonl"
METRICS="$OUT/pd_metrics.txt"
SUMMARY="$OUT/pd_summary.json"
LOGS=$(mktemp -d /tmp/pd_logs.XXXXXX)
rm -f "$REPORT" "$RESULTS" "$METRICS" "$SUMMARY" "$OUT/pd_logs.tar.gz"  # bench_serving appends

log() { echo "run_gpu_pd_bench: $*" | tee -a "$REPORT" >&2; }

# ---- packages and system libraries
if [[ ${INSTALL_WHEELS:-1} == 1 ]]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || { log "no wheels in $WHEELS: run WHEEL_SET=pd scripts/build_gpu_wheels.sh and carry it"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { log "installing $WHEELS failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  export PATH=/tmp/site/bin:$PATH
else
  log "not installing $WHEELS; using the packages already installed"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Mooncake links these even for TCP; a library the machine lacks is taken from $SYSLIBS (extracted to
# /tmp/pd_syslibs/all, linked one by one into /tmp/pd_syslibs, so the machine's own ones stay first)
missing_libs=()
have_lib() { ldconfig -p | awk '{print $1}' | grep -xF "$1" >/dev/null; }  # no -q: under pipefail its early exit fails the pipe
for lib in libibverbs.so.1 libmlx5.so.1 libnuma.so.1 libcurl.so.4; do
  have_lib "$lib" || missing_libs+=("$lib")
done
if ((${#missing_libs[@]})); then
  log "the machine lacks ${missing_libs[*]}"
  if [[ -f $SYSLIBS ]]; then
    rm -rf /tmp/pd_syslibs && mkdir -p /tmp/pd_syslibs/all && tar -xzf "$SYSLIBS" -C /tmp/pd_syslibs/all
    taken=()
    for f in /tmp/pd_syslibs/all/*; do
      name=$(basename "$f")
      have_lib "$name" || { ln -s "$f" "/tmp/pd_syslibs/$name"; taken+=("$name"); }
    done
    export LD_LIBRARY_PATH=/tmp/pd_syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    log "taken from $SYSLIBS: ${taken[*]}"
  else
    log "and there is no $SYSLIBS to take them from (apt-get install libibverbs1 ibverbs-providers libnuma1 libcurl4)"
  fi
fi
# Mooncake's CUDA build links libcudart.so.13, which torch's CUDA wheels hold
cudart=$(python3 - <<'EOF' 2>/dev/null
import glob, os, sys
for p in sys.path:
    for f in glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcudart.so.*")) + glob.glob(os.path.join(p, "nvidia", "cuda_runtime", "lib", "libcudart.so.*")):
        print(os.path.dirname(f)); raise SystemExit
EOF
)
[[ -n $cudart ]] && export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$cudart

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  # the commit, where this tree is a checkout of its own (a copy inside another checkout is not)
  [[ $(git rev-parse --show-toplevel 2>/dev/null) == "$PWD" ]] && git log -1 --format='%h %s' || echo "(not a git checkout)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)'
  echo "missing system libraries: ${missing_libs[*]:-none}; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  grep -h -E "^(PRETTY_NAME)=" /etc/os-release 2>/dev/null
} >"$OUT/env.txt" 2>&1

# ---- processes: each in its own process group, stopped in reverse order
PIDS=()      # prefill server, decode server, router, as started
NAMES=()
start_bg() {  # $1: name (its log is $LOGS/$1.log); the rest: the command
  local name=$1; shift
  echo "$*" >"$LOGS/$name.log"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 &
  PIDS+=("$!"); NAMES+=("$name")
}
stop_one() {  # $1: pid. SIGTERM (a server stops its children), again to skip draining, then KILL the group
  local pid=$1 sig
  for sig in TERM TERM; do
    kill -0 "$pid" 2>/dev/null || break
    kill -"$sig" "$pid" 2>/dev/null
    for _ in $(seq "$STOP_GRACE"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}
stop_all() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_one "${PIDS[i]}"; done
  PIDS=(); NAMES=()
}
finish() {
  stop_all
  tar -czf "$OUT/pd_logs.tar.gz" -C "$LOGS" . 2>/dev/null
  rm -rf "$LOGS"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM

http_ok() {  # $1: URL; true when it answers 200
  python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=60).status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
wait_for() {  # $1: name (of its log too), $2: pid, $3: a command that succeeds once it is up
  local name=$1 pid=$2 check=$3 deadline=$((SECONDS + STARTUP_TIMEOUT))
  until eval "$check"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during start-up; last lines of its log:"
      tail -20 "$LOGS/$name.log" | tee -a "$REPORT" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$name was not up after ${STARTUP_TIMEOUT}s; last lines of its log:"
      tail -20 "$LOGS/$name.log" | tee -a "$REPORT" >&2
      return 1
    fi
    sleep 2
  done
  log "$name up after $((SECONDS - START))s"
}

# ---- Mooncake: imports, and moves device memory between two processes
if [[ ${MOONCAKE_CHECK:-1} == 1 ]]; then
  log "Mooncake probe: $PROBE_BYTES bytes from one process's memory into another's (protocol $PROBE_PROTOCOL;" \
      "$(env | grep -E '^MC_' | tr '\n' ' '))"
  cat >"$LOGS/probe.py" <<'EOF'
import os, subprocess, sys, time

import torch

CHUNK = 2 << 20  # one layer's K (or V) of a 1,024-token run of Llama-3.1-8B's KV in bf16
nbytes, device = int(sys.argv[1]) // CHUNK * CHUNK, sys.argv[2] or ("cuda" if torch.cuda.is_available() else "cpu")
role = os.environ.get("PROBE_ROLE", "sender")


def pattern() -> torch.Tensor:  # the same bytes in both processes
    g = torch.Generator(device=device).manual_seed(1234)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=g)


def engine(buf: torch.Tensor):
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    rc = e.initialize("127.0.0.1", "P2PHANDSHAKE", os.environ.get("PROBE_PROTOCOL", "tcp"), "")
    assert rc == 0, f"Mooncake initialize: rc {rc}"
    rc = e.register_memory(buf.data_ptr(), buf.numel())
    assert rc == 0, f"Mooncake register_memory of {buf.numel()} bytes of {buf.device} memory: rc {rc}"
    return e


if role == "receiver":
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    e = engine(buf)
    print(f"127.0.0.1:{e.get_rpc_port()} {buf.data_ptr()}", flush=True)
    sys.stdin.readline()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    wrong = int((buf != pattern()).sum())
    print("equal" if wrong == 0 else f"{wrong} of {nbytes} bytes differ", flush=True)
    sys.exit(0 if wrong == 0 else 1)

print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""))
child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PROBE_ROLE": "receiver"})
src = pattern()
e = engine(src)
line = child.stdout.readline().split()
assert len(line) == 2, f"the receiver did not start (exit {child.poll()})"
peer, dst = line[0], int(line[1])
offsets = range(0, nbytes, CHUNK)
rc = e.batch_transfer_sync_write(peer, [src.data_ptr()], [dst], [CHUNK])  # connect, warm up
assert rc == 0, f"Mooncake write of {device} memory: rc {rc}"
t = time.perf_counter()
for i in range(0, len(offsets), 512):
    part = offsets[i : i + 512]
    rc = e.batch_transfer_sync_write(peer, [src.data_ptr() + o for o in part], [dst + o for o in part], [CHUNK] * len(part))
    assert rc == 0, f"Mooncake write of {device} memory: rc {rc}"
seconds = time.perf_counter() - t
child.stdin.write("done\n"); child.stdin.flush()
verdict = child.stdout.readline().strip()
print(f"wrote {nbytes / 1e9:.2f} GB of {device} memory in {len(offsets)} copies of {CHUNK >> 20} MiB: "
      f"{seconds:.3f} s, {nbytes / seconds / 1e9:.2f} GB/s; receiver: {verdict}")
sys.exit(0 if child.wait(60) == 0 and verdict == "equal" else 1)
EOF
  PROBE_PROTOCOL=$PROBE_PROTOCOL timeout "${PROBE_TIMEOUT:-120}" python3 "$LOGS/probe.py" "$PROBE_BYTES" "${DEVICE:-}" >"$LOGS/probe.log" 2>&1
  rc=$?
  cat "$LOGS/probe.log" >>"$REPORT"
  grep -E "^(wrote|torch )" "$LOGS/probe.log" >&2
  if [[ $rc != 0 ]]; then
    log "the Mooncake probe failed (exit $rc); its output:"
    tail -30 "$LOGS/probe.log" >&2
    exit 1
  fi
fi
[[ ${PD_CHECK_ONLY:-0} == 1 ]] && { log "PD_CHECK_ONLY=1: done in $((SECONDS - START))s"; exit 0; }

# ---- the servers, one after the other (the decode server sizes its KV from what the prefill server left)
COMMON=(--model-path "$MODEL" --load-format "$LOAD_FORMAT" --dtype "$DTYPE" --host 127.0.0.1 --enable-metrics)
[[ -n ${DEVICE:-} ]] && COMMON+=(--device "$DEVICE")
# shellcheck disable=SC2206  # lists of flags, split on purpose
PREFILL_CMD=(python3 -m radixserve.launch_server "${COMMON[@]}" --port "$PREFILL_PORT"
             --disaggregation-mode prefill --disaggregation-bootstrap-port "$BOOTSTRAP_PORT"
             --mem-fraction-static "$PREFILL_MEM_FRACTION" ${SERVER_ARGS:-} ${PREFILL_ARGS:-})
# shellcheck disable=SC2206
DECODE_CMD=(python3 -m radixserve.launch_server "${COMMON[@]}" --port "$DECODE_PORT"
            --disaggregation-mode decode --disaggregation-bootstrap-port "$BOOTSTRAP_PORT"
            --mem-fraction-static "$DECODE_MEM_FRACTION" ${SERVER_ARGS:-} ${DECODE_ARGS:-})
# shellcheck disable=SC2206
ROUTER_CMD=(python3 -m sglang_router.launch_router --pd-disaggregation
            --prefill "http://127.0.0.1:$PREFILL_PORT" "$BOOTSTRAP_PORT" --decode "http://127.0.0.1:$DECODE_PORT"
            --host 127.0.0.1 --port "$ROUTER_PORT" --prometheus-port "$ROUTER_METRICS_PORT" --disable-retries
            ${ROUTER_ARGS})

log "starting the prefill server: ${PREFILL_CMD[*]}"
start_bg prefill "${PREFILL_CMD[@]}"
wait_for prefill "${PIDS[0]}" "http_ok http://127.0.0.1:$PREFILL_PORT/health" || exit 1
log "starting the decode server: ${DECODE_CMD[*]}"
start_bg decode "${DECODE_CMD[@]}"
wait_for decode "${PIDS[1]}" "http_ok http://127.0.0.1:$DECODE_PORT/health" || exit 1
log "starting the router: ${ROUTER_CMD[*]}"
start_bg router "${ROUTER_CMD[@]}"
router_ready() {
  python3 - "http://127.0.0.1:$ROUTER_PORT/readiness" <<'EOF'
import json, sys, urllib.request
try:
    sys.exit(0 if json.load(urllib.request.urlopen(sys.argv[1], timeout=10)).get("healthy_workers") == 2 else 1)
except Exception:
    sys.exit(1)
EOF
}
wait_for router "${PIDS[2]}" router_ready || exit 1
grep -h "\] KV cache:" "$LOGS/prefill.log" "$LOGS/decode.log" | tee -a "$REPORT" >&2
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >>"$OUT/env.txt" 2>&1 || true

# one request through the router proves the whole path before the timed run
python3 - "http://127.0.0.1:$ROUTER_PORT/generate" <<'EOF' 2>&1 | tee -a "$REPORT" >&2
import json, sys, urllib.request
body = {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
req = urllib.request.Request(sys.argv[1], json.dumps(body).encode(), {"Content-Type": "application/json"})
try:
    out = json.load(urllib.request.urlopen(req, timeout=120))
except Exception as e:
    detail = e.read().decode()[:500] if hasattr(e, "read") else ""
    sys.exit(f"a request through the router failed: {e} {detail}")
print(f"a request through the router: {len(out['output_ids'])} tokens")
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || { log "see $OUT/pd_logs.tar.gz"; exit 1; }

scrape() {  # $1: label written above each scrape
  local what url
  for what in prefill:$PREFILL_PORT decode:$DECODE_PORT router:$ROUTER_METRICS_PORT; do
    url="http://127.0.0.1:${what#*:}/metrics"
    echo "### $1 ${what%%:*} $url"
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' \
      "$url" 2>&1 || echo "(no answer)"
  done >>"$METRICS"
}

# ---- the bench, through the router, with what is left of the overall budget
VOCAB=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1] + "/config.json"))["vocab_size"])' "$MODEL" 2>/dev/null)
BENCH_BASE=(python3 -m radixserve.bench_serving --backend radixserve --base-url "http://127.0.0.1:$ROUTER_PORT"
            --tokenize-prompt ${VOCAB:+--vocab-size "$VOCAB"} --dataset-name random
            --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --random-range-ratio "$RANGE_RATIO"
            --request-rate "$REQUEST_RATE" --disable-tqdm)
# untimed: PD_WARMUP_PROMPTS at once (another seed), so both servers have run batches before the timed run
if ((${PD_WARMUP_PROMPTS:-16} > 0)); then
  log "warm-up: ${PD_WARMUP_PROMPTS:-16} prompts at once through the router"
  timeout 120 "${BENCH_BASE[@]}" --num-prompts "${PD_WARMUP_PROMPTS:-16}" --warmup-requests 0 --seed 7 \
    >"$LOGS/warmup.log" 2>&1 || { log "the warm-up run failed:"; tail -20 "$LOGS/warmup.log" | tee -a "$REPORT" >&2; exit 1; }
fi
scrape before  # the differences to 'after' count the timed run and its WARMUP_REQUESTS
BENCH_TIMEOUT=$((TOTAL_TIMEOUT - (SECONDS - START) - 3 * STOP_GRACE))
((BENCH_TIMEOUT < 30)) && { log "only ${BENCH_TIMEOUT}s left for the bench; raise TOTAL_TIMEOUT"; exit 1; }
BENCH_CMD=("${BENCH_BASE[@]}" --num-prompts "$NUM_PROMPTS" --warmup-requests "$WARMUP_REQUESTS" --output-file "$RESULTS")
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
scrape after
if [[ $rc == 0 ]]; then
  failed=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["failed"])' \
    "$RESULTS" 2>/dev/null) || failed=unknown
  if [[ $failed != 0 ]]; then
    log "$failed requests failed; see $REPORT and $OUT/pd_logs.tar.gz"
    rc=1
  fi
fi

# ---- the TTFT split, from the servers' metrics (differences between the two scrapes)
python3 - "$METRICS" "$RESULTS" "$SUMMARY" <<'EOF' 2>&1 | tee -a "$REPORT"
import json, re, sys

metrics_path, results_path, summary_path = sys.argv[1:]
scrapes: dict[tuple[str, str], dict[str, float]] = {}
current = None
for line in open(metrics_path):
    if line.startswith("### "):
        _, when, who, _ = line.split(" ", 3)
        current = scrapes.setdefault((when, who), {})
        continue
    m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
    if current is None or not m or line.startswith("#") or "_bucket" in m.group(1):
        continue
    try:
        current[m.group(1)] = current.get(m.group(1), 0.0) + float(m.group(3))  # summed over label sets
    except ValueError:
        pass


def delta(who: str, name: str) -> float | None:
    after, before = scrapes.get(("after", who), {}), scrapes.get(("before", who), {})
    return after[name] - before.get(name, 0.0) if name in after else None


def mean(who: str, hist: str) -> float | None:
    s, n = delta(who, f"radixserve:{hist}_sum"), delta(who, f"radixserve:{hist}_count")
    return s / n if s is not None and n else None


bench = json.loads(open(results_path).readlines()[-1]) if open(results_path).read().strip() else {}
nbytes = delta("prefill", "radixserve:kv_transfer_bytes_total")
lat_sum = delta("prefill", "radixserve:kv_transfer_latency_seconds_sum")
summary = {
    "bench": {k: bench.get(k) for k in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                                        "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                                        "mean_itl_ms", "median_itl_ms", "mean_tpot_ms", "mean_e2e_ms")},
    "kv_transfers": delta("prefill", "radixserve:kv_transfers_total"),
    "kv_transfer_failures": delta("prefill", "radixserve:kv_transfer_failures_total"),
    "kv_transfer_bytes": nbytes,
    "kv_transfer_gb_per_s": nbytes / lat_sum / 1e9 if nbytes and lat_sum else None,
    "prefill_mean_ttft_s": mean("prefill", "time_to_first_token_seconds"),
    "kv_transfer_mean_latency_s": mean("prefill", "kv_transfer_latency_seconds"),
    "decode_mean_kv_wait_s": mean("decode", "kv_transfer_wait_seconds"),
    "decode_mean_ttft_s": mean("decode", "time_to_first_token_seconds"),
    "decode_mean_itl_s": mean("decode", "inter_token_latency_seconds"),
    "prefill_requests": delta("prefill", "radixserve:num_requests_total"),
    "decode_requests": delta("decode", "radixserve:num_requests_total"),
}
json.dump(summary, open(summary_path, "w"), indent=1)


def fmt(v, scale=1.0, unit="", digits=1):
    return "not exported" if v is None else f"{v * scale:,.{digits}f}{unit}"


b = summary["bench"]
rows = [
    ("requests completed / failed", f"{b.get('completed')} / {b.get('failed')}"),
    ("output tok/s (bench, through the router)", fmt(b.get("output_throughput"))),
    ("TTFT mean / median (bench)", f"{fmt(b.get('mean_ttft_ms'), unit=' ms')} / {fmt(b.get('median_ttft_ms'), unit=' ms')}"),
    ("ITL mean, TPOT mean (bench)", f"{fmt(b.get('mean_itl_ms'), unit=' ms', digits=2)}, {fmt(b.get('mean_tpot_ms'), unit=' ms', digits=2)}"),
    ("prefill: prefill server's mean TTFT", fmt(summary["prefill_mean_ttft_s"], 1e3, " ms")),
    ("transfer: mean KV transfer latency", fmt(summary["kv_transfer_mean_latency_s"], 1e3, " ms", 2)),
    ("first decode step ~ decode server's mean ITL", fmt(summary["decode_mean_itl_s"], 1e3, " ms", 2)),
    ("decode server's mean KV wait / mean TTFT", f"{fmt(summary['decode_mean_kv_wait_s'], 1e3, ' ms')} / {fmt(summary['decode_mean_ttft_s'], 1e3, ' ms')}"),
    ("KV transfers (failed), GB moved", f"{fmt(summary['kv_transfers'], digits=0)} ({fmt(summary['kv_transfer_failures'], digits=0)}), {fmt(nbytes, 1e-9, '', 2)}"),
    ("KV transfer GB/s (bytes / latency sum)", fmt(summary["kv_transfer_gb_per_s"], digits=2)),
]
print("\n".join(f"{k:<48} {v}" for k, v in rows))
EOF
stop_all
log "done in $((SECONDS - START))s (exit $rc); results in $OUT"
exit "$rc"
