# SPDX-License-Identifier: BSD-2-Clause
"""io.machinepy1 in a real systemd + dbus-daemon + machined test host.

The units are installed with `machinepy install-units`; the daemon is started
by D-Bus activation only; everything is driven with busctl, machinectl and
systemctl, as an administrator would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from machinepy.service.manager import container_path

MACHINEPY = [sys.executable, "-m", "machinepy"]
DEST = ("io.machinepy1", "/io/machinepy1", "io.machinepy1.Manager")
USER = "mpytest"
# PID 1 of a pid namespace ignores signals it has no handler for: trap what we send.
TRAP = "trap 'exit 3' 38; trap 'exit 7' TERM; while :; do sleep 0.05; done"  # 38: SIGRTMIN+4

# Runs inside the test host: waits for ContainerRemoved of argv[1], prints its body.
WATCH_REMOVED = textwrap.dedent("""
    import asyncio, sys
    from dbus_fast import Message, BusType
    from dbus_fast.aio import MessageBus
    async def main():
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        done = asyncio.get_running_loop().create_future()
        def handler(msg):
            if msg.member == "ContainerRemoved" and msg.body[0] == sys.argv[1]:
                done.set_result(msg.body)
        bus.add_message_handler(handler)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch",
                               signature="s", body=["type='signal',sender='io.machinepy1'"]))
        print("subscribed", flush=True)
        print(*await asyncio.wait_for(done, 60), flush=True)
    asyncio.run(main())
""")

# Runs inside the test host: OpenConsole, talk to the container's shell through the fd.
CONSOLE = textwrap.dedent("""
    import asyncio, os, sys, time
    from dbus_fast import Message, BusType, MessageType
    from dbus_fast.aio import MessageBus
    async def main():
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        reply = await bus.call(Message(destination="io.machinepy1", path="/io/machinepy1",
                                       interface="io.machinepy1.Manager", member="OpenConsole",
                                       signature="s", body=[sys.argv[1]]))
        if reply.message_type == MessageType.ERROR:
            print("ERROR", reply.error_name, reply.body); return
        fd = reply.unix_fds[reply.body[0]]
        print("tty", os.isatty(fd), flush=True)
        os.set_blocking(fd, False)
        os.write(fd, sys.argv[2].encode() + b"\\n")
        out, deadline = b"", time.monotonic() + 20
        while sys.argv[3].encode() not in out and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            try:
                out += os.read(fd, 4096)
            except (BlockingIOError, OSError):
                pass
        print("found" if sys.argv[3].encode() in out else "missing: %r" % out, flush=True)
    asyncio.run(main())
