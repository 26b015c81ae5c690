#!/usr/bin/env bash
# The runbook's health check over a PD deployment (prefill, decode, router), with the endpoints and timeout
# configurable:
#
#   deploy/health_check.sh [--timeout S] [URL ...]
#
# URLs come from the arguments, else from HEALTH_CHECK_ENDPOINTS (space- or comma-separated), else the
# runbook's three (127.0.0.1:30000 prefill, :30001 decode, :8000 router). A URL without a path gets /health.
# Each endpoint has S seconds (HEALTH_CHECK_TIMEOUT, default 5) to answer 2xx. Every endpoint is checked and
# printed with ✓ or ✗. Exit status: 0 when all are healthy, 1 when any is not (as the runbook's script),
# 2 for bad arguments.
set -euo pipefail

TIMEOUT=${HEALTH_CHECK_TIMEOUT:-5}
urls=()
while (($#)); do
  case $1 in
    --timeout) [[ $# -ge 2 ]] || { echo "health_check: --timeout needs a value" >&2; exit 2; }
               TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "health_check: unknown option $1" >&2; exit 2 ;;
    *) urls+=("$1"); shift ;;
  esac
done
[[ $TIMEOUT =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "health_check: timeout must be seconds, not '$TIMEOUT'" >&2; exit 2; }
if ((${#urls[@]} == 0)); then
  if [[ -n ${HEALTH_CHECK_ENDPOINTS:-} ]]; then
    read -r -a urls <<<"${HEALTH_CHECK_ENDPOINTS//,/ }"
  else
    urls=(http://127.0.0.1:30000/health http://127.0.0.1:30001/health http://127.0.0.1:8000/health)
  fi
fi

failed=0
for url in "${urls[@]}"; do
  # scheme://host[:port] with nothing after it: the health route
  [[ $url =~ ^[a-z]+://[^/]+/?$ ]] && url="${url%/}/health"
  # -m bounds the whole exchange, so a server that accepts and never answers fails too
  if curl -sf -o /dev/null --connect-timeout "$TIMEOUT" -m "$TIMEOUT" "$url"; then
    echo "✓ $url"
  else
    echo "✗ $url"
    failed=1
  fi
done
exit "$failed"
