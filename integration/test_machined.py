# SPDX-License-Identifier: BSD-2-Clause
"""machinepy against a real systemd, dbus-daemon and systemd-machined.

Everything is driven the way a user would: `machinepy boot/run` started inside
the test host, then the real `machinectl`, `systemctl` and `busctl`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MACHINEPY = [sys.executable, "-m", "machinepy"]


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Machine:
    """A machinepy process inside the test host, and helpers to look at it."""

    def __init__(self, host: Any, name: str, argv: list[str]) -> None:
        self.host, self.name = host, name
        self.proc: subprocess.Popen[str] = host.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def show(self) -> dict[str, str]:
        r = self.host.run(["machinectl", "show", self.name])
        if r.returncode != 0:
            return {}
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def shell(self, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            ["machinectl", "shell", "-q", self.name, "/bin/sh", "-c", script], timeout=timeout
        )

    def wait_booted(self, timeout: float = 60) -> None:
        def booted() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"machinepy exited {self.proc.returncode}: "
                    f"{self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            if not self.show():
                return False
            r = self.shell("systemctl is-system-running", timeout=10)
            return r.stdout.strip() in ("running", "degraded")

        wait_for(booted, timeout, f"{self.name} to boot")

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the machinepy inside (killing its nsenter would orphan it)."""
        if self.proc.poll() is None:
            self.host.run(["pkill", "-KILL", "-f", f"machinepy .*--machine {self.name}( |$)"])
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def listed(host: Any) -> str:
    return host.run(["machinectl", "list", "--no-legend"]).stdout


def scopes(host: Any) -> str:
    return host.run(["systemctl", "list-units", "--all", "--no-legend", "machine-*"]).stdout


def mountpoints(host: Any) -> set[str]:
    info = host.run(["cat", "/proc/self/mountinfo"]).stdout
    return {line.split()[4] for line in info.splitlines()}


@pytest.fixture(autouse=True)
def host_mounts(testhost: Any) -> set[str]:
    """The test host's mount points before the test: all must be as before after it."""
    return mountpoints(testhost)


def assert_nothing_left(host: Any, name: str, before: set[str]) -> None:
    """Called once machinepy has exited: it waits for machined and systemd to let go."""
    assert name not in listed(host)
    assert "machine-" not in scopes(host)
    assert mountpoints(host) == before
    assert host.run(["test", "-e", f"/run/systemd/nspawn/propagate/{name}"]).returncode != 0


@pytest.fixture
def boot(testhost: Any, debian_rootfs: Path) -> Iterator[Any]:
    machines: list[Machine] = []

    def start(name: str, *opts: str) -> Machine:
        m = Machine(
            testhost,
            name,
            [*MACHINEPY, "boot", str(debian_rootfs), "--machine", name, "--ephemeral", *opts],
        )
        machines.append(m)
        m.wait_booted()
        return m

    yield start
    for m in machines:
        m.kill()
        testhost.run(["machinectl", "terminate", m.name])


def test_boot_shows_in_machinectl_and_powers_off(
    testhost: Any, host_mounts: set[str], boot: Any, debian_rootfs: Path
) -> None:
    m = boot("deb-poweroff")
    props = m.show()
    assert props["Class"] == "container"
    assert props["Service"] == "machinepy"
    assert props["RootDirectory"] == str(debian_rootfs)
    assert props["Unit"] == r"machine-deb\x2dpoweroff.scope"
    leader = int(props["Leader"])
    assert "deb-poweroff" in listed(testhost)
    # The supervisor stays outside the scope; the leader is inside.
    cgroup = testhost.run(["cat", f"/proc/{leader}/cgroup"]).stdout
    assert "machine.slice/machine-deb" in cgroup
    # container= is in PID 1's environment, not in a machinectl shell's.
    r = m.shell("echo inside $(cat /proc/1/comm) "
                "$(tr '\\0' '\\n' < /proc/1/environ | sed -n 's/^container=//p')")
    assert r.stdout.split() == ["inside", "systemd", "machinepy"]
    assert testhost.run(["machinectl", "poweroff", "deb-poweroff"]).returncode == 0
    assert m.wait_exit() == 0
    assert_nothing_left(testhost, "deb-poweroff", host_mounts)


