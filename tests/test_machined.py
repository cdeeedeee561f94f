# SPDX-License-Identifier: BSD-2-Clause
"""machined.py against fake systemd and machined on a private bus (tests/fakebus.py).

No root and no real systemd: every test gets its own dbus-daemon, so what
the fakes record is exactly what machinepy sent.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from machinepy.core import sd
from machinepy.core.sd import (
    bus_label_escape,
    scope_name,
    system_bus_available,
    unit_name_escape,
    unit_path,
)
from machinepy.core.unitprops import accounting_property, parse_property
from machinepy.integrate import machined
from machinepy.integrate.dbus import PEER, Connection, bus_call, method_call
from machinepy.integrate.dbus import signal as new_signal
from machinepy.integrate.machined import (
    MachineRegistration,
    RegistrationError,
    RegistrationUnavailable,
)
from tests.fakebus import SCOPE, FakeSystem, MessageTrace, plain_properties

NAME = "deb-x"
UNIT = "machine-deb\\x2dx.scope"
UNIT_PATH = "/org/freedesktop/systemd1/unit/machine_2ddeb_5cx2dx_2escope"
LEADER = 4242
MACHINE_ID = uuid.UUID("0123456789abcdef0123456789abcdef")
QUICK = 1.5  # seconds: "promptly", with room for a loaded machine


@pytest.fixture(autouse=True)
def short_call_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lost reply or signal fails the test in seconds instead of sd-bus's 25.
    monkeypatch.setattr(machined, "CALL_TIMEOUT", 3.0)


@pytest.fixture
async def system(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeSystem]:
    async with FakeSystem() as fake:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", fake.address)
        yield fake


@pytest.fixture
async def reg(system: FakeSystem) -> AsyncIterator[MachineRegistration]:
    registration = await MachineRegistration.connect(asyncio.get_running_loop())
    yield registration
    registration.close()


async def register(reg: MachineRegistration, **kwargs: Any) -> str:
    args: dict[str, Any] = {"name": NAME, "machine_id": MACHINE_ID, "leader": LEADER,
                            "root_directory": "/srv/deb", **kwargs}
    return await reg.register(**args)


def sent_properties(system: FakeSystem) -> list[tuple[str, str, Any]]:
    ((unit, mode, props, aux),) = system.calls("StartTransientUnit")
    assert (unit, mode, aux) == (UNIT, "fail", [])
    return plain_properties(props)


def counter() -> tuple[list[None], asyncio.Event, Callable[[], None]]:
    """An on_request_stop callback, what it saw, and an event for its first call."""
    calls: list[None] = []
    called = asyncio.Event()

    def on_request_stop() -> None:
        calls.append(None)
        called.set()

    return calls, called, on_request_stop


async def round_trip(bus: Connection, peer: str) -> None:
    """A Ping to `peer` and back: whatever `bus` sent it before has been handled."""
    reply = await bus.call(method_call(peer, "/", PEER, "Ping"))
    assert reply.type.name == "method_return"


# -- names ------------------------------------------------------------------


@pytest.mark.parametrize("name, escaped", [
    # Each as `systemd-escape NAME` prints it.
    ("a-b.c", "a\\x2db.c"),
    ("deb-x", "deb\\x2dx"),
    ("foo/bar", "foo-bar"),
    (".hidden", "\\x2ehidden"),
    ("a..b", "a..b"),
    ("a b", "a\\x20b"),
    ("a\\b", "a\\x5cb"),
    ("x:y_z", "x:y_z"),
    ("ä", "\\xc3\\xa4"),
])
def test_unit_name_escape(name: str, escaped: str) -> None:
    assert unit_name_escape(name) == escaped


def test_scope_name() -> None:
    assert scope_name("deb-x") == UNIT
    assert scope_name("box") == "machine-box.scope"


@pytest.mark.parametrize("label, escaped", [
    # As sd-bus's bus_label_escape() (the unit object paths `busctl tree` shows).
    ("machine-a.scope", "machine_2da_2escope"),
    (UNIT, "machine_2ddeb_5cx2dx_2escope"),
    ("init.scope", "init_2escope"),
    ("abc123", "abc123"),
    ("1abc", "_31abc"),  # a leading digit is escaped too
    ("", "_"),
    ("ä", "_c3_a4"),
])
def test_bus_label_escape(label: str, escaped: str) -> None:
    assert bus_label_escape(label) == escaped


def test_unit_path() -> None:
    assert unit_path(UNIT) == UNIT_PATH


def test_system_bus_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent")
    assert system_bus_available()  # an explicit address is taken at its word
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    monkeypatch.setattr(sd, "SYSTEM_BUS_SOCKET", str(tmp_path / "socket"))
    assert not system_bus_available()
    (tmp_path / "socket").touch()
    assert system_bus_available()


# -- connect ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "refused", "garbage"])
async def test_connect_without_a_bus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     kind: str) -> None:
    path = tmp_path / "bus"
    with socket.socket(socket.AF_UNIX) as sock:
        if kind == "refused":
            sock.bind(str(path))  # bound, never listening: ECONNREFUSED
        address = "not an address" if kind == "garbage" else f"unix:path={path}"
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        with pytest.raises(RegistrationUnavailable, match="cannot connect to the system bus"):
            await MachineRegistration.connect(asyncio.get_running_loop())


async def list_names(bus: Connection) -> set[str]:
    reply = await bus.call(bus_call("ListNames"))
    return set(reply.body[0])


@pytest.mark.parametrize("missing", ["systemd1", "machine1"])
async def test_connect_without_systemd_or_machined(monkeypatch: pytest.MonkeyPatch,
                                                   missing: str) -> None:
    async with FakeSystem(with_systemd=missing != "systemd1",
                          with_machined=missing != "machine1") as fake:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", fake.address)
        peer = await fake.connect()
        before = await list_names(peer)
        with pytest.raises(RegistrationUnavailable,
                           match=rf"org\.freedesktop\.{missing} is not on the system bus"):
            await MachineRegistration.connect(asyncio.get_running_loop())
        # Its connection was closed again: no stray unique name left on the bus.
        deadline = time.monotonic() + QUICK
        while await list_names(peer) != before:
            assert time.monotonic() < deadline, "connection left open"
            await asyncio.sleep(0.01)


# -- register ---------------------------------------------------------------


async def test_register_sends_the_scope_then_the_machine(system: FakeSystem,
                                                         reg: MachineRegistration) -> None:
    user = [accounting_property("cpu"), parse_property("MemoryMax=64M")]
    assert await register(reg, properties=user) == UNIT
    assert reg.unit == UNIT and reg.machine == NAME
    props = sent_properties(system)
    values = {name: (sig, value) for name, sig, value in props}
    assert values["PIDs"] == ("au", [LEADER])
    assert values["Slice"] == ("s", "machine.slice")
    assert values["Delegate"] == ("b", True)
    assert values["Description"] == ("s", "Container deb-x")
    assert values["AddRef"] == ("b", True)
    assert values["Controller"] == ("s", reg.conn.unique_name)
    assert values["DevicePolicy"] == ("s", "closed")
    assert values["DeviceAllow"] == ("a(ss)", [("/dev/net/tun", "rwm"), ("char-pts", "rw")])
    assert "KillSignal" not in values and "KillMode" not in values  # only for boot
    # The user's come last, in their order: systemd applies them in turn, later wins.
    assert props[-2:] == [("CPUAccounting", "b", True), ("MemoryMax", "t", 64 << 20)]
    assert system.members() == ["Subscribe", "StartTransientUnit", "RegisterMachine"]
    assert system.calls("RegisterMachine") == [
        (NAME, MACHINE_ID.bytes, "machinepy", "container", LEADER, "/srv/deb")]
    assert system.systemd.units[UNIT].controller == reg.conn.unique_name


async def test_boot_kills_with_sigrtmin_3_and_mixed_mode(system: FakeSystem,
                                                         reg: MachineRegistration) -> None:
    await register(reg, boot=True, properties=[parse_property("KillSignal=SIGTERM")])
    props = sent_properties(system)
    assert ("KillMode", "s", "mixed") in props
    # systemd's halt signal for a container's init, then the user's, which wins.
    assert [p for p in props if p[0] == "KillSignal"] == [
        ("KillSignal", "i", int(signal.SIGRTMIN) + 3), ("KillSignal", "i", int(signal.SIGTERM))]


async def test_register_with_network(system: FakeSystem, reg: MachineRegistration) -> None:
    await register(reg, machine_id=None, ifindices=[3, 7])
    assert system.calls("RegisterMachineWithNetwork") == [
        (NAME, b"", "machinepy", "container", LEADER, "/srv/deb", [3, 7])]
    assert system.calls("RegisterMachine") == []


@pytest.mark.parametrize("when", ["before-reply", "after-reply", "later"])
async def test_job_removed_before_or_after_the_reply(system: FakeSystem,
                                                     reg: MachineRegistration,
                                                     when: str) -> None:
    system.systemd.job_removed = when  # type: ignore[assignment]
    trace = MessageTrace(reg.conn)
    assert await register(reg) == UNIT
    signal_at = trace.index("JobRemoved", UNIT)
    job = trace.seen[signal_at][1][1]
    reply_at = trace.index("reply", job)
    # The race is real: the signal does overtake the reply when sent first.
    assert (signal_at < reply_at) == (when == "before-reply")
    assert system.members("machined") == ["RegisterMachine"]


@pytest.mark.parametrize("when", ["before-reply", "later"])
async def test_someone_elses_job_is_not_ours(system: FakeSystem, reg: MachineRegistration,
                                             when: str) -> None:
    system.systemd.job_removed = when  # type: ignore[assignment]
    system.systemd.other_job_first = True  # and it failed
    assert await register(reg) == UNIT
    assert system.members("machined") == ["RegisterMachine"]


def assert_scope_cleaned_up(system: FakeSystem) -> None:
    assert system.calls("KillUnit") == [(UNIT, "all", int(signal.SIGKILL))]
    assert system.calls("UnrefUnit") == [(UNIT,)]
    assert system.systemd.units == {}


@pytest.mark.parametrize("when", ["before-reply", "later"])
async def test_failed_job(system: FakeSystem, reg: MachineRegistration, when: str) -> None:
    system.systemd.job_removed = when  # type: ignore[assignment]
    system.systemd.job_result = "failed"
    with pytest.raises(RegistrationError, match=r"^creating machine-deb\\x2dx\.scope: job failed$"):
        await register(reg)
    assert system.members("machined") == []
    assert system.systemd.units == {}
    assert reg.unit is None and reg.machine is None


async def test_job_that_never_finishes(system: FakeSystem, reg: MachineRegistration,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machined, "CALL_TIMEOUT", 0.3)
    system.systemd.job_removed = "never"
    with pytest.raises(RegistrationError, match="did not finish"):
        await register(reg)
    assert system.members("machined") == []
    assert_scope_cleaned_up(system)


async def test_register_machine_fails(system: FakeSystem, reg: MachineRegistration) -> None:
    system.machined.errors["RegisterMachine"] = ("org.freedesktop.DBus.Error.AccessDenied",
                                                 "Access denied")
    with pytest.raises(RegistrationError) as caught:
        await register(reg)
    assert str(caught.value) == "Access denied (org.freedesktop.DBus.Error.AccessDenied)"
    # Nothing left half-made: the scope went the way it came; there was no machine.
    assert_scope_cleaned_up(system)
    assert system.calls("UnregisterMachine") == []
    assert reg.unit is None and reg.machine is None


async def test_scope_already_exists(system: FakeSystem, reg: MachineRegistration) -> None:
    # Another container of that name: its scope is not ours to kill.
    await register(reg)
    other = await MachineRegistration.connect(asyncio.get_running_loop())
    try:
        with pytest.raises(RegistrationError, match=r"creating .*: Unit .* already exists"):
            await register(other, leader=LEADER + 1)
    finally:
        other.close()
    assert system.calls("KillUnit") == system.calls("UnrefUnit") == []
    assert UNIT in system.systemd.units
    assert other.unit is None


async def test_failure_next_to_start_transient_unit(system: FakeSystem,
                                                    reg: MachineRegistration) -> None:
    # Subscribe fails, but StartTransientUnit may have been sent along with it:
    # if the scope was made, it must be gone again.
    system.systemd.errors["Subscribe"] = ("org.freedesktop.DBus.Error.LimitsExceeded", "full")
    with pytest.raises(RegistrationError, match="full"):
        await register(reg)
    assert system.systemd.units == {}
    assert system.members("machined") == []
    assert reg.unit is None


# -- RequestStop ------------------------------------------------------------


async def test_request_stop_reaches_the_callback(system: FakeSystem,
                                                 reg: MachineRegistration) -> None:
    calls, called, on_request_stop = counter()
    await register(reg, on_request_stop=on_request_stop)
    assert system.systemd.units[UNIT].path == UNIT_PATH
    # One for another unit first: not ours.
    system.systemd.request_stop(UNIT, path="/org/freedesktop/systemd1/unit/other_2escope")
    system.systemd.request_stop(UNIT)
    await asyncio.wait_for(called.wait(), QUICK)
    assert len(calls) == 1


async def test_request_stop_from_anyone_else_is_ignored(system: FakeSystem,
                                                        reg: MachineRegistration) -> None:
    # Signals may be sent to any connection by any peer (the usual system bus
    # policy allows it): only systemd may stop the container.
    calls, called, on_request_stop = counter()
    await register(reg, on_request_stop=on_request_stop)
    peer = await system.connect()
    peer.send(new_signal(UNIT_PATH, SCOPE, "RequestStop", destination=reg.conn.unique_name))
    await round_trip(peer, reg.conn.unique_name)
    system.systemd.request_stop(UNIT)
    await asyncio.wait_for(called.wait(), QUICK)
    assert len(calls) == 1


async def test_request_stop_after_systemd_reexecuted(system: FakeSystem,
                                                     reg: MachineRegistration) -> None:
    calls, called, on_request_stop = counter()
    await register(reg, on_request_stop=on_request_stop)
    assert system.systemd.bus is not None
    before = system.systemd.bus.unique_name
    await system.restart_systemd()
    assert system.systemd.bus.unique_name != before
    system.systemd.request_stop(UNIT)
    await asyncio.wait_for(called.wait(), QUICK)
    assert len(calls) == 1


async def test_no_request_stop_after_unregister(system: FakeSystem, reg: MachineRegistration,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machined, "GONE_TIMEOUT", 0.05)
    calls, _, on_request_stop = counter()
    await register(reg, on_request_stop=on_request_stop)
    system.systemd.collect_after = None  # still there to be stopped
    await reg.unregister()
    system.systemd.request_stop(UNIT)
    assert system.systemd.bus is not None
    await round_trip(system.systemd.bus, reg.conn.unique_name)
    await asyncio.sleep(0.05)
    assert calls == []


# -- unregister -------------------------------------------------------------


async def test_unregister_waits_for_the_scope_to_go(system: FakeSystem,
                                                    reg: MachineRegistration) -> None:
    await register(reg)
    system.systemd.collect_after = 0.3
    start = time.monotonic()
    await reg.unregister()
    elapsed = time.monotonic() - start
    # Returned on UnitRemoved: not before it, and long before GONE_TIMEOUT.
    assert 0.25 <= elapsed < QUICK < machined.GONE_TIMEOUT
    assert system.systemd.units == {}
    assert system.calls("UnregisterMachine") == [(NAME,)]
    assert system.members("systemd")[-4:] == ["AbandonScope", "KillUnit", "UnrefUnit", "GetUnit"]
    assert_scope_cleaned_up(system)
    assert reg.unit is None and reg.machine is None


async def test_unregister_when_the_scope_is_already_gone(system: FakeSystem,
                                                         reg: MachineRegistration) -> None:
    await register(reg)
    system.systemd.units.clear()  # gone, its UnitRemoved long past
    start = time.monotonic()
    await reg.unregister()
    assert time.monotonic() - start < QUICK < machined.GONE_TIMEOUT
    assert system.calls("GetUnit") == [(UNIT,)]


async def test_unregister_gives_up_after_gone_timeout(system: FakeSystem,
                                                      reg: MachineRegistration,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machined, "GONE_TIMEOUT", 0.3)
    await register(reg)
    system.systemd.collect_after = None  # never collected, no UnitRemoved
    start = time.monotonic()
    await reg.unregister()
    assert 0.25 <= time.monotonic() - start < QUICK
    assert UNIT in system.systemd.units


async def test_unregister_never_raises(system: FakeSystem, reg: MachineRegistration) -> None:
    await register(reg)
    error = ("org.freedesktop.DBus.Error.AccessDenied", "no")
    for member in ("AbandonScope", "KillUnit", "UnrefUnit", "GetUnit"):
        system.systemd.errors[member] = error
    system.machined.errors["UnregisterMachine"] = error
    start = time.monotonic()
    await reg.unregister()
    assert time.monotonic() - start < QUICK
    assert reg.unit is None and reg.machine is None


async def test_unregister_twice(system: FakeSystem, reg: MachineRegistration) -> None:
    await reg.unregister()  # nothing registered: nothing to say
    assert system.log == []
    await register(reg)
    await reg.unregister()
    calls = len(system.log)
    await reg.unregister()
    assert len(system.log) == calls

