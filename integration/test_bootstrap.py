# SPDX-License-Identifier: BSD-2-Clause
"""The README's two commands: `machinepy bootstrap NAME && machinepy boot NAME`,
then `machinectl login NAME` reaches a prompt and takes root's password.

The tree is our own bootstrap's, cached (tests/rootfs.py cached_bootstrap_rootfs);
inside the test host it is bind-mounted at /var/lib/machines/NAME, so `boot NAME`
finds it where `bootstrap NAME` puts it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from integration.test_machined import MACHINEPY, Machine, assert_nothing_left, mountpoints
from integration.test_service import installed  # noqa: F401 (a fixture: units installed)
from tests.rootfs import BOOTSTRAP_HOSTNAME, BOOTSTRAP_PASSWORD, cached_bootstrap_rootfs

NAME = "bs-login"

# Logs in on a pty as a user would (name, password, a command), then leaves with the
# last line given: argv = password, last line, the command that shows a login prompt.
LOGIN = r"""
import os, pty, select, sys, time
password, last, argv = sys.argv[1].encode(), sys.argv[2].encode(), sys.argv[3:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
seen = b""
def expect(what, timeout=30):
    global seen
    deadline = time.monotonic() + timeout
    while what not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            sys.exit(f"no {what!r} in: {seen.decode(errors='replace')}")
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            sys.exit(f"{argv[0]} ended before {what!r}: {seen.decode(errors='replace')}")
        seen += data
    before, _, seen = seen.partition(what)
    return before.decode(errors="replace")
expect(b"login: ")
os.write(fd, b"root\n")
expect(b"Password: ")
os.write(fd, password + b"\n")
expect(b"# ")
os.write(fd, b"echo logged-in-$(id -u)-on-$(cat /etc/hostname)\n")
expect(b"logged-in-0-on-")
print("logged-in-0-on-" + expect(b"\r\n"))
os.write(fd, last + b"\n")
if last == b"exit":  # machinectl login stays for the next getty
    os.kill(pid, 9)
    sys.exit(0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and select.select([fd], [], [], 1)[0]:
    try:
        if not os.read(fd, 4096):
            break
    except OSError:
        break
print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.fixture(scope="module")
def bootstrapped() -> Path:
    return cached_bootstrap_rootfs()


@pytest.fixture
def machine_dir(testhost: Any, bootstrapped: Path) -> Any:
    r = testhost.shell(f"mkdir -p /var/lib/machines/{NAME} && "
                       f"mount --bind {bootstrapped} /var/lib/machines/{NAME}")
    assert r.returncode == 0, r.stderr
    yield f"/var/lib/machines/{NAME}"
    testhost.shell(f"umount /var/lib/machines/{NAME}; rmdir /var/lib/machines/{NAME}")


def test_boot_name_reaches_login_and_takes_the_password(
    testhost: Any, machine_dir: str
) -> None:
    before = mountpoints(testhost)
    # `boot NAME`: /var/lib/machines/NAME, registered as NAME (no --machine).
    m = Machine(testhost, NAME, [*MACHINEPY, "boot", NAME, "--ephemeral"])
    try:
        m.wait_booted()
        assert m.show()["RootDirectory"] == machine_dir
        # First boot made a machine id (the tree's is empty), and it is the container's.
        r = m.shell("cat /etc/machine-id")
        assert len(r.stdout.strip()) == 32, r.stdout + r.stderr
        r = testhost.run([sys.executable, "-c", LOGIN, BOOTSTRAP_PASSWORD, "exit",
                          "machinectl", "login", NAME], timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == f"logged-in-0-on-{BOOTSTRAP_HOSTNAME}", r.stdout
        assert testhost.run(["machinectl", "poweroff", NAME]).returncode == 0
        assert m.wait_exit() == 0
    finally:
        m.kill()
        testhost.run(["machinectl", "terminate", NAME])
    assert_nothing_left(testhost, NAME, before)


def test_boot_name_on_a_terminal_shows_the_console_login(testhost: Any, machine_dir: str) -> None:
    """`machinepy boot NAME` on a terminal: the container's console-getty on our pty;
    logging in there and powering off ends machinepy with status 0."""
    before = mountpoints(testhost)
    try:
        r = testhost.run([sys.executable, "-c", LOGIN, BOOTSTRAP_PASSWORD, "systemctl poweroff",
                          *MACHINEPY, "boot", NAME, "--ephemeral"], timeout=150)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split("\n")[:2] == [f"logged-in-0-on-{BOOTSTRAP_HOSTNAME}", "exit 0"], (
            r.stdout)
    finally:
        testhost.run(["machinectl", "terminate", NAME])
    assert_nothing_left(testhost, NAME, before)


def test_boot_unknown_name_is_one_line(testhost: Any) -> None:
    r = testhost.run([*MACHINEPY, "boot", "no-such-machine"], timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("machinepy: "), r.stderr
    assert "/var/lib/machines/no-such-machine" in r.stderr


def test_template_unit_boots_a_bootstrapped_tree(installed: Any,  # noqa: F811
                                                 bootstrapped: Path) -> None:
    """`systemctl start machinepy@NAME` (--private-users=pick) boots what bootstrap made,
    and machinectl login takes the password there too.  On a tmpfs copy: the unit may
    shift or idmap the tree, and the cached one must stay as it is."""
    host, name = installed, "bs-svc"
    r = host.shell(f"set -e; mkdir -p /var/lib/machines/{name}; "
                   f"mount -t tmpfs -o mode=755 tmpfs /var/lib/machines/{name}; "
                   f"cp -a {bootstrapped}/. /var/lib/machines/{name}/", timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        r = host.run(["systemctl", "start", f"machinepy@{name}.service"], timeout=120)
        assert r.returncode == 0, r.stderr + host.run(
            ["journalctl", "-u", f"machinepy@{name}", "--no-pager"]).stdout[-2000:]
        r = host.run(["machinectl", "shell", "-q", name, "/bin/sh", "-c",
                      "systemctl is-system-running --wait"], timeout=60)
        assert r.stdout.strip() in ("running", "degraded"), r.stdout + r.stderr
        r = host.run([sys.executable, "-c", LOGIN, BOOTSTRAP_PASSWORD, "exit",
                      "machinectl", "login", name], timeout=90)
        assert r.stdout.strip() == f"logged-in-0-on-{BOOTSTRAP_HOSTNAME}", r.stdout + r.stderr
        assert host.run(["systemctl", "stop", f"machinepy@{name}.service"],
                        timeout=120).returncode == 0
        assert name not in host.run(["machinectl", "list"]).stdout
    finally:
        host.run(["systemctl", "stop", f"machinepy@{name}.service"], timeout=120)
        host.shell(f"umount /var/lib/machines/{name}; rmdir /var/lib/machines/{name}")