def test_terminate(testhost: Any, host_mounts: set[str], boot: Any) -> None:
    m = boot("deb-terminate")
    assert testhost.run(["machinectl", "terminate", "deb-terminate"]).returncode == 0
    assert m.wait_exit() == 128 + 9  # terminate means killed, not shut down
    assert_nothing_left(testhost, "deb-terminate", host_mounts)


def test_kill_leader(testhost: Any, host_mounts: set[str], boot: Any) -> None:
    m = boot("deb-kill")
    r = testhost.run(["machinectl", "kill", "--kill-whom=leader", "--signal=SIGKILL", "deb-kill"])
    assert r.returncode == 0, r.stderr
    assert m.wait_exit() == 128 + 9
    assert_nothing_left(testhost, "deb-kill", host_mounts)


def test_reboot_restarts_in_place(testhost: Any, host_mounts: set[str], boot: Any) -> None:
    m = boot("deb-reboot")
    first = int(m.show()["Leader"])
    assert testhost.run(["machinectl", "reboot", "deb-reboot"]).returncode == 0

    def new_leader() -> int | None:
        props = m.show()
        leader = int(props.get("Leader", "0") or 0)
        return leader if leader and leader != first else None

    wait_for(new_leader, 60, "the container to come back")
    m.wait_booted()
    assert m.proc.poll() is None
    testhost.run(["machinectl", "poweroff", "deb-reboot"])
    assert m.wait_exit() == 0
    assert_nothing_left(testhost, "deb-reboot", host_mounts)


def test_login_reaches_prompt(testhost: Any, host_mounts: set[str], boot: Any) -> None:
    boot("deb-login")
    r = testhost.run(
        ["timeout", "-s", "KILL", "8", "script", "-qec", "machinectl login deb-login", "/dev/null"],
        timeout=30,
    )
    assert "login:" in r.stdout, r.stdout + r.stderr


def test_copy_to_and_bind(testhost: Any, host_mounts: set[str], boot: Any, tmp_path: Path) -> None:
    m = boot("deb-copy")
    r = testhost.run(
        [
            "sh",
            "-c",
            "mkdir -p /var/tmp/mpy-bind && echo bound > "
            "/var/tmp/mpy-bind/f && echo copied > /var/tmp/mpy-copy",
        ]
    )
    assert r.returncode == 0
    r = testhost.run(["machinectl", "copy-to", "deb-copy", "/var/tmp/mpy-copy", "/root/copied"])
    assert r.returncode == 0, r.stderr
    assert m.shell("cat /root/copied").stdout.strip() == "copied"
    r = testhost.run(
        ["machinectl", "bind", "--mkdir", "deb-copy", "/var/tmp/mpy-bind", "/mnt/bound"]
    )
    assert r.returncode == 0, r.stderr
    assert m.shell("cat /mnt/bound/f").stdout.strip() == "bound"
    r = testhost.run(["machinectl", "copy-from", "deb-copy", "/usr/lib/os-release",
                      "/var/tmp/mpy-os-release"])
    assert r.returncode == 0, r.stderr
    assert "Debian" in testhost.run(["cat", "/var/tmp/mpy-os-release"]).stdout
    status = testhost.run(["machinectl", "status", "--no-pager", "deb-copy"]).stdout
    assert "Service: machinepy; class container" in status, status
    assert f"Leader: {m.show()['Leader']}" in status and "Unit: machine-deb" in status
    testhost.run(["rm", "-rf", "/var/tmp/mpy-bind", "/var/tmp/mpy-copy",
                  "/var/tmp/mpy-os-release"])


def test_boot_detached_prints_name_and_powers_off(
    testhost: Any, host_mounts: set[str], debian_rootfs: Path
) -> None:
    r = testhost.run([*MACHINEPY, "boot", str(debian_rootfs), "--machine", "deb-detach",
                      "--ephemeral", "--detach"], timeout=60)
    try:
        assert (r.returncode, r.stdout.strip()) == (0, "deb-detach"), r.stderr
        assert "deb-detach" in listed(testhost)

        def running() -> bool:
            r = testhost.run(["machinectl", "shell", "-q", "deb-detach", "/bin/systemctl",
                              "is-system-running"], timeout=10)
            return r.stdout.strip() in ("running", "degraded")

        wait_for(running, 60, "deb-detach to boot")
        assert testhost.run(["machinectl", "poweroff", "deb-detach"]).returncode == 0
        wait_for(lambda: "deb-detach" not in listed(testhost), 30, "deb-detach to power off")
        wait_for(lambda: not testhost.run(["pgrep", "-f", "machinepy boot"]).stdout, 15,
                 "the background supervisor to exit")
        assert_nothing_left(testhost, "deb-detach", host_mounts)
    finally:
        testhost.run(["machinectl", "terminate", "deb-detach"])


