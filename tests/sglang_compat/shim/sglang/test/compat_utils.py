"""sglang.test.test_utils for radixserve: launch `python -m radixserve.launch_server` the way SGLang's
test files launch `python -m sglang.launch_server`.

Written from scratch after the behaviour of SGLang's helpers: popen_launch_server puts the host and port
of base_url on the command line with the test's own flags (and --api-key), then polls /health_generate
until it answers 200, failing as soon as the server process exits.

Model names: every DEFAULT_*MODEL* constant is radixserve's bundled model (`smollm2-135m-instruct`,
served with no --model-path). A test that names another model (a Hub id the offline machine cannot
load) gets the bundled model served under that name (--served-model-name NAME), so requests that
name it still match; a note on stderr says so. SGLANG_COMPAT_MODEL_PATH=PATH serves PATH instead.

Flags: the test's flags are passed through unchanged, so a flag radixserve does not know stops the
server at launch (and the test class errors in setUpClass), which is what the run should report.
SGLANG_COMPAT_UNKNOWN_FLAGS=drop instead drops the flags radixserve's parser does not know (with the
value that follows them), printing each, to see how the tests fare past that point.

Environment knobs (all optional): SGLANG_COMPAT_PORT (port of DEFAULT_URL_FOR_TEST, default 21000),
SGLANG_COMPAT_LAUNCH_TIMEOUT (seconds, caps each launch), SGLANG_COMPAT_MODEL_PATH,
SGLANG_COMPAT_UNKNOWN_FLAGS (pass|drop), SGLANG_COMPAT_EXTRA_SERVER_ARGS (appended to every launch),
SGLANG_TEST_MAX_RETRY (CustomTestCase retries, default 0).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import unittest
from typing import Any
from urllib.parse import urlsplit

import requests

from sglang.srt.utils import kill_process_tree

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m-instruct"

# ---- model names: all of them are the model radixserve serves here --------------------------------
DEFAULT_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_SMALL_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_SMALL_MODEL_NAME_FOR_TEST_BASE = BUNDLED_MODEL
DEFAULT_SMALL_MODEL_NAME_FOR_TEST_QWEN = BUNDLED_MODEL
DEFAULT_SMALL_EMBEDDING_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_SMALL_CROSS_ENCODER_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_REASONING_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_ENABLE_THINKING_MODEL_NAME_FOR_TEST = BUNDLED_MODEL
DEFAULT_EAGLE_TARGET_MODEL_FOR_TEST = BUNDLED_MODEL
DEFAULT_EAGLE_DRAFT_MODEL_FOR_TEST = BUNDLED_MODEL

DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH = 600
DEFAULT_PORT_FOR_SRT_TEST_RUNNER = int(os.environ.get("SGLANG_COMPAT_PORT", "21000")) - 1000
DEFAULT_URL_FOR_TEST = f"http://127.0.0.1:{DEFAULT_PORT_FOR_SRT_TEST_RUNNER + 1000}"

STDOUT_FILENAME = "/tmp/sglang_compat_stdout.txt"
STDERR_FILENAME = "/tmp/sglang_compat_stderr.txt"


def __getattr__(name: str) -> Any:
    # any other model-name constant a test file imports (DEFAULT_..._MODEL_..._FOR_TEST)
    if name.startswith("DEFAULT_") and "MODEL" in name:
        return BUNDLED_MODEL
    raise AttributeError(f"module {__name__!r} (radixserve compat shim) has no attribute {name!r}")


def is_in_ci() -> bool:
    return False


class CustomTestCase(unittest.TestCase):
    """unittest.TestCase; a failing test is run again up to SGLANG_TEST_MAX_RETRY times (default 0)."""

    def _callTestMethod(self, method):  # noqa: N802 (unittest's name)
        retries = int(os.environ.get("SGLANG_TEST_MAX_RETRY", "0"))
        for attempt in range(retries + 1):
            try:
                return super()._callTestMethod(method)
            except (AssertionError, Exception):
                if attempt == retries:
                    raise
                print(f"[sglang-compat] {self.id()} failed, retry {attempt + 1}/{retries}", file=sys.stderr)


# ---- the server ------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> tuple[str | None, str | None]:
    """(model path to load or None for the bundled one, a note when the test's model is replaced)."""
    override = os.environ.get("SGLANG_COMPAT_MODEL_PATH")
    if override:
        return (
            override,
            None if model == override else f"{model!r} replaced by SGLANG_COMPAT_MODEL_PATH={override}",
        )
    if model is None or model.strip().lower() == BUNDLED_MODEL:
        return None, None
    if os.path.exists(model):
        return model, None
    return None, f"{model!r} is not available offline: serving radixserve's bundled model under that name"


@functools.lru_cache(maxsize=1)
def radixserve_flags() -> frozenset[str]:
    """Every --flag radixserve.launch_server's parser knows (read from its --help)."""
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.launch_server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out))


