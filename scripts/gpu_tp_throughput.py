"""Engine throughput of a dummy-weight model at a given TP size on this machine's GPUs.

    python scripts/gpu_tp_throughput.py radixserve/configs/llama-3.1-8b 2
"""

from __future__ import annotations

import random
import sys
import time


def main() -> None:
    from radixserve import Engine

    path = sys.argv[1] if len(sys.argv) > 1 else "radixserve/configs/llama-3.1-8b"
    tp = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 100000) for _ in range(128)] for _ in range(32)]
    params = {"temperature": 0, "max_new_tokens": 128, "ignore_eos": True}
    with Engine(model_path=path, load_format="dummy", tp_size=tp, log_level="warning") as e:
        e.generate(input_ids=prompts[:4], sampling_params=params)  # warm-up
        e.generate(input_ids=prompts[0], sampling_params=params)
        start = time.perf_counter()
        e.generate(input_ids=prompts[1], sampling_params=params)
        single = 128 / (time.perf_counter() - start)
        start = time.perf_counter()
        e.generate(input_ids=prompts, sampling_params=params)
        batched = 32 * 128 / (time.perf_counter() - start)
    print(f"TP={tp} {path}: batch-1 {single:.1f} tok/s, 32 prompts x 128 in / 128 out {batched:.0f} output tok/s")


if __name__ == "__main__":
    main()
