"""Batch-1 Mixtral decode in the style of pytorch-labs/gpt-fast (`mixtral-moe/`), as a peer for radixserve.

Why this file exists: issue 20 compares radixserve's batch-1 Mixtral-8x7B decode with gpt-fast's. gpt-fast's
code cannot be brought into this repository (its code stays out of our commits) and the GPU machine has no
internet, so gpt-fast itself cannot be run there. This script RE-IMPLEMENTS gpt-fast's Mixtral design in our own
code, from a reading of its method, so that the comparison measures the same method. It is not gpt-fast, and its
numbers should be labelled "gpt-fast-style (our re-implementation)".

What is the same as gpt-fast's mixtral-moe:
  * a plain PyTorch model: RMSNorm (in fp32, cast back), interleaved-pair rotary embedding computed in fp32
    from a precomputed cos/sin table, one fused QKV projection, GQA by repeating K/V heads, and
    scaled_dot_product_attention with a boolean causal mask over a static, preallocated KV cache of
    [1, kv_heads, max_seq, head_dim] written by index at the current positions (max_seq = prompt + output
    rounded up to a multiple of 8);
  * the MoE feed-forward: expert weights stacked as w1/w3 [E, I, H] and w2 [E, H, I]; the router's softmax,
    its top-k, renormalised over the chosen k; the chosen experts' weight slices gathered by indexing the
    stacked tensors (w[expert_indices]) and applied with einsum; the k outputs mixed by the routing weights;
  * the decode step (model forward + sampling) compiled with torch.compile(mode="reduce-overhead",
    fullgraph=True), i.e. CUDA graphs, called under the math SDPA backend so Inductor generates the
    attention; prefill runs eagerly (gpt-fast's default, without --compile_prefill);
  * the inductor flags: coordinate_descent_tuning, triton.unique_kernel_names, fx_graph_cache, and
    assert_indirect_indexing=False when compiling;
  * sampling: temperature 0.8 and top-k 200 by default, with the exponential-race trick (no host sync);
  * batch 1, a compiling warm-up run first, then timed runs; gpt-fast's tokens/s (generated tokens over the
    whole generate call, prefill included) is reported as `gptfast_tokens_per_s`.

What differs (none of it touches the decode step that is measured):
  * random weights (uniform(-1e-3, 1e-3), norm weights 1, like radixserve's --load-format dummy), created
    directly on the device in the target dtype, and a random prompt of --input-len token ids: no checkpoint
    and no tokenizer;
  * the model is built from an HF config.json rather than gpt-fast's built-in table;
  * prefill gathers expert weights for at most --moe-gather-gib of weight copies at a time (a loop over token
    slices inside the MoE). gpt-fast gathers them for the whole prompt at once, which for Mixtral-8x7B costs
    about 0.7 GB per prompt token (90 GB at 128 tokens) and would not fit beside the 93 GB of weights on one
    H200. Decode (one token) is a single slice, exactly gpt-fast's computation;
  * the rotary table is kept in the model dtype (bf16 in the benchmark, as gpt-fast; fp32 in the tests);
  * prefill and decode are timed separately (one extra device sync between them), and the headline
    `decode_tokens_per_s` is decode steps over decode time; gpt-fast's own metric is reported beside it.

Run (one GPU):  python benchmarks/peers/gptfast_style_mixtral.py --config radixserve/configs/mixtral-8x7b
Smoke (CPU):    python benchmarks/peers/gptfast_style_mixtral.py --config <cfg> --device cpu --no-compile
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class MixtralShape:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    vocab: int
    rope_theta: float
    norm_eps: float

    @classmethod
    def from_hf(cls, cfg: dict, num_layers: int | None = None) -> MixtralShape:
        if cfg.get("model_type", "mixtral") != "mixtral":
            raise ValueError(f"a Mixtral config is needed, not model_type {cfg.get('model_type')!r}")
        # transformers 5 writes rope_theta inside rope_parameters; older configs keep it at the top level
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 1e6
        n_heads = cfg["num_attention_heads"]
        return cls(
            n_layers=num_layers or cfg["num_hidden_layers"], dim=cfg["hidden_size"],
            ffn_dim=cfg["intermediate_size"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            n_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"], vocab=cfg["vocab_size"],
            rope_theta=float(theta), norm_eps=float(cfg["rms_norm_eps"]),
        )


def read_hf_config(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    return json.loads(p.read_text())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(positions: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[positions, head_dim // 2, 2] of (cos, sin): the angle of each channel pair at each position."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(positions, device=device).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(dtype)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, S, heads, D] by table [S, D/2, 2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos = table[..., 0].float()[None, :, None, :]
    sin = table[..., 1].float()[None, :, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class StaticKVCache(nn.Module):
    def __init__(self, n_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (1, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # in-place writes at fixed addresses: what lets the decode step be captured in a CUDA graph
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, s: MixtralShape) -> None:
        super().__init__()
        self.s = s
        self.wqkv = nn.Linear(s.dim, (s.n_heads + 2 * s.n_kv_heads) * s.head_dim, bias=False)
        self.wo = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)
        self.cache: StaticKVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        s, (b, n, _) = self.s, x.shape
        q_size, kv_size = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(b, n, s.n_heads, s.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, n, s.n_kv_heads, s.head_dim), rope).transpose(1, 2)
        v = v.view(b, n, s.n_kv_heads, s.head_dim).transpose(1, 2)
        assert self.cache is not None, "call setup_caches first"
        k, v = self.cache.write(pos, k, v)
        group = s.n_heads // s.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, n, q_size))


class MoEFeedForward(nn.Module):
    """Top-k routing; the chosen experts' slices of the stacked weights are gathered and applied by einsum."""

    def __init__(self, s: MixtralShape) -> None:
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.dim, s.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(s.n_experts, s.ffn_dim, s.dim))  # gate projection
        self.w3 = nn.Parameter(torch.empty(s.n_experts, s.ffn_dim, s.dim))  # up projection
        self.w2 = nn.Parameter(torch.empty(s.n_experts, s.dim, s.ffn_dim))  # down projection
        self.tokens_per_gather = 1 << 30  # set by set_gather_budget; decode always gathers one token

    def set_gather_budget(self, budget_bytes: float) -> None:
        # bytes one token's gather copies: k slices of each of the three expert matrices
        per_token = 3 * self.s.top_k * self.s.ffn_dim * self.s.dim * self.w1.element_size()
        self.tokens_per_gather = max(1, int(budget_bytes // per_token))

    def experts(self, x: Tensor, chosen: Tensor) -> Tensor:
        """x [T, H], chosen [T, k] -> the k experts' outputs [T, k, H]."""
        w1, w3, w2 = self.w1[chosen], self.w3[chosen], self.w2[chosen]  # [T, k, I, H], [T, k, I, H], [T, k, H, I]
        h = F.silu(torch.einsum("th,tkih->tki", x, w1)) * torch.einsum("th,tkih->tki", x, w3)
        return torch.einsum("tki,tkhi->tkh", h, w2)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.s.dim)
        probs = F.softmax(self.gate(x), dim=-1)
        weights, chosen = torch.topk(probs, self.s.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        step = self.tokens_per_gather
        if x.shape[0] <= step:
            outs = self.experts(x, chosen)
        else:  # long prefill: bound the gathered weight copies (see the module docstring)
            outs = torch.cat([self.experts(x[i:i + step], chosen[i:i + step])
                              for i in range(0, x.shape[0], step)])
        return torch.einsum("tkh,tk->th", outs, weights).view(shape)


class Block(nn.Module):
    def __init__(self, s: MixtralShape) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(s.dim, s.norm_eps)
        self.attention = Attention(s)
        self.ffn_norm = RMSNorm(s.dim, s.norm_eps)
        self.moe = MoEFeedForward(s)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, pos)
        return h + self.moe(self.ffn_norm(h))


class MixtralPeer(nn.Module):
    def __init__(self, s: MixtralShape) -> None:
        super().__init__()
        self.s = s
        self.tok_embeddings = nn.Embedding(s.vocab, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.norm_eps)
        self.output = nn.Linear(s.dim, s.vocab, bias=False)
        self.max_seq = 0

    def setup_caches(self, max_seq: int) -> None:
        """Static KV caches, rope table and causal mask for sequences up to max_seq (rounded up to 8)."""
        max_seq = round_up(max_seq, 8)
        device, dtype = self.output.weight.device, self.output.weight.dtype
        for layer in self.layers:
            layer.attention.cache = StaticKVCache(self.s.n_kv_heads, max_seq, self.s.head_dim, dtype, device)
        self.rope = rope_table(max_seq, self.s.head_dim, self.s.rope_theta, dtype, device)
        self.causal_mask = torch.ones(max_seq, max_seq, dtype=torch.bool, device=device).tril()
        self.max_seq = max_seq

    def forward(self, idx: Tensor, pos: Tensor) -> Tensor:
        """idx [1, S] token ids at positions pos [S] -> logits [1, S, vocab]."""
        mask = self.causal_mask[None, None, pos]
        rope = self.rope[pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, mask, pos)
        return self.output(self.norm(x))


@torch.no_grad()
def build_random_model(s: MixtralShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MixtralPeer:
    """The model with uniform(-1e-3, 1e-3) weights (norms 1), allocated once, on the device, in dtype."""
    with torch.device("meta"):
        model = MixtralPeer(s)
    model = model.to(dtype=dtype).to_empty(device=device)  # meta -> device: no fp32 or host copy
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.uniform_(-1e-3, 1e-3, generator=gen)
    return model.eval()


# ---- sampling and generation, as gpt-fast does them ----

def sample(logits: Tensor, temperature: float, top_k: int | None) -> tuple[Tensor, Tensor]:
    logits = logits[0, -1] / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = torch.where(logits < kth, -float("inf"), logits)
    probs = F.softmax(logits, dim=-1)
    # argmax(p / Exp(1)) draws from p without the host sync torch.multinomial needs
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1, keepdim=True).to(torch.int), probs


def prefill(model: MixtralPeer, prompt: Tensor, pos: Tensor, temperature: float, top_k: int | None) -> Tensor:
    return sample(model(prompt, pos), temperature, top_k)[0]


def decode_one_token(model: MixtralPeer, tok: Tensor, pos: Tensor, temperature: float,
                     top_k: int | None) -> tuple[Tensor, Tensor]:
    return sample(model(tok, pos), temperature, top_k)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model: MixtralPeer, decode_fn, prompt: Tensor, output_len: int, temperature: float,
             top_k: int | None) -> tuple[Tensor, float, float]:
    """Prefill the prompt and decode output_len - 1 more tokens; returns (tokens, prefill s, decode s)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, n = prompt.device, prompt.numel()
    sync(device)
    t0 = time.perf_counter()
    tok = prefill(model, prompt.view(1, -1), torch.arange(n, device=device), temperature, top_k)
    sync(device)
    t1 = time.perf_counter()
    pos = torch.tensor([n], device=device, dtype=torch.int)
    tokens, step_probs = [tok.clone()], []
    cur = tok.view(1, -1)
    for _ in range(output_len - 1):
        # the math backend lets Inductor generate the decode attention itself (gpt-fast's choice)
        with sdpa_kernel(SDPBackend.MATH):
            nxt, probs = decode_fn(model, cur, pos, temperature, top_k)
        pos += 1
        # CUDA-graph outputs are overwritten by the next replay: keep copies, and feed the copy back in
        tokens.append(nxt.clone())
        step_probs.append(probs.clone())  # gpt-fast keeps each step's probabilities too: same work
        cur = tokens[-1].view(1, -1)
    sync(device)
    t2 = time.perf_counter()
    return torch.cat(tokens), t1 - t0, t2 - t1


def set_inductor_flags() -> None:
    import torch._inductor.config as ind

    ind.coordinate_descent_tuning = True
    ind.triton.unique_kernel_names = True
    ind.fx_graph_cache = True
    ind.assert_indirect_indexing = False  # the expert gather indexes weights by data-dependent ids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="an HF config.json or the folder holding it")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256, help="generated tokens, the prefill's included")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--no-compile", action="store_true", help="eager decode (CPU smoke runs)")
    p.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--moe-gather-gib", type=float, default=4.0,
                   help="cap on the expert-weight copies one MoE gather makes in prefill")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.output_len < 1 or args.input_len < 1:
        raise SystemExit("--input-len and --output-len must be at least 1")
    shape = MixtralShape.from_hf(read_hf_config(args.config), args.num_layers)
    torch.manual_seed(args.seed)

    t_build = time.perf_counter()
    model = build_random_model(shape, device, dtype, args.seed)
    for layer in model.layers:
        layer.moe.set_gather_budget(args.moe_gather_gib * 2**30)
    model.setup_caches(args.input_len + args.output_len)
    sync(device)
    build_s = time.perf_counter() - t_build

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_bytes = sum(p.numel() * p.element_size() for layer in model.layers
                       for p in (layer.moe.w1, layer.moe.w2, layer.moe.w3))
    embed_bytes = model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    # one decode step reads the non-expert weights (one embedding row), top_k of the experts, and the KV cache
    step_weight_bytes = (weight_bytes - expert_bytes - embed_bytes + embed_bytes // shape.vocab
                         + expert_bytes * shape.top_k // shape.n_experts)

    decode_fn = decode_one_token
    if not args.no_compile:
        set_inductor_flags()
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    prompt = torch.randint(0, shape.vocab, (args.input_len,), generator=gen, dtype=torch.int).to(device)
    top_k = args.top_k if args.top_k > 0 else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    with torch.no_grad():
        for i in range(-1, args.runs):  # run -1 is the warm-up: compilation and CUDA-graph capture
            t0 = time.perf_counter()
            tokens, prefill_s, decode_s = generate(model, decode_fn, prompt, args.output_len,
                                                   args.temperature, top_k)
            total_s = time.perf_counter() - t0
            steps = args.output_len - 1
            run = {
                "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
                "decode_tokens_per_s": steps / decode_s if steps else None,
                "decode_ms_per_token": 1e3 * decode_s / steps if steps else None,
                "gptfast_tokens_per_s": tokens.numel() / total_s,
            }
            if i < 0:
                what = "eager" if args.no_compile else "compiles the decode step and captures CUDA graphs"
                print(f"warm-up run ({what}): {total_s:.2f} s", flush=True)
                warmup = run
                continue
            runs.append(run)
            print(f"run {i + 1}: prefill {prefill_s * 1e3:.1f} ms, decode {steps} steps in {decode_s:.3f} s = "
                  f"{run['decode_tokens_per_s'] or 0:.2f} tok/s ({run['decode_ms_per_token'] or 0:.3f} ms/token),"
                  f" gpt-fast tokens/s {run['gptfast_tokens_per_s']:.2f}", flush=True)

    def median(key: str) -> float | None:
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    decode_tps = median("decode_tokens_per_s")
    result = {
        "peer": "gpt-fast-style mixtral-moe (radixserve's re-implementation, not gpt-fast itself)",
        "config": str(args.config), "shape": asdict(shape), "dtype": args.dtype, "batch_size": 1,
        "input_len": args.input_len, "output_len": args.output_len, "kv_cache_len": model.max_seq,
        "compiled": not args.no_compile, "compile_mode": None if args.no_compile else "reduce-overhead",
        "temperature": args.temperature, "top_k": top_k,
        "prefill_tokens_per_gather": model.layers[0].moe.tokens_per_gather,
        "decode_tokens_per_s": decode_tps, "decode_ms_per_token": median("decode_ms_per_token"),
        "gptfast_tokens_per_s": median("gptfast_tokens_per_s"), "prefill_s": median("prefill_s"),
        "weight_bytes": weight_bytes, "decode_step_weight_bytes": step_weight_bytes,
        "decode_weight_gbps": None if decode_tps is None else step_weight_bytes * decode_tps / 1e9,
        "build_s": build_s, "warmup": warmup, "runs": runs,
        "peak_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    }
    print(f"median over {len(runs)} runs: decode {decode_tps or 0:.2f} tok/s "
          f"({result['decode_ms_per_token'] or 0:.3f} ms/token, {result['decode_weight_gbps'] or 0:.0f} GB/s of "
          f"weights), gpt-fast tokens/s {result['gptfast_tokens_per_s']:.2f}, prefill {result['prefill_s']:.3f} s; "
          f"peak reserved {result['peak_memory_reserved_gb'] or 0:.1f} GB on {result['device']}, "
          f"torch {torch.__version__}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
