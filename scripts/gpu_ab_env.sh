#!/usr/bin/env bash
# A/B a command over one environment variable, alternating the values so that drift on the machine
# (clocks, temperature, a cold first run) does not land on one side:
#
#   ROUNDS=2 scripts/gpu_ab_env.sh RADIXSERVE_TRITON_GEMV "1 0" python3 -m radixserve.bench_one_batch ...
#
# runs the command as NAME=1, NAME=0, NAME=1, NAME=0 and prints each run's last line that matches
# $PICK (default: the bench_one_batch table row), tagged with the value.
set -uo pipefail
name=$1 values=$2
shift 2
rounds=${ROUNDS:-2}
pick=${PICK:-'^ *[0-9]+ \|'}
for round in $(seq 1 "$rounds"); do
  for value in $values; do
    line=$(env "$name=$value" "$@" 2>&1 | grep -E "$pick" | tail -n 1)
    echo "round $round $name=$value: $line"
  done
done
