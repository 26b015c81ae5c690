"""Encode + decode time of the scheduler's messages: MessagePack through msgspec (what radixserve
sends) against pickle (what it sent before), per message, for the shapes that dominate traffic.

    python -m radixserve.bench.bench_ipc_codec [--repeat 2000]
"""

from __future__ import annotations

import argparse
import pickle
import random
import time
from collections.abc import Callable

from radixserve import ipc_codec
from radixserve.messages import BatchOut, GenerateBatch, GenerateReq, Message, ReqOutput
from radixserve.sampling_params import SamplingParams

PARAMS = {"max_new_tokens": 256, "min_new_tokens": 0, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0,
          "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "stop": [],
          "stop_token_ids": [], "stop_regex": None, "ignore_eos": False, "n": 1, "seed": None,
          "skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
          "logit_bias": None, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None}


def samples(rng: random.Random) -> dict[str, Message]:
    def req(i: int, prompt: int) -> GenerateReq:
        return GenerateReq(f"{i:032x}", [rng.randrange(128256) for _ in range(prompt)],
                                    SamplingParams(**PARAMS))

    def out(i: int, tokens: int, logprobs: bool) -> ReqOutput:
        o = ReqOutput(f"{i:032x}", [rng.randrange(128256) for _ in range(tokens)], None, 1024, 100, 0)
        if logprobs:
            o.output_token_logprobs = [-rng.random() for _ in range(tokens)]
            o.output_top_logprobs = [[(-rng.random(), rng.randrange(128256)) for _ in range(5)] for _ in range(tokens)]
        return o

    return {
        "one request, 1,024-token prompt": GenerateBatch([req(0, 1024)]),
        "a call of 64 requests, 256-token prompts": GenerateBatch([req(i, 256) for i in range(64)]),
        "decode step out, 64 requests x 1 token": BatchOut([out(i, 1, False) for i in range(64)]),
        "decode step out, 256 requests x 1 token": BatchOut([out(i, 1, False) for i in range(256)]),
        "decode step out, 64 x 1 token, top-5 logprobs": BatchOut([out(i, 1, True) for i in range(64)]),
    }


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    print(f"{'message':48} | {'bytes msgpack':>13} | {'bytes pickle':>12} | {'msgpack us':>10} | {'pickle us':>9} | speed-up")
    for name, msg in samples(random.Random(0)).items():
        packed, pickled = ipc_codec.encode(msg), pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        ours = per_call_us(lambda m=msg: ipc_codec.decode(ipc_codec.encode(m)), args.repeat)
        theirs = per_call_us(lambda m=msg: pickle.loads(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)),
                             args.repeat)
        print(f"{name:48} | {len(packed):13,} | {len(pickled):12,} | {ours:10.1f} | {theirs:9.1f} | {theirs / ours:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