def _known_flag(flag: str, known: frozenset[str]) -> bool:
    if flag in known:
        return True
    hits = [k for k in known if k.startswith(flag)]  # argparse accepts unique prefixes
    return len(hits) == 1


def drop_unknown_flags(args: list[str]) -> tuple[list[str], list[str]]:
    known = radixserve_flags()
    kept: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            if not _known_flag(flag, known):
                dropped.append(a)
                has_value = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
                if has_value:
                    dropped.append(args[i + 1])
                    i += 1
                i += 1
                continue
        kept.append(a)
        i += 1
    return kept, dropped


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _tee(src, sinks) -> None:
    for line in iter(src.readline, ""):
        for sink in sinks:
            try:
                sink.write(line)
                sink.flush()
            except ValueError:  # a sink the test already closed
                pass
    src.close()


def popen_launch_server(
    model: str,
    base_url: str,
    timeout: float,
    api_key: str | None = None,
    other_args: Any | None = None,
    env: dict | None = None,
    return_stdout_stderr: tuple | None = None,
    device: str = "auto",
    pd_separated: bool = False,
    num_replicas: int | None = None,
    **unused: Any,
) -> subprocess.Popen:
    """Start radixserve on base_url's host and port and return its Popen once /health_generate says 200."""
    if pd_separated or num_replicas is not None:
        raise unittest.SkipTest("PD-disaggregated / multi-replica launch: not built in radixserve")
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 80)

    args = [str(x) for x in (other_args or ())]
    extra = os.environ.get("SGLANG_COMPAT_EXTRA_SERVER_ARGS")
    if extra:
        args += shlex.split(extra)
    if os.environ.get("SGLANG_COMPAT_UNKNOWN_FLAGS", "pass") == "drop":
        args, dropped = drop_unknown_flags(args)
        if dropped:
            print(
                f"[sglang-compat] dropped flags radixserve does not know: {' '.join(dropped)}",
                file=sys.stderr,
                flush=True,
            )

    path, note = resolve_model(model)
    cmd = [sys.executable, "-m", "radixserve.launch_server"]
    if path is not None:
        cmd += ["--model-path", path]
    if note:
        print(f"[sglang-compat] {note}", file=sys.stderr, flush=True)
    if model and model.strip().lower() != BUNDLED_MODEL and not _has_flag(args, "--served-model-name"):
        cmd += ["--served-model-name", model]
    if device != "auto":
        cmd += ["--device", str(device)]
    cmd += args
    cmd += ["--host", host, "--port", port]
    if api_key:
        cmd += ["--api-key", api_key]
    print(f"command={shlex.join(cmd)}", flush=True)

    # a server of the previous test class may still be releasing the port
    deadline = time.monotonic() + 30
    while not _port_free(host, int(port)) and time.monotonic() < deadline:
        time.sleep(0.5)

    if return_stdout_stderr:
        process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1
        )
        threading.Thread(
            target=_tee, args=(process.stdout, [return_stdout_stderr[0], sys.stdout]), daemon=True
        ).start()
        threading.Thread(
            target=_tee, args=(process.stderr, [return_stdout_stderr[1], sys.stderr]), daemon=True
        ).start()
    else:
        process = subprocess.Popen(cmd, stdout=None, stderr=None, env=env)

    cap = os.environ.get("SGLANG_COMPAT_LAUNCH_TIMEOUT")
    if cap:
        timeout = min(float(timeout), float(cap))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    with requests.Session() as session:
        while time.monotonic() - start < timeout:
            rc = process.poll()
            if rc is not None:
                raise Exception(f"Server process exited with code {rc}. Check server logs for errors.")
            try:
                r = session.get(f"{base_url}/health_generate", headers=headers, timeout=30)
                if r.status_code == 200:
                    print(f"[sglang-compat] server ready in {time.monotonic() - start:.1f}s", flush=True)
                    return process
            except requests.RequestException:
                pass
            time.sleep(1)
    kill_process_tree(process.pid)
    raise TimeoutError("Server failed to start within the timeout period.")


def popen_launch_router_with_grpc_worker(*args: Any, **kwargs: Any):
    raise unittest.SkipTest("out of scope: radixserve has no SGLang router and no gRPC worker")


def popen_launch_pd_server(*args: Any, **kwargs: Any):
    raise unittest.SkipTest("out of scope: PD disaggregation is not built in radixserve")
