"""Every server and router command line in deploy/ (systemd units and their environment files, compose files,
Kubernetes manifests) is accepted by radixserve's own flag parsers and checks, as a user would run it."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
import yaml

from radixserve.launch_server import build_parser as server_parser
from radixserve.router.args import parse_args as parse_router_args
from radixserve.server_args import ServerArgs
from tests.deploy.tools import DEPLOY


def compose_default(text: str) -> str:
    """${NAME:-default} as compose fills it when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    env_args = {}  # example environment file -> its *_ARGS value
    for env in glob.glob(os.path.join(DEPLOY, "systemd", "*.env")):
        env_args[os.path.basename(env)] = re.search(r"^\w+_ARGS=(.*)$", open(env).read(), re.M).group(1)
        module = "radixserve.launch_router" if env.endswith("router.env") else "radixserve.launch_server"
        found.append((os.path.basename(env), ["python", "-m", module, *shlex.split(env_args[os.path.basename(env)])]))
    for unit in glob.glob(os.path.join(DEPLOY, "systemd", "*.service")):
        exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", open(unit).read(), re.M | re.S).group(1)
        # as systemd expands an unbraced $VAR: into words, from the instance's environment file
        exec_start = exec_start.replace("$RADIXSERVE_ARGS", env_args["prefill.env"])
        exec_start = exec_start.replace("$ROUTER_ARGS", env_args["router.env"])
        found.append((os.path.basename(unit), shlex.split(exec_start.replace("\\\n", " "))))
    for compose in glob.glob(os.path.join(DEPLOY, "docker-compose*.yml")):
        for name, service in yaml.safe_load(open(compose))["services"].items():
            found.append((f"{os.path.basename(compose)}:{name}", shlex.split(compose_default(service["command"]))))
    for manifest in glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml")):
        for doc in yaml.safe_load_all(open(manifest)):
            if doc["kind"] in ("Deployment", "StatefulSet"):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    args = [a.replace("$(NODE_RANK)", "1") for a in c["args"]]
                    found.append((f"{os.path.basename(manifest)}:{c['name']}", [*c["command"], *args]))
    return found


COMMANDS = command_lines()


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_line_parses(where, argv):
    module = argv[argv.index("-m") + 1]
    rest = argv[argv.index("-m") + 2:]
    if module == "radixserve.launch_server":
        args = ServerArgs.from_cli_or_exit(server_parser().parse_args(rest))
        assert args.port in (30000, 30001)
    else:
        assert module == "radixserve.launch_router"
        parse_router_args(rest)


def test_every_kind_of_file_was_found():
    wheres = {w.split(":")[0].split(".")[-1] for w, _ in COMMANDS}
    assert wheres == {"service", "env", "yml", "yaml"}
    assert len(COMMANDS) >= 12
