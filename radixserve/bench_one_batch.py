"""`python -m radixserve.bench_one_batch ...`: the static-batch latency bench (radixserve.bench)."""

from __future__ import annotations

import sys

from radixserve.bench.bench_one_batch import main

if __name__ == "__main__":
    sys.exit(main())
