#!/usr/bin/env bash
# The runbook's zero-downtime restart through radixserve's router (SGLang's router takes the same calls):
#   1. start the new instance (on another port)   2. wait until it is healthy
#   3. add it to the router                        4. remove the old one from the router
#   5. wait until the old one's in-flight requests have ended (the router drops it then)
#   6. stop the old instance
#
#   deploy/graceful_restart.sh --router http://127.0.0.1:8000 --old http://127.0.0.1:30000 \
#       --new http://127.0.0.1:30002 \
#       --start-cmd "python -m radixserve.launch_server --model-path M --port 30002" \
#       --old-pid 12345          # or --stop-cmd "systemctl stop radixserve@30000"
#
# Options: --worker-type regular|prefill|decode (default regular), --bootstrap-port N (a prefill server's),
# --api-key KEY (the router's), --health-timeout S (default 600: model loading), --drain-timeout S
# (default 300), --new-log FILE (the started instance's output; default /tmp/graceful_restart_new.log).
# Without --start-cmd the new instance is taken as already starting. Exit status 0 when the old instance is
# out of the router and stopped; 1 (with the step that failed) otherwise; 2 for bad arguments.
set -uo pipefail

ROUTER="" OLD="" NEW="" START_CMD="" STOP_CMD="" OLD_PID="" WORKER_TYPE=regular BOOTSTRAP_PORT="" API_KEY=""
HEALTH_TIMEOUT=600 DRAIN_TIMEOUT=300 NEW_LOG=/tmp/graceful_restart_new.log
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while (($#)); do
  case $1 in
    --router) ROUTER=${2%/}; shift 2 ;;
    --old) OLD=${2%/}; shift 2 ;;
    --new) NEW=${2%/}; shift 2 ;;
    --start-cmd) START_CMD=$2; shift 2 ;;
    --stop-cmd) STOP_CMD=$2; shift 2 ;;
    --old-pid) OLD_PID=$2; shift 2 ;;
    --worker-type) WORKER_TYPE=$2; shift 2 ;;
    --bootstrap-port) BOOTSTRAP_PORT=$2; shift 2 ;;
    --api-key) API_KEY=$2; shift 2 ;;
    --health-timeout) HEALTH_TIMEOUT=$2; shift 2 ;;
    --drain-timeout) DRAIN_TIMEOUT=$2; shift 2 ;;
    --new-log) NEW_LOG=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "graceful_restart: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $ROUTER && -n $OLD && -n $NEW ]] || { echo "graceful_restart: --router, --old and --new are required" >&2; usage; }

say() { echo "graceful_restart: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
AUTH=()
[[ -n $API_KEY ]] && AUTH=(-H "Authorization: Bearer $API_KEY")
urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

# 1. the new instance
if [[ -n $START_CMD ]]; then
  say "starting the new instance: $START_CMD"
  setsid bash -c "$START_CMD" >"$NEW_LOG" 2>&1 &
  say "new instance pid $! (log $NEW_LOG)"
fi

# 2. healthy?
deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -sf -m 5 "$NEW/health" >/dev/null; do
  ((SECONDS < deadline)) || fail "the new instance $NEW was not healthy within ${HEALTH_TIMEOUT}s"
  sleep 1
done
say "new instance $NEW is healthy"

# 3. into the router
body="{\"url\": \"$NEW\", \"worker_type\": \"$WORKER_TYPE\"${BOOTSTRAP_PORT:+, \"bootstrap_port\": $BOOTSTRAP_PORT}}"
code=$(curl -s -o /tmp/graceful_restart_add.json -w '%{http_code}' -m 30 "${AUTH[@]}" \
       -H 'Content-Type: application/json' -d "$body" "$ROUTER/workers")
[[ $code == 201 || $code == 409 ]] || fail "adding $NEW to the router: HTTP $code $(cat /tmp/graceful_restart_add.json)"
say "router took $NEW (HTTP $code)"

# 4. the old one out of the router
old_path="$ROUTER/workers/$(urlencode "$OLD")"
code=$(curl -s -o /dev/null -w '%{http_code}' -m 30 "${AUTH[@]}" -X DELETE "$old_path")
[[ $code == 202 || $code == 404 ]] || fail "removing $OLD from the router: HTTP $code"
say "router stopped sending to $OLD (HTTP $code)"

# 5. drained: the router forgets a removed worker once its last request has ended
deadline=$((SECONDS + DRAIN_TIMEOUT))
while [[ $(curl -s -o /dev/null -w '%{http_code}' -m 10 "${AUTH[@]}" "$old_path") == 200 ]]; do
  ((SECONDS < deadline)) || fail "$OLD still had requests in flight after ${DRAIN_TIMEOUT}s"
  sleep 0.5
done
say "$OLD has no requests in flight"

# 6. stop the old instance (SIGTERM: a radixserve server finishes what it holds, then exits)
if [[ -n $STOP_CMD ]]; then
  bash -c "$STOP_CMD" || fail "stopping the old instance: '$STOP_CMD' failed"
elif [[ -n $OLD_PID ]]; then
  kill -TERM "$OLD_PID" 2>/dev/null || say "old instance pid $OLD_PID was already gone"
  for _ in $(seq 120); do kill -0 "$OLD_PID" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$OLD_PID" 2>/dev/null && fail "old instance pid $OLD_PID did not exit within 60s of SIGTERM"
else
  say "no --stop-cmd or --old-pid: the old instance is out of the router and left running"
fi
say "done: $NEW serves in place of $OLD"
