# SPDX-License-Identifier: BSD-2-Clause
"""io.machinepy1 on a private dbus-daemon: objects, errors, authorization, real containers.

The service runs in the test's own event loop (or, for restarts, as a real
`machinepy daemon` process); clients are machinepy.integrate.dbus connections
and busctl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from machinepy.core.spec import MountSpec, SpecError
from machinepy.integrate.dbus import BusError, Connection, Received, bus_call, method_call
from machinepy.service.manager import (
    BUS_NAME,
    CONTAINER_IFACE,
    CONTAINER_XML,
    MANAGER_IFACE,
    MANAGER_PATH,
    MANAGER_XML,
    Service,
    container_path,
    introspection_xml,
    spec_from_options,
)

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:abstract={name}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""
MACHINEPY = [sys.executable, "-m", "machinepy"]
DATA = Path(__file__).resolve().parent / "data"
TIMEOUT = 20.0
NOBODY = 65534


Reply = BusError  # an error answer: .name and .text


def Variant(signature: str, value: Any) -> tuple[str, Any]:
    return (signature, value)


class Msg:
    """A message as the tests look at it: its body as a list."""

    def __init__(self, msg: Received) -> None:
        self.member, self.path, self.signature = msg.member, msg.path, msg.signature
        self.body = list(msg.body)
        self.fds = msg.fds


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    """A dbus-daemon of our own; an abstract socket, so other users can connect too."""
    name = f"mpy-test-bus-{os.getpid()}-{time.monotonic_ns()}"
    conf = tmp_path / "bus.conf"
    conf.write_text(BUS_CONFIG.format(name=name))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                             "--print-address=1", "--nopidfile"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("unix:abstract="), address
    yield address
    proc.terminate()
    proc.wait(10)


def connect(address: str) -> Connection:
    bus = Connection.open(address, fds=True)
    bus.attach(asyncio.get_running_loop())
    return bus


@pytest.fixture
async def service(bus_address: str) -> AsyncIterator[Service]:
    bus = Connection.open(bus_address, fds=True)
    svc = Service(bus, stop_timeout=2.0)
    await svc.start()
    yield svc
    await svc.close()
    bus.close()


class Client:
    def __init__(self, bus: Connection) -> None:
        self.bus = bus
        self.signals: list[Msg] = []
        self._waiters: list[asyncio.Future[None]] = []
        bus.add_handler(self._on_message)

    def _on_message(self, msg: Received) -> bool:
        if msg.type.name == "signal" and msg.path and msg.path.startswith(MANAGER_PATH):
            self.signals.append(Msg(msg))
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
        return False

    async def subscribe(self) -> None:
        await self.bus.call(bus_call("AddMatch", "s",
                                     ["type='signal',path_namespace='/io/machinepy1'"]))

    async def call(self, path: str, iface: str | None, member: str, sig: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME, *,
                   keep_fds: bool = False) -> Msg:
        msg = method_call(destination, path, iface, member, sig, body or [])
        return Msg(await self.bus.call(msg, timeout=TIMEOUT, keep_fds=keep_fds))

    async def manager(self, member: str, sig: str = "", *body: Any) -> list[Any]:
        return list((await self.call(MANAGER_PATH, MANAGER_IFACE, member, sig,
                                     list(body))).body)

    async def prop(self, path: str, name: str) -> Any:
        reply = await self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                [CONTAINER_IFACE, name])
        return reply.body[0][1]

    async def wait_signal(self, member: str, name: str) -> Msg:
        async with asyncio.timeout(TIMEOUT):
            while True:
                for msg in self.signals:
                    if msg.member == member and msg.body[0] == name:
                        return msg
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut
                self._waiters.remove(fut)


@pytest.fixture
async def client(bus_address: str, service: Service) -> AsyncIterator[Client]:
    bus = connect(bus_address)
    c = Client(bus)
    await c.subscribe()
    yield c
    bus.close()


def _busctl_argv(address: str, args: tuple[str, ...], uid: int) -> list[str]:
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return [*prefix, "busctl", f"--address={address}", *args]


def busctl(address: str, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_busctl_argv(address, args, uid), capture_output=True, text=True,
                          timeout=TIMEOUT)


async def abusctl(address: str, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    """busctl while the service runs on this very loop.

    Polled rather than awaited with asyncio's subprocess support: its child
    watcher is a thread, and the service forks containers, which it refuses to
    do from a threaded process.
    """
    argv = _busctl_argv(address, args, uid)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{argv} timed out")
            await asyncio.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())


# ---------------------------------------------------------------------------
# Options → spec (pure)


def test_options_mirror_the_cli(tmp_path: Path) -> None:
    spec = spec_from_options("box", str(tmp_path), ["/bin/sh", "-c", "true"], {
        "Hostname": ("s", "inbox"),
        "Mounts": ("a(sssss)", [("bind-ro", "/data", str(tmp_path), "", ""),
                                ("tmp", "/scratch", "", "", "")]),
        "Tmpfs": ("a(ss)", [("/tmp", "size=16M")]),
        "Ephemeral": ("b", True),
        "EphemeralSize": ("s", "1G"),
        "Environment": ("as", ["A=1,2", "B=x"]),
        "Netifs": ("a(sss)", []),
        "UserMap": ("a(uuu)", [(0, 100000, 65536)]),
        "Properties": ("as", ["MemoryMax=64M"]),
        "NoNamespaces": ("as", ["ipc"]),
    })
    assert spec.machine == "box" and spec.root == str(tmp_path)
    assert spec.hostname == "inbox"
    assert [m.kind for m in spec.mounts] == ["bind-ro", "tmp", "tmp"]
    assert spec.mounts[2] == MountSpec("tmp", "/tmp", options="size=16M")
    assert spec.ephemeral and spec.ephemeral_size == "1G"
    assert spec.setenv == (("A", "1,2"), ("B", "x"))  # one item per entry, commas kept
    assert {"net", "user"} <= spec.namespaces and "ipc" not in spec.namespaces
    assert spec.properties[0].name == "MemoryMax"
    assert spec.register is True and spec.machine_id is not None


@pytest.mark.parametrize(("options", "message"), [
    ({"Bogus": ("b", True)}, "unknown option 'Bogus'"),
    ({"Hostname": ("i", 3)}, "option 'Hostname' must be of type 's', not 'i'"),
    ({"Mounts": ("a(sssss)", [("bind", "/x", "/nonexistent-src", "", "")])}, "does not exist"),
    ({"Boot": ("b", True)}, "Boot needs a root directory"),
    ({"NoNamespaces": ("as", ["time"])}, "unknown namespace 'time'"),
    ({"Ephemeral": ("b", True)}, "--ephemeral needs --chroot"),
    ({"PrivateUsers": ("s", "maybe")}, "PrivateUsers must be 'pick' or 'no'"),
    ({"PrivateUsersOwnership": ("s", "bind")}, "must be one of auto, map, chown"),
    ({"BaseEnvironment": ("as", ["PATH"])}, "'PATH' is not NAME=VALUE"),
    ({"LandlockScope": ("as", ["files"])}, "unknown scope 'files'"),
    ({"Netifs": ("a(sss)", []), "NoNamespaces": ("as", ["net"])},
     "--no-netns contradicts --netif"),
    ({"NetifAddresses": ("a(ss)", [("lo", "10.0.0.1/8")])}, "--netif-address needs --netif"),
    ({"UserMap": ("a(uuu)", [(0, 100000, 65536)]), "NoNamespaces": ("as", ["user"])},
     "--no-userns contradicts --user-map"),
    ({"Properties": ("as", ["MemoryMax=64M"]), "Register": ("b", False)},
     "needs --register=yes"),
    ({"Tmpfs": ("a(ss)", [("/tmp", "size=0")])}, "invalid --tmpfs '/tmp:size=0': size '0'"),
    ({"EphemeralSize": ("s", "1G")}, "--ephemeral-size needs --ephemeral"),
    ({"EphemeralSize": ("s", "")}, "invalid --ephemeral-size: size ''"),
    ({"Hostname": ("s", "rel_x")}, "invalid hostname 'rel_x'"),
    ({"Hostname": ("s", "-rel")}, "invalid hostname '-rel'"),
    ({"Hostname": ("s", "a\nb")}, r"invalid hostname 'a\\nb'"),
    ({"NetifRoutes": ("a(sss)", [("lo", "default", "x")])},
     r"^invalid --netif-route 'lo=default,via=x': bad gateway 'x'$"),
])
def test_bad_options_are_one_line_errors(options: dict[str, tuple[str, object]],
                                         message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        spec_from_options("x", "", ["true"], options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"NoNamespaces": ("as", ["pid"])}, "boot contradicts --no-pidns"),
    ({"NoNamespaces": ("as", ["uts"])}, "boot contradicts --no-utsns"),
    ({"User": ("s", "root")}, "boot takes no --user"),
    ({"WorkingDirectory": ("s", "/")}, "boot takes no --chdir"),
    ({"KeepEnvironment": ("b", True)}, "boot takes no --keepenv"),
])
def test_boot_contradictions_are_one_line_errors(tmp_path: Path,
                                                 options: dict[str, tuple[str, object]],
                                                 message: str) -> None:
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/init").symlink_to("/bin/busybox")
    with pytest.raises(SpecError, match=message) as e:
        spec_from_options("x", str(tmp_path), [], {"Boot": ("b", True), **options})
    assert "\n" not in str(e.value)


def test_private_users_and_base_environment(tmp_path: Path) -> None:
    spec = spec_from_options("x", str(tmp_path), ["true"], {
        "PrivateUsers": ("s", "pick"),
        "PrivateUsersOwnership": ("s", "chown"),
        "BaseEnvironment": ("as", ["HOME=/home/me", "EMPTY=", "EQ=a=b"]),
    })
    assert spec.private_users and "user" in spec.namespaces and spec.ownership == "chown"
    assert spec.base_env == (("HOME", "/home/me"), ("EMPTY", ""), ("EQ", "a=b"))
    assert spec_from_options("x", str(tmp_path), ["true"], {}).base_env is None


def test_landlock_scope_option() -> None:
    spec = spec_from_options("x", "", ["true"],
                             {"LandlockScope": ("as", ["abstract-unix-socket", "signal"])})
    assert spec.landlock_scope == ("abstract-unix-socket", "signal")


def test_host_root_when_root_is_empty_or_slash() -> None:
    for root in ("", "/"):
        assert spec_from_options("x", root, ["true"], {}).root is None


# ---------------------------------------------------------------------------
# The object tree, introspection and properties


async def test_tree_introspection_and_manager_properties(bus_address: str,
                                                         client: Client) -> None:
    r = await abusctl(bus_address, "tree", BUS_NAME)
    assert r.returncode == 0, r.stderr
    assert "/io/machinepy1" in r.stdout
    r = await abusctl(bus_address, "introspect", BUS_NAME, MANAGER_PATH)
    assert r.returncode == 0, r.stderr
    for needle in ("io.machinepy1.Manager", ".CreateContainer", "ssasa{sv}", ".ListContainers",
                   "a(ssuo)", ".OpenConsole", ".ContainerRemoved", "soi",
                   "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Peer"):
        assert needle in r.stdout, needle
    r = await abusctl(bus_address, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                      "Containers")
    assert r.stdout.strip() == "u 0"
    # Peer is answered by the connection, for every object (as sd-bus does).
    r = await abusctl(bus_address, "call", BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.Peer",
                      "Ping")
    assert r.returncode == 0, r.stderr
    assert await client.manager("ListContainers") == [[]]


@pytest.mark.parametrize(("which", "path"), [("manager", MANAGER_PATH),
                                             ("container", container_path("abc"))])
def test_introspection_is_the_one_dbus_fast_wrote(which: str, path: str) -> None:
    # tests/data/introspect-*.xml: dbus-fast's XML (canonicalized) before the move to jeepney.
    xml = introspection_xml(path, MANAGER_XML if which == "manager" else CONTAINER_XML, [])
    assert xml.startswith('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object '
                          'Introspection 1.0//EN"\n')
    ours = ET.canonicalize(xml[xml.index("<node"):], strip_text=True)
    assert ours + "\n" == (DATA / f"introspect-{which}.xml").read_text()


@pytest.mark.parametrize(("call", "error"), [
    ((MANAGER_PATH, MANAGER_IFACE, "GetContainer", "s", ["nope"]),
     "io.machinepy1.Error.NoSuchContainer"),
    ((MANAGER_PATH, MANAGER_IFACE, "GetContainer", "s", ["two\nlines"]),
     "io.machinepy1.Error.NoSuchContainer"),
    ((MANAGER_PATH, MANAGER_IFACE, "GetContainer", "i", [1]),
     "org.freedesktop.DBus.Error.InvalidArgs"),
    ((MANAGER_PATH, MANAGER_IFACE, "Frobnicate", "", []),
     "org.freedesktop.DBus.Error.UnknownMethod"),
    ((MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER_IFACE, "Nope"]),
     "org.freedesktop.DBus.Error.UnknownProperty"),
    ((MANAGER_PATH, "org.freedesktop.DBus.Properties", "Set", "ssv",
      [MANAGER_IFACE, "Version", Variant("s", "2")]),
     "org.freedesktop.DBus.Error.PropertyReadOnly"),
    ((container_path("nope"), CONTAINER_IFACE, "Poweroff", "", []),
     "org.freedesktop.DBus.Error.UnknownObject"),
])
async def test_read_only_errors(client: Client, call: tuple[Any, ...], error: str) -> None:
    with pytest.raises(Reply) as e:
        await client.call(*call)
    assert e.value.name == error
    assert e.value.text and "\n" not in e.value.text


# ---------------------------------------------------------------------------
# Authorization: the caller's uid, asked from the bus


@pytest.mark.root
async def test_non_root_is_denied_changes_but_may_read(bus_address: str,
                                                       client: Client) -> None:
    r = await abusctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateContainer",
               "ssasa{sv}", "evil", "/", "1", "/bin/true", "0", uid=NOBODY)
    assert r.returncode != 0
    assert "Access denied" in r.stderr  # busctl's words for org.freedesktop.DBus.Error.AccessDenied
    r = await abusctl(bus_address, "--json=short", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
               "ListContainers", uid=NOBODY)
    assert r.returncode == 0, r.stderr
    assert '"data":[[]]' in r.stdout
    for member, sig, args in (("PoweroffContainer", "s", ["x"]),
                              ("KillContainer", "ssi", ["x", "all", "9"]),
                              ("OpenConsole", "s", ["x"])):
        r = await abusctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, sig,
                   *args, uid=NOBODY)
        assert "Access denied" in r.stderr, (member, r.stderr)
    assert await client.manager("ListContainers") == [[]]


async def test_access_denied_error_name(service: Service, client: Client) -> None:
    # As if the client were uid 65534 (the bus answered GetConnectionUnixUser so).
    service._uids[client.bus.unique_name or ""] = NOBODY
    with pytest.raises(Reply) as e:
        await client.manager("TerminateContainer", "s", "x")
    assert e.value.name == "org.freedesktop.DBus.Error.AccessDenied"
    assert e.value.text == "TerminateContainer is only for root"
    assert await client.manager("ListContainers") == [[]]


# ---------------------------------------------------------------------------
# Real containers (root)

TERM_TRAP = "trap 'exit 7' TERM; while :; do sleep 0.05; done"


async def create(client: Client, name: str, root: str, command: list[str],
                 **options: Variant) -> str:
    opts = {"Register": Variant("b", False), **options}
    (path,) = await client.manager("CreateContainer", "ssasa{sv}", name, root, command, opts)
    return str(path)


@pytest.mark.root
async def test_lifecycle_create_list_properties_poweroff(client: Client,
                                                         busybox_root: Path) -> None:
    path = await create(client, "life", str(busybox_root), ["/bin/sh", "-c", TERM_TRAP],
                        Hostname=Variant("s", "lifehost"))
    assert path == container_path("life")
    new = await client.wait_signal("ContainerNew", "life")
    assert new.body == ["life", path]
    (rows,) = await client.manager("ListContainers")
    assert len(rows) == 1
    name, state, leader, lpath = rows[0]
    assert (name, state, lpath) == ("life", "running", path)
    # The leader is a real process, PID 1 of its own pid namespace.
    assert os.readlink(f"/proc/{leader}/ns/pid") != os.readlink("/proc/self/ns/pid")
    with open(f"/proc/{leader}/status") as f:
        assert f"NSpid:\t{leader}\t1\n" in f.read()
    assert await client.prop(path, "Leader") == leader
    assert await client.prop(path, "RootDirectory") == str(busybox_root)
    assert await client.prop(path, "Command") == ["/bin/sh", "-c", TERM_TRAP]
    assert await client.prop(path, "MachineRegistered") is False
    assert len(await client.prop(path, "Id")) == 16
    since = await client.prop(path, "Since")
    assert abs(since / 1e6 - time.time()) < 60
    assert (await client.manager("GetContainer", "s", "life")) == [path]
    with pytest.raises(Reply) as e:  # the name is taken
        await create(client, "life", "/", ["/bin/true"])
    assert e.value.name == "io.machinepy1.Error.AlreadyExists"
    await client.manager("PoweroffContainer", "s", "life")
    removed = await client.wait_signal("ContainerRemoved", "life")
    assert removed.body == ["life", path, 7]  # its TERM trap ran
    changed = [m.body[1]["State"][1] for m in client.signals
               if m.member == "PropertiesChanged" and "State" in m.body[1]]
    assert changed[-1] == "exited"
    assert await client.manager("ListContainers") == [[]]
    with pytest.raises(ProcessLookupError):
        os.kill(leader, 0)


@pytest.mark.root
async def test_uuid_is_the_id_and_container_uuid(client: Client, tmp_path: Path) -> None:
    import uuid

    u = uuid.uuid4()
    out = tmp_path / "uuid"
    path = await create(client, "withid", "/", ["/bin/sh", "-c", f"echo $container_uuid > {out}; "
                                                 "exec sleep 1000"], Uuid=Variant("ay", u.bytes))
    assert await client.prop(path, "Id") == u.bytes
    options = await client.prop(path, "Options")
    assert options["Uuid"] == ("ay", u.bytes)  # (signature, value)
    deadline = time.monotonic() + TIMEOUT
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert out.read_text() == f"{u}\n"
    await client.manager("TerminateContainer", "s", "withid")
    await client.wait_signal("ContainerRemoved", "withid")


@pytest.mark.root
async def test_console_is_passed_as_fd(client: Client) -> None:
    path = await create(client, "cons", "/", ["/bin/sh", "-c", "read x; echo got-$x; exit 3"])
    reply = await client.call(path, CONTAINER_IFACE, "OpenConsole", keep_fds=True)
    assert reply.signature == "h" and len(reply.fds) == 1
    master = reply.body[0]
    assert master == reply.fds[0]
    try:
        assert os.isatty(master)
        os.write(master, b"hello\n")
        out = b""
        deadline = time.monotonic() + TIMEOUT
        while b"got-hello" not in out and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            with contextlib.suppress(BlockingIOError, OSError):
                out += os.read(master, 4096)
        assert b"got-hello" in out
    finally:
        os.close(master)
    removed = await client.wait_signal("ContainerRemoved", "cons")
    assert removed.body[2] == 3


@pytest.mark.root
async def test_kill_and_terminate(client: Client) -> None:
    await create(client, "k1", "/", ["/bin/sleep", "1000"])
    with pytest.raises(Reply) as e:
        await client.manager("KillContainer", "ssi", "k1", "nobody", 9)
    assert e.value.name == "io.machinepy1.Error.InvalidArgument"
    with pytest.raises(Reply) as e:
        await client.manager("KillContainer", "ssi", "k1", "leader", 999)
    assert e.value.name == "io.machinepy1.Error.InvalidArgument"
    await client.manager("KillContainer", "ssi", "k1", "all", int(signal.SIGKILL))
    assert (await client.wait_signal("ContainerRemoved", "k1")).body[2] == 128 + 9
    path = await create(client, "k2", "/", ["/bin/sleep", "1000"])
    await client.call(path, CONTAINER_IFACE, "Terminate")
    assert (await client.wait_signal("ContainerRemoved", "k2")).body[2] == 128 + 9


@pytest.mark.root
async def test_setup_failure_is_an_error_and_leaves_nothing(client: Client,
                                                            busybox_root: Path) -> None:
    with pytest.raises(Reply) as e:
        await create(client, "broken", str(busybox_root), ["/no/such/command"])
    assert e.value.name == "io.machinepy1.Error.Failed"
    assert "/no/such/command" in e.value.text
    assert await client.manager("ListContainers") == [[]]
    assert not any(m.member == "ContainerNew" for m in client.signals)
    # The name is free again.
    await create(client, "broken", str(busybox_root), ["/bin/true"])
    assert (await client.wait_signal("ContainerRemoved", "broken")).body[2] == 0


@pytest.mark.root
@pytest.mark.parametrize("name", ["-rel", "rel-", "rel_x", "a.-b", "x.", ".host",
                                  "two\nlines"])
async def test_names_machined_refuses_are_invalid_arguments(client: Client, name: str) -> None:
    # Refused up front (machined's own rules), not by RegisterMachine after the
    # container is made; here registration is off, so only the check can refuse.
    with pytest.raises(Reply) as e:
        await create(client, name, "/", ["/bin/true"])
    assert e.value.name == "io.machinepy1.Error.InvalidArgument", e.value
    assert "invalid machine name" in e.value.text and e.value.text.isprintable()
    assert await client.manager("ListContainers") == [[]]
    assert not any(m.member == "ContainerNew" for m in client.signals)


def _open_fds() -> dict[int, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


@pytest.mark.root
@pytest.mark.parametrize(("netifs", "routes"), [
    ([("move", "nosuchdev0", "eth0")], []),  # refused by the up-front checks
    ([("veth", "lo", "host0")], []),
    ([("bridge", "lo", "eth0")], []),
    ([("macvlan", "lo", "mv0")], []),  # refused by the kernel, after the sockets are made
    ([], [("lo", "10.9.0.0/16", "10.231.99.1")]),  # unreachable gateway, at the last step
])
async def test_failed_network_setup_leaks_no_fd_or_namespace(
        client: Client, netifs: list[tuple[str, str, str]],
        routes: list[tuple[str, str, str]]) -> None:
    # Each failed setup used to leave a netlink socket open in the service,
    # bound to the dead container's network namespace (keeping it alive).
    opts = {"Netifs": Variant("a(sss)", netifs), "NetifRoutes": Variant("a(sss)", routes)}

    async def fail() -> None:
        with pytest.raises(Reply) as e:
            await create(client, "badnet", "/", ["/bin/true"], **opts)
        assert e.value.name == "io.machinepy1.Error.Failed", e.value

    await fail()  # the first call may import and cache what later calls reuse
    before = _open_fds()
    for _ in range(20):
        await fail()
    leaked = {fd: what for fd, what in _open_fds().items() if before.get(fd) != what}
    assert not leaked
    assert await client.manager("ListContainers") == [[]]


@pytest.mark.root
async def test_empty_name_picks_one(client: Client) -> None:
    path = await create(client, "", "/", ["/bin/sleep", "1000"])
    name = path.rsplit("/", 1)[1]
    assert name.startswith("machinepy_2d")  # "machinepy-N", bus-label escaped
    (rows,) = await client.manager("ListContainers")
    await client.call(path, CONTAINER_IFACE, "Terminate")
    await client.wait_signal("ContainerRemoved", rows[0][0])


@pytest.mark.root
async def test_malformed_calls_leave_the_service_up_and_nothing_behind(
        bus_address: str, client: Client, tmp_path: Path) -> None:
    bad: list[tuple[str, str, list[Any]]] = [
        ("CreateContainer", "ssasa{sv}", ["../x", "/", [], {}]),
        ("CreateContainer", "ssasa{sv}", ["a" * 100, "/", [], {}]),
        ("CreateContainer", "ssasa{sv}", ["x", "relative/root", [], {}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/nonexistent", [], {}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"Netifs": Variant("a(sss)", [("move", "a/b", "c")])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [], {"Mounts": Variant("s", "x")}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"Mounts": Variant("a(sssss)",
                                                             [("bad", "/x", "", "", "")])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"Netifs": Variant("a(sss)", [("a", "b", "c")])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"UserMap": Variant("a(uuu)", [(1, 2, 0)])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"Properties": Variant("as", ["Bogus=1"])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [], {"Caps": Variant("as", ["+nope"])}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [], {"User": Variant("s", "nosuchuser")}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"WorkingDirectory": Variant("s", "rel")}]),
        ("CreateContainer", "ssasa{sv}", ["x", "/", [],
                                          {"Environment": Variant("as", ["1BAD=x"])}]),
        ("CreateContainer", "ssasa{sv}", ["x", str(tmp_path), [],  # no init in there
                                          {"Boot": Variant("b", True)}]),
        ("CreateContainer", "s", ["x"]),
        ("CreateContainer", "", []),
        ("KillContainer", "ssi", ["none", "all", 9]),
        ("OpenConsole", "s", [""]),
        ("GetContainer", "as", [["x"]]),
    ]
    for i in range(50):
        member, sig, body = bad[i % len(bad)]
        with pytest.raises(Reply) as e:
            await client.manager(member, sig, *body)
        assert e.value.name.startswith(("io.machinepy1.Error.", "org.freedesktop.DBus.Error."))
        assert e.value.name != "org.freedesktop.DBus.Error.Failed", e.value
        assert "\n" not in e.value.text
    assert await client.manager("ListContainers") == [[]]
    assert not client.signals
    r = await abusctl(bus_address, "call", BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.Peer",
                      "Ping")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# The daemon process: stop leaves containers running, a new one adopts them.


def start_daemon(address: str, state_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*MACHINEPY, "daemon", f"--bus-address={address}",
                             f"--state-dir={state_dir}", "--stop-timeout=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        r = busctl(address, "status", BUS_NAME)
        if r.returncode == 0:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("daemon did not take its name")


def gone(pid: int) -> bool:
    """Dead and reaped.  An orphaned leader comes to us: spawn() made pytest a subreaper."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.root