def test_notify_ready_under_a_type_notify_unit(
    testhost: Any, host_mounts: set[str], debian_rootfs: Path
) -> None:
    """systemd-run waits for READY=1: it returns only once the container has booted."""
    unit = "mpy-notify.service"
    r = testhost.run(
        ["systemd-run", f"--unit={unit}", "--property=Type=notify",
         "--property=NotifyAccess=main", "--property=TimeoutStartSec=60", "--",
         *MACHINEPY, "boot", str(debian_rootfs), "--machine", "deb-notify", "--ephemeral",
         "--notify-ready"], timeout=90)
    try:
        assert r.returncode == 0, r.stderr
        show = testhost.run(["systemctl", "show", unit, "-p", "ActiveState"]).stdout
        assert show.strip() == "ActiveState=active"
        # Booted right now, not soon: READY=1 came from the container's systemd.
        r = testhost.run(["machinectl", "shell", "-q", "deb-notify", "/bin/systemctl",
                          "is-system-running"], timeout=10)
        assert r.stdout.strip() in ("running", "degraded"), r.stdout + r.stderr
        # Stopping the unit sends SIGTERM: a clean poweroff of the container.
        assert testhost.run(["systemctl", "stop", unit], timeout=90).returncode == 0
        result = testhost.run(["systemctl", "show", unit, "-p", "ExecMainStatus"]).stdout
        assert result.strip() == "ExecMainStatus=0"
        assert_nothing_left(testhost, "deb-notify", host_mounts)
    finally:
        testhost.run(["systemctl", "stop", unit])
        testhost.run(["systemctl", "reset-failed", unit])


