"""deploy/'s files checked by the tools their formats have: hadolint on both Dockerfiles, shellcheck on the
scripts, Kubernetes' own schemas (strict: unknown fields fail) on the manifests. And the two images share
every install step: each Dockerfile installs only through deploy/install.sh."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

from tests.deploy.tools import DEPLOY, tool

DOCKERFILES = [os.path.join(DEPLOY, "Dockerfile"), os.path.join(DEPLOY, "Dockerfile.cpu")]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_dockerfile_passes_hadolint(dockerfile):
    done = run([tool("hadolint"), "--no-color", dockerfile])
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_dockerfile_installs_only_through_install_sh(dockerfile):
    text = open(dockerfile).read()
    runs = [r for r in re.findall(r"^RUN (.*?)(?<!\\)$", text, re.M | re.S)]
    assert any("/src/deploy/install.sh --device" in r for r in runs)
    assert not re.search(r"\b(apt-get|apt|pip|pip3)\b(?!\.)", "\n".join(r for r in runs if "install.sh" not in r))
    for needed in ("USER ${RADIXSERVE_UID}", "HEALTHCHECK", "EXPOSE 30000", "VOLUME", "STOPSIGNAL SIGTERM",
                   'CMD ["python", "-m", "radixserve.launch_server"'):
        assert needed in text, needed


def test_dockerfile_build_args_match_the_runbook():
    text = open(DOCKERFILES[0]).read()
    for arg in ("ARG CUDA_VERSION=12.9.1", "ARG BUILD_TYPE=all", "ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}"):
        assert arg in text, arg


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(glob.glob(os.path.join(DEPLOY, "*.sh")))
    assert len(scripts) >= 3
    done = run([tool("shellcheck"), *scripts])
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_manifests_validate_against_the_schemas():
    manifests = sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml")))
    assert len(manifests) == 3
    done = run([tool("kubernetes-validate"), "--strict", *manifests])
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = re.findall(r"passed for resource (\S+)/", done.stdout + done.stderr)
    assert sorted(set(kinds)) == ["deployment", "service", "statefulset"], done.stdout + done.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    """So a pass above means something: a wrong type and an unknown field both fail."""
    text = open(os.path.join(DEPLOY, "k8s", "server.yaml")).read()
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("periodSeconds: 5", "periodSeconds: often", 1))
    assert run([tool("kubernetes-validate"), "--strict", str(broken)]).returncode != 0
    broken.write_text(text.replace("terminationGracePeriodSeconds: 120", "terminationGraceSeconds: 120", 1))
    assert run([tool("kubernetes-validate"), "--strict", str(broken)]).returncode != 0
