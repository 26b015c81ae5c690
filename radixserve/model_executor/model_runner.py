"""Loading a rank's model, sizing its KV memory, and running its forward passes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psutil
import torch

from radixserve.attention.torch_native import TorchNativeBackend
from radixserve.cache.memory import MemoryPools
from radixserve.cache.pools import KVPool, MLAKVPool, resolve_kv_dtype
from radixserve.distributed.dp_attention import get_dp_attention, sync_step
from radixserve.distributed.parallel_state import set_moe_parallel, tp_min_int
from radixserve.layers.logits import LogitsOutput
from radixserve.layers.quantization.fp8_linear import fp8_config_for, quantize_loaded_weights, set_fp8_config
from radixserve.loader import config as cfgutil
from radixserve.loader.dummy import init_dummy_weights
from radixserve.loader.model_config import ModelConfig
from radixserve.loader.source import ModelSource
from radixserve.loader.weights import iter_weights
from radixserve.model_executor.compile import make_compiled_decode
from radixserve.model_executor.cuda_graph import CudaGraphRunner
from radixserve.model_executor.decode_inputs import eager_decode_batch
from radixserve.model_executor.forward_batch import ForwardBatch
from radixserve.models.registry import MODEL_CLASSES, architecture_of
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

CPU_DEFAULT_MAX_TOKENS = 32768  # bounded default KV on CPU: never more than a fifth of free RAM
CPU_MEMORY_SHARE = 0.2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run about twice as fast as fp32 there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, cfg, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float16 if cfgutil.torch_dtype_of(cfg) == torch.float16 else torch.bfloat16


def make_attention_backend(name: str | None, device: torch.device):
    """torch_native everywhere; triton (the default on CUDA) needs a GPU."""
    name = name or ("triton" if device.type == "cuda" else "torch_native")
    if name == "torch_native":
        return TorchNativeBackend()
    if device.type != "cuda":
        raise ValueError("--attention-backend triton: needs a CUDA device; use torch_native on CPU")
    from radixserve.attention.triton_backend import TritonBackend

    return TritonBackend()


@dataclass
class MemoryPlan:
    max_total_tokens: int
    max_running_requests: int


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: ModelConfig
    dtype: torch.dtype
    context_len: int
    quantization: str | None = None  # "fp8" when the linear weights are FP8 (checkpoint or --quantization)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_as(self.dtype)

    def kv_bytes_per_token_as(self, kv_dtype: torch.dtype) -> int:
        """K and V bytes of one token, every layer, stored as kv_dtype (fp8: half of bf16's); for MLA
        the one latent row per layer, which every TP rank holds whole."""
        mla = self.cfg.mla
        if mla is not None:
            return MLAKVPool.bytes_per_token_for(self.cfg.num_layers, mla.kv_lora_rank, mla.qk_rope_head_dim, kv_dtype)
        return KVPool.bytes_per_token_for(
            self.cfg.num_layers, self.model.num_kv_heads_per_rank, self.cfg.head_dim, kv_dtype
        )


def load_model(args: ServerArgs, source: ModelSource, device: torch.device, context_len: int) -> LoadedModel:
    dtype = resolve_dtype(args.dtype, source.hf_config, device)
    if args.random_seed is not None:
        torch.manual_seed(args.random_seed)
    architecture = architecture_of(source.hf_config)
    cfg = ModelConfig.from_hf(source.hf_config, architecture)
    cls = MODEL_CLASSES[architecture]
    if args.enable_dp_attention and (cfg.moe is None or not hasattr(cls, "idle_forward")):
        raise ValueError(f"--enable-dp-attention: built for MoE models only (Mixtral, Qwen2-MoE, Qwen3-MoE, "
                         f"DeepSeek-V2/V3); {architecture} has no experts, so use --dp-size without it")
    set_moe_parallel(args.ep_size, args.moe_dense_tp_size)
    fp8 = fp8_config_for(source.hf_config, args.quantization)
    dummy = source.kind == "dummy" or args.load_format == "dummy"
    what = "random weights (--load-format dummy)" if dummy else source.gguf_file or source.model_path
    logger.info("loading %s from %s as %s on %s ...", cls.__name__, what, str(dtype).replace("torch.", ""), device)
    started = time.perf_counter()
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    set_fp8_config(fp8)
    try:
        with torch.device(device):
            model = cls(cfg, context_len)
    finally:
        torch.set_default_dtype(old_dtype)
        set_fp8_config(None)
    if dummy:
        init_dummy_weights(model, args.random_seed or 0)
    else:
        model.load_weights(iter_weights(source))
    if fp8 is not None and not fp8.from_checkpoint:  # --quantization fp8
        saved = quantize_loaded_weights(model)
        logger.info("--quantization fp8: linear weights quantized to e4m3 with %dx%d block scales (%.2f GB saved)",
                    *fp8.block, saved / 1e9)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("weights loaded in %.1f s (%.2f GB)", time.perf_counter() - started, size / 1e9)
    return LoadedModel(model.eval(), cfg, dtype, context_len, "fp8" if fp8 is not None else None)


def cuda_graph_reserve(args: ServerArgs, vocab_size: int) -> int:
    """Bytes kept out of the KV pool for the captured graphs' activations and logits."""
    if args.disable_cuda_graph:
        return 0
    max_bs = args.cuda_graph_max_bs or 256
    return (512 << 20) + max_bs * vocab_size * 4 * 2


def plan_memory(args: ServerArgs, loaded: LoadedModel, device: torch.device) -> MemoryPlan:
    """How many tokens the KV pool holds and how many requests run at once."""
    bytes_per_token = loaded.kv_bytes_per_token_as(resolve_kv_dtype(args.kv_cache_dtype, loaded.dtype, device))
    if device.type == "cuda":
        # memory the caching allocator holds but no tensor uses (the bf16 weights --quantization fp8
        # replaced, load-time buffers) is free for the pool: hand it back before measuring
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        fraction = args.mem_fraction_static if args.mem_fraction_static is not None else 0.9
        used = total - free
        # the request table ([rows, context] int64) lives beside the KV pool
        rows = (args.max_running_requests or 512) + 1
        budget = (int(total * fraction) - used - cuda_graph_reserve(args, loaded.cfg.vocab_size)
                  - rows * loaded.context_len * 8)
        if budget <= 0:
            raise ValueError(
                f"--mem-fraction-static {fraction}: the weights already use {used / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise the fraction"
            )
        capacity = budget // bytes_per_token
    else:
        if args.mem_fraction_static is not None:  # accepted, so say what it does here
            logger.info("--mem-fraction-static sizes the KV pool on GPUs only; on the CPU it is "
                        "--max-total-tokens (default: up to %d tokens in %.0f%% of free RAM)",
                        CPU_DEFAULT_MAX_TOKENS, CPU_MEMORY_SHARE * 100)
        capacity = min(CPU_DEFAULT_MAX_TOKENS, int(psutil.virtual_memory().available * CPU_MEMORY_SHARE) // bytes_per_token)
    if args.max_total_tokens is not None:
        capacity = args.max_total_tokens if device.type == "cpu" else min(capacity, args.max_total_tokens)
    capacity = tp_min_int(capacity)  # every TP rank must hold the same number of tokens
    page = args.page_size
    capacity = capacity // page * page
    if capacity < page:
        raise ValueError("KV cache has no room: raise --max-total-tokens or --mem-fraction-static")
    max_running = args.max_running_requests or max(1, min(512 if device.type == "cuda" else 128, capacity // 2))
    return MemoryPlan(capacity, max_running)


def create_memory_pools(args: ServerArgs, loaded: LoadedModel, plan: MemoryPlan, device: torch.device) -> MemoryPools:
    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, loaded.dtype, device)
    mla = loaded.cfg.mla
    if mla is not None:  # DeepSeek: a latent pool (an fp8 one with scale 1.0 per layer)
        return MemoryPools.create_mla(
            plan.max_total_tokens, plan.max_running_requests, loaded.context_len, args.page_size,
            loaded.cfg.num_layers, mla.kv_lora_rank, mla.qk_rope_head_dim, kv_dtype, device,
        )
    # an FP8 cache takes the checkpoint's per-layer scales where it has them (1.0 otherwise)
    scales = getattr(loaded.model, "checkpoint_kv_scales", None) if kv_dtype != loaded.dtype else None
    if scales is not None:
        logger.info("FP8 KV cache: per-layer scales from the checkpoint (k %.3g..%.3g, v %.3g..%.3g)",
                    min(k for k, _ in scales), max(k for k, _ in scales),
                    min(v for _, v in scales), max(v for _, v in scales))
    return MemoryPools.create(
        plan.max_total_tokens, plan.max_running_requests, loaded.context_len, args.page_size,
        loaded.cfg.num_layers, loaded.model.num_kv_heads_per_rank, loaded.cfg.head_dim, kv_dtype, device,
        [tuple(pair) for pair in scales] if scales is not None else None,
    )


class ModelRunner:
    """Runs one rank's forward passes: the model, the attention backend, CUDA graphs or a compiled
    decode, over the KV memory it is handed (`MemoryPools`, shared with the scheduler and the cache)."""

    def __init__(self, args: ServerArgs, loaded: LoadedModel, plan: MemoryPlan, pools: MemoryPools,
                 device: torch.device) -> None:
        self.args = args
        self.device = device
        self.cfg = loaded.cfg
        self.dtype = loaded.dtype
        self.context_len = loaded.context_len
        self.model = loaded.model
        self.quantization = loaded.quantization
        self.plan = plan
        self.pools = pools
        self.page_size = args.page_size
        self.attn_backend = make_attention_backend(args.attention_backend, device)
        self.vocab_size = self.cfg.vocab_size
        # DP attention: every forward starts with the groups' step sync (sync_step), which a graph
        # replay or a compiled decode would skip; both stay off (see use_cuda_graph)
        self.dp_attention = get_dp_attention()
        self.forwarded = False  # DP attention: whether this step ran a forward (else: idle_step)
        if self.dp_attention is not None and (args.enable_torch_compile or device.type == "cuda"):
            logger.info("--enable-dp-attention: CUDA graphs and torch.compile are off (each forward first "
                        "syncs the DP groups' token counts, which a replayed graph would skip)")
        self.compiled_decode = None if self.dp_attention is not None else make_compiled_decode(self)
        self.graph_runner: CudaGraphRunner | None = None
        if self.use_cuda_graph:
            self.graph_runner = CudaGraphRunner(self, self.cuda_graph_max_bs)

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        """(query heads, head dim, KV heads) of this rank's attention layers."""
        attn = self.model.layers[0].self_attn.attn
        return attn.num_heads, attn.head_dim, attn.num_kv_heads

    @property
    def use_cuda_graph(self) -> bool:
        return (self.device.type == "cuda" and not self.args.disable_cuda_graph
                and hasattr(self.attn_backend, "init_cuda_graph_state") and self.dp_attention is None)

    @property
    def cuda_graph_max_bs(self) -> int:
        return min(self.args.cuda_graph_max_bs or 256, self.plan.max_running_requests)

    def decode_batch(self, rows: list[int], seq_lens: list[int], slots: list[int]) -> ForwardBatch:
        """The device inputs of a decode step (decode_inputs.py): staged in a CUDA graph's static block
        when one covers the batch size, else built for an eager forward."""
        if self.graph_runner is not None and len(rows) <= self.graph_runner.max_bs:
            return self.graph_runner.stage_decode(rows, seq_lens, slots)
        return eager_decode_batch(self, rows, seq_lens, slots)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, prompt_top_k: int = 0) -> LogitsOutput:
        if self.dp_attention is not None:  # the MoE layers gather every group's tokens: say how many
            sync_step(int(batch.input_ids.shape[0]))
            self.forwarded = True
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return LogitsOutput(self.graph_runner.replay(batch))
        self.attn_backend.init_forward_metadata(batch)
        if self.compiled_decode is not None and self.compiled_decode.can_run(batch):
            return self.compiled_decode(batch)
        return self.model(batch, prompt_top_k)

    def idle_step(self) -> bool:
        """DP attention, a step in which this group runs no batch: sync with the other groups, and join
        their forward's world collectives if any runs one. Returns whether any group ran."""
        if not any(sync_step(0)):
            return False
        self.model.idle_forward()
        return True


def build_model_runner(args: ServerArgs, source: ModelSource, device: torch.device, context_len: int) -> ModelRunner:
    """Load the model, size and create its KV memory, and a runner over both (benchmarks, tests)."""
    loaded = load_model(args, source, device, context_len)
    plan = plan_memory(args, loaded, device)
    return ModelRunner(args, loaded, plan, create_memory_pools(args, loaded, plan, device), device)
