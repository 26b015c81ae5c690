"""deploy/systemd/: the units pass `systemd-analyze verify` (no running systemd needed), with ExecStart's
interpreter pointed at this Python (verify checks that the program exists; /opt/radixserve/venv exists only
on an installed host), and their stop settings leave a SIGTERM drain the time it needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.deploy.tools import DEPLOY, tool

UNITS = os.path.join(DEPLOY, "systemd")
INSTALLED_PYTHON = "/opt/radixserve/venv/bin/python"
# unit file -> the name it is verified under (a template as one of its instances)
NAMES = {"radixserve.service": "radixserve.service", "radixserve@.service": "radixserve@prefill.service",
         "radixserve-router.service": "radixserve-router.service"}
# how long each SIGTERM drain may take by default: the server's --shutdown-timeout, the router's grace period
DRAIN_S = {"radixserve.service": 60, "radixserve@.service": 60, "radixserve-router.service": 180}


def verify(directory, unit_text: str, name: str) -> subprocess.CompletedProcess:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(unit_text.replace(INSTALLED_PYTHON, sys.executable))
    return subprocess.run([tool("systemd-analyze"), "verify", "--man=no", path], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("unit", sorted(NAMES))
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    text = open(os.path.join(UNITS, unit)).read()
    assert INSTALLED_PYTHON in text
    done = verify(tmp_path, text, NAMES[unit])
    # verify exits 0 on many problems (an unknown key, a bad value) and only prints them: no output at all
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_verify_reports_what_a_broken_unit_gets_wrong(tmp_path):
    text = open(os.path.join(UNITS, "radixserve.service")).read()
    done = verify(tmp_path, text.replace("Restart=on-failure", "Restart=sometimes"), "radixserve.service")
    assert "sometimes" in done.stdout + done.stderr


@pytest.mark.parametrize("unit", sorted(NAMES))
def test_unit_restarts_on_failure_and_drains_on_stop(unit):
    text = open(os.path.join(UNITS, unit)).read()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["Restart"] == "on-failure" and keys["KillSignal"] == "SIGTERM"
    assert int(keys["TimeoutStopSec"]) >= DRAIN_S[unit] + 15, "the stop timeout must outlast the drain"
    assert keys["User"] == "radixserve"


def test_template_and_router_read_the_example_environment_files():
    for env, var in (("prefill.env", "RADIXSERVE_ARGS"), ("decode.env", "RADIXSERVE_ARGS"),
                     ("router.env", "ROUTER_ARGS")):
        text = open(os.path.join(UNITS, env)).read()
        assert re.search(rf"^{var}=--", text, re.M), env
    assert "EnvironmentFile=/etc/radixserve/%i.env" in open(os.path.join(UNITS, "radixserve@.service")).read()
    assert "$ROUTER_ARGS" in open(os.path.join(UNITS, "radixserve-router.service")).read()
