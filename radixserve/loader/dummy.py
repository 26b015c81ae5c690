"""Random weights for --load-format dummy: benchmarks and tests without a checkpoint."""

from __future__ import annotations

import torch

from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX

_LOW, _HIGH = -1e-3, 1e-3
# elements drawn at a time for dtypes drawn through an fp32 buffer: one buffer the size of a large FP8
# expert stack (DeepSeek-V3's w2 is 3.8 G elements) would need 4x its bytes on top of the model
_CHUNK = 1 << 24


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every floating parameter in place with uniform(-1e-3, 1e-3), reproducibly from `seed`.

    Norm weights (1-D parameters named *norm*) are set to 1 so activations keep their scale through the
    layers. Values are drawn on the parameter's own device, so results repeat per device type.
    Non-floating parameters (e.g. packed quantized ints) are left alone.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        module_name, _, param_name = name.rpartition(".")
        if param.dim() == 1 and param_name == "weight" and "norm" in module_name.rpartition(".")[2]:
            param.fill_(1.0)
            continue
        # FP8 block scales (weight_scale_inv; MoE: w13_/w2_weight_scale_inv): the e4m3 values below times this
        if param_name.endswith("weight_scale_inv"):
            param.fill_(_HIGH / FP8_MAX)  # span the same +-1e-3 as every other weight
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
            generators[param.device] = gen
        if param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            param.uniform_(_LOW, _HIGH, generator=gen)
        else:
            # fp8 and other exotic dtypes have no uniform_ kernel: draw in fp32, then cast. FP8 weights
            # with block scales draw over e4m3's range (+-1e-3 would round to zero or subnormals).
            low, high = (-FP8_MAX, FP8_MAX) if param.dtype == FP8_DTYPE else (_LOW, _HIGH)
            parts = [param] if not param.is_contiguous() else param.view(-1).split(_CHUNK)
            for part in parts:
                drawn = torch.empty(part.shape, dtype=torch.float32, device=param.device)
                part.copy_(drawn.uniform_(low, high, generator=gen))
    # weights derived from others once loaded (DeepSeek's absorbed attention matrices)
    after = getattr(model, "after_weights_loaded", None)
    if after is not None:
        after()
