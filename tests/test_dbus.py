# SPDX-License-Identifier: BSD-2-Clause
"""machinepy.integrate.dbus on a private dbus-daemon: connecting, calls blocking and on
both loops, serving, fd passing (nested too) and that every received fd is closed.

No root: each test gets its own dbus-daemon (tests/fakebus.PrivateBus).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney.low_level import (
    Endianness,
    Header,
    HeaderFields,
    MessageType,
    padding,
    parse_signature,
)

from machinepy.integrate.dbus import (
    AUTH_FAILED,
    DISCONNECTED,
    INVALID_ARGS,
    NO_SERVER,
    PEER,
    TIMEOUT,
    UNKNOWN_OBJECT,
    BusError,
    Connection,
    Received,
    bus_call,
    conform,
    error_reply,
    marshal,
    method_call,
    method_return,
    signal,
)
from machinepy.runtime.loop import MiniLoop
from tests.fakebus import PrivateBus


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus()
    bus.start()
    yield bus
    bus.stop()


@pytest.fixture
def address(private_bus: PrivateBus) -> str:
    return private_bus.address


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Echo:
    """A served object: Echo returns its arguments, Hang never answers, Give passes fds."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.seen: list[Received] = []
        self.kept: list[int] = []
        conn.add_handler(self.handle)

    def handle(self, msg: Received) -> bool:
        self.seen.append(msg)
        if msg.path != "/echo":
            return False
        if msg.member == "Echo":
            self.conn.send(method_return(msg, msg.signature, msg.body))
        elif msg.member == "Fail":
            self.conn.send(error_reply(msg, "org.example.Error.Nope", "it failed"))
        elif msg.member == "Keep":
            self.kept.append(msg.take_fd(msg.body[0]))
            self.conn.send(method_return(msg))
        elif msg.member == "Give":
            # One pipe's read end four times over, each a dup of its own, three of them nested.
            (fd,) = msg.body
            dups = [os.dup(fd) for _ in range(4)]
            self.conn.send(method_return(msg, "h(sh)a{sv}v", (
                dups[0], ("nested", dups[1]), {"fd": ("h", dups[2])}, ("(ih)", (7, dups[3])))),
                close_fds=True)
        return True  # Hang: taken, never answered


# -- connecting ---------------------------------------------------------------


def test_open_and_blocking_calls(address: str) -> None:
    conn = Connection.open(address)
    try:
        assert conn.unique_name.startswith(":")
        (names,) = conn.call_blocking(bus_call("ListNames")).body
        assert conn.unique_name in names
        with pytest.raises(BusError) as e:
            conn.call_blocking(method_call("org.example.Nobody", "/", "org.example.X", "Y"))
        assert e.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
        assert str(e.value) and "\n" not in str(e.value)
    finally:
        conn.close()
    with pytest.raises(BusError) as e:
        conn.call_blocking(bus_call("ListNames"))
    assert e.value.name == DISCONNECTED


def test_calls_may_follow_hello_before_it_is_answered(address: str) -> None:
    conn = Connection.begin(address)  # nothing read yet
    try:
        assert conn.unique_name == ""
        (owner,) = conn.call_blocking(bus_call("NameHasOwner", "s", ["org.freedesktop.DBus"])).body
        assert owner is True
        assert conn.unique_name.startswith(":")  # Hello went first, and was answered first
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["missing", "refused", "garbage", "tcp"])
def test_no_bus_is_a_bus_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bus"
    with socket.socket(socket.AF_UNIX) as sock:
        if kind == "refused":
            sock.bind(str(path))  # bound, never listening: ECONNREFUSED
        address = {"garbage": "not an address", "tcp": "tcp:host=localhost,port=1"}.get(
            kind, f"unix:path={path}")
        with pytest.raises(BusError) as e:
            Connection.open(address)
    assert e.value.name == NO_SERVER


def test_refused_authentication(tmp_path: Path) -> None:
    path = str(tmp_path / "bus")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)
        pid = os.fork()
        if pid == 0:  # a server that takes nobody
            try:
                peer, _ = srv.accept()
                peer.recv(4096)
                peer.sendall(b"REJECTED EXTERNAL\r\n")
                time.sleep(2)
            finally:
                os._exit(0)
        try:
            with pytest.raises(BusError) as e:
                Connection.open(f"unix:path={path}", timeout=5)
            assert e.value.name == AUTH_FAILED
            assert "REJECTED" in str(e.value)
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


# -- calls on a loop -------------------------------------------------------------


