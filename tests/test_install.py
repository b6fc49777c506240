"""`make install` / `make uninstall` for real, into a temporary PREFIX: wrappers that run the
venv's entry points, typed as README types them; foreign files are never touched."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from lab import UPSTREAM_V4, Lab
from runner import parse_records, veth_ifindexes

from agent.datapath import PIN_DIR, our_filters

REPO = Path(__file__).resolve().parent.parent
# in the order of [project.scripts], which is the order the install reports
SCRIPTS = list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
MARKER = "# egress-top wrapper, written by 'make install'; 'make uninstall' removes it"
FOREIGN = "#!/bin/sh\necho not egress-top\n"


def make(target: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), f"PREFIX={prefix}", target],
        capture_output=True,
        text=True,
        timeout=120,
    )


def typed(command: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    """A command line as an operator types it, with the install's bin first on PATH."""
    env = {**os.environ, "PATH": f"{prefix / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, env=env)


def test_install_puts_every_cli_on_the_path_and_uninstall_takes_them_away(
    tmp_path: Path, lab: Lab, upstream
) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text(FOREIGN)  # like /usr/local/bin/docker here
    installed = make("install", tmp_path)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.splitlines() == [f"installed {tmp_path}/bin/{name}" for name in SCRIPTS]
    for name in SCRIPTS:
        wrapper = tmp_path / "bin" / name
        assert wrapper.read_text().splitlines() == [
            "#!/bin/sh",
            MARKER,
            f'exec {REPO / ".venv" / "bin" / name} "$@"',
        ]
        assert os.access(wrapper, os.X_OK)
        assert typed(f"{name} --help", tmp_path).returncode == 0

    pinger = lab.container(
        "install",
        network=lab.network(),
        command=["sh", "-c", f"for i in $(seq 1 300); do ping -c1 -W1 {UPSTREAM_V4}; sleep 0.02; done"],
    )
    result = typed("egress-top --json -n 1 -i 0.1", tmp_path)  # as README types it, less the sudo
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    records = parse_records(result.stdout)
    assert {r["ifindex"] for r in records if r["container_name"] == pinger.name} == veth_ifindexes(
        lab.pid(pinger)
    ), result.stdout
    assert not our_filters() and not PIN_DIR.exists()

    removed = make("uninstall", tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [f"removed {tmp_path}/bin/{name}" for name in SCRIPTS]
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["docker"]
    assert (tmp_path / "bin" / "docker").read_text() == FOREIGN


def test_install_refuses_to_overwrite_and_uninstall_keeps_a_foreign_file(tmp_path: Path) -> None:
    foreign = tmp_path / "bin" / "egress-rules"
    foreign.parent.mkdir()
    foreign.write_text(FOREIGN)
    refused = make("install", tmp_path)
    assert refused.returncode != 0
    assert refused.stderr.splitlines()[0] == (
        f"make install: {foreign} exists and is not ours: remove or move it, then run again"
    )
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["egress-rules"]  # nothing half-installed
    assert foreign.read_text() == FOREIGN

    kept = make("uninstall", tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == [f"kept {foreign}: not ours"]
    assert foreign.read_text() == FOREIGN


def test_every_package_of_the_source_tree_is_in_the_wheel() -> None:
    """A subpackage missing from [tool.setuptools] packages works from the work tree (editable
    install) and fails only in the image: compare the list with the tree."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "agent").rglob("__init__.py")
    }
    assert in_tree, "no package found under agent/"
    assert in_tree - listed == set()
