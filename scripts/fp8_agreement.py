"""Greedy tokens of a model with --quantization fp8 against the same model unquantized: the share of the
first N generated tokens that agree, per prompt and overall (issue 21's sanity record for real weights).

    python scripts/fp8_agreement.py                        # the bundled SmolLM2-135M, bf16, 8 prompts x 32
    python scripts/fp8_agreement.py --model-path DIR --dtype bfloat16 --max-new-tokens 32 --out result.json

Agreement counts matching tokens up to the first difference (after it the two continue different texts,
so later matches say little) and also position by position.
"""

from __future__ import annotations

import argparse
import json
import time

from radixserve import Engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Translate to French: Good morning, how are you?",
    "Once upon a time, in a small village,",
    "Explain what a hash table is in one sentence.",
]


def prefix_match(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the bundled model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    greedy = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    common = dict(model_path=args.model_path, dtype=args.dtype, device=args.device, log_level="warning")
    runs = {}
    for name, extra in (("plain", {}), ("fp8", {"quantization": "fp8"})):
        started = time.perf_counter()
        with Engine(**common, **extra) as engine:
            chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                          add_generation_prompt=True) for q in PROMPTS]
            outs = engine.generate(chats, greedy)
        runs[name] = {"outputs": outs, "seconds": time.perf_counter() - started}
    rows = []
    for prompt, plain, fp8 in zip(PROMPTS, runs["plain"]["outputs"], runs["fp8"]["outputs"]):
        a, b = plain["output_ids"], fp8["output_ids"]
        rows.append({"prompt": prompt, "prefix_match": prefix_match(a, b), "positional": sum(x == y for x, y in zip(a, b)),
                     "tokens": len(a), "plain": plain["text"], "fp8": fp8["text"]})
    total = sum(r["tokens"] for r in rows)
    result = {
        "model": args.model_path or "bundled SmolLM2-135M-Instruct", "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "prefix_agreement": sum(r["prefix_match"] for r in rows) / total,
        "positional_agreement": sum(r["positional"] for r in rows) / total, "prompts": rows,
    }
    for r in rows:
        print(f"{r['prefix_match']:>3}/{r['tokens']} same before the first difference, {r['positional']:>3} by "
              f"position | {r['prompt'][:40]!r}\n    plain: {r['plain'][:70]!r}\n    fp8:   {r['fp8'][:70]!r}")
    print(f"agreement: {result['prefix_agreement']:.1%} of tokens before the first difference, "
          f"{result['positional_agreement']:.1%} position by position")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
