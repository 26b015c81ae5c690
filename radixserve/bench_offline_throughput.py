"""`python -m radixserve.bench_offline_throughput ...`: the offline throughput bench (radixserve.bench)."""

from __future__ import annotations

import sys

from radixserve.bench.bench_offline_throughput import main

if __name__ == "__main__":
    sys.exit(main())