def test_daemon_restart_adopts_running_containers(bus_address: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_daemon(bus_address, state)
    leader = 0
    try:
        r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                   "CreateContainer", "ssasa{sv}", "survivor", "/", "2", "/bin/sleep", "1000",
                   "1", "Register", "b", "false")
        assert r.returncode == 0, r.stderr
        r = busctl(bus_address, "get-property", BUS_NAME, container_path("survivor"),
                   CONTAINER_IFACE, "Leader")
        leader = int(r.stdout.split()[1])
        assert (state / "survivor.json").exists()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(TIMEOUT) == 0
        os.kill(leader, 0)  # still running without its daemon
        daemon = start_daemon(bus_address, state)
        r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListContainers")
        assert r.stdout.split() == ["a(ssuo)", "1", '"survivor"', '"running"', str(leader),
                                    f'"{container_path("survivor")}"'], r.stdout
        r = busctl(bus_address, "call", BUS_NAME, container_path("survivor"), CONTAINER_IFACE,
                   "Terminate")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not gone(leader):
            time.sleep(0.05)
        assert gone(leader)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and state.exists():
            time.sleep(0.05)
        assert not state.exists()  # state files removed, and the empty dir too
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT)
        if leader and not gone(leader):
            os.kill(leader, signal.SIGKILL)
            time.sleep(0.1)
            gone(leader)


