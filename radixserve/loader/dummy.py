"""Random weights for --load-format dummy: benchmarks and tests without a checkpoint."""

from __future__ import annotations

import torch

_LOW, _HIGH = -1e-3, 1e-3


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
        gen = generators.get(param.device)
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
            generators[param.device] = gen
        if param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            param.uniform_(_LOW, _HIGH, generator=gen)
        else:
            # fp8 and other exotic dtypes have no uniform_ kernel: draw in fp32, then cast.
            tmp = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            param.copy_(tmp.uniform_(_LOW, _HIGH, generator=gen))
