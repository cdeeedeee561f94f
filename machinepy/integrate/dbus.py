# SPDX-License-Identifier: BSD-2-Clause
"""machinepy's one D-Bus connection type and error: jeepney's messages over our socket.

jeepney marshals and parses; this module owns the socket.  A Connection
connects and authenticates without a loop (AUTH, NEGOTIATE_UNIX_FD, BEGIN and
Hello go out in one write, as sd-bus does; nothing waits until the first
answer is needed), offers blocking calls for whoever has no loop yet (the CLI's
verbs, a container that is not started yet), and is then watched by whichever
loop runs: machinepy's MiniLoop or asyncio's.  Replies resolve the loop's
futures; signals and method calls go to the handlers.  So the supervisor (one
code for both loops), the daemon and the CLI share it, and a registered `run`
never imports asyncio.

Every file descriptor that arrives is closed unless someone takes it: those of
signals and method calls once the handlers have seen the message, those of
replies unless the caller asked to keep them (`keep_fds`), wherever in the body
they sit (an `h` nested in a struct or a variant too).

Values are jeepney's: a struct is a tuple, an array a list (`ay`: bytes), a
dict a dict, a variant a (signature, value) tuple, an `h` the fd number.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from jeepney.auth import BEGIN, NEGOTIATE_UNIX_FD, make_auth_external
from jeepney.bus import get_connectable_addresses
from jeepney.low_level import (
    Array,
    DictEntry,
    Endianness,
    Header,
    HeaderFields,
    Message,
    MessageFlag,
    MessageType,
    Struct,
    calc_msg_size,
    padding,
    parse_signature,
)

if TYPE_CHECKING:  # a blocking client (`machinepy list`) never loads a loop
    from machinepy.runtime.loop import Cancellable, FutureLike

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PEER = "org.freedesktop.DBus.Peer"
ERROR = "org.freedesktop.DBus.Error."
NO_SERVER = ERROR + "NoServer"
DISCONNECTED = ERROR + "Disconnected"
TIMEOUT = ERROR + "Timeout"
AUTH_FAILED = ERROR + "AuthFailed"
INVALID_ARGS = ERROR + "InvalidArgs"
UNKNOWN_OBJECT = ERROR + "UnknownObject"
FAILED = ERROR + "Failed"

SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"  # sd-bus's default
CALL_TIMEOUT = 25.0  # sd-bus's default method timeout
READ_SIZE = 65536
MAX_MESSAGE = 1 << 27  # the specification's limit
# One recvmsg() gets the fds of one sendmsg() at most, and the kernel passes
# 253 (SCM_MAX_FD) at most per call.
FDS_SPACE = socket.CMSG_SPACE(253 * array.array("i").itemsize)
SIGNATURE_CACHE = 256  # parsed body signatures kept (peers choose them: bounded)

Body = tuple[object, ...]


class BusError(Exception):
    """Any D-Bus failure: an error reply, no reply in time, no bus, a lost connection.

    NAME is a D-Bus error name; str() is the one line a user reads (the text,
    or the name when there is none).
    """

    def __init__(self, name: str, text: str = "") -> None:
        super().__init__(text or name)
        self.name = name
        self.text = text

    def with_name(self) -> str:
        return f"{self.text} ({self.name})" if self.text else self.name


# ---------------------------------------------------------------------------
# What a loop must offer: asyncio's loops and machinepy's MiniLoop both do.


class EventLoop(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], object], /) -> None: ...
    def remove_reader(self, fd: int, /) -> bool: ...
    def add_writer(self, fd: int, callback: Callable[[], object], /) -> None: ...
    def remove_writer(self, fd: int, /) -> bool: ...
    def call_later(self, delay: float, callback: Callable[[], object], /) -> Cancellable: ...
    def create_future(self) -> FutureLike[Any]: ...


# ---------------------------------------------------------------------------
# Messages


class Received(Message):
    """A message as it arrived, with every fd that came along (ours to close)."""

    def __init__(self, header: Header, body: Body, fds: list[int]) -> None:
        super().__init__(header, body)
        self.fds = fds

    def _field(self, field: HeaderFields) -> str | None:
        value = self.header.fields.get(field)
        return value if isinstance(value, str) else None

    @property
    def type(self) -> MessageType:
        return self.header.message_type

    @property
    def path(self) -> str | None:
        return self._field(HeaderFields.path)

    @property
    def interface(self) -> str | None:
        return self._field(HeaderFields.interface)

    @property
    def member(self) -> str | None:
        return self._field(HeaderFields.member)

    @property
    def sender(self) -> str | None:
        return self._field(HeaderFields.sender)

    @property
    def signature(self) -> str:
        return self._field(HeaderFields.signature) or ""

    @property
    def error_name(self) -> str | None:
        return self._field(HeaderFields.error_name)

    @property
    def no_reply(self) -> bool:
        return bool(self.header.flags & MessageFlag.no_reply_expected)

    def take_fd(self, fd: object) -> int:
        """Keep FD (a value of the body): the caller closes it, not the connection."""
        if not isinstance(fd, int) or fd not in self.fds:
            raise BusError(INVALID_ARGS, "no such file descriptor in the message")
        self.fds.remove(fd)
        return fd

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def error(self) -> BusError:
        """An error reply as the exception it stands for."""
        text = self.body[0] if self.body and isinstance(self.body[0], str) else ""
        return BusError(self.error_name or FAILED, text)


def _message(kind: MessageType, fields: dict[HeaderFields, object], signature: str,
             body: Sequence[object], flags: int = 0) -> Message:
    if signature:
        fields[HeaderFields.signature] = signature
    return Message(Header(Endianness.little, kind, flags, 1, 0, 0, fields), tuple(body))


def method_call(destination: str | None, path: str, interface: str | None, member: str,
                signature: str = "", body: Sequence[object] = (), *,
                no_reply: bool = False, auto_start: bool = True) -> Message:
    fields: dict[HeaderFields, object] = {HeaderFields.path: path, HeaderFields.member: member}
    if destination is not None:
        fields[HeaderFields.destination] = destination
    if interface is not None:
        fields[HeaderFields.interface] = interface
    flags = (MessageFlag.no_reply_expected if no_reply else 0) | \
        (0 if auto_start else MessageFlag.no_auto_start)
    return _message(MessageType.method_call, fields, signature, body, flags)


def bus_call(member: str, signature: str = "", body: Sequence[object] = ()) -> Message:
    """A call to the bus itself (org.freedesktop.DBus)."""
    return method_call(DBUS_NAME, DBUS_PATH, DBUS_NAME, member, signature, body)


def signal(path: str, interface: str, member: str, signature: str = "",
           body: Sequence[object] = (), *, destination: str | None = None) -> Message:
    fields: dict[HeaderFields, object] = {HeaderFields.path: path,
                                          HeaderFields.interface: interface,
                                          HeaderFields.member: member}
    if destination is not None:
        fields[HeaderFields.destination] = destination
    return _message(MessageType.signal, fields, signature, body)


def _reply_fields(call: Message) -> dict[HeaderFields, object]:
    fields: dict[HeaderFields, object] = {HeaderFields.reply_serial: call.header.serial}
    sender = call.header.fields.get(HeaderFields.sender)
    if sender is not None:
        fields[HeaderFields.destination] = sender
    return fields


def method_return(call: Message, signature: str = "", body: Sequence[object] = (), *,
                  marshalled: bytes | None = None) -> Message:
    """The return of CALL; MARSHALLED: its body as marshal() made it, for SIGNATURE."""
    if marshalled is None:
        return _message(MessageType.method_return, _reply_fields(call), signature, body)
    fields = _reply_fields(call)
    fields[HeaderFields.signature] = signature
    return _Marshalled(Header(Endianness.little, MessageType.method_return, 0, 1, 0, 0, fields),
                       marshalled)


class _Marshalled(Message):
    """A message whose body was marshalled beforehand (see marshal())."""

    def __init__(self, header: Header, data: bytes) -> None:
        super().__init__(header, ())
        self.data = data

    def serialise(self, serial: int | None = None, fds: None = None) -> bytes:
        self.header.body_length = len(self.data)
        head = self.header.serialise(serial)
        # The body starts 8-aligned, as it was marshalled (from 0).
        return head + b"\0" * padding(len(head), 8) + self.data


def marshal(signature: str, body: Sequence[object]) -> bytes:
    """BODY marshalled once, to be sent many times (method_return(..., marshalled=))."""
    if "h" in signature:
        raise ValueError("a marshalled body cannot carry file descriptors")
    data: bytes = _body_type(signature).serialise(tuple(body), 0, Endianness.little)
    return data


def error_reply(call: Message, name: str, text: str) -> Message:
    fields = _reply_fields(call)
    fields[HeaderFields.error_name] = name
    return _message(MessageType.error, fields, "s", (text,))


_signatures: dict[str, Any] = {}


def _body_type(signature: str) -> Any:  # jeepney's parser objects have no common type
    parsed = _signatures.get(signature)
    if parsed is None:
        parsed = parse_signature(list(f"({signature})"))
        if len(_signatures) < SIGNATURE_CACHE:
            _signatures[signature] = parsed
    return parsed


def conform(signature: str, value: object) -> object:
    """VALUE of one complete type SIGNATURE, its sequences as jeepney marshals them:
    structs as tuples, arrays as lists (bytes for ay), dicts as dicts."""
    return _conform(_body_type(signature).fields[0], value)  # the body: a struct of one


def _conform(t: object, value: object) -> object:
    # (jeepney-stubs do not declare the type objects' fields and elt_type)
    if isinstance(t, Struct) and isinstance(value, (tuple, list)):
        return tuple(_conform(f, v) for f, v in zip(t.fields, value,  # type: ignore[attr-defined]
                                                     strict=True))
    if isinstance(t, Array):
        elt: object = t.elt_type  # type: ignore[attr-defined]
        if isinstance(elt, DictEntry):
            items = value.items() if isinstance(value, dict) else value
            assert isinstance(items, Iterable)
            key, val = elt.fields  # type: ignore[attr-defined]
            return {_conform(key, k): _conform(val, v) for k, v in items}
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        assert isinstance(value, Iterable)
        return [_conform(elt, v) for v in value]
    return value


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS


# ---------------------------------------------------------------------------

Handler = Callable[[Received], bool]  # True: a method call is taken (it will be answered)
Pending = Callable[[Received | BusError], None]


class Connection:
    """One bus connection; blocking until attach(loop), then driven by the loop."""

    def __init__(self, sock: socket.socket, *, fds: bool, address: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.want_fds = fds
        self.can_pass_fds = False  # the bus agreed (NEGOTIATE_UNIX_FD)
        self.unique_name = ""
        self.closed = False
        self.close_reason = ""
        self.close_name = DISCONNECTED
        self._serial = 0
        self._authenticated = False
        self._auth_lines = 2 if fds else 1  # OK, then AGREE_UNIX_FD
        self._in = bytearray()
        self._in_fds: list[int] = []
        # (data, fds to pass, whether to close those once sent)
        self._out: deque[tuple[bytes, list[int], bool]] = deque()
        self._pending: dict[int, Pending] = {}
        self._handlers: list[Handler] = []
        self._on_close: list[Callable[[], None]] = []
        self._loop: EventLoop | None = None
        self._writing = False
        # Sees every message as it arrives, replies too (debugging, tests).
        self.trace: Callable[[Received], None] | None = None

    # -- connecting -----------------------------------------------------------

    @classmethod
    def begin(cls, address: str | None = None, *, fds: bool = False) -> Connection:
        """Connect, and send the authentication and Hello; nothing waits for answers.

        ADDRESS: a D-Bus address (default: the system bus).  BusError (NoServer)
        when there is nobody to connect to.
        """
        address = address or system_bus_address()
        try:
            path = next(iter(get_connectable_addresses(address)))
        except (RuntimeError, ValueError, KeyError, StopIteration):
            raise BusError(NO_SERVER, f"unusable bus address {address!r}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)  # a listening unix socket accepts at once
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            shown = path.replace("\0", "@")
            raise BusError(NO_SERVER, f"{shown}: {e.strerror or e}") from None
        self = cls(sock, fds=fds, address=address)
        hello = bus_call("Hello")
        self._serial = 1
        self._pending[1] = self._hello
        auth = b"\0" + make_auth_external() + (NEGOTIATE_UNIX_FD if fds else b"") + BEGIN
        self._out.append((auth + hello.serialise(1), [], False))
        self._flush()
        return self

    @classmethod
    def open(cls, address: str | None = None, *, fds: bool = False,
             timeout: float = CALL_TIMEOUT) -> Connection:
        """begin(), then wait for our unique name."""
        self = cls.begin(address, fds=fds)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, timeout: float = CALL_TIMEOUT) -> None:
        """Block until the bus has answered Hello."""
        self._drive(lambda: bool(self.unique_name), time.monotonic() + timeout,
                    "the bus did not answer Hello")

    def _hello(self, reply: Received | BusError) -> None:
        if isinstance(reply, BusError):
            return  # the connection is gone; close() says why
        if reply.type == MessageType.error or not reply.body or \
                not isinstance(reply.body[0], str):
            self._lost(f"Hello: {reply.error().with_name()}")
            return
        self.unique_name = reply.body[0]

    def _auth_input(self) -> None:
        """The bus's answers to AUTH (and NEGOTIATE_UNIX_FD), one line each."""
        while self._auth_lines and b"\r\n" in self._in:
            line, _, rest = bytes(self._in).partition(b"\r\n")
            self._in[:] = rest
            self._auth_lines -= 1
            if line.startswith(b"OK "):
                continue
            if line == b"AGREE_UNIX_FD":
                self.can_pass_fds = True
                continue
            if line.startswith(b"ERROR") and self.want_fds and self._auth_lines == 0:
                continue  # no fd passing; BEGIN goes on without it
            self._lost(f"authentication refused: {line.decode(errors='replace')}",
                       AUTH_FAILED)
            return
        if len(self._in) > 8192 and self._auth_lines:
            self._lost("authentication: garbage from the bus", AUTH_FAILED)
            return
        if not self._auth_lines:
            self._authenticated = True

    # -- the loop -------------------------------------------------------------

    def attach(self, loop: EventLoop) -> None:
        """From now on LOOP reads (and, when the socket is full, writes)."""
        if self.closed:
            raise self._gone()
        self._loop = loop
        loop.add_reader(self.fd, self._read)
        self._writing = False
        self._want_write()

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not self.closed:
            loop.remove_reader(self.fd)
            if self._writing:
                loop.remove_writer(self.fd)
        self._writing = False

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def remove_handler(self, handler: Handler) -> None:
        with contextlib.suppress(ValueError):
            self._handlers.remove(handler)

    def on_close(self, callback: Callable[[], None]) -> None:
        """CALLBACK() once the connection is gone (closed by us or by the bus)."""
        if self.closed:
            callback()
        else:
            self._on_close.append(callback)

    # -- sending --------------------------------------------------------------

    def send(self, msg: Message, *, close_fds: bool = False, fds: Sequence[int] = ()) -> int:
        """Queue MSG (written at once when the socket takes it); its serial.

        CLOSE_FDS: the fds in its body are the message's, closed once sent.
        FDS: more to pass along, which the body does not name (tests do that).
        """
        if self.closed:
            if close_fds:
                close_fds_in(msg)
            raise self._gone()
        self._serial += 1
        fds = list(fds)
        # jeepney collects the body's fds into FDS (it types the argument as None).
        data = msg.serialise(self._serial, fds if self.can_pass_fds else None)  # type: ignore[arg-type]
        self._out.append((data, fds, close_fds))
        self._flush()
        return self._serial

    def _flush(self) -> None:
        while self._out and not self.closed:
            data, fds, close = self._out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = self.sock.send(data)
            except BlockingIOError:
                break
            except OSError as e:
                self._lost(f"writing: {e.strerror or e}")
                return
            if close:
                _close_all(fds)  # they went with the first byte
            if sent < len(data):
                self._out[0] = (data[sent:], [], False)
                break
            self._out.popleft()
        self._want_write()

    def _want_write(self) -> None:
        want = bool(self._out) and not self.closed
        if self._loop is None or want == self._writing:
            return
        self._writing = want
        if want:
            self._loop.add_writer(self.fd, self._flush)
        else:
            self._loop.remove_writer(self.fd)

    # -- calling --------------------------------------------------------------

    def call(self, msg: Message, *, timeout: float = CALL_TIMEOUT, keep_fds: bool = False,
             fds: Sequence[int] = ()) -> FutureLike[Received]:
        """Send a method call; a future of the loop for its return (or BusError).

        The reply's fds are closed unless KEEP_FDS (then they are the caller's).
        """
        loop = self._loop
        if self.closed:
            raise self._gone()
        if loop is None:
            raise RuntimeError("Connection.call needs attach(loop) first")
        fut: FutureLike[Received] = loop.create_future()
        serial = self.send(msg, fds=fds)
        what = _describe(msg)
        timer = loop.call_later(timeout, lambda: self._expire(serial, what))

        def resolve(reply: Received | BusError) -> None:
            timer.cancel()
            if fut.done():  # cancelled meanwhile
                if isinstance(reply, Received):
                    reply.close_fds()
                return
            outcome = _outcome(reply, keep_fds)
            if isinstance(outcome, BusError):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

        self._pending[serial] = resolve
        return fut

    def call_blocking(self, msg: Message, *, timeout: float = CALL_TIMEOUT,
                      keep_fds: bool = False, fds: Sequence[int] = ()) -> Received:
        """Send a method call and wait for its return, reading the socket ourselves;
        what else arrives meanwhile goes to the handlers."""
        got: list[Received | BusError] = []
        serial = self.send(msg, fds=fds)
        self._pending[serial] = got.append
        try:
            self._drive(lambda: bool(got), time.monotonic() + timeout, _describe(msg))
        finally:
            self._pending.pop(serial, None)
        outcome = _outcome(got[0], keep_fds)
        if isinstance(outcome, BusError):
            raise outcome
        return outcome

    def _expire(self, serial: int, what: str) -> None:
        pending = self._pending.pop(serial, None)
        if pending is not None:
            pending(BusError(TIMEOUT, f"{what} in time"))

    def _drive(self, until: Callable[[], bool], deadline: float, what: str) -> None:
        """Read (and write) until UNTIL() holds; BusError on a timeout or a lost bus."""
        poll = select.poll()
        while not until():
            if self.closed:
                raise self._gone()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(TIMEOUT, f"{what} in time")
            poll.register(self.fd, select.POLLIN | (select.POLLOUT if self._out else 0))
            events = poll.poll(max(1, int(left * 1000)))
            for _, ev in events:
                if ev & select.POLLOUT:
                    self._flush()
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read()

    # -- receiving ------------------------------------------------------------

    def _read(self) -> None:
        if self.closed:
            return
        try:
            if self.want_fds:
                data, anc, flags, _ = self.sock.recvmsg(READ_SIZE, FDS_SPACE,
                                                        socket.MSG_CMSG_CLOEXEC)
                fds = _fds_of(anc)
                if flags & socket.MSG_CTRUNC:
                    _close_all(fds)
                    self._lost("file descriptors lost in transit (MSG_CTRUNC)")
                    return
                self._in_fds += fds
            else:
                data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(f"reading: {e.strerror or e}")
            return
        if not data:
            self._lost("the bus closed the connection")
            return
        self._in += data
        if not self._authenticated:
            self._auth_input()
            if not self._authenticated:
                return
        self._messages()

    def _messages(self) -> None:
        buf = self._in
        while len(buf) >= 16 and not self.closed:
            try:
                size = calc_msg_size(bytes(buf[:16]))
            except (KeyError, ValueError):
                self._lost("not a D-Bus message")
                return
            if size > MAX_MESSAGE:
                self._lost(f"message of {size} bytes")
                return
            if len(buf) < size:
                return
            raw = bytes(buf[:size])
            del buf[:size]
            try:
                header, pos = Header.from_buffer(raw)
            except Exception:  # jeepney raises whatever its parsers hit
                self._lost("malformed message header")
                return
            count = header.fields.get(HeaderFields.unix_fds, 0)
            fds, self._in_fds = self._in_fds[:count], self._in_fds[count:]
            if len(fds) < count:
                _close_all(fds)
                self._lost("message without its file descriptors")
                return
            signature = header.fields.get(HeaderFields.signature, "")
            try:
                body: Body = _body_type(signature).parse_data(
                    raw, pos, header.endianness, fds)[0] if signature else ()
            except Exception:  # e.g. an 'h' that names no fd: the bus lets it through
                self._malformed(header, fds)
                continue
            self._dispatch(Received(header, body, fds))

    def _malformed(self, header: Header, fds: list[int]) -> None:
        _close_all(fds)
        if header.message_type == MessageType.method_call and \
                not header.flags & MessageFlag.no_reply_expected:
            call = Received(header, (), [])
            with contextlib.suppress(BusError):
                self.send(error_reply(call, INVALID_ARGS, "malformed message body"))
        elif header.message_type in (MessageType.method_return, MessageType.error):
            pending = self._pending.pop(header.fields.get(HeaderFields.reply_serial, 0), None)
            if pending is not None:
                pending(BusError(INVALID_ARGS, "malformed reply"))

    def _dispatch(self, msg: Received) -> None:
        if self.trace is not None:
            self.trace(msg)
        if msg.type in (MessageType.method_return, MessageType.error):
            pending = self._pending.pop(msg.header.fields.get(HeaderFields.reply_serial, 0),
                                        None)
            if pending is None:
                msg.close_fds()
            else:
                pending(msg)  # the reply's fds: for the caller (see _outcome)
            return
        taken = False
        for handler in list(self._handlers):
            try:
                taken = bool(handler(msg)) or taken
            except Exception as e:  # a broken handler must not take the connection down
                print(f"machinepy: D-Bus handler {handler!r} failed: {e!r}", file=sys.stderr)
        if msg.type == MessageType.method_call and not taken and not msg.no_reply:
            with contextlib.suppress(BusError):
                self.send(self._default_answer(msg))
        msg.close_fds()

    @staticmethod
    def _default_answer(msg: Received) -> Message:
        """What sd-bus answers for every object: Peer; else nobody is there."""
        if msg.interface == PEER and msg.member == "Ping" and not msg.signature:
            return method_return(msg)
        if msg.interface == PEER and msg.member == "GetMachineId" and not msg.signature:
            try:
                with open("/etc/machine-id") as f:
                    return method_return(msg, "s", (f.read().strip(),))
            except OSError as e:
                return error_reply(msg, FAILED, f"/etc/machine-id: {e.strerror}")
        return error_reply(msg, UNKNOWN_OBJECT, f"no object at '{msg.path}' for "
                                                f"{msg.interface}.{msg.member}")

    # -- closing --------------------------------------------------------------

    def _lost(self, reason: str, name: str = DISCONNECTED) -> None:
        if self.closed:
            return
        self.detach()
        self.closed = True
        self.close_reason, self.close_name = reason, name
        self.sock.close()
        _close_all(self._in_fds)
        self._in_fds = []
        for _, fds, close in self._out:
            if close:
                _close_all(fds)
        self._out.clear()
        pending, self._pending = self._pending, {}
        for callback in pending.values():
            callback(BusError(name, reason))
        watchers, self._on_close = self._on_close, []
        for watcher in watchers:
            watcher()

    def _gone(self) -> BusError:
        return BusError(self.close_name, self.close_reason or "connection closed")

    def close(self) -> None:
        """Disconnect; calls still waiting fail with Disconnected."""
        self._lost("connection closed")

    def flush(self, timeout: float = CALL_TIMEOUT) -> None:
        """Block until everything queued is written (before a close, say)."""
        with contextlib.suppress(BusError):
            self._drive(lambda: not self._out, time.monotonic() + timeout,
                        "the bus did not read")


def _outcome(reply: Received | BusError, keep_fds: bool) -> Received | BusError:
    if isinstance(reply, BusError):
        return reply
    if reply.type == MessageType.error:
        reply.close_fds()
        return reply.error()
    if not keep_fds:
        reply.close_fds()
    return reply


def _describe(msg: Message) -> str:
    """For a timeout: "DESTINATION did not answer MEMBER"."""
    fields = msg.header.fields
    return f"{fields.get(HeaderFields.destination, 'the bus')} did not answer " \
           f"{fields.get(HeaderFields.member, '?')}"


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def close_fds_in(msg: Message) -> None:
    """Close the fds in an unsent message's body (serialising collects them)."""
    fds: list[int] = []
    with contextlib.suppress(Exception):
        msg.serialise(0, fds)  # type: ignore[arg-type]
    _close_all(fds)
