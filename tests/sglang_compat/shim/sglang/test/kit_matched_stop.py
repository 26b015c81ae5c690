"""sglang.test.kit_matched_stop: SGLang's MatchedStopMixin holds the test methods of test_matched_stop.py,
so it is part of the tests, not of the shim. It is read from the folder of fetched SGLang files
(`_kits/kit_matched_stop.py` next to basic/, features/, ...; the runner sets SGLANG_COMPAT_KITS_DIR), never
kept in this repository."""

from __future__ import annotations

import importlib.util
import os

_path = os.path.join(os.environ.get("SGLANG_COMPAT_KITS_DIR", ""), "kit_matched_stop.py")
if not os.path.isfile(_path):
    raise ImportError(
        f"SGLang's kit_matched_stop.py not found at {_path!r}: fetch python/sglang/test/kit_matched_stop.py "
        "into <tests dir>/_kits/ (see tests/sglang_compat/README.md)"
    )
_spec = importlib.util.spec_from_file_location("_sglang_kit_matched_stop", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

MatchedStopMixin = _mod.MatchedStopMixin
MANY_NEW_TOKENS_PROMPT = getattr(_mod, "MANY_NEW_TOKENS_PROMPT", None)
