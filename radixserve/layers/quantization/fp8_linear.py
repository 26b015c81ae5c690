"""FP8 linear layers: which weights are FP8, their block scales, how they load and how they run.

Two ways in, one format out (e4m3 weights with one fp32 factor per 128x128 block, `weight_scale_inv`,
as DeepSeek-V3 and Qwen3-FP8 checkpoints publish them):
- a checkpoint whose config has `quantization_config.quant_method == "fp8"` with `weight_block_size`:
  the linear layers are built with FP8 weights and scales and load them as stored;
- `--quantization fp8` on a bf16/fp16 checkpoint: the layers load as usual and each linear weight is
  quantized once after loading (`quantize_loaded_weights`), the whole per-rank matrix at a time, so a
  fused q/k/v or gate/up weight gets blocks over the fused rows (MoE experts: layers/moe/layer.py,
  each expert's gate, up and down on their own).
Embeddings, the LM head and norms stay in the model dtype (as SGLang and vLLM keep them). Activations
are quantized per token and 128 columns on the fly (w8a8) on CUDA, except at batch 1 where an FP8
GEMV reads the weight with the activation left in its dtype; the CPU path dequantizes the weight and
quantizes the activation the same way in torch, so CPU tests see the GPU's numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, block_fp8_linear_torch, quantize_weight_block

try:
    from radixserve.layers.quantization.fp8_kernels import (
        block_fp8_linear,
        fp8_gemv,
        fp8_gemv_silu_mul,
        gemv_silu_mul_fits,
        takes_fp8_kernels,
    )
except ImportError:  # no Triton: the torch path only
    block_fp8_linear = fp8_gemv = fp8_gemv_silu_mul = gemv_silu_mul_fits = None

    def takes_fp8_kernels(x: torch.Tensor) -> bool:
        return False


@dataclass(frozen=True)
class Fp8Config:
    block: tuple[int, int] = (128, 128)
    from_checkpoint: bool = False  # the weights arrive as FP8 (else: quantized after loading)


_CURRENT: Fp8Config | None = None


def set_fp8_config(config: Fp8Config | None) -> None:
    """What the linear layers built from now on hold (set by load_model around the model's construction)."""
    global _CURRENT
    _CURRENT = config


def get_fp8_config() -> Fp8Config | None:
    return _CURRENT


def fp8_config_for(hf_cfg: Any, quantization: str | None) -> Fp8Config | None:
    """The FP8 format a checkpoint and --quantization ask for; None for plain weights."""
    qcfg = getattr(hf_cfg, "quantization_config", None)
    if qcfg is not None and not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict() if hasattr(qcfg, "to_dict") else vars(qcfg)
    if qcfg:
        method = qcfg.get("quant_method")
        if method != "fp8":
            raise ValueError(f"the checkpoint is quantized with {method!r}; radixserve reads fp8 checkpoints only")
        block = qcfg.get("weight_block_size")
        if not block:
            raise ValueError("per-tensor FP8 checkpoints (no weight_block_size) are not supported yet; "
                             "block-scaled ones (weight_block_size [128, 128]) are")
        if qcfg.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"FP8 activation_scheme {qcfg.get('activation_scheme')!r}: only dynamic is supported")
        return Fp8Config(block=(int(block[0]), int(block[1])), from_checkpoint=True)
    if quantization == "fp8":
        return Fp8Config()
    return None


def fp8_weight_params(layer: nn.Module, out_features: int, in_features: int, config: Fp8Config) -> None:
    """Give `layer` an FP8 weight [out, in] and its block scales, both loadable by the layer's loader."""
    bn, bk = config.block
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
    layer.weight_scale_inv = nn.Parameter(
        torch.ones(-(-out_features // bn), -(-in_features // bk), dtype=torch.float32), requires_grad=False
    )
    layer.fp8_block = config.block


def fp8_linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for a layer holding FP8 weights."""
    w, scales, block = layer.weight, layer.weight_scale_inv, layer.fp8_block
    if block_fp8_linear is not None and takes_fp8_kernels(x):
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            return fp8_gemv(x, w, scales, block, bias)
        return block_fp8_linear(x, w, scales, block, bias)
    return block_fp8_linear_torch(x, w, scales, block, bias, out_dtype=x.dtype)


def fp8_gate_up_silu_mul(x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
    """silu(gate) * up of one row through a fused gate/up layer holding FP8 weights, in one kernel
    (fp8_kernels.fp8_gemv_silu_mul); None where that kernel does not run (the caller projects, then
    applies the activation)."""
    if (fp8_gemv_silu_mul is None or layer.fp8_block is None or layer.bias is not None
            or not takes_fp8_kernels(x) or not statically_known_true(x.numel() == layer.weight.shape[1])
            or not gemv_silu_mul_fits(layer.weight, layer.fp8_block)):
        return None
    return fp8_gemv_silu_mul(x, layer.weight, layer.weight_scale_inv, layer.fp8_block)


def to_scale_units(start: int, size: int, total_blocks: int, block: int, what: str) -> tuple[int, int]:
    """Weight rows [start, start + size) as rows of their block scales (a matrix with total_blocks
    of them): the slice must begin on a block and end on one or inside the last (partial) block."""
    end = start + size
    if start % block or (end % block and -(-end // block) != total_blocks):
        raise ValueError(
            f"{what}: weight rows {start}..{end} do not fall on the FP8 checkpoint's {block}-row scale blocks "
            "(a tensor-parallel split or a fused projection off the blocks); use a --tp-size that splits on "
            "block boundaries"
        )
    return start // block, -(-size // block)


@torch.no_grad()
def quantize_loaded_weights(model: nn.Module) -> int:
    """--quantization fp8: replace each FP8-marked layer's loaded weight by e4m3 values and block scales
    (a layer with its own `quantize_pending_fp8`, the MoE experts, does it itself). Returns the bytes saved."""
    saved = 0
    for module in model.modules():
        config = getattr(module, "fp8_pending", None)
        if config is None:
            continue
        if hasattr(module, "quantize_pending_fp8"):
            saved += module.quantize_pending_fp8()
            continue
        w = module.weight
        w_fp8, scales = quantize_weight_block(w.data.float(), config.block)
        saved += w.numel() * w.element_size() - w_fp8.numel() - scales.numel() * 4
        module.weight = nn.Parameter(w_fp8.to(w.device), requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scales.to(w.device), requires_grad=False)
        module.fp8_block = config.block
        module.fp8_pending = None
    return saved
