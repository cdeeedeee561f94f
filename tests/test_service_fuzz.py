# SPDX-License-Identifier: BSD-2-Clause
"""io.machinepy1 under hostile input: fds attached to calls, fuzzed signatures and bodies.

The service runs as a process of its own on a private dbus-daemon (so its fd
table and RSS are its own to count), with every caller taken for uid 65534:
the policy lets anyone call, and nobody is who an attacker is.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jeepney.low_level import Array, DictEntry, Message, Struct, parse_signature, simple_types
from jeepney.low_level import Variant as VariantType

from machinepy.integrate import dbus
from machinepy.integrate.dbus import BusError, Connection, bus_call, method_call
from machinepy.service.manager import (
    BUS_NAME,
    CONTAINER_IFACE,
    CONTAINER_METHODS,
    MANAGER_IFACE,
    MANAGER_METHODS,
    MANAGER_PATH,
    container_path,
)
from tests.test_service import NOBODY, TIMEOUT, bus_address, busctl

__all__ = ["bus_address"]  # the fixture, shared

SERVICE = textwrap.dedent("""
    import asyncio, sys
    from machinepy.integrate.dbus import Connection
    from machinepy.service.manager import Service

    async def main():
        bus = Connection.open(sys.argv[1], fds=True)
        svc = Service(bus)
        async def nobody(sender):
            return 65534
        svc.caller_uid = nobody
        await svc.start()
        print("ready", flush=True)
        gone = asyncio.get_running_loop().create_future()
        bus.on_close(lambda: gone.set_result(None))
        await gone

    asyncio.run(main())
