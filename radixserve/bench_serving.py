"""`python -m radixserve.bench_serving ...`: the online serving bench (radixserve.bench)."""

from __future__ import annotations

import sys

from radixserve.bench.bench_serving import main

if __name__ == "__main__":
    sys.exit(main())
