"""The sparse feed-forward of Mixture-of-Experts models, and the Llama-shaped decoder that uses it.

A sparse layer routes each token to its top-k experts (the router is a small replicated linear, so
every TP rank picks the same experts), adds a shared expert where the model has one (Qwen2-MoE: scaled
by sigmoid of its own one-output gate), and finishes the rank's partial sums with one all-reduce.
Under DP attention the layer spans every rank of the world: it runs on all DP groups' tokens
(gathered first) and hands back this group's rows (distributed/dp_attention.py).
Layers the config marks dense keep a plain MLP, split over the TP group or, with --moe-dense-tp-size
1, whole on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.dp_attention import gather_for_moe, lm_head_spans_world, own_rows
from radixserve.distributed.parallel_state import get_moe_parallel, moe_all_reduce
from radixserve.layers.moe.layer import EXPERT_PROJECTIONS, SCALE_SUFFIX, FusedMoE
from radixserve.layers.moe.router import select_experts
from radixserve.loader.model_config import ModelConfig, MoEConfig
from radixserve.models.llama import LlamaForCausalLM, LlamaMLP

# one expert's matrix (mlp.experts.3.w1.weight, or an FP8 checkpoint's .weight_scale_inv beside it) or all
# experts stacked (mlp.experts.gate_up_proj)
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight(_scale_inv)?$")
_STACKED = {"gate_up_proj": ("w13", "gate_up"), "down_proj": ("w2", "down"),
            "gate_proj": ("w13", "gate"), "up_proj": ("w13", "up")}
_STACKED_RE = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj|gate_proj|up_proj)(?:\.weight)?$")
# a shared expert's tensors (Qwen2-MoE's shared_expert and its one-output gate, DeepSeek's shared_experts)
_SHARED = re.compile(r"\.mlp\.shared_experts?(_gate)?\.")


class SparseMoeBlock(nn.Module):
    spans_world = True  # its collectives run over the world (DP attention: an idle group joins them)

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)  # the router, replicated
        self.experts = FusedMoE(moe.num_experts, hidden, moe.intermediate_size)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(hidden, moe.shared_expert_intermediate_size, reduce_results=False,
                                          over_world=True)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, own = gather_for_moe(x)
        weights, ids = select_experts(F.linear(x, self.gate.weight), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return own_rows(moe_all_reduce(out), own)


class MoECausalLM(LlamaForCausalLM):
    """The Llama decoder with sparse feed-forward layers where the config has experts."""

    def make_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        if cfg.moe is None:
            raise ValueError(f"{cfg.architecture}: the config names no experts (num_experts / num_local_experts)")
        if cfg.moe.is_sparse(layer_id):
            return SparseMoeBlock(cfg.hidden_size, cfg.moe)
        size = cfg.intermediate_size
        return LlamaMLP(cfg.hidden_size, size, cfg.mlp_bias, replicated=get_moe_parallel().dense_tp_size == 1)

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """DP attention, a group with no batch while others run: take part in the world's collectives
        (every MoE layer's, the LM head's) with no tokens of its own."""
        x = self.norm.weight.new_empty(0, self.config.hidden_size)  # the model dtype, on its device
        for layer in self.layers:
            if getattr(layer.mlp, "spans_world", False):
                layer.mlp(x)
        if lm_head_spans_world():
            self.lm_head.compute_logits(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        moe = self.config.moe
        if moe is not None and not (moe.shared_expert_intermediate_size or moe.shared_experts_intermediate_size):
            weights = _without_empty_shared_expert(weights)
        super().load_weights(weights)

    def checkpoint_target(self, name: str) -> tuple[str, object]:
        m = _PER_EXPERT.match(name)
        if m and m.group(3) in EXPERT_PROJECTIONS:
            ours, role = EXPERT_PROJECTIONS[m.group(3)]
            return f"{m.group(1)}.{ours}{SCALE_SUFFIX if m.group(4) else ''}", (role, int(m.group(2)))
        m = _STACKED_RE.match(name)
        if m:
            ours, role = _STACKED[m.group(2)]
            return f"{m.group(1)}.{ours}", (role, None)
        return super().checkpoint_target(name)


def _without_empty_shared_expert(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """A config with no shared expert (size 0) still gets one from transformers, zero wide, and saved:
    its empty matrices, and Qwen2-MoE's gate, which scales that zero output. We build none: skip them."""
    for name, tensor in weights:
        m = _SHARED.search(name)
        if m and (tensor.numel() == 0 or m.group(1)):
            continue
        yield name, tensor
