"""One log format for every process, in the style of SGLang's lines."""

from __future__ import annotations

import logging


def configure_logging(level: str, process_name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"[%(asctime)s {process_name}] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
