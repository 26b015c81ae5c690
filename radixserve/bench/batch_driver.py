"""Drive prefill and decode steps of lightweight requests through the scheduler's own batch builders
and sampler, on a model runner made for the purpose: the core of bench_one_batch, and of the tests
and scripts that time or check a step without a scheduler loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from radixserve.server_args import ServerArgs

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ---- driving the runner --------------------------------------------------------------------------
class BatchDriver:
    """Runs prefill and decode steps of lightweight Reqs through the scheduler's batch builders."""

    def __init__(self, runner: Any, seed: int) -> None:
        from radixserve.cache.chunk import ChunkCache
        from radixserve.layers.sampler import Sampler

        self.runner = runner
        # no prefix sharing: every run pays for its whole prompt
        self.cache = ChunkCache(runner.pools.req_to_token, runner.pools.allocator, runner.page_size)
        self.sampler = Sampler()
        self.gen = torch.Generator().manual_seed(seed)

    def timed(self, fn: Callable[[], None]) -> float:
        cuda = self.runner.device.type == "cuda"
        if cuda:  # kernels still queued from before must not count, nor ours escape the timer
            torch.cuda.synchronize(self.runner.device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    def reset(self) -> None:
        self.runner.pools.clear()

    def new_reqs(self, bs: int, input_len: int, output_len: int) -> list[Any]:
        from radixserve.messages import GenerateReq
        from radixserve.sampling_params import SamplingParams
        from radixserve.scheduler.req import Req
        from radixserve.scheduler.state import ReqState, move

        params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
        ids = torch.randint(0, self.runner.vocab_size, (bs, input_len), generator=self.gen).tolist()
        reqs = []
        for i, prompt in enumerate(ids):
            req = Req(GenerateReq(f"bench-{i}", prompt, params), eos_ids=set(), max_new_tokens=output_len)
            req.req_pool_idx = self.runner.pools.req_to_token.alloc()
            req.extend_len = input_len
            move(req, ReqState.PREFILLING)
            reqs.append(req)
        return reqs

    def sample(self, reqs: list[Any], batch: Any, logits: torch.Tensor) -> list[int]:
        from radixserve.sampling_batch import SamplingBatch
        from radixserve.scheduler.batch import record_sampled

        n = len(reqs)
        params = SamplingBatch.build(
            [r.params for r in reqs], [r.output_ids for r in reqs], [r.origin_input_ids for r in reqs],
            [[]] * n, [None] * n, self.runner.vocab_size, self.runner.device,
        )
        next_ids = self.sampler(logits, params, return_logprob=False).next_token_ids
        record_sampled(self.runner, batch, next_ids)  # the next decode batch reads its inputs there
        return next_ids.tolist()

    def prefill(self, reqs: list[Any]) -> None:
        from radixserve.scheduler.batch import build_extend_batch

        batch = build_extend_batch(reqs, self.runner, self.cache)
        out = self.runner.forward(batch)
        for req, token in zip(reqs, self.sample(reqs, batch, out.next_token_logits)):
            req.kv_committed_len += req.extend_len
            req.output_ids.append(token)

    def decode(self, reqs: list[Any]) -> None:
        from radixserve.scheduler.batch import build_decode_batch

        batch = build_decode_batch(reqs, self.runner, self.cache)
        out = self.runner.forward(batch)
        for req, token in zip(reqs, self.sample(reqs, batch, out.next_token_logits)):
            req.kv_committed_len += 1
            req.output_ids.append(token)

    @torch.inference_mode()
    def run(self, bs: int, input_len: int, output_len: int) -> tuple[float, list[float]]:
        """(prefill seconds, seconds of each decode step), from an empty KV pool."""
        self.reset()
        try:
            reqs = self.new_reqs(bs, input_len, output_len)
            prefill_s = self.timed(lambda: self.prefill(reqs))
            steps = [self.timed(lambda: self.decode(reqs)) for _ in range(output_len - 1)]
        finally:
            self.reset()
        return prefill_s, steps


def resolve_model_path(path: str) -> str:
    """A path, or the bare name of a packaged config (llama-3.1-8b, tiny-llama, ...)."""
    if not os.path.exists(path) and os.path.isfile(os.path.join(CONFIGS_DIR, path, "config.json")):
        return os.path.join(CONFIGS_DIR, path)
    return path


def build_runner(sargs: ServerArgs) -> Any:
    from radixserve.loader import config as cfgutil
    from radixserve.loader.source import resolve_model_source
    from radixserve.model_executor.model_runner import build_model_runner, resolve_device

    source = resolve_model_source(sargs.model_path, sargs.load_format, sargs.tokenizer_path)
    limit = cfgutil.context_length(source.hf_config)
    if limit is not None and sargs.context_length > limit:
        raise ValueError(f"input + output ({sargs.context_length}) exceeds the model's context length {limit}")
    return build_model_runner(sargs, source, resolve_device(sargs.device), sargs.context_length)
