"""python -m radixserve.generate: run prompts through the offline Engine from the command line.

    python -m radixserve.generate --prompt "The capital of France is" --max-new-tokens 32
Every server flag (see --help) is accepted; with no --model-path the bundled model is used.
"""

from __future__ import annotations

import argparse
import json
import sys

from radixserve import __version__
from radixserve.server_args import ServerArgs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve generate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"radixserve {__version__}")
    g = parser.add_argument_group("prompt")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print full results as JSON lines")
    ServerArgs.add_cli_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server_args = ServerArgs.from_cli_or_exit(args)
    from radixserve.engine import Engine

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed}
    prompts = args.prompt or ["The capital of France is"]
    try:
        with Engine(**{k: v for k, v in vars(server_args).items()}) as engine:
            for prompt, out in zip(prompts, engine.generate(prompts, params)):
                if args.json:
                    print(json.dumps({"prompt": prompt, **out}))
                else:
                    print(f"{prompt}{out['text']}")
    except ValueError as e:
        print(f"radixserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
