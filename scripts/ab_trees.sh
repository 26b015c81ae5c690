#!/usr/bin/env bash
# A/B a command over two source trees (say, the commit before a refactor and the one after), alternating
# them so that drift on the machine (clocks, temperature, a cold first run) does not land on one side:
#
#   git archive OLD_COMMIT radixserve scripts | tar -x -C /tmp/ab_old     # the old tree, once
#   ROUNDS=2 scripts/ab_trees.sh /tmp/ab_old . python3 -m radixserve.bench_one_batch ...
#
# Each run starts inside its tree, with the tree first on PYTHONPATH (then $EXTRA_PYTHONPATH, e.g. the
# wheel folder of the GPU machine), and prints the run's last line matching $PICK (default: the
# bench_one_batch table row), tagged with the tree. With $OUT set, each run's whole output is kept
# there as ab_<round>_<a|b>.log.
set -uo pipefail
old=$1 new=$2
shift 2
rounds=${ROUNDS:-2}
pick=${PICK:-'^ *[0-9]+ \|'}
for round in $(seq 1 "$rounds"); do
  for side in a b; do
    tree=$old
    [[ $side == b ]] && tree=$new
    dir=$(cd "$tree" && pwd)
    log=${OUT:+$OUT/ab_${round}_${side}.log}
    output=$(cd "$dir" && PYTHONPATH="$dir${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" "$@" 2>&1)
    [[ -n $log ]] && printf '%s\n' "$output" > "$log"
    echo "round $round $side ($tree): $(printf '%s\n' "$output" | grep -E "$pick" | tail -n 1)"
  done
done
