"""Tile configurations for the fused MoE kernel (triton_moe.py), per expert shape and GPU.

The best tile depends on how many rows each expert gets (decode: a handful, so the weights' read is
the cost and BLOCK_M is small; prefill: hundreds, so the tensor cores are) and on the GPU. Tuned
tables live in configs/ as JSON, one file per (E, N, H, dtype, device name), written by
`scripts/gpu_moe_kernel_bench.py --tune`; each maps token counts to a config, and the nearest count
wins. Shapes without a file get `default_config`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# `default_config` sees no top-k; it guesses the rows an expert gets with this one (Mixtral routes to
# 2, Qwen3-MoE to 8: the guess is off by at most a factor two for both).
ASSUMED_TOP_K = 4


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def device_slug(device_name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3': a name that is safe in a file name."""
    if not device_name:
        return "none"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in device_name.strip())


def config_file_name(num_experts: int, n: int, h: int, dtype: torch.dtype | str, device_name: str | None) -> str:
    return f"E={num_experts},N={n},H={h},dtype={dtype_name(dtype)},device={device_slug(device_name)}.json"


def default_config(num_tokens: int, num_experts: int, n: int, h: int) -> dict:
    """A tile for shapes nobody tuned: BLOCK_M follows the rows an expert is expected to get (padding
    a block of 64 rows for 2 tokens wastes the tensor cores' work and the activations' reads)."""
    rows = num_tokens * ASSUMED_TOP_K / max(num_experts, 1)
    # the winners of the first H100 tuning runs (configs/), by rows per expert
    if rows <= 16:  # decode: weight-read bound, so many narrow programs stream the weights
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows <= 64:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=3)
    if rows <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


@functools.lru_cache(maxsize=64)
def load_table(file_name: str, config_dir: str | None = None) -> dict[int, dict] | None:
    """{token count: config} from one JSON file, or None when there is none. Keys that are not
    token counts ("_note" and the like) are comments."""
    path = Path(config_dir) / file_name if config_dir else CONFIG_DIR / file_name
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    table = {int(k): {key: int(v[key]) for key in KEYS} for k, v in raw.items() if not k.startswith("_")}
    return table or None


def nearest(table: dict[int, dict], num_tokens: int) -> dict:
    """The entry whose token count is closest to num_tokens (the smaller one on a tie)."""
    return table[min(table, key=lambda k: (abs(k - num_tokens), k))]


def tile_config(num_tokens: int, num_experts: int, n: int, h: int, dtype: torch.dtype | str,
                device_name: str | None, config_dir: str | None = None) -> dict:
    """BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M/num_warps/num_stages for T=num_tokens tokens through E experts
    of w13 [E, 2N, H] and w2 [E, H, N] on `device_name` (torch.cuda.get_device_name; None on CPU)."""
    table = load_table(config_file_name(num_experts, n, h, dtype, device_name), config_dir)
    if table is None:
        return default_config(num_tokens, num_experts, n, h)
    return dict(nearest(table, num_tokens))


def write_table(path: Path, table: dict[int, dict], note: str) -> None:
    """The JSON layout `load_table` reads: a "_note", then token counts in ascending order."""
    lines = [f' "_note": {json.dumps(note)}']
    lines += [f' "{k}": {json.dumps({key: int(table[k][key]) for key in KEYS})}' for k in sorted(table)]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
