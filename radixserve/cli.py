"""The `radixserve` console script: `radixserve serve ...`, `radixserve generate ...`."""

from __future__ import annotations

import sys

from radixserve import __version__

USAGE = """usage: radixserve {serve,router,generate,version} [ARGS]

  serve      start the HTTP server (python -m radixserve.launch_server)
  router     start the router (python -m radixserve.launch_router)
  generate   run prompts through the offline engine (python -m radixserve.generate)
  version    print the version
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("version", "--version"):
        print(f"radixserve {__version__}")
        return 0
    if command == "serve":
        from radixserve.launch_server import main as serve_main

        return serve_main(rest)
    if command == "router":
        from radixserve.launch_router import main as router_main

        return router_main(rest)
    if command == "generate":
        from radixserve.generate import main as generate_main

        return generate_main(rest)
    print(f"radixserve: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
