# SPDX-License-Identifier: BSD-2-Clause
"""An unregistered container's cgroup namespace is rooted at a cgroup of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from machinepy.runtime.cgroup import PAYLOAD_PREFIX, cgroup_dir
from tests.security.conftest import run_in

pytestmark = pytest.mark.root


@pytest.fixture
def scratch_cgroup() -> object:
    """A cgroup beside ours with a sleeping process in it: what an escaped
    container would see and could kill."""
    parent = cgroup_dir(os.getpid())
    if parent is None:
        pytest.skip("no cgroup2 hierarchy on this host")
    path = Path(parent) / f"sectest-{os.getpid()}"
    path.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (path / "cgroup.procs").write_text(str(sleeper.pid))
        yield path, sleeper
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.02)


def test_host_cgroups_out_of_reach(scratch_cgroup: tuple[Path, subprocess.Popen[bytes]],
                                   busybox_root: Path, mode: tuple[str, ...]) -> None:
    # A chroot: on the host's own root without a user namespace the container's
    # root has the host's /sys (and everything else): no boundary, as README says.
    path, sleeper = scratch_cgroup
    script = ("cat /proc/self/cgroup; ls /sys/fs/cgroup; "
              # The attack: kill every cgroup the container can see (itself included).
              "for f in $(find /sys/fs/cgroup -name cgroup.kill); do echo 1 > $f; done")
    r = run_in(busybox_root, "/bin/sh", "-c", script, opts=mode)
    assert "0::/\n" in r.stdout, r.stdout + r.stderr
    assert path.name not in r.stdout
    assert sleeper.poll() is None, "a host cgroup was killed from inside the container"


def test_payload_cgroup_is_removed(busybox_root: Path) -> None:
    parent = cgroup_dir(os.getpid())
    if parent is None:
        pytest.skip("no cgroup2 hierarchy on this host")
    r = run_in(busybox_root, "/bin/sh", "-c", "mkdir /sys/fs/cgroup/inner && sleep 300 & "
               "sleep 0.2; echo $$ > /sys/fs/cgroup/inner/cgroup.procs; exit 0")
    assert r.returncode == 0, r.stderr
    assert not [n for n in os.listdir(parent) if n.startswith(PAYLOAD_PREFIX)]