def test_serving_and_calling_on_the_miniloop(address: str) -> None:
    server, client = Connection.open(address), Connection.open(address)
    Echo(server)
    loop = MiniLoop()
    server.attach(loop)
    client.attach(loop)
    dest = server.unique_name

    async def main() -> None:
        try:
            reply = await client.call(method_call(dest, "/echo", "org.example.Echo", "Echo",
                                                  "s(ia{sv})ay", ["hi", (3, {"k": ("as", ["v"])}),
                                                                  b"\0\1"]))
            assert reply.body == ("hi", (3, {"k": ("as", ["v"])}), b"\0\1")
            with pytest.raises(BusError) as e:
                await client.call(method_call(dest, "/echo", "org.example.Echo", "Fail"))
            assert (e.value.name, str(e.value)) == ("org.example.Error.Nope", "it failed")
            assert e.value.with_name() == "it failed (org.example.Error.Nope)"
            # Nobody takes it: the connection answers, as sd-bus does.
            with pytest.raises(BusError) as e:
                await client.call(method_call(dest, "/nowhere", "org.example.Echo", "Echo"))
            assert e.value.name == UNKNOWN_OBJECT
            assert (await client.call(method_call(dest, "/any", PEER, "Ping"))).body == ()
            # Far more than a socket buffer takes: written as the loop finds room.
            big = "x" * 3_000_000
            reply = await client.call(method_call(dest, "/echo", "org.example.Echo", "Echo",
                                                  "s", [big]))
            assert reply.body == (big,)
        finally:
            client.close()
            server.close()

    loop.run(main())


