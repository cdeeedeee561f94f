# SPDX-License-Identifier: BSD-2-Clause
"""io.machinepy1: many containers, one asyncio loop, exported on the system bus.

The object tree is served by hand from one message handler on a
machinepy.integrate.dbus connection: every call needs its sender
(authorization), most are coroutines, and one returns a file descriptor.
Introspection (the XML written here) and Properties (with PropertiesChanged)
are answered here; Peer by the connection, for every object, as sd-bus does.

    /io/machinepy1                   io.machinepy1.Manager
    /io/machinepy1/container/NAME    io.machinepy1.Container (NAME bus-label escaped)

Each container is a Supervisor (console "service": the pty master stays here
for OpenConsole) that never dies with us, or, after a daemon restart, an
adopted leader known only by its pidfd (see daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from jeepney.low_level import Message, MessageType

from machinepy.core.options import (
    DEFAULTS,
    ContainerOptions,
    build_spec,
    options_from_bus,
    options_to_bus,
)
from machinepy.core.spec import (
    ContainerSpec,
    SpecError,
    check_machine_name,
    one_line,
    quote,
    validate,
)
from machinepy.integrate.dbus import (
    FAILED,
    BusError,
    Connection,
    Received,
    bus_call,
    close_fds_in,
    error_reply,
    marshal,
    method_return,
)
from machinepy.integrate.dbus import (
    signal as new_signal,
)
from machinepy.runtime.console import Drain
from machinepy.service.api import (
    BUS_NAME,
    CONTAINER_IFACE,
    CONTAINER_METHODS,
    CONTAINER_PROPERTIES,
    CONTAINERS_PATH,
    DBUS,
    INTROSPECTABLE,
    MANAGER_IFACE,
    MANAGER_METHODS,
    MANAGER_PATH,
    MANAGER_PROPERTIES,
    MANAGER_SIGNALS,
    METHODS,
    PROPERTIES,
    VERSION,
    Method,
    ServiceError,
    container_path,
)
from machinepy.supervise.stop import STOP_TIMEOUT
from machinepy.supervise.supervisor import Container, Supervisor, with_machine_id

log = logging.getLogger("machinepy.service.manager")

UID_TIMEOUT = 25.0  # GetConnectionUnixUser; sd-bus's default method timeout
# RequestName: its flag, and its answers.
DO_NOT_QUEUE = 4
PRIMARY_OWNER, ALREADY_OWNER = 1, 4
REQUEST_NAME_REPLIES = {1: "primary owner", 2: "in queue", 3: "exists", 4: "already owner"}


def _signature(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(sig for _, sig in pairs)


Variant = tuple[str, object]  # (signature, value), as jeepney has them

# The standard interfaces every object has, as sd-bus and dbus-fast list them.
STANDARD_INTERFACES: tuple[tuple[str, tuple[Method, ...],
                                 tuple[tuple[str, tuple[tuple[str, str], ...]], ...]], ...] = (
    (INTROSPECTABLE, (Method("Introspect", (), (("data", "s"),), False),), ()),
    ("org.freedesktop.DBus.Peer", (
        Method("GetMachineId", (), (("machine_uuid", "s"),), False),
        Method("Ping", (), (), False)), ()),
    (PROPERTIES, (
        Method("Get", (("interface_name", "s"), ("property_name", "s")), (("value", "v"),),
               False),
        Method("Set", (("interface_name", "s"), ("property_name", "s"), ("value", "v")), (),
               False),
        Method("GetAll", (("interface_name", "s"),), (("props", "a{sv}"),), False)),
     (("PropertiesChanged", (("interface_name", "s"), ("changed_properties", "a{sv}"),
                             ("invalidated_properties", "as"))),)),
)
DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
           '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')


def _interface_xml(name: str, methods: Sequence[Method],
                   signals: Sequence[tuple[str, Sequence[tuple[str, str]]]] = (),
                   props: Sequence[tuple[str, str]] = ()) -> list[str]:
    """One <interface> (names come from our own tables: nothing to escape)."""
    out = [f'  <interface name="{name}">']

    def element(kind: str, title: str, args: list[tuple[str, str, str]]) -> None:
        if not args:
            out.append(f'    <{kind} name="{title}" />')
            return
        out.append(f'    <{kind} name="{title}">')
        out.extend(f'      <arg name="{a}" direction="{d}" type="{t}" />' for a, d, t in args)
        out.append(f"    </{kind}>")

    for m in methods:
        element("method", m.name, [(a, "in", t) for a, t in m.args] +
                [(a, "out", t) for a, t in m.returns])
    for title, args in signals:
        element("signal", title, [(a, "out", t) for a, t in args])
    out.extend(f'    <property name="{n}" type="{t}" access="read" />' for n, t in props)
    out.append("  </interface>")
    return out


def introspection_xml(path: str, interfaces: Sequence[list[str]], children: Sequence[str]
                      ) -> str:
    if not interfaces and not children:
        return f'{DOCTYPE}<node name="{path}" />'
    lines = [f'{DOCTYPE}<node name="{path}">']
    for iface in interfaces:
        lines += iface
    lines += [f'  <node name="{child}" />' for child in children]
    lines.append("</node>")
    return "\n".join(lines)


_STANDARD_XML = [_interface_xml(n, m, s) for n, m, s in STANDARD_INTERFACES]
MANAGER_XML = [*_STANDARD_XML, _interface_xml(MANAGER_IFACE, MANAGER_METHODS, MANAGER_SIGNALS,
                                              MANAGER_PROPERTIES)]
CONTAINER_XML = [*_STANDARD_XML, _interface_xml(CONTAINER_IFACE, CONTAINER_METHODS,
                                                props=CONTAINER_PROPERTIES)]


# ---------------------------------------------------------------------------
# CreateContainer → the ContainerSpec the CLI would make (core.options: the table)


def spec_from_options(name: str, root_directory: str, command: Sequence[str],
                      options: Mapping[str, tuple[str, object]]) -> ContainerSpec:
    """OPTIONS: the a{sv} as (signature, value) pairs; SpecError on any bad input."""
    return spec_of(name, root_directory, command, options_from_bus(options))


def spec_of(name: str, root_directory: str, command: Sequence[str],
            options: ContainerOptions) -> ContainerSpec:
    root = root_directory or None
    if options.boot and root is None:
        raise SpecError("Boot needs a root directory")
    if any("\0" in text for text in (name, root_directory, *command)):
        raise SpecError("strings must not contain NUL bytes")
    spec = build_spec(options, name=name or None, root=root, command=command)
    return with_machine_id(validate(spec))


# ---------------------------------------------------------------------------
# Containers as the service holds them


class Control(Protocol):
    """What the service drives: a Supervisor, or an adopted container (daemon.py)."""

    container: Container

    def poweroff(self) -> None: ...
    def terminate(self) -> None: ...
    def kill(self, sig: int) -> None: ...


class Entry:
    """One container of the service."""

    def __init__(self, name: str, control: Control | None, since: int | None = None,
                 options: ContainerOptions = DEFAULTS) -> None:
        self.name = name
        self.options = options  # what it was asked for: its state file, its Options
        self.path = container_path(name)
        self.control = control
        self.container: Container | None = control.container if control else None
        self.since = since if since is not None else time.time_ns() // 1000
        self.console: Drain | None = None
        self.exit_status = -1
        self.announced = False  # ContainerNew sent
        self.sent: dict[str, Variant] = {}  # property values last announced

    @property
    def state(self) -> str:
        return self.container.state if self.container else "starting"

    def properties(self) -> dict[str, Variant]:
        c = self.container
        spec = c.spec if c else None
        mid = spec.machine_id.bytes if spec is not None and spec.machine_id else b""
        ifindices: list[int] = list(getattr(self.control, "ifindices", []) or [])
        return {
            "Name": ("s", self.name),
            "Id": ("ay", mid),
            "State": ("s", self.state),
            "Leader": ("u", c.leader if c else 0),
            "RootDirectory": ("s", (spec.root if spec else None) or "/"),
            "Command": ("as", list(spec.command) if spec else []),
            "Boot": ("b", bool(spec and spec.boot)),
            "Unit": ("s", (c.unit if c else None) or ""),
            "MachineRegistered": ("b", bool(c and c.registered)),
            "Since": ("t", self.since),
            "ExitStatus": ("i", self.exit_status),
            "NetworkInterfaces": ("ai", ifindices),
            "Options": ("a{sv}", options_to_bus(self.options, public=True)),
        }


# ---------------------------------------------------------------------------


class Hooks(NamedTuple):
    """What the daemon adds: persistence and the fd store.  All optional."""

    running: Callable[[Entry], None] = lambda e: None  # started or restarted in place
    gone: Callable[[Entry], None] = lambda e: None
    console: Callable[[Entry, int], None] = lambda e, fd: None  # new pty master
    console_gone: Callable[[Entry], None] = lambda e: None


class Service:
    def __init__(self, bus: Connection, *, hooks: Hooks | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.bus = bus
        self.loop = asyncio.get_running_loop()
        self.hooks = hooks or Hooks()
        self.stop_timeout = stop_timeout
        self.entries: dict[str, Entry] = {}
        self.by_path: dict[str, Entry] = {}
        self.tasks: set[asyncio.Future[Any]] = set()
        self._uids: dict[str, int] = {}
        self._serial = 0
        self._listed: tuple[list[tuple[str, str, int, str]], bytes] = ([], marshal("a(ssuo)", [[]]))
        bus.add_handler(self._on_message)
        bus.attach(self.loop)

    async def start(self, request_name: bool = True) -> None:
        """Watch for vanishing peers (attached consoles), then take the name."""
        await self._bus_call("AddMatch", "s", [
            f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged'"])
        if request_name:
            (reply,) = await self._bus_call("RequestName", "su", [BUS_NAME, DO_NOT_QUEUE])
            if reply not in (PRIMARY_OWNER, ALREADY_OWNER):
                raise RuntimeError(f"cannot own {BUS_NAME}: "
                                   f"{REQUEST_NAME_REPLIES.get(reply, reply)}")

    # -- containers --------------------------------------------------------------------

    def _pick_name(self) -> str:
        while True:
            self._serial += 1
            name = f"machinepy-{self._serial}"
            if name not in self.entries:
                return name

    async def create(self, name: str, root_directory: str, command: Sequence[str],
                     options: dict[str, Variant]) -> Entry:
        if name:
            try:
                check_machine_name(name)
            except SpecError as e:
                raise ServiceError("InvalidArgument", one_line(str(e))) from None
        else:
            name = self._pick_name()
        if name in self.entries:
            raise ServiceError("AlreadyExists", f"container '{name}' already exists")
        try:
            opts = options_from_bus(options)
            spec = spec_of(name, root_directory, command, opts)
        except SpecError as e:
            raise ServiceError("InvalidArgument", one_line(str(e))) from None
        entry = Entry(name, None, options=opts)
        started: asyncio.Future[None] = self.loop.create_future()

        def on_error(msg: str) -> None:
            if not started.done():
                started.set_exception(ServiceError("Failed", msg))
            else:
                log.warning("container %s: %s", name, msg)

        def on_started(c: Container) -> None:
            try:
                self._running(entry)
            except OSError as e:
                # No state file (/run full?): no restart safety.  Answer what
                # happens, which is that the container is stopped again.
                msg = f"container '{name}': saving its state: {e.strerror or e}"
                if started.done():
                    log.warning("%s", msg)  # a reboot in place: keep it running
                    return
                started.set_exception(ServiceError("Failed", msg))
                sup.terminate()
                return
            if not started.done():
                started.set_result(None)

        sup = Supervisor(spec, console="service", die_with_supervisor=False,
                         handle_signals=False, stop_timeout=self.stop_timeout,
                         on_error=on_error, on_started=on_started,
                         on_console=lambda fd: self._own_console(entry, fd))
        entry.control = sup
        entry.container = sup.container
        sup.container.on_state = lambda c: self._changed(entry)
        self._add(entry)
        task = self._watch(entry, sup.run())
        waiting: list[asyncio.Future[Any]] = [started, task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if started.done() and started.exception() is None:
            return entry
        # Failed: wait for the supervisor's clean-up, so nothing is left when we answer.
        await asyncio.wait([task])
        if started.done():
            started.result()  # the setup error
        task.result()  # the supervisor crashed: its exception
        raise ServiceError("Failed", f"container '{name}' exited during start-up")

    def adopt(self, entry: Entry, run: Awaitable[int]) -> None:
        """A running container from an earlier daemon (daemon.py)."""
        assert entry.container is not None
        entry.container.on_state = lambda c: self._changed(entry)
        self._add(entry)
        try:
            self._running(entry)
        except OSError as e:  # its state file is there already, from the last daemon
            log.warning("container %s: saving its state: %s", entry.name, e)
        self._watch(entry, run)

    def _add(self, entry: Entry) -> None:
        self.entries[entry.name] = entry
        self.by_path[entry.path] = entry

    def _watch(self, entry: Entry, run: Awaitable[int]) -> asyncio.Task[int]:
        task = asyncio.ensure_future(run)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._exited(entry, t))
        return task

    def _running(self, entry: Entry) -> None:
        # Persist first (OSError goes to the caller): nobody hears of a
        # container whose state file could not be written.
        self.hooks.running(entry)
        if not entry.announced:
            entry.announced = True
            entry.sent = entry.properties()
            self._signal(MANAGER_PATH, MANAGER_IFACE, "ContainerNew", "so",
                         [entry.name, entry.path])

    def _exited(self, entry: Entry, task: asyncio.Task[int]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            status = -1
        elif task.exception() is not None:
            log.error("container %s: supervisor failed: %r", entry.name, task.exception())
            status = -1
        else:
            status = task.result()
        entry.exit_status = status
        if entry.container is not None:
            entry.container.state = "exited"
        if entry.announced:
            self._changed(entry)
            self._signal(MANAGER_PATH, MANAGER_IFACE, "ContainerRemoved", "soi",
                         [entry.name, entry.path, status])
        self.entries.pop(entry.name, None)
        self.by_path.pop(entry.path, None)
        self.hooks.gone(entry)

    def _own_console(self, entry: Entry, master: int) -> Callable[[], None]:
        console = entry.console = Drain(self.loop, master)
        self.hooks.console(entry, master)

        def release() -> None:
            console.close()
            if entry.console is console:
                entry.console = None
                self.hooks.console_gone(entry)

        return release

    def _changed(self, entry: Entry) -> None:
        if not entry.announced:
            return
        now = entry.properties()
        changed = {k: v for k, v in now.items() if entry.sent.get(k) != v}
        entry.sent = now
        if changed:
            self._signal(entry.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                         [CONTAINER_IFACE, changed, []])
        if "Leader" in changed and entry.state == "running":
            try:
                self.hooks.running(entry)  # a reboot in place: new leader
            except OSError as e:
                log.warning("container %s: saving its state: %s", entry.name, e)

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ServiceError("NoSuchContainer", f"no container {quote(name)}")
        return entry

    @staticmethod
    def _control(entry: Entry) -> Control:
        if entry.control is None or entry.state not in ("running", "stopping"):
            raise ServiceError("NotRunning", f"container '{entry.name}' is {entry.state}")
        return entry.control

    def poweroff(self, entry: Entry) -> None:
        self._control(entry).poweroff()  # SIGKILL after the grace time (supervise.stop)

    def reboot(self, entry: Entry) -> None:
        # As machined: SIGINT to the leader; systemd reboots on it (ctrl-alt-del).
        self._control(entry).kill(signal.SIGINT)

    def terminate(self, entry: Entry) -> None:
        self._control(entry).terminate()

    def kill(self, entry: Entry, whom: str, sig: int) -> None:
        if whom not in ("leader", "all", ""):
            raise ServiceError("InvalidArgument", f"invalid whom {quote(whom)} (leader or all)")
        if not 1 <= sig < signal.NSIG:
            raise ServiceError("InvalidArgument", f"invalid signal {sig}")
        control = self._control(entry)
        if whom == "all" and entry.container is not None:
            kill_namespace(entry.container.leader, sig)
        control.kill(sig)

    def open_console(self, entry: Entry, sender: str) -> int:
        self._control(entry)
        if entry.console is None or entry.console.master < 0:
            raise ServiceError("NoConsole", f"container '{entry.name}' has no console")
        entry.console.attach(sender)
        return entry.console.master

    def _peer_gone(self, name: str) -> None:
        self._uids.pop(name, None)
        for entry in self.entries.values():
            if entry.console is not None and name in entry.console.attached:
                entry.console.detach(name)

    async def close(self) -> None:
        """Stop every container and wait for them (tests; the daemon leaves them running)."""
        for entry in list(self.entries.values()):
            if entry.control is not None:
                entry.control.terminate()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=30)
        self.bus.remove_handler(self._on_message)

    # -- D-Bus plumbing ----------------------------------------------------------------

    def _signal(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
        with contextlib.suppress(BusError):  # the bus is gone: the daemon is on its way out
            self.bus.send(new_signal(path, iface, member, sig, body))

    async def _bus_call(self, member: str, sig: str, body: list[Any]) -> list[Any]:
        return list((await self.bus.call(bus_call(member, sig, body),
                                         timeout=UID_TIMEOUT)).body)

    async def caller_uid(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is None:
            (uid,) = await self._bus_call("GetConnectionUnixUser", "s", [sender])
            self._uids[sender] = uid
        return uid

    def _ours(self, path: str) -> bool:
        return path == MANAGER_PATH or path.startswith(MANAGER_PATH + "/") or \
            MANAGER_PATH.startswith(path.rstrip("/") + "/") or path == "/"

    def _on_message(self, msg: Received) -> bool:
        # Fds that arrive with a call or a signal are closed by the connection
        # once the handlers have seen it (none of ours takes one): else any
        # peer could fill our fd table.  Peer, and whatever is not ours, the
        # connection answers.
        if msg.type == MessageType.signal:
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS and \
                    msg.signature == "sss" and not msg.body[2]:
                self._peer_gone(msg.body[0])
            return False
        if msg.type != MessageType.method_call:
            return False
        if not self._ours(msg.path or "") or msg.interface == "org.freedesktop.DBus.Peer":
            return False
        task = asyncio.ensure_future(self._dispatch(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _dispatch(self, msg: Received) -> None:
        try:
            reply = await self._handle(msg)
        except BusError as e:  # ServiceError, and the bus's own errors
            reply = error_reply(msg, e.name, str(e))
        except Exception as e:  # never let one call take the daemon down
            log.exception("%s.%s failed", msg.interface, msg.member)
            reply = error_reply(msg, FAILED, f"internal error: {type(e).__name__}: {e}")
        # Replies own their fds (dups): closed once written, whatever happens meanwhile.
        if msg.no_reply:
            close_fds_in(reply)
            return
        with contextlib.suppress(BusError):  # gone: closed with it
            self.bus.send(reply, close_fds=True)

    async def _handle(self, msg: Received) -> Message:
        path, iface, member = msg.path or "", msg.interface, msg.member or ""
        entry = self.by_path.get(path)
        exported = path == MANAGER_PATH or entry is not None
        if iface in (None, INTROSPECTABLE) and member == "Introspect" and msg.signature == "":
            return method_return(msg, "s", [self.introspect(path)])
        if not exported:
            raise ServiceError(f"{DBUS}.Error.UnknownObject", f"no object at '{path}'")
        own_iface = MANAGER_IFACE if entry is None else CONTAINER_IFACE
        if iface == PROPERTIES:
            return self._properties(msg, own_iface, entry)
        if iface is None:
            iface = own_iface
        method = METHODS.get(iface, {}).get(member) if iface == own_iface else None
        if method is None:
            raise ServiceError(f"{DBUS}.Error.UnknownMethod",
                               f"unknown method {iface}.{member} on '{path}'")
        want = _signature(method.args)
        if msg.signature != want:
            raise ServiceError(f"{DBUS}.Error.InvalidArgs",
                               f"{member} takes '{want}', got '{msg.signature}'")
        if method.privileged and await self.caller_uid(msg.sender or "") != 0:
            raise ServiceError(f"{DBUS}.Error.AccessDenied",
                               f"{member} is only for root")
        if entry is None:
            return await self._manager_call(msg, member)
        return self._container_call(msg, entry, member, list(msg.body))

    async def _manager_call(self, msg: Received, member: str) -> Message:
        args = list(msg.body)
        if member == "CreateContainer":
            entry = await self.create(*args)
            return method_return(msg, "o", [entry.path])
        if member == "ListContainers":
            rows = [(e.name, e.state, e.container.leader if e.container else 0, e.path)
                    for e in self.entries.values()]
            if rows != self._listed[0]:
                # Marshalling is jeepney's pure Python (~7 ms for 1000 rows):
                # once per change, not per call.
                self._listed = (rows, marshal("a(ssuo)", [rows]))
            return method_return(msg, "a(ssuo)", marshalled=self._listed[1])
        entry = self.get(args[0])
        if member == "GetContainer":
            return method_return(msg, "o", [entry.path])
        return self._container_call(msg, entry, member.removesuffix("Container"), args[1:])

    def _container_call(self, msg: Received, entry: Entry, member: str,
                        args: list[Any]) -> Message:
        if member == "OpenConsole":
            fd = self.open_console(entry, msg.sender or "")
            return method_return(msg, "h", [os.dup(fd)])
        if member == "Poweroff":
            self.poweroff(entry)
        elif member == "Reboot":
            self.reboot(entry)
        elif member == "Terminate":
            self.terminate(entry)
        elif member == "Kill":
            self.kill(entry, args[0], args[1])
        return method_return(msg)

    def _properties(self, msg: Received, own_iface: str, entry: Entry | None) -> Message:
        member, body = msg.member, list(msg.body)
        props = self.manager_properties() if entry is None else entry.properties()
        expected = {"Get": "ss", "GetAll": "s", "Set": "ssv"}.get(member or "")
        if expected is None:
            raise ServiceError(f"{DBUS}.Error.UnknownMethod", f"unknown method {member}")
        if msg.signature != expected:
            raise ServiceError(f"{DBUS}.Error.InvalidArgs",
                               f"{member} takes '{expected}', got '{msg.signature}'")
        if body[0] not in (own_iface, ""):
            if member == "GetAll" and body[0] in (INTROSPECTABLE, PROPERTIES,
                                                   "org.freedesktop.DBus.Peer"):
                return method_return(msg, "a{sv}", [{}])
            raise ServiceError(f"{DBUS}.Error.UnknownInterface", f"no interface '{body[0]}'")
        if member == "GetAll":
            return method_return(msg, "a{sv}", [props])
        if body[1] not in props:
            raise ServiceError(f"{DBUS}.Error.UnknownProperty", f"no property '{body[1]}'")
        if member == "Set":
            raise ServiceError(f"{DBUS}.Error.PropertyReadOnly", f"'{body[1]}' is read-only")
        return method_return(msg, "v", [props[body[1]]])

    def manager_properties(self) -> dict[str, Variant]:
        return {"Version": ("s", VERSION),
                "Containers": ("u", len(self.entries))}

    def introspect(self, path: str) -> str:
        interfaces: list[list[str]] = []
        children: list[str] = []
        if path == MANAGER_PATH:
            interfaces = MANAGER_XML
            children = ["container"] if self.entries else []
        elif path in self.by_path:
            interfaces = CONTAINER_XML
        elif path == CONTAINERS_PATH:
            children = sorted(p.rsplit("/", 1)[1] for p in self.by_path)
        elif MANAGER_PATH.startswith(path.rstrip("/") + "/"):
            rest = MANAGER_PATH[len(path.rstrip("/")) + 1:]
            children = [rest.split("/", 1)[0]]
        return introspection_xml(path, interfaces, children)


def kill_namespace(leader: int, sig: int) -> None:
    """Signal every process in the leader's pid namespace (`machinectl kill --kill-whom=all`)."""
    try:
        ns = os.readlink(f"/proc/{leader}/ns/pid")
    except OSError:
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == leader:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                os.kill(int(entry), sig)
