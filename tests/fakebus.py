# SPDX-License-Identifier: BSD-2-Clause
"""A private dbus-daemon with fake systemd and machined on it, for unit tests.

    async with FakeSystem() as system:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", system.address)
        ...  # code under test talks to system.systemd and system.machined

The fakes answer like the real services closely enough for machinepy's
registration code, record every call (`system.log`), and can be told to
misbehave: JobRemoved before or after the method reply or never, a failed
job, errors from any method, a scope that is never collected.  Needs only
`dbus-daemon` and no privileges.
"""

from __future__ import annotations

import asyncio
import selectors
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

from machinepy.integrate.dbus import (
    BusError,
    Connection,
    Received,
    bus_call,
    error_reply,
    method_return,
    signal,
)

START_TIMEOUT = 5.0  # for dbus-daemon to print its address, and to exit

SYSTEMD_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
SCOPE = "org.freedesktop.systemd1.Scope"
MACHINED_NAME = "org.freedesktop.machine1"
MACHINED_PATH = "/org/freedesktop/machine1"

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def object_path_label(name: str) -> str:
    """sd-bus's label escaping, written out here so the fake does not trust machinepy's."""
    return "".join(
        c if c.isascii() and (c.isalpha() or (c.isdigit() and i > 0))
        else "".join(f"_{b:02x}" for b in c.encode())
        for i, c in enumerate(name)
    ) or "_"


def unit_object_path(unit: str) -> str:
    return f"{SYSTEMD_PATH}/unit/{object_path_label(unit)}"


# ---------------------------------------------------------------------------


