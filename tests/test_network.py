# SPDX-License-Identifier: BSD-2-Clause
"""`--netif`: interfaces given to a container, and taken back, on the real kernel.

Traffic only flows between links these tests create themselves (private
10.231.x.y addresses on their own veth pairs and bridge), never outside.  The
autouse leak check compares the host's links before and after every test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

MACHINEPY = [sys.executable, "-m", "machinepy", "run", "--register=no"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, *args], capture_output=True, text=True, timeout=timeout)


def start(*args: str) -> subprocess.Popen[str]:
    """A container that reports a line, then waits for one on stdin."""
    return subprocess.Popen([*MACHINEPY, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    _out, err = p.communicate("go\n", timeout=30)
    return p.returncode, err


@pytest.fixture
def bridge() -> Iterator[str]:
    name = "mpyt-br0"
    ip("link", "add", name, "type", "bridge")
    try:
        ip("addr", "add", "10.231.7.1/24", "dev", name)
        ip("link", "set", name, "up")
        yield name
    finally:
        ip("link", "del", name, check=False)


@pytest.fixture
def veth_pair() -> Iterator[tuple[str, str]]:
    a, b = "mpyt-a", "mpyt-b"
    ip("link", "add", a, "type", "veth", "peer", "name", b)
    try:
        yield a, b
    finally:
        ip("link", "del", a, check=False)  # takes the peer along
        ip("link", "del", b, check=False)


def kernel_has(kind: str) -> bool:
    """Try KIND on a veth end in a throw-away network namespace."""
    r = subprocess.run(["unshare", "-n", "sh", "-c",
                        "ip link add a type veth peer name b && "
                        f"ip link add c link a type {kind}"], capture_output=True)
    return r.returncode == 0


def test_netif_alone_gives_only_lo_up(busybox_root: Path) -> None:
    r = run("-n", "-r", str(busybox_root), "--", "/bin/sh", "-c",
            "ls /sys/class/net; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "lo" and len(lines) == 3
    assert int(lines[2], 16) & 1  # IFF_UP


def test_bridge_interface_reaches_the_bridge(busybox_root: Path, bridge: str) -> None:
    r = run("-n", f"bridge:{bridge}:eth0", "--netif-address", "eth0=10.231.7.2/24",
            "-r", str(busybox_root), "--", "/bin/sh", "-c",
            "ls /sys/class/net; ping -c 1 -W 5 10.231.7.1 >/dev/null && echo reached")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["eth0", "lo", "reached"]


def test_veth_pair_with_addresses_and_route(busybox_root: Path) -> None:
    p = start("-n", "veth:mpyt-v0:eth0", "--netif-address", "eth0=10.231.8.2/24",
              "--netif-route", "eth0=10.231.9.0/24,via=10.231.8.1", "-r", str(busybox_root),
              "--", "/bin/sh", "-c",
              "cat /sys/class/net/eth0/iflink; read x; ping -c 1 -W 5 10.231.8.1 >/dev/null "
              "&& echo reached; ip route | grep 10.231.9")
    try:
        assert p.stdout is not None
        peer = int(p.stdout.readline())
        # The host end: ours, up, the container's eth0's peer.
        assert int(Path("/sys/class/net/mpyt-v0/ifindex").read_text()) == peer
        assert Path("/sys/class/net/mpyt-v0/operstate").read_text().strip() != "down"
        ip("addr", "add", "10.231.8.1/24", "dev", "mpyt-v0")
        out, err = p.communicate("go\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert out.splitlines()[0] == "reached"
    assert "10.231.9.0/24 via 10.231.8.1 dev eth0" in out
    assert "mpyt-v0" not in host_links()


def test_moved_device_comes_back_under_its_name(busybox_root: Path,
                                                veth_pair: tuple[str, str]) -> None:
    a, _b = veth_pair
    index = Path(f"/sys/class/net/{a}/ifindex").read_text()
    p = start("-n", f"{a}:eth1", "-r", str(busybox_root), "--", "/bin/sh", "-c",
              "ls /sys/class/net | tr '\\n' ' '; echo; read x")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().split() == ["eth1", "lo"]
        assert a not in host_links()  # lent to the container, not copied
        status, err = finish(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert status == 0, err
    assert a in host_links()
    assert Path(f"/sys/class/net/{a}/ifindex").read_text() == index


def test_macvlan_on_a_host_device(busybox_root: Path, veth_pair: tuple[str, str]) -> None:
    _a, b = veth_pair
    before = host_links()
    r = run("-n", f"macvlan:{b}:mv0", "--netif-address", "mv0=10.231.10.2/24",
            "-r", str(busybox_root), "--", "/bin/sh", "-c",
            "ls /sys/class/net | tr '\\n' ' '; ip -o -4 addr show mv0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["lo", "mv0"]
    assert "10.231.10.2/24" in r.stdout
    assert host_links() == before  # never on the host


@pytest.mark.skipif(not kernel_has("ipvlan"), reason="this kernel has no ipvlan support")
def test_ipvlan_on_a_host_device(busybox_root: Path, veth_pair: tuple[str, str]) -> None:
    _a, b = veth_pair
    r = run("-n", f"ipvlan:{b}:ipv0", "-r", str(busybox_root), "--", "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ipv0", "lo"]


@pytest.mark.skipif(kernel_has("ipvlan"), reason="this kernel supports ipvlan")
def test_ipvlan_without_kernel_support_is_one_line(busybox_root: Path,
                                                   veth_pair: tuple[str, str]) -> None:
    _a, b = veth_pair
    before = host_links()
    r = run("-n", f"ipvlan:{b}:ipv0", "-r", str(busybox_root), "--", "true")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"machinepy: cannot create ipvlan interface 'ipv0' on '{b}': "
        "the kernel has no ipvlan support"]
    assert host_links() == before


@pytest.mark.parametrize(("netif", "message"), [
    ("macvlan:mpyt-nosuch:mv0", "no interface 'mpyt-nosuch' on the host"),
    ("mpyt-nosuch:eth0", "no interface 'mpyt-nosuch' on the host"),
    ("bridge:lo:eth0", "'lo' is not a bridge"),
    ("lo:eth0", "the loopback interface cannot be moved"),
])
def test_bad_netif_is_one_line_and_creates_nothing(busybox_root: Path, netif: str,
                                                   message: str) -> None:
    before = host_links()
    r = run("-n", netif, "-r", str(busybox_root), "--", "true")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert host_links() == before


def test_taken_outside_name_is_refused(busybox_root: Path, veth_pair: tuple[str, str]) -> None:
    a, _b = veth_pair
    r = run("-n", f"veth:{a}:eth0", "-r", str(busybox_root), "--", "true")
    assert r.returncode != 0
    assert f"an interface '{a}' already exists on the host" in r.stderr


def test_malformed_netif_is_a_usage_error() -> None:
    r = run("-n", "tun:a:b", "--", "true")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "invalid --netif" in r.stderr


@pytest.mark.parametrize("victim", ["leader", "machinepy"])
def test_sigkill_leaves_no_links(busybox_root: Path, victim: str) -> None:
    p = start("-n", "veth:mpyt-k0:eth0", "-r", str(busybox_root), "--", "/bin/sh", "-c",
              "echo $$; read x")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "1"
        assert "mpyt-k0" in host_links()
        if victim == "machinepy":
            p.kill()
        else:
            os.kill(_leader_of(p.pid), signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 5
    while "mpyt-k0" in host_links() and time.monotonic() < deadline:
        time.sleep(0.05)  # a dying namespace's devices go asynchronously
    assert "mpyt-k0" not in host_links()


def _leader_of(supervisor: int) -> int:
    """The container's PID 1: the child of machinepy in another pid namespace."""
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        children = [int(c) for c in f.read().split()]
    ours = os.readlink("/proc/self/ns/pid")
    return next(c for c in children if os.readlink(f"/proc/{c}/ns/pid") != ours)
