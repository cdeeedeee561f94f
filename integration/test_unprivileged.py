# SPDX-License-Identifier: BSD-2-Clause
"""A real unprivileged user on a systemd host: README's user-map example and a
plain `run` without root; systemd refuses them a scope (no polkit here), and
the container runs unregistered after one warning line (was: exit 1)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
USER = "mpytest"


@pytest.fixture(scope="module")
def user_site() -> Iterator[Path]:
    """The user cannot read our interpreter's site-packages (under /root): a copy of
    jeepney, which registration needs, where it can."""
    spec = importlib.util.find_spec("jeepney")
    assert spec is not None and spec.origin is not None
    site = Path(tempfile.mkdtemp(prefix="mpytest-site-", dir="/var/tmp"))
    site.chmod(0o755)
    shutil.copytree(Path(spec.origin).parent, site / "jeepney")
    yield site
    shutil.rmtree(site)


@pytest.fixture(scope="module")
def user(testhost: Any) -> Iterator[str]:
    """A user of the test host's own (its /etc is its overlay's, not the machine's)."""
    if not os.path.exists(SYSTEM_PYTHON) or shutil.which("runuser") is None:
        pytest.skip(f"needs {SYSTEM_PYTHON} and runuser")
    made = testhost.run(["id", USER]).returncode != 0
    if made:
        r = testhost.run(["useradd", "-M", "-s", "/bin/sh", USER])
        assert r.returncode == 0, r.stderr
    yield USER
    if made:
        testhost.run(["userdel", USER])


def as_user(host: Any, user: str, site: Path, *args: str) -> Any:
    return host.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={REPO}:{site}",
                     SYSTEM_PYTHON, "-m", "machinepy", "run", *args], timeout=60)


@pytest.mark.parametrize("maps", ["default", "readme"])
def test_refused_registration_is_a_warning(testhost: Any, user: str, user_site: Path,
                                           busybox_root: Path, maps: str) -> None:
    uid = int(testhost.run(["id", "-u", user]).stdout)
    subuid = testhost.run(["cat", "/etc/subuid"]).stdout
    sub = next((line.split(":")[1:] for line in subuid.splitlines()
                if line.startswith(f"{user}:")), None)
    opts: list[str] = []
    if maps == "readme":
        if sub is None:
            pytest.skip(f"{user} has no /etc/subuid range")
        opts = ["-e", f"0:{uid}:1", "-e", f"1:{sub[0]}:{sub[1]}"]
    r = as_user(testhost, user, user_site, "-r", str(busybox_root), *opts, "--", "id", "-u")
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "machinepy: warning: not registering machine 'pflask-"), r.stderr
    assert testhost.run(["machinectl", "list", "--no-legend"]).stdout.strip() == ""
