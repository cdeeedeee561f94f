# SPDX-License-Identifier: BSD-2-Clause
"""The escape suite, registered: each attack from inside a container that sits in
its machine-NAME.scope (DevicePolicy=closed, delegated cgroup) in the systemd
test host, as root without a user namespace and with --private-users=pick."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.security.conftest import MODES, build_probe

MACHINEPY = [sys.executable, "-m", "machinepy"]
PROBES = ["shocker", "keyctl", "bpf", "perf", "userfaultfd", "tiocsti", "audit", "unknown",
          "fds", *(["compat"] if os.uname().machine == "x86_64" else [])]


def registered(host: Any, root: Path, mode: str, *args: str,
               opts: tuple[str, ...] = ()) -> Any:
    name = f"esc-{uuid.uuid4().hex[:8]}"
    r = host.run([*MACHINEPY, "run", "--machine", name, "-r", str(root), *MODES[mode], *opts,
                  "--", *args], timeout=60)
    # Registered for real: no "not registering" warning, and nothing left after.
    assert "not registering" not in r.stderr, r.stderr
    assert name not in host.run(["machinectl", "list", "--no-legend"]).stdout
    return r


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", PROBES)
def test_attack_is_blocked_when_registered(testhost: Any, busybox_root: Path, name: str,
                                           mode: str) -> None:
    probe = build_probe(name)
    r = registered(testhost, busybox_root, mode, "/probe",
                   opts=("-m", f"bind-ro:{probe}:/probe"))
    assert r.returncode != 2, f"probe could not run the attack:\n{r.stdout}{r.stderr}"
    assert r.returncode == 0, f"escape got through:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("mode", list(MODES))
def test_cwd_through_a_host_fd_when_registered(testhost: Any, busybox_root: Path,
                                               mode: str) -> None:
    # runc's CVE-2024-21626 pattern: -c into an fd PID 1 had on the host's tree.
    for fd in range(3, 8):
        r = registered(testhost, busybox_root, mode, "/bin/sh", "-c",
                       "cat ../../../../etc/shadow && echo ESCAPED",
                       opts=("-c", f"/proc/self/fd/{fd}"))
        assert "ESCAPED" not in r.stdout and "root:" not in r.stdout, (fd, r.stdout)


@pytest.mark.parametrize("mode", list(MODES))
def test_scope_cgroup_is_the_root_when_registered(testhost: Any, busybox_root: Path,
                                                  mode: str) -> None:
    r = registered(testhost, busybox_root, mode, "/bin/sh", "-c",
                   "cat /proc/self/cgroup; ls /sys/fs/cgroup | grep -c slice || true")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # Rooted at its scope (v1 hierarchies of a hybrid host aside), no host slice in sight.
    assert "0::/" in lines and lines[-1] == "0", r.stdout
