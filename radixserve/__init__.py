"""radixserve: a small, fast LLM serving system."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from radixserve.engine import Engine


def __getattr__(name: str):
    # Engine pulls in torch; keep `import radixserve` (and --version) light.
    if name == "Engine":
        from radixserve.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "__version__"]