class PrivateBus:
    """A dbus-daemon of our own, configured as a system bus, in a temporary directory.

    The directory lives under /tmp rather than pytest's tmp_path: a unix
    socket path must stay below 108 bytes, and test names can be long.
    """

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> str:
        self.directory = Path(tempfile.mkdtemp(prefix="machinepy-bus-"))
        try:
            config = self.directory / "bus.conf"
            config.write_text(CONFIG.format(socket=escape(str(self.directory / "bus"))))
            # Its stderr goes to a file: it warns about fd limits it may not raise.
            with open(self.directory / "stderr", "w") as stderr:
                self.process = subprocess.Popen(
                    ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
            assert self.process.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(self.process.stdout, selectors.EVENT_READ)
                ready = sel.select(START_TIMEOUT)
            line = self.process.stdout.readline().strip() if ready else ""
            if not line:
                errors = (self.directory / "stderr").read_text().strip()
                raise RuntimeError(f"dbus-daemon printed no address (exit {self.process.poll()})"
                                   f": {errors}")
        except BaseException:
            self.stop()
            raise
        self.address = line
        return line

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


@dataclass
class Call:
    service: str  # "systemd" or "machined"
    member: str
    args: tuple[Any, ...]


@dataclass
class Unit:
    name: str
    path: str
    properties: list[tuple[str, str, Any]]
    controller: str | None


def plain_properties(props: list[Any]) -> list[tuple[str, str, Any]]:
    """a(sv) as received → [(name, signature, value)], in order."""
    return [(name, sig, value) for name, (sig, value) in props]


def dbus_method(signature: str, returns: str = "") -> Callable[[Any], Any]:
    """Marks a fake's method: the signature it takes, and the one of its answer."""
    def mark(fn: Any) -> Any:
        fn.dbus = (signature, returns)
        return fn

    return mark


class _Fake:
    """Shared by both fakes: the connection, the call log and configurable errors."""

    service = ""
    path = ""

    def __init__(self, interface: str, log: list[Call]) -> None:
        self.interface = interface
        self.log = log
        self.bus: Connection | None = None
        # member → (D-Bus error name, text): that method fails instead.
        self.errors: dict[str, tuple[str, str]] = {}

    def handle(self, msg: Received) -> bool:
        """Method calls to our object, answered as dbus-fast's ServiceInterface did."""
        if msg.type.name != "method_call" or msg.path != self.path or \
                msg.interface not in (None, self.interface):
            return False
        assert self.bus is not None
        method = getattr(self, msg.member or "", None)
        spec = getattr(method, "dbus", None)
        if method is None or spec is None:
            self.bus.send(error_reply(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                      f"no method {msg.member}"))
            return True
        if msg.signature != spec[0]:
            self.bus.send(error_reply(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                      f"{msg.member} takes '{spec[0]}'"))
            return True
        try:
            result = method(*msg.body)
        except BusError as e:
            self.bus.send(error_reply(msg, e.name, e.text))
            return True
        self.bus.send(method_return(msg, spec[1], (result,) if spec[1] else ()))
        return True

    def _record(self, member: str, *args: Any) -> None:
        self.log.append(Call(self.service, member, args))
        if member in self.errors:
            raise BusError(*self.errors[member])

    def emit(self, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None, destination: str | None = None) -> None:
        """Queue a signal now: anything queued later on this connection arrives after it."""
        assert self.bus is not None
        self.bus.send(signal(path, interface, member, signature, body or [],
                             destination=destination))


JobRemovedWhen = Literal["before-reply", "after-reply", "later", "never"]


class FakeSystemd(_Fake):
    """org.freedesktop.systemd1.Manager, the parts a container's scope needs."""

    service = "systemd"
    path = SYSTEMD_PATH

    def __init__(self, log: list[Call]) -> None:
        super().__init__(MANAGER, log)
        self.units: dict[str, Unit] = {}
        self.job_removed: JobRemovedWhen = "before-reply"
        self.job_result = "done"
        self.later_delay = 0.05
        # An unrelated job finishing (with 'failed') just ahead of ours.
        self.other_job_first = False
        # Seconds from UnrefUnit until the scope is collected (UnitRemoved); None: never.
        self.collect_after: float | None = 0.0
        self._jobs = 0

    def _job_removed(self, job_id: int, job: str, unit: str, result: str) -> None:
        self.emit(SYSTEMD_PATH, MANAGER, "JobRemoved", "uoss", [job_id, job, unit, result])

    def _unit(self, name: str) -> Unit:
        unit = self.units.get(name)
        if unit is None:
            raise BusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return unit

    @dbus_method("")
    def Subscribe(self) -> None:
        self._record("Subscribe")

    @dbus_method("ssa(sv)a(sa(sv))", "o")
    def StartTransientUnit(self, name: str, mode: str, properties: list[Any],
                           aux: list[Any]) -> str:
        self._record("StartTransientUnit", name, mode, properties, aux)
        if name in self.units:
            raise BusError("org.freedesktop.systemd1.UnitExists", f"Unit {name} already exists.")
        props = plain_properties(properties)
        controller = next((v for n, s, v in props if n == "Controller"), None)
        self.units[name] = Unit(name, unit_object_path(name), props, controller)
        self._jobs += 2
        job_id = self._jobs
        job = f"{SYSTEMD_PATH}/job/{job_id}"
        if self.other_job_first:
            self._job_removed(job_id - 1, f"{SYSTEMD_PATH}/job/{job_id - 1}", "other.service",
                              "failed")
        finish = self._finisher(job_id, job, name)
        loop = asyncio.get_running_loop()
        if self.job_removed == "before-reply":
            finish()  # queued ahead of the reply sent when we return
        elif self.job_removed == "after-reply":
            loop.call_soon(finish)
        elif self.job_removed == "later":
            loop.call_later(self.later_delay, finish)
        return job

    def _finisher(self, job_id: int, job: str, unit: str) -> Callable[[], None]:
        result = self.job_result

        def finish() -> None:
            if result != "done":
                # As systemd: a failed start leaves no unit behind to clean up.
                self.units.pop(unit, None)
            self._job_removed(job_id, job, unit, result)

        return finish

    @dbus_method("s", "o")
    def GetUnit(self, name: str) -> str:
        self._record("GetUnit", name)
        return self._unit(name).path

    @dbus_method("ssi")
    def KillUnit(self, name: str, whom: str, signal: int) -> None:
        self._record("KillUnit", name, whom, signal)
        self._unit(name)

    @dbus_method("s")
    def AbandonScope(self, name: str) -> None:
        self._record("AbandonScope", name)
        self._unit(name)

    @dbus_method("s")
    def UnrefUnit(self, name: str) -> None:
        self._record("UnrefUnit", name)
        unit = self._unit(name)
        if self.collect_after is not None:
            asyncio.get_running_loop().call_later(self.collect_after, self.collect, unit.name)

    def collect(self, name: str) -> None:
        """The scope is gone: UnitRemoved, as systemd's garbage collection sends it."""
        unit = self.units.pop(name, None)
        if unit is not None:
            self.emit(SYSTEMD_PATH, MANAGER, "UnitRemoved", "so", [unit.name, unit.path])

    def request_stop(self, name: str, path: str | None = None) -> None:
        """`machinectl terminate`: systemd asks the scope's Controller to stop it."""
        unit = self.units[name]
        self.emit(path or unit.path, SCOPE, "RequestStop", destination=unit.controller)


class FakeMachined(_Fake):
    """org.freedesktop.machine1.Manager: registration only."""

    service = "machined"
    path = MACHINED_PATH

    def __init__(self, log: list[Call]) -> None:
        super().__init__("org.freedesktop.machine1.Manager", log)
        self.machines: dict[str, tuple[Any, ...]] = {}

    def _register(self, member: str, *args: Any) -> str:
        self._record(member, *args)
        name = args[0]
        if name in self.machines:
            raise BusError("org.freedesktop.machine1.MachineExists",
                           f"Machine '{name}' already exists")
        self.machines[name] = args
        return f"{MACHINED_PATH}/machine/{object_path_label(name)}"

    @dbus_method("sayssus", "o")
    def RegisterMachine(self, name: str, id: bytes, service: str, klass: str, leader: int,
                        root_directory: str) -> str:
        return self._register("RegisterMachine", name, id, service, klass, leader,
                              root_directory)

    @dbus_method("sayssusai", "o")
    def RegisterMachineWithNetwork(self, name: str, id: bytes, service: str, klass: str,
                                   leader: int, root_directory: str,
                                   ifindices: list[int]) -> str:
        return self._register("RegisterMachineWithNetwork", name, id, service, klass, leader,
                              root_directory, ifindices)

    @dbus_method("s")
    def UnregisterMachine(self, name: str) -> None:
        self._record("UnregisterMachine", name)
        if self.machines.pop(name, None) is None:
            raise BusError("org.freedesktop.machine1.NoSuchMachine",
                           f"No machine '{name}' known")


@dataclass
class FakeSystem:
    """Async context manager: a private system bus, with the fakes each on its own connection."""

    with_systemd: bool = True
    with_machined: bool = True
    log: list[Call] = field(default_factory=list)
    systemd: FakeSystemd = field(init=False)
    machined: FakeMachined = field(init=False)
    daemon: PrivateBus = field(default_factory=PrivateBus)
    _buses: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.systemd = FakeSystemd(self.log)
        self.machined = FakeMachined(self.log)

    @property
    def address(self) -> str:
        return self.daemon.address

    async def __aenter__(self) -> FakeSystem:
        self.daemon.start()
        try:
            if self.with_systemd:
                await self._serve(self.systemd, SYSTEMD_NAME, SYSTEMD_PATH)
            if self.with_machined:
                await self._serve(self.machined, MACHINED_NAME, MACHINED_PATH)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bus in reversed(self._buses):
            bus.close()
        self._buses.clear()
        self.daemon.stop()

    async def connect(self) -> Connection:
        """Another peer on the bus, on the running loop, closed with the rest."""
        bus = Connection.open(self.address)
        bus.attach(asyncio.get_running_loop())
        self._buses.append(bus)
        return bus

    async def restart_systemd(self) -> None:
        """As `systemctl daemon-reexec`: same units, but a new connection and unique name."""
        old = self.systemd.bus
        assert old is not None
        self._buses.remove(old)
        old.close()
        await self._serve(self.systemd, SYSTEMD_NAME, SYSTEMD_PATH)

    async def _serve(self, fake: _Fake, name: str, path: str) -> None:
        fake.bus = await self.connect()
        fake.bus.add_handler(fake.handle)
        await fake.bus.call(bus_call("RequestName", "su", [name, 0]))

    def calls(self, member: str) -> list[tuple[Any, ...]]:
        return [c.args for c in self.log if c.member == member]

    def members(self, service: str | None = None) -> list[str]:
        return [c.member for c in self.log if service in (None, c.service)]


class MessageTrace:
    """What a client connection received, in order: to check which came first."""

    def __init__(self, bus: Connection) -> None:
        self.seen: list[tuple[str, Any]] = []
        bus.trace = self._on_message

    def _on_message(self, msg: Received) -> None:
        if msg.type.name == "signal":
            self.seen.append((msg.member, list(msg.body)))
        elif msg.type.name == "method_return":
            self.seen.append(("reply", list(msg.body)))

    def index(self, kind: str, arg: object) -> int:
        """Position of the first `kind` ("reply" or a signal's member) carrying `arg`."""
        for i, (k, body) in enumerate(self.seen):
            if k == kind and arg in body:
                return i
        raise LookupError(f"no {kind} with {arg!r} in {self.seen}")
