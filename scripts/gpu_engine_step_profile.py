"""Profile the scheduler loop of the Engine at batch 1 (RADIXSERVE_PROFILE_STEPS) on a dummy model.

    python scripts/gpu_engine_step_profile.py radixserve/configs/llama-3.1-8b
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RADIXSERVE_PROFILE_STEPS", "100")


def main() -> None:
    from radixserve import Engine

    path = sys.argv[1] if len(sys.argv) > 1 else "radixserve/configs/llama-3.1-8b"
    with Engine(model_path=path, load_format="dummy", log_level="info", max_running_requests=64) as engine:
        params = {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0}
        engine.generate(input_ids=list(range(100, 228)), sampling_params=params)
        start = time.perf_counter()
        engine.generate(input_ids=list(range(300, 428)), sampling_params=params)
        print(f"batch-1 request: {200 / (time.perf_counter() - start):.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
