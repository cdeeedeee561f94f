# SPDX-License-Identifier: BSD-2-Clause
"""The test host itself: systemd as PID 1, machined, scopes, nspawn, clean shutdown."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from integration.testhost import TestHost


def test_pid1_is_systemd(testhost: TestHost) -> None:
    assert os.readlink(f"/proc/{testhost.pid}/exe").endswith("/systemd")
    r = testhost.run(["cat", "/proc/1/comm"])
    assert r.stdout.strip() == "systemd"
    r = testhost.run(["systemctl", "is-system-running"])
    assert r.stdout.strip() in ("running", "degraded", "starting"), r.stdout + r.stderr


def test_machinectl_answers(testhost: TestHost) -> None:
    r = testhost.run(["machinectl", "list", "--no-legend"])
    assert r.returncode == 0, r.stderr


def test_commands_run_inside_the_test_host_cgroup_tree(testhost: TestHost) -> None:
    r = testhost.run(["cat", "/proc/self/cgroup"])
    unified = [line for line in r.stdout.splitlines() if line.startswith("0::")]
    assert unified and not unified[0].startswith("0::/.."), r.stdout


def test_systemd_run_scope(testhost: TestHost) -> None:
    r = testhost.run(["systemd-run", "--scope", "--quiet", "cat", "/proc/self/cgroup"])
    assert r.returncode == 0, r.stderr
    assert "0::/system.slice/run-" in r.stdout


def test_nspawn_registers_with_machined(testhost: TestHost, debian_rootfs: Path) -> None:
    r = testhost.run(["systemd-nspawn", "--quiet", "--register=yes", "-D", str(debian_rootfs),
                      "/bin/true"], timeout=120)
    assert r.returncode == 0, r.stderr


def test_python_and_checkout_are_visible(testhost: TestHost) -> None:
    import sys

    r = testhost.run([sys.executable, "-c", "import machinepy; print(machinepy.__file__)"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(Path(__file__).resolve().parent.parent))


def _host_state() -> dict[str, set[str]]:
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f}
    procs = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "machinepy-testhost" in cmd or cmd.startswith("/lib/systemd/systemd"):
            procs.add(f"{pid} {cmd}")
    return {
        "mounts": mounts,
        "temp": {n for n in os.listdir("/var/tmp") if n.startswith("machinepy-testhost")},
        "processes": procs,
    }


def test_own_test_host_boots_and_leaves_nothing(tmp_path: Path) -> None:
    before = _host_state()
    bound = tmp_path / "bound"
    bound.mkdir()
    (bound / "marker").write_text("seen\n")
    host = TestHost(binds=[bound])
    with host:
        assert host.pid > 0 and host.tmp is not None and host.tmp.is_dir()
        assert host.run(["cat", str(bound / "marker")]).stdout == "seen\n"
        assert host.run(["systemctl", "is-system-running"]).returncode in (0, 1)
        p = host.popen(["sleep", "1000"], stdout=subprocess.DEVNULL)
        cgroup, tmp = host.cgroup, host.tmp
    assert host.pid == 0 and not tmp.exists()
    assert cgroup is None or not cgroup.exists()
    assert p.wait(10) != 0  # killed with the test host's pid namespace
    after = _host_state()
    assert {k: after[k] - before[k] for k in after if after[k] - before[k]} == {}