def _sleepers(arg: str) -> list[int]:
    """Processes running `sleep ARG` in a pid namespace other than ours."""
    mine = os.readlink("/proc/self/ns/pid")
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and _cmdline(p) == [b"/bin/sleep", arg.encode(), b""]:
            with contextlib.suppress(OSError):
                if os.readlink(p / "ns/pid") != mine:
                    found.append(int(p.name))
    return found


@pytest.mark.root
def test_create_fails_when_the_state_file_cannot_be_written(bus_address: str,
                                                            tmp_path: Path) -> None:
    # /run full: the reply must say Failed (the container is not restart-safe,
    # so it is stopped), and no temp file may stay, now or after a restart.
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "mpy-full", str(state)],
                   check=True)
    daemon = None
    try:
        (state / ".killed-mid-write.tmp").write_text("{")  # an earlier daemon's
        daemon = start_daemon(bus_address, state)
        assert os.listdir(state) == []  # swept at start
        with contextlib.suppress(OSError), open(state / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 1024)
        r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                   "CreateContainer", "ssasa{sv}", "full", "/", "2", "/bin/sleep", "4242",
                   "1", "Register", "b", "false")
        assert r.returncode != 0, r.stdout
        assert "saving its state" in r.stderr and "No space left" in r.stderr, r.stderr
        assert os.listdir(state) == ["filler"]
        r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListContainers")
        assert r.stdout.split() == ["a(ssuo)", "0"], r.stdout
        deadline = time.monotonic() + TIMEOUT
        while _sleepers("4242") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sleepers("4242") == []
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(TIMEOUT)
        for pid in _sleepers("4242"):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", str(state)], check=True)