def test_sigkill_of_machinepy_leaves_no_machine(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    p = testhost.popen([*MACHINEPY, "run", "--machine", "bb-sigkill", "-r", str(busybox_root),
                        "--", "sleep", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    wait_for(lambda: "bb-sigkill" in listed(testhost), 20, "bb-sigkill to register")
    testhost.run(["pkill", "-KILL", "-f", "machinepy run --machine bb-sigkill"])
    p.wait(30)
    # The leader dies with its supervisor, the scope empties and loses its last
    # reference (our bus connection), and machined drops the machine.
    wait_for(lambda: "bb-sigkill" not in listed(testhost), 15, "bb-sigkill to go")
    wait_for(lambda: "machine-" not in scopes(testhost), 15, "its scope to go")
    assert not testhost.run(["pgrep", "-f", "sleep 1000"]).stdout
    # A killed process cleans nothing: the next registration sweeps its propagation dir.
    stale = "/run/systemd/nspawn/propagate/bb-sigkill"
    r = testhost.run([*MACHINEPY, "run", "--machine", "bb-next", "-r", str(busybox_root),
                      "--", "true"])
    assert r.returncode == 0, r.stderr
    assert testhost.run(["test", "-e", stale]).returncode != 0
    assert_nothing_left(testhost, "bb-next", host_mounts)


def test_sigterm_to_machinepy_powers_off(testhost: Any, host_mounts: set[str], boot: Any) -> None:
    m = boot("deb-sigterm")
    testhost.run(["pkill", "-TERM", "-f", "machinepy boot .* --machine deb-sigterm"])
    assert m.wait_exit(60) == 0
    assert_nothing_left(testhost, "deb-sigterm", host_mounts)


# -- `run` registered, and the paths without machined ---------------------------------


def test_run_registers_pflask_name(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    p = testhost.popen(
        [*MACHINEPY, "run", "-r", str(busybox_root), "--", "sleep", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name = wait_for(lambda: re.search(r"pflask-\d+", listed(testhost)), 20, "pflask machine")
    name = name.group(0)
    props = dict(
        line.split("=", 1)
        for line in testhost.run(["machinectl", "show", name]).stdout.splitlines()
    )
    assert name == f"pflask-{props['Leader']}"
    assert testhost.run(["machinectl", "terminate", name]).returncode == 0
    p.wait(30)
    assert_nothing_left(testhost, name, host_mounts)


def test_uuid_is_the_registered_machine_id(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    uuid = "0123456789abcdef0123456789abcdef"
    m = Machine(testhost, "uuid-run", [*MACHINEPY, "run", "--machine=uuid-run", f"--uuid={uuid}",
                                       "-r", str(busybox_root), "--", "sleep", "1000"])
    props = wait_for(m.show, 20, "uuid-run to register")
    assert props["Id"] == uuid

    def environ() -> list[str]:  # once PID 1 has exec'd sleep
        r = testhost.run(["cat", f"/proc/{props['Leader']}/environ"])
        return r.stdout.split("\0") if "sleep" in testhost.run(
            ["cat", f"/proc/{props['Leader']}/comm"]).stdout else []

    env = wait_for(environ, 20, "uuid-run's sleep")
    assert "container_uuid=01234567-89ab-cdef-0123-456789abcdef" in env
    assert testhost.run(["machinectl", "terminate", "uuid-run"]).returncode == 0
    m.wait_exit(30)
    assert_nothing_left(testhost, "uuid-run", host_mounts)


def test_register_no(testhost: Any, host_mounts: set[str], busybox_root: Path) -> None:
    r = testhost.run(
        [*MACHINEPY, "run", "--register=no", "-r", str(busybox_root), "--", "sh", "-c", "echo ok"]
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_no_bus_warns_once_and_runs(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
    r = testhost.run(
        [*MACHINEPY, "run", "-r", str(busybox_root), "--", "sh", "-c", "echo ok"], env=env
    )
    assert r.returncode == 0 and r.stdout == "ok\n"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("machinepy: warning:"), r.stderr


def test_properties_reach_the_scope(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    p = testhost.popen(
        [
            *MACHINEPY,
            "run",
            "--machine",
            "props",
            "--property=MemoryMax=64M",
            "--property=TasksMax=33",
            "--property=CPUQuota=50%",
            "-g",
            "memory",
            "-r",
            str(busybox_root),
            "--",
            "sleep",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: "props" in listed(testhost), 20, "machine props")
    r = testhost.run(
        [
            "systemctl",
            "show",
            "machine-props.scope",
            "-p",
            "MemoryMax",
            "-p",
            "TasksMax",
            "-p",
            "CPUQuotaPerSecUSec",
            "-p",
            "MemoryAccounting",
            "-p",
            "Delegate",
            "-p",
            "Slice",
        ]
    )
    assert "MemoryMax=67108864" in r.stdout
    assert "TasksMax=33" in r.stdout
    assert "CPUQuotaPerSecUSec=500ms" in r.stdout
    assert "MemoryAccounting=yes" in r.stdout
    # (Not checked in the container's cgroup files: this machine's memory and pids
    # controllers live on cgroup v1, so the unified tree has no memory.max.)
    assert "Delegate=yes" in r.stdout and "Slice=machine.slice" in r.stdout
    testhost.run(["machinectl", "terminate", "props"])
    p.wait(30)
    assert_nothing_left(testhost, "props", host_mounts)


@pytest.mark.parametrize("ownership", ["map", "chown"])
def test_private_users_pick_boots_debian(
    testhost: Any, host_mounts: set[str], debian_rootfs: Path, ownership: str
) -> None:
    """A whole OS in a user namespace, the scope delegated to its root: the tree
    idmapped (left as it is on disk) or shifted once, below a mode-0700 directory
    as /var/lib/machines is."""
    root = "/var/tmp/mpytest-pick/root"
    # On a tmpfs: the test host's own root is an overlay, which takes no idmapped mounts.
    assert testhost.run(["sh", "-c", "mkdir -p /var/tmp/mpytest-pick && mount -t tmpfs -o "
                                     "mode=700 tmpfs /var/tmp/mpytest-pick && "
                                     f"cp -a {debian_rootfs} {root}"], timeout=120).returncode == 0
    try:
        r = testhost.run([*MACHINEPY, "boot", root, "--machine", "deb-pick",
                          "--private-users=pick", f"--private-users-ownership={ownership}",
                          "--detach"], timeout=120)
        assert (r.returncode, r.stdout.strip()) == (0, "deb-pick"), r.stderr

        def running() -> bool:
            r = testhost.run(["machinectl", "shell", "-q", "deb-pick", "/bin/systemctl",
                              "is-system-running"], timeout=10)
            return r.stdout.strip() in ("running", "degraded")

        wait_for(running, 60, "deb-pick to boot")
        r = testhost.run(["machinectl", "shell", "-q", "deb-pick", "/bin/sh", "-c",
                          "cat /proc/self/uid_map; touch /root/made; stat -c %u /usr/bin; "
                          "systemctl --failed --no-legend"])
        inside, base, count, usr_owner = (int(x) for x in r.stdout.split())
        assert (inside, count, usr_owner) == (0, 65536, 0), r.stdout
        assert base % 65536 == 0 and base >= 0x80000
        # On disk: untouched ids with map, the range's with chown.
        on_disk = 0 if ownership == "map" else base
        r = testhost.run(["stat", "-c", "%u", root, f"{root}/usr/bin", f"{root}/root/made"])
        assert r.stdout.split() == [str(on_disk)] * 3, r.stdout + r.stderr
        assert testhost.run(["machinectl", "poweroff", "deb-pick"]).returncode == 0
        wait_for(lambda: "deb-pick" not in listed(testhost), 30, "deb-pick to power off")
        wait_for(lambda: not testhost.run(["pgrep", "-f", "machinepy boot"]).stdout, 15,
                 "the background supervisor to exit")
        assert_nothing_left(testhost, "deb-pick", host_mounts | {"/var/tmp/mpytest-pick"})
    finally:
        testhost.run(["machinectl", "terminate", "deb-pick"])
        testhost.run(["sh", "-c", "umount /var/tmp/mpytest-pick; rmdir /var/tmp/mpytest-pick"])


def test_network_interfaces_reach_machined(
    testhost: Any, host_mounts: set[str], busybox_root: Path
) -> None:
    """RegisterMachineWithNetwork: machined knows the host end of the container's veth."""
    p = testhost.popen([*MACHINEPY, "run", "--machine", "bb-net", "-n", "veth:mpyt-ve0:host0",
                        "-r", str(busybox_root), "--", "sleep", "1000"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "bb-net" in listed(testhost), 20, "bb-net to register")
        ifindex = testhost.run(["cat", "/sys/class/net/mpyt-ve0/ifindex"]).stdout.strip()
        # (machinectl show prints this one as [unprintable].)
        r = testhost.run(["busctl", "get-property", "org.freedesktop.machine1",
                          "/org/freedesktop/machine1/machine/bb_2dnet",
                          "org.freedesktop.machine1.Machine", "NetworkInterfaces"])
        assert r.stdout.split() == ["ai", "1", ifindex], r.stdout + r.stderr
        assert testhost.run(["machinectl", "terminate", "bb-net"]).returncode == 0
        assert p.wait(30) == 128 + 9
    finally:
        if p.poll() is None:
            testhost.run(["machinectl", "terminate", "bb-net"])
    assert_nothing_left(testhost, "bb-net", host_mounts)
    assert testhost.run(["test", "-e", "/sys/class/net/mpyt-ve0"]).returncode != 0


def test_run_of_an_init_powers_off_cleanly(testhost: Any, host_mounts: set[str],
                                           debian_rootfs: Path) -> None:
    # pflask's `--chroot=ROOT --ephemeral /lib/systemd/systemd`: `run`, not
    # `boot`; machinectl poweroff ends it by reboot(2), which is exit 0 (was
    # 130: a unit running it failed).
    m = Machine(testhost, "deb-runinit", [*MACHINEPY, "run", "--machine", "deb-runinit",
                                          "-r", str(debian_rootfs), "--ephemeral", "--",
                                          "/lib/systemd/systemd"])
    m.wait_booted()
    assert testhost.run(["machinectl", "poweroff", "deb-runinit"]).returncode == 0
    assert m.wait_exit(60) == 0
    assert_nothing_left(testhost, "deb-runinit", host_mounts)