""")


def busctl(host: Any, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return host.run([*prefix, "busctl", *args], timeout=60)


def manager(host: Any, member: str, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    return busctl(host, "--", "call", *DEST, member, *args, uid=uid)  # args may start with -


def create(host: Any, name: str, root: Path | str, *command: str) -> str:
    r = manager(host, "CreateContainer", "ssasa{sv}", name, str(root), str(len(command)),
                *command, "0")
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[1].strip('"')


def names(host: Any) -> list[str]:
    r = busctl(host, "--json=short", "--", "call", *DEST, "ListContainers")
    assert r.returncode == 0, r.stderr
    import json

    return [row[0] for row in json.loads(r.stdout)["data"][0]]


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def main_pid(host: Any) -> int:
    r = host.run(["systemctl", "show", "-P", "MainPID", "machinepy.service"])
    return int(r.stdout.strip() or 0)


@pytest.fixture(scope="module")
def installed(testhost: Any) -> Iterator[Any]:
    r = testhost.run([*MACHINEPY, "install-units"])
    assert r.returncode == 0, r.stderr
    yield testhost
    testhost.run(["systemctl", "stop", "machinepy.service"])


@pytest.fixture
def host(installed: Any) -> Iterator[Any]:
    """The test host with the units installed; every container gone after the test."""
    yield installed
    if main_pid(installed):
        for name in names(installed):
            manager(installed, "TerminateContainer", "s", name)
        wait_for(lambda: not names(installed), 30, "containers to go")
    wait_for(lambda: "machine-" not in installed.run(
        ["systemctl", "list-units", "--all", "--no-legend", "machine-*"]).stdout, 30,
        "scopes to go")
    assert installed.run(["machinectl", "list", "--no-legend"]).stdout.strip() == ""


def test_activation_create_list_get_property_poweroff(host: Any, busybox_root: Path) -> None:
    host.run(["systemctl", "stop", "machinepy.service"])
    assert host.run(["systemctl", "is-active", "machinepy.service"]).stdout.strip() != "active"
    # The first call starts the daemon (D-Bus activation → machinepy.service).
    r = manager(host, "ListContainers")
    assert (r.returncode, r.stdout.strip()) == (0, "a(ssuo) 0"), r.stderr
    assert host.run(["systemctl", "is-active", "machinepy.service"]).stdout.strip() == "active"
    path = create(host, "svc-one", busybox_root, "/bin/sh", "-c", TRAP)
    assert path == container_path("svc-one") == "/io/machinepy1/container/svc_2done"
    r = manager(host, "ListContainers")
    fields = r.stdout.split()
    assert fields[:4] == ["a(ssuo)", "1", '"svc-one"', '"running"'] and fields[5] == f'"{path}"'
    leader = int(fields[4])
    r = busctl(host, "get-property", DEST[0], path, "io.machinepy1.Container", "State",
               "Leader", "MachineRegistered", "Unit", "RootDirectory")
    assert r.stdout.split("\n")[:5] == ['s "running"', f"u {leader}", "b true",
                                        's "machine-svc\\\\x2done.scope"',
                                        f's "{busybox_root}"'], r.stdout
    r = busctl(host, "tree", DEST[0])
    assert path in r.stdout
    r = busctl(host, "introspect", DEST[0], path)
    assert ".Poweroff" in r.stdout and "NetworkInterfaces" in r.stdout
    # Registered like any other machine, in its own scope.
    show = host.run(["machinectl", "show", "svc-one", "-p", "Leader", "-p", "Service"]).stdout
    assert sorted(show.split()) == [f"Leader={leader}", "Service=machinepy"]
    assert "machine-svc" in host.run(["cat", f"/proc/{leader}/cgroup"]).stdout
    assert manager(host, "PoweroffContainer", "s", "svc-one").returncode == 0
    wait_for(lambda: not names(host), 30, "svc-one to go")
    wait_for(lambda: "svc-one" not in host.run(["machinectl", "list"]).stdout, 30, "machined")


def test_machinectl_poweroff_updates_the_service(host: Any, busybox_root: Path) -> None:
    manager(host, "ListContainers")
    create(host, "svc-mctl", busybox_root, "/bin/sh", "-c", TRAP)
    watcher = host.popen([sys.executable, "-c", WATCH_REMOVED, "svc-mctl"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "subscribed\n"
        r = host.run(["machinectl", "poweroff", "svc-mctl"])
        assert r.returncode == 0, r.stderr
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    # ContainerRemoved(name, path, exit status): the trap for SIGRTMIN+4 ran.
    assert out.split() == ["svc-mctl", container_path("svc-mctl"), "3"], err
    assert "svc-mctl" not in names(host)


def test_open_console_passes_the_pty(host: Any, busybox_root: Path) -> None:
    manager(host, "ListContainers")
    create(host, "svc-tty", busybox_root, "/bin/sh", "-c",
           "while read x; do echo got-$x; done")
    r = host.run([sys.executable, "-c", CONSOLE, "svc-tty", "hello", "got-hello"])
    assert r.stdout.split("\n")[:2] == ["tty True", "found"], r.stdout + r.stderr


def test_non_root_may_read_but_not_create(host: Any, busybox_root: Path) -> None:
    if host.run(["id", "-u", USER]).returncode != 0:
        r = host.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER])
        assert r.returncode == 0, r.stderr
    uid = int(host.run(["id", "-u", USER]).stdout)
    assert uid != 0
    manager(host, "ListContainers")
    r = manager(host, "CreateContainer", "ssasa{sv}", "evil", str(busybox_root), "1",
                "/bin/true", "0", uid=uid)
    assert r.returncode != 0 and "Access denied" in r.stderr, r.stderr
    assert "evil" not in names(host)
    r = manager(host, "ListContainers", uid=uid)
    assert (r.returncode, r.stdout.strip()) == (0, "a(ssuo) 0"), r.stderr
    create(host, "svc-ro", busybox_root, "/bin/sh", "-c", TRAP)
    r = busctl(host, "get-property", DEST[0], container_path("svc-ro"),
               "io.machinepy1.Container", "State", uid=uid)
    assert r.stdout.strip() == 's "running"', r.stderr
    for member, sig, *args in (("TerminateContainer", "s", "svc-ro"),
                               ("OpenConsole", "s", "svc-ro"),
                               ("KillContainer", "ssi", "svc-ro", "all", "9")):
        r = manager(host, member, sig, *args, uid=uid)
        assert "Access denied" in r.stderr, (member, r.stderr)
    assert names(host) == ["svc-ro"]


def test_daemon_restart_readopts(host: Any, busybox_root: Path) -> None:
    manager(host, "ListContainers")
    path = create(host, "svc-keep", busybox_root, "/bin/sh", "-c",
                  "while read x; do echo got-$x; done")
    leader = busctl(host, "get-property", DEST[0], path, "io.machinepy1.Container",
                    "Leader").stdout.split()[1]
    first = main_pid(host)
    assert host.run(["test", "-e", "/run/machinepy/svc-keep.json"]).returncode == 0
    assert host.run(["systemctl", "restart", "machinepy.service"]).returncode == 0
    assert main_pid(host) not in (0, first)
    r = manager(host, "ListContainers")
    assert r.stdout.split()[:5] == ["a(ssuo)", "1", '"svc-keep"', '"running"', leader], r.stdout
    assert host.run(["machinectl", "show", "svc-keep", "-p", "Leader"]).stdout.strip() == \
        f"Leader={leader}"
    # The console came back from systemd's fd store.
    r = host.run([sys.executable, "-c", CONSOLE, "svc-keep", "again", "got-again"])
    assert r.stdout.split("\n")[:2] == ["tty True", "found"], r.stdout + r.stderr
    assert manager(host, "TerminateContainer", "s", "svc-keep").returncode == 0
    wait_for(lambda: not names(host), 30, "svc-keep to go")
    wait_for(lambda: host.run(["test", "-e", "/run/machinepy/svc-keep.json"]).returncode != 0,
             10, "its state file to go")


def test_malformed_calls_leave_the_daemon_up_and_nothing_behind(host: Any) -> None:
    manager(host, "ListContainers")
    pid = main_pid(host)
    calls: list[tuple[str, ...]] = [
        ("CreateContainer", "ssasa{sv}", "../evil", "/", "0", "0"),
        ("CreateContainer", "ssasa{sv}", "x", "relative", "0", "0"),
        ("CreateContainer", "ssasa{sv}", "x", "/nonexistent", "0", "0"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "Bogus", "b", "true"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "Mounts", "s", "x"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "Mounts", "a(sssss)", "1", "nope",
         "/x", "", "", ""),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "Boot", "b", "true"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "UserMap", "a(uuu)", "1", "0", "1",
         "0"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "0", "1", "Properties", "as", "1", "X=1"),
        ("CreateContainer", "ssasa{sv}", "x", "/", "1", "/no/such/command", "0"),
        ("CreateContainer", "s", "x"),
        ("GetContainer", "s", "nope"),
        ("KillContainer", "ssi", "nope", "all", "9"),
        ("Frobnicate",),
        ("PoweroffContainer", "i", "1"),
    ]
    for i in range(50):
        r = manager(host, *calls[i % len(calls)])
        assert r.returncode != 0 and r.stderr.startswith("Call failed:"), (calls[i], r)
    assert main_pid(host) == pid
    assert names(host) == []
    assert "machine-" not in host.run(["systemctl", "list-units", "--all", "--no-legend",
                                       "machine-*"]).stdout
    assert host.run(["ls", "-A", "/run/systemd/nspawn/propagate"]).stdout.strip() == ""


def test_template_unit_boots_var_lib_machines(host: Any, debian_rootfs: Path) -> None:
    # A throw-away copy of the cached rootfs on a tmpfs in the test host only: the
    # unit boots with --private-users=pick, and tmpfs takes the idmapped mount
    # (the test host's overlay root would not, and chown would copy it all up).
    r = host.shell(
        "set -e; mkdir -p /var/lib/machines/svc-deb; "
        "mount -t tmpfs -o mode=755 tmpfs /var/lib/machines/svc-deb; "
        f"cp -a {debian_rootfs}/. /var/lib/machines/svc-deb/", timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        # Type=notify: returns once the container's systemd has sent READY=1.
        r = host.run(["systemctl", "start", "machinepy@svc-deb.service"], timeout=120)
        assert r.returncode == 0, r.stderr + host.run(
            ["journalctl", "-u", "machinepy@svc-deb", "--no-pager"]).stdout[-2000:]
        show = host.run(["machinectl", "show", "svc-deb", "-p", "Service", "-p", "Class"])
        assert sorted(show.stdout.split()) == ["Class=container", "Service=machinepy"]
        r = host.run(["machinectl", "shell", "-q", "svc-deb", "/bin/sh", "-c",
                      "systemctl is-system-running --wait"], timeout=60)
        assert r.stdout.strip() in ("running", "degraded"), r.stdout + r.stderr
        r = host.run(["machinectl", "shell", "-q", "svc-deb", "/bin/cat", "/proc/self/uid_map"])
        inside, base, count = (int(x) for x in r.stdout.split())
        assert (inside, count) == (0, 65536) and base >= 0x80000, r.stdout + r.stderr
        assert host.run(["systemctl", "stop", "machinepy@svc-deb.service"],
                        timeout=120).returncode == 0
        assert "svc-deb" not in host.run(["machinectl", "list"]).stdout
    finally:
        host.run(["systemctl", "stop", "machinepy@svc-deb.service"], timeout=120)
        host.shell("umount /var/lib/machines/svc-deb; rmdir /var/lib/machines/svc-deb")


def test_boot_detach_hands_the_container_to_the_service(host: Any, debian_rootfs: Path) -> None:
    host.run(["systemctl", "stop", "machinepy.service"])
    # Activated by the hand-off itself; our process ends once the name is printed.
    r = host.run([*MACHINEPY, "boot", str(debian_rootfs), "--ephemeral", "--detach",
                  "--machine", "svc-handed"], timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "svc-handed\n", ""), r.stderr
    assert host.run(["systemctl", "is-active", "machinepy.service"]).stdout.strip() == "active"
    assert names(host) == ["svc-handed"]
    leader = host.run(["machinectl", "show", "svc-handed", "-p", "Leader", "--value"])
    status = host.run(["cat", f"/proc/{leader.stdout.strip()}/status"]).stdout
    ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
    assert int(ppid) == main_pid(host)  # supervised by the daemon, nothing else of ours

    def booted() -> bool:  # `machinectl shell` needs the container's own bus up first
        r = host.run(["machinectl", "shell", "-q", "svc-handed", "/bin/systemctl",
                      "is-system-running", "--wait"], timeout=60)
        return r.stdout.strip() in ("running", "degraded")

    wait_for(booted, 60, "svc-handed to boot")
    assert host.run(["machinectl", "poweroff", "svc-handed"]).returncode == 0
    wait_for(lambda: not names(host), 60, "svc-handed to power off")


def test_booted_container_keeps_its_console_across_a_restart(host: Any,
                                                             debian_rootfs: Path) -> None:
    # Its systemd vhangup()s /dev/console while booting: the pty master in
    # systemd's fd store sees POLLHUP, and a polled fd is dropped from the store.
    manager(host, "ListContainers")
    r = manager(host, "CreateContainer", "ssasa{sv}", "svc-bootc", str(debian_rootfs), "0",
                "2", "Boot", "b", "true", "Ephemeral", "b", "true")
    assert r.returncode == 0, r.stderr

    def booted() -> bool:
        r = host.run(["machinectl", "shell", "-q", "svc-bootc", "/bin/systemctl",
                      "is-system-running", "--wait"], timeout=60)
        return r.stdout.strip() in ("running", "degraded")

    wait_for(booted, 90, "svc-bootc to boot")
    assert host.run(["systemctl", "restart", "machinepy.service"]).returncode == 0
    assert names(host) == ["svc-bootc"]
    r = host.run([sys.executable, "-c", CONSOLE, "svc-bootc", "", "login:"])
    assert r.stdout.split("\n")[:2] == ["tty True", "found"], r.stdout + r.stderr
    # Powered off by its own systemd, at once; not SIGKILLed after the grace time.
    watcher = host.popen([sys.executable, "-c", WATCH_REMOVED, "svc-bootc"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "subscribed\n"
        began = time.monotonic()
        assert manager(host, "PoweroffContainer", "s", "svc-bootc").returncode == 0
        out, _ = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert time.monotonic() - began < 20
    assert out.split() == ["svc-bootc", container_path("svc-bootc"), "0"], out


def test_attach_by_leader_pid_and_daemon_pid(host: Any, busybox_root: Path) -> None:
    # pflask's flow (find the process, then --attach=PID) for a container the
    # service holds: the leader's pid, or the daemon's when it holds just one.
    create(host, "svc-bypid", busybox_root, "/bin/sh", "-c",
           "while :; do echo tick; sleep 0.2; done")
    leader = host.run(["machinectl", "show", "svc-bypid", "-p", "Leader", "--value"])
    for pid in (leader.stdout.strip(), str(main_pid(host))):
        r = host.run(["timeout", "-s", "INT", "2", *MACHINEPY, "run", "-a", pid], timeout=30)
        assert "tick" in r.stdout and "Attached to svc-bypid." in r.stderr, (pid, r.stderr)
    r = host.run([*MACHINEPY, "run", "-a", "999999"], timeout=30)
    assert r.returncode == 1 and "cannot attach to '999999'" in r.stderr, r.stderr