def test_the_same_connection_on_asyncio(address: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server, client = Connection.open(address), Connection.open(address)
        Echo(server)
        server.attach(loop)
        client.attach(loop)
        gone: asyncio.Future[str] = loop.create_future()

        def on_signal(msg: Received) -> bool:
            if msg.member == "NameOwnerChanged" and msg.body[2] == "" and not gone.done():
                gone.set_result(msg.body[0])
            return False

        client.add_handler(on_signal)
        try:
            await client.call(bus_call("AddMatch", "s", [
                "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"]))
            reply = await client.call(method_call(server.unique_name, "/echo",
                                                  "org.example.Echo", "Echo", "u", [7]))
            assert reply.body == (7,)
            name = server.unique_name
            server.close()
            assert await asyncio.wait_for(gone, 5) == name
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_no_answer_in_time(address: str) -> None:
    server, client = Connection.open(address), Connection.open(address)
    Echo(server)
    hang = method_call(server.unique_name, "/echo", "org.example.Echo", "Hang")
    t0 = time.monotonic()
    with pytest.raises(BusError) as e:
        client.call_blocking(hang, timeout=0.2)
    assert e.value.name == TIMEOUT and "did not answer Hang" in str(e.value)
    assert 0.15 < time.monotonic() - t0 < 2
    loop = MiniLoop()
    server.attach(loop)
    client.attach(loop)

    async def main() -> None:
        try:
            with pytest.raises(BusError) as e:
                await client.call(hang, timeout=0.2)
            assert e.value.name == TIMEOUT
            # The connection goes on.
            assert (await client.call(bus_call("GetId"))).body[0]
        finally:
            client.close()
            server.close()

    loop.run(main())


def test_a_lost_bus_fails_what_waits(private_bus: PrivateBus) -> None:
    server, client = Connection.open(private_bus.address), Connection.open(private_bus.address)
    Echo(server)
    closed: list[bool] = []
    client.on_close(lambda: closed.append(True))
    loop = MiniLoop()
    client.attach(loop)

    async def main() -> None:
        pending = client.call(method_call(server.unique_name, "/echo", "org.example.Echo",
                                          "Hang"))
        private_bus.stop()
        with pytest.raises(BusError) as e:
            await pending
        assert e.value.name == DISCONNECTED
        assert closed == [True] and client.closed
        server.close()

    loop.run(main())


# -- file descriptors -------------------------------------------------------------


def test_fds_pass_both_ways_nested_too(address: str) -> None:
    server = Connection.open(address, fds=True)
    client = Connection.open(address, fds=True)
    assert server.can_pass_fds and client.can_pass_fds
    Echo(server)
    loop = MiniLoop()
    server.attach(loop)
    client.attach(loop)
    r, w = os.pipe()
    give = method_call(server.unique_name, "/echo", "org.example.Echo", "Give", "h", [r])

    async def main() -> None:
        try:
            before = fd_count()
            reply = await client.call(give, keep_fds=True)
            top, (_, in_struct), props, (_, (_, in_variant)) = reply.body
            got = [top, in_struct, props["fd"][1], in_variant]
            assert sorted(got) == sorted(reply.fds) and len(set(got)) == 4
            os.write(w, b"abcd")
            assert b"".join(os.read(fd, 1) for fd in got) == b"abcd"  # all the same pipe
            reply.close_fds()
            assert fd_count() == before  # ours closed, and the server closed its dups once sent
            await client.call(give)  # without keep_fds: closed on arrival
            assert fd_count() == before
        finally:
            server.close()
            client.close()

    try:
        loop.run(main())
    finally:
        os.close(r)
        os.close(w)


def test_fds_of_calls_and_signals_are_closed_after_the_handlers(address: str) -> None:
    server = Connection.open(address, fds=True)
    client = Connection.open(address, fds=True)
    echo = Echo(server)
    loop = MiniLoop()
    server.attach(loop)
    client.attach(loop)
    r, w = os.pipe()
    dest = server.unique_name

    async def settle() -> None:
        await client.call(bus_call("GetId"))  # what we sent is at the server by now
        await client.call(method_call(dest, "/echo", "org.example.Echo", "Echo"))  # and read

    async def main() -> None:
        try:
            await settle()
            before, seen = fd_count(), len(echo.seen)
            for msg in (
                    method_call(dest, "/echo", "org.example.Echo", "Echo", "(sh)", [("x", r)]),
                    method_call(dest, "/elsewhere", "org.example.X", "Y", "a{sv}",
                                [{"fd": ("h", r)}]),  # answered by nobody
                    method_call(dest, "/echo", "org.example.Echo", "Hang", "v", [("h", r)],
                                no_reply=True)):
                client.send(msg)
            client.send(signal("/echo", "org.example.Echo", "Spoof", "ah", [[r, r]],
                               destination=dest))
            await settle()
            assert len(echo.seen) >= seen + 4
            assert fd_count() == before
            assert all(not m.fds for m in echo.seen)
            # A handler may keep one: take_fd.
            await client.call(method_call(dest, "/echo", "org.example.Echo", "Keep", "h", [r]))
            (kept,) = echo.kept
            assert is_open(kept) and fd_count() == before + 1
            os.close(kept)
        finally:
            server.close()
            client.close()

    try:
        loop.run(main())
    finally:
        os.close(r)
        os.close(w)


def _pair() -> tuple[Connection, socket.socket]:
    """A connection past authentication on one end of a socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    conn = Connection(ours, fds=True, address="test")
    conn._authenticated = conn.can_pass_fds = True
    conn.unique_name = ":1.1"
    return conn, theirs


def test_a_malformed_body_is_an_error_and_its_fds_are_closed() -> None:
    # An 'h' naming fd 1 of a message carrying one: jeepney cannot parse it.
    conn, peer = _pair()
    r, w = os.pipe()
    try:
        body = parse_signature(list("(h)")).serialise((w,), 0, Endianness.little, fds=[r, w])
        header = Header(Endianness.little, MessageType.method_call, 0, 1, len(body), 9, {
            HeaderFields.path: "/x", HeaderFields.member: "M", HeaderFields.sender: ":1.2",
            HeaderFields.signature: "h", HeaderFields.unix_fds: 1})
        raw = header.serialise()
        raw += b"\0" * padding(len(raw), 8) + body
        socket.send_fds(peer, [raw], [r])
        before = fd_count()
        conn._read()
        assert fd_count() == before  # the one that came with it: closed again
        peer.settimeout(5)
        data = peer.recv(4096)
        answer = Received(*Header.from_buffer(data)[:1], (), [])
        assert answer.type == MessageType.error and answer.error_name == INVALID_ARGS
        assert answer.header.fields[HeaderFields.reply_serial] == 9
        assert not conn.closed  # and the connection goes on
    finally:
        conn.close()
        peer.close()
        os.close(r)
        os.close(w)


def test_unsent_fds_are_closed_with_the_connection() -> None:
    conn, peer = _pair()
    peer.close()
    r, w = os.pipe()
    os.close(w)
    conn.close()
    with pytest.raises(BusError):
        conn.send(method_return(Received(Header(Endianness.little, MessageType.method_call, 0,
                                                1, 0, 1, {}), (), []), "h", [r]),
                  close_fds=True)
    assert not is_open(r)


def test_a_marshalled_body_is_the_same_message() -> None:
    call = Received(Header(Endianness.little, MessageType.method_call, 0, 1, 0, 7,
                           {HeaderFields.sender: ":1.9"}), (), [])
    rows = [("a", "running", 12, "/io/machinepy1/container/a"), ("b", "exited", 0, "/x/b")]
    plain = method_return(call, "a(ssuo)", [rows]).serialise(3)
    assert method_return(call, "a(ssuo)", marshalled=marshal("a(ssuo)", [rows])).serialise(3) \
        == plain
    with pytest.raises(ValueError):
        marshal("h", [0])


def test_conform_gives_structs_as_tuples_and_arrays_as_lists() -> None:
    # UnitProperty values are immutable (tuples all through); jeepney wants structs
    # as tuples and arrays as lists, and marshals nothing else.
    assert conform("a(ss)", (("/dev/net/tun", "rwm"), ("char-pts", "rw"))) == \
        [("/dev/net/tun", "rwm"), ("char-pts", "rw")]
    assert conform("a{sas}", (("k", ("a", "b")),)) == {"k": ["a", "b"]}
    assert conform("ay", bytearray(b"\1")) == b"\1"
    assert conform("(tat)", [1, (2, 3)]) == (1, [2, 3])
    assert conform("t", 5) == 5