# ---------------------------------------------------------------------------
# The CLI verbs, against a daemon on the private bus


def machinepy(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address})


@pytest.mark.root
def test_cli_verbs(bus_address: str, tmp_path: Path, busybox_root: Path) -> None:
    daemon = start_daemon(bus_address, tmp_path / "state")
    try:
        r = machinepy(bus_address, "start", "web", str(busybox_root), "--register=no",
                      "-t", "webhost", "-s", "A=1,B=2", "--", "/bin/sh", "-c",
                      "trap 'exit 5' TERM; while :; do sleep 0.05; done")
        assert (r.returncode, r.stdout, r.stderr) == (0, "web\n", "")
        r = machinepy(bus_address, "start", "", "/", "--register=no", "--", "sleep", "1000")
        assert r.returncode == 0 and r.stdout.startswith("machinepy-"), r.stderr
        other = r.stdout.strip()
        r = machinepy(bus_address, "list")
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["NAME", "STATE", "LEADER"]
        assert [line.split()[:2] for line in lines[1:3]] == [[other, "running"],
                                                            ["web", "running"]]
        assert lines[-1] == "2 containers listed."
        r = machinepy(bus_address, "list", "--no-legend", "--no-pager")  # as machinectl's
        assert [line.split()[:2] for line in r.stdout.splitlines()] == [[other, "running"],
                                                                       ["web", "running"]]
        r = machinepy(bus_address, "list", "-o", "json")
        rows = {row["Name"]: row for row in json.loads(r.stdout)}
        assert rows["web"]["RootDirectory"] == str(busybox_root)
        assert rows[other]["Command"] == ["sleep", "1000"]
        r = machinepy(bus_address, "status", "web")
        assert "State: running" in r.stdout and f"Root: {busybox_root}" in r.stdout
        assert "Options: --hostname=webhost --register=no\n" in r.stdout  # not its -s
        assert machinepy(bus_address, "kill", other, "--signal=KILL").returncode == 0
        assert machinepy(bus_address, "poweroff", "web").returncode == 0
        r = machinepy(bus_address, "status", "nope")
        assert (r.returncode, r.stderr) == (1, "machinepy: no container 'nope'\n")
        r = machinepy(bus_address, "start", "bad", "/nonexistent")
        assert r.returncode == 2 and "does not exist" in r.stderr
        assert machinepy(bus_address, "kill", "web", "--signal=FOO").returncode == 2
        deadline = time.monotonic() + TIMEOUT
        while machinepy(bus_address, "list").stdout != "0 containers listed.\n":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT)