""")


def Variant(signature: str, value: Any) -> tuple[str, Any]:
    return (signature, value)


def connect(address: str) -> Connection:
    bus = Connection.open(address, fds=True)
    bus.attach(asyncio.get_running_loop())
    return bus


@pytest.fixture
def service_pid(bus_address: str, tmp_path: Path) -> Iterator[int]:
    script = tmp_path / "svc.py"
    script.write_text(SERVICE)
    proc = subprocess.Popen([sys.executable, str(script), bus_address],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc.pid
    proc.terminate()
    proc.wait(TIMEOUT)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Answer:
    """A reply, error or not (an error is what most of these calls must get)."""

    def __init__(self, kind: str, error_name: str | None, body: list[Any]) -> None:
        self.kind, self.error_name, self.body = kind, error_name, body


async def _call(bus: Connection, msg: Message, fds: Sequence[int] = ()) -> Answer:
    try:
        reply = await bus.call(msg, timeout=TIMEOUT, fds=fds)
    except BusError as e:
        assert e.name != dbus.TIMEOUT, e  # answered, not timed out here
        return Answer("error", e.name, [e.text] if e.text else [])
    return Answer("method_return", None, list(reply.body))


async def _settle(bus: Connection) -> None:
    """One round trip: the service has handled everything we sent before."""
    reply = await _call(bus, method_call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                                         "ListContainers"))
    assert reply.kind == "method_return", (reply.error_name, reply.body)


async def test_fds_sent_with_calls_and_signals_are_closed(bus_address: str,
                                                          service_pid: int) -> None:
    bus = connect(bus_address)
    r, w = os.pipe()
    try:
        await _settle(bus)
        before = fd_count(service_pid)
        for _ in range(100):  # answered: a method return
            reply = await _call(bus, method_call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                                                 "ListContainers"), fds=[r])
            assert reply.kind == "method_return"
        for path, iface, member, sig, body in (
                (MANAGER_PATH, MANAGER_IFACE, "GetContainer", "s", ["nope"]),  # an error
                (MANAGER_PATH, MANAGER_IFACE, "GetContainer", "h", [r]),  # bad signature
                (MANAGER_PATH, MANAGER_IFACE, "OpenConsole", "s", ["x"]),  # denied
                (MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping", "", []),  # the connection's
                ("/elsewhere", "x.y", "Z", "", []),  # not our object
                (MANAGER_PATH, MANAGER_IFACE, "GetContainer", "(sh)", [("x", r)]),  # nested
                (MANAGER_PATH, MANAGER_IFACE, "GetContainer", "v", [("ah", [r, r])]),
                (container_path("nope"), CONTAINER_IFACE, "Poweroff", "", [])):
            reply = await _call(bus, method_call(BUS_NAME, path, iface, member, sig, body),
                                fds=[r])
        # No reply expected, and a signal sent straight to the service.
        owner = (await _call(bus, bus_call("GetNameOwner", "s", [BUS_NAME]))).body[0]
        for _ in range(10):
            bus.send(method_call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListContainers",
                                 no_reply=True), fds=[r])
            bus.send(dbus.signal(MANAGER_PATH, MANAGER_IFACE, "Spoof", "h", [r]))
            bus.send(dbus.signal("/x", "x.y", "Sig", "a{sv}", [{"fd": ("h", r)}],
                                destination=owner))
        await _settle(bus)
        await asyncio.sleep(0.1)  # the no-reply calls are dispatched as tasks
        await _settle(bus)
        assert fd_count(service_pid) == before
    finally:
        os.close(r)
        os.close(w)
        bus.close()


def as_nobody(fn: Any) -> int:
    """Run FN() in a forked child as uid/gid 65534 (the interpreter, with jeepney,
    is under root's home, which nobody cannot read: so fork, don't exec)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            asyncio.run(fn())
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.root  # setresuid
def test_nobody_cannot_grow_the_fd_table(bus_address: str, service_pid: int) -> None:
    # The reproducer: as nobody, 100 calls of ListContainers with an fd each.
    async def client() -> None:
        assert os.getuid() == NOBODY
        bus = connect(bus_address)
        r, _ = os.pipe()
        for _ in range(100):
            reply = await _call(bus, method_call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                                                 "ListContainers"), fds=[r])
            assert reply.kind == "method_return"

    r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListContainers")
    assert r.returncode == 0, r.stderr
    before = fd_count(service_pid)
    assert as_nobody(client) == 0
    r = busctl(bus_address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListContainers")
    assert r.returncode == 0, r.stderr
    assert fd_count(service_pid) == before


# ---------------------------------------------------------------------------
# Fuzzing: random signatures and values, fds attached; an error every time.

BASIC = "ybnqiuxtdsogh"
NAMES = st.sampled_from(["a", "x", "nope", "", "Version", MANAGER_IFACE, CONTAINER_IFACE])
OBJECT_PATHS = st.sampled_from(["/", "/a", MANAGER_PATH, container_path("x"), "/a/b_c"])
SIGNATURES = st.sampled_from(["", "s", "i", "as", "a{sv}", "(ii)", "v", "h", "ay"])


def _basic(code: str, nfds: int) -> st.SearchStrategy[Any]:
    ints = {"y": (0, 255), "n": (-2**15, 2**15 - 1), "q": (0, 2**16 - 1),
            "i": (-2**31, 2**31 - 1), "u": (0, 2**32 - 1), "x": (-2**63, 2**63 - 1),
            "t": (0, 2**64 - 1)}
    if code in ints:
        lo, hi = ints[code]
        return st.integers(lo, hi)
    if code == "b":
        return st.booleans()
    if code == "d":
        return st.floats(allow_nan=False)
    if code == "s":
        return st.one_of(NAMES, st.text(st.characters(blacklist_characters="\0",
                                                      blacklist_categories=("Cs",)),
                                        max_size=40))
    if code == "o":
        return OBJECT_PATHS
    if code == "g":
        return SIGNATURES
    assert code == "h"
    return st.integers(0, nfds - 1)


def typed(nfds: int, depth: int = 3) -> st.SearchStrategy[tuple[str, Any]]:
    """(signature, value) of one complete type; 'h' only when there are fds."""
    codes = BASIC if nfds else BASIC[:-1]
    basic = st.sampled_from(codes).flatmap(
        lambda c: st.tuples(st.just(c), _basic(c, nfds)))
    if depth == 0:
        return basic
    inner = typed(nfds, depth - 1)

    def array(elem: tuple[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
        sig = elem[0]
        return _value(f"a{sig}", nfds).map(lambda v: (f"a{sig}", v))

    def struct(items: list[tuple[str, Any]]) -> tuple[str, Any]:
        return "(" + "".join(s for s, _ in items) + ")", tuple(v for _, v in items)

    def dict_(key: str, val: tuple[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
        return st.dictionaries(_basic(key, nfds), _value(val[0], nfds),
                               max_size=3).map(lambda d: (f"a{{{key}{val[0]}}}", d))

    return st.one_of(
        basic,
        inner.flatmap(array),
        st.lists(inner, min_size=1, max_size=4).map(struct),
        st.tuples(st.sampled_from("sytu"), inner).flatmap(lambda kv: dict_(*kv)),
        inner.map(lambda sv: ("v", Variant(sv[0], sv[1]))),
    )


CODES = {id(t): c for c, t in simple_types.items()}


def _value(sig: str, nfds: int) -> st.SearchStrategy[Any]:
    return _from_type(parse_signature(list(sig)), nfds)


def _from_type(t: Any, nfds: int) -> st.SearchStrategy[Any]:
    """Values of jeepney's type T: structs as tuples, 'h' as an index into the fds."""
    if isinstance(t, VariantType):
        return st.sampled_from([Variant("s", "x"), Variant("i", 1), Variant("as", ["a"])])
    if isinstance(t, Array):
        child = t.elt_type
        if isinstance(child, DictEntry):
            return st.dictionaries(_from_type(child.fields[0], nfds),
                                   _from_type(child.fields[1], nfds), max_size=3)
        if child is simple_types["y"]:
            return st.binary(max_size=16)
        return st.lists(_from_type(child, nfds), max_size=3)
    if isinstance(t, Struct):
        return st.tuples(*(_from_type(c, nfds) for c in t.fields))
    return _basic(CODES[id(t)], nfds)


MAX_FDS = 16  # dbus-daemon's max_message_unix_fds: a message with more, and it hangs up


def with_fds(sig: str, body: list[Any], fds: list[int]) -> tuple[list[Any], int]:
    """BODY with each 'h' (an index, as drawn) replaced by that fd; and how many
    fds it passes (each 'h' is one)."""
    count = 0

    def walk(t: Any, v: Any) -> Any:
        nonlocal count
        if isinstance(t, VariantType):
            return (v[0], walk(parse_signature(list(v[0])), v[1]))
        if isinstance(t, Array):
            child = t.elt_type
            if isinstance(child, DictEntry):
                return {walk(child.fields[0], k): walk(child.fields[1], x) for k, x in v.items()}
            if isinstance(v, bytes):
                return v
            return [walk(child, x) for x in v]
        if isinstance(t, Struct):
            return tuple(walk(f, x) for f, x in zip(t.fields, v, strict=True))
        if t is simple_types["h"]:
            count += 1
            return fds[v]
        return v

    return list(walk(parse_signature(list(f"({sig})")), tuple(body))), count


MEMBERS = sorted({m.name for m in (*MANAGER_METHODS, *CONTAINER_METHODS)} |
                 {"Get", "GetAll", "Set", "Introspect", "Nope"})
# What may answer with a method return (checked elsewhere): left out here.
SUCCEEDS = {("ListContainers", ""), ("Introspect", ""), ("GetAll", "s"), ("Get", "ss")}


Call = tuple[str, str | None, str, str, list[Any], int]  # path iface member sig body nfds


@st.composite
def calls(draw: st.DrawFn) -> Call:
    nfds = draw(st.integers(0, 3))
    if draw(st.booleans()):  # the right signature, random values: past the type check
        method = draw(st.sampled_from([m for m in MANAGER_METHODS if m.args]))
        body = [draw(_value(a, nfds)) for _, a in method.args]
        sig = "".join(a for _, a in method.args)
        return MANAGER_PATH, MANAGER_IFACE, method.name, sig, body, nfds
    args = draw(st.lists(typed(nfds), max_size=4))
    sig = "".join(s for s, _ in args)
    member = draw(st.sampled_from(MEMBERS))
    assume((member, sig) not in SUCCEEDS)
    path = draw(st.sampled_from([MANAGER_PATH, container_path("x"), CONTAINERS_PATH, "/"]))
    iface = draw(st.sampled_from([None, MANAGER_IFACE, CONTAINER_IFACE,
                                  "org.freedesktop.DBus.Properties", "x.y"]))
    return path, iface, member, sig, [v for _, v in args], nfds


CONTAINERS_PATH = f"{MANAGER_PATH}/container"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_fuzzed_calls_get_errors_and_cost_nothing(bus_address: str, service_pid: int,
                                                  loop: asyncio.AbstractEventLoop) -> None:
    async def connected() -> Connection:
        return connect(bus_address)

    bus = loop.run_until_complete(connected())
    pipes = [os.pipe() for _ in range(3)]
    fds = [r for r, _ in pipes]
    errors: dict[str, int] = {}

    async def one(path: str, iface: str | None, member: str, sig: str, body: list[Any],
                  nfds: int) -> None:
        real, count = with_fds(sig, body, fds)
        assume(count + nfds <= MAX_FDS)
        reply = await _call(bus, method_call(BUS_NAME, path, iface, member, sig, real),
                            fds=fds[:nfds])
        assert reply.kind == "error", (member, sig, reply.body)
        assert reply.error_name is not None
        assert reply.error_name.startswith(("io.machinepy1.Error.",
                                            "org.freedesktop.DBus.Error.")), reply.error_name
        assert reply.error_name != "org.freedesktop.DBus.Error.Failed", reply.body
        assert "\n" not in (reply.body[0] if reply.body else "")
        errors[reply.error_name] = errors.get(reply.error_name, 0) + 1

    @settings(max_examples=int(os.environ.get("MPY_FUZZ_EXAMPLES", "300")), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(calls())
    def fuzz(call: Call) -> None:
        loop.run_until_complete(one(*call))

    try:
        fuzz()  # warm-up: caches, interned strings, jeepney's parsed signatures
        loop.run_until_complete(_settle(bus))
        fds_before, rss_before = fd_count(service_pid), rss_kib(service_pid)
        fuzz()
        loop.run_until_complete(_settle(bus))
        assert fd_count(service_pid) == fds_before
        growth = rss_kib(service_pid) - rss_before
        assert growth < 2048, f"RSS grew by {growth} KiB"
        assert "org.freedesktop.DBus.Error.AccessDenied" in errors  # reached the checks
        assert "org.freedesktop.DBus.Error.InvalidArgs" in errors
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        bus.close()