def test_install_units_into_a_root(tmp_path: Path) -> None:
    r = subprocess.run([*MACHINEPY, "install-units", f"--root={tmp_path}"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    service = (tmp_path / "etc/systemd/system/machinepy.service").read_text()
    assert f"ExecStart={sys.executable} -m machinepy daemon\n" in service
    # This checkout's code runs, whatever else `import machinepy` would find.
    repo = Path(__file__).resolve().parent.parent
    assert f"\nEnvironment=PYTHONPATH={repo}\nExecStart=" in service
    assert "BusName=io.machinepy1" in service and "KillMode=process" in service
    assert "FileDescriptorStoreMax=" in service
    from machinepy.core.sd import systemd_version

    assert ("FileDescriptorStorePreserve=yes" in service) == ((systemd_version() or 254) >= 254)
    template = (tmp_path / "etc/systemd/system/machinepy@.service").read_text()
    assert "boot /var/lib/machines/%i --machine=%i" in template
    activation = (tmp_path / "usr/share/dbus-1/system-services/io.machinepy1.service")
    assert "SystemdService=machinepy.service" in activation.read_text()
    policy = (tmp_path / "etc/dbus-1/system.d/io.machinepy1.conf").read_text()
    assert 'send_member="ListContainers"' in policy and 'own="io.machinepy1"' in policy


def test_fd_store_preserve_only_where_systemd_has_it() -> None:
    from machinepy.cli.install import for_systemd, units_dir

    UNITS_DIR = units_dir()
    assert UNITS_DIR is not None
    from machinepy.core.sd import systemd_version

    unit = (UNITS_DIR / "machinepy.service").read_text()
    assert "FileDescriptorStorePreserve=yes\n" in for_systemd(unit, 254)
    assert "FileDescriptorStorePreserve" not in for_systemd(unit, 252)
    assert for_systemd(unit, None) == unit
    assert "FileDescriptorStoreMax=4096\n" in for_systemd(unit, 252)
    version = systemd_version()
    if version is not None:  # install-units asks the systemd at hand
        assert isinstance(version, int) and version > 200


@pytest.mark.root
@pytest.mark.parametrize("verb", [["attach"], ["run", "-a"]], ids=["attach", "run-a"])
def test_cli_attach_relays_the_console_until_the_container_ends(bus_address: str,
                                                                 tmp_path: Path,
                                                                 verb: list[str]) -> None:
    daemon = start_daemon(bus_address, tmp_path / "state")
    try:
        r = machinepy(bus_address, "start", "ticker", "/", "--register=no", "--", "/bin/sh",
                      "-c", "while :; do echo tick; sleep 0.1; done")
        assert r.returncode == 0, r.stderr
        # `run -a NAME` falls back to the service when no `run -d` supervisor has NAME.
        attach = subprocess.Popen([*MACHINEPY, *verb, "ticker"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address})
        try:
            assert attach.stdout is not None
            assert attach.stdout.readline().strip() == "tick"
            assert machinepy(bus_address, "terminate", "ticker").returncode == 0
            _out, err = attach.communicate(timeout=TIMEOUT)
        finally:
            if attach.poll() is None:
                attach.kill()
                attach.wait()
        assert attach.returncode == 0
        assert "Attached to ticker." in err and "Detached from ticker." in err
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT)


# ---------------------------------------------------------------------------
# run --detach hands the container to the service when there is one


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


@pytest.mark.root
def test_run_detach_hands_the_container_to_the_daemon(bus_address: str,
                                                      tmp_path: Path) -> None:
    daemon = start_daemon(bus_address, tmp_path / "state")
    work = tmp_path / "work"
    work.mkdir()
    leader = 0
    try:
        # Host root, no --chdir: the container starts where and with what we have,
        # not in the daemon's / with the daemon's environment.
        r = subprocess.run([*MACHINEPY, "run", "-d", "--register=no", "--machine", "handed",
                            "-s", "X=1", "--", "/bin/sh", "-c",
                            'echo "$FROM_CALLER $X $PWD" > out; exec sleep 1000'],
                           capture_output=True, text=True, timeout=TIMEOUT, cwd=work,
                           env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address,
                                "FROM_CALLER": "yes"})
        assert (r.returncode, r.stdout, r.stderr) == (0, "handed\n", "")
        r = machinepy(bus_address, "list", "-o", "json")
        (row,) = json.loads(r.stdout)
        assert (row["Name"], row["State"]) == ("handed", "running")
        leader = row["Leader"]
        assert _ppid(leader) == daemon.pid  # the daemon supervises it, no process of ours
        deadline = time.monotonic() + TIMEOUT
        while not (work / "out").exists() or not (work / "out").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (work / "out").read_text() == f"yes 1 {work}\n"
        # Same name again: the service's one-line error, nothing new made.
        r = subprocess.run([*MACHINEPY, "run", "-d", "--register=no", "--machine", "handed",
                            "--", "true"], capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address})
        assert (r.returncode, r.stderr) == (1, "machinepy: container 'handed' already exists\n")
        assert machinepy(bus_address, "terminate", "handed").returncode == 0
        deadline = time.monotonic() + TIMEOUT
        while machinepy(bus_address, "list").stdout != "0 containers listed.\n":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{leader}")
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT)
        if leader and os.path.exists(f"/proc/{leader}"):
            os.kill(leader, signal.SIGKILL)


@pytest.mark.root
def test_run_detach_without_the_service_detaches_by_itself(bus_address: str,
                                                           busybox_root: Path) -> None:
    # A bus, but nobody owns io.machinepy1 and nothing can activate it.
    name = f"alone-{os.getpid()}"
    r = subprocess.run([*MACHINEPY, "run", "-d", "--register=no", "-r", str(busybox_root),
                        "--machine", name, "--", "/bin/sleep", "1000"],
                       capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address})
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{name}\n", "")
    supervisors = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and name.encode() in _cmdline(p) and b"-d" in _cmdline(p)]
    assert len(supervisors) == 1
    os.kill(supervisors[0], signal.SIGTERM)  # forwarded; sleep ignores it as PID 1
    time.sleep(0.2)
    os.kill(supervisors[0], signal.SIGTERM)  # the second one kills
    deadline = time.monotonic() + TIMEOUT
    while not gone(supervisors[0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _cmdline(proc: Path) -> list[bytes]:
    try:
        return (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
