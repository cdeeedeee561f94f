# SPDX-License-Identifier: BSD-2-Clause
"""Registration with systemd-machined: a scope unit for the leader, then the machine.

The order is the one systemd-nspawn uses: the leader goes into a transient
`machine-NAME.scope` in machine.slice (Delegate=yes, so the container owns its
cgroup subtree), then machined learns about it with RegisterMachine; machined
finds the unit through the leader's cgroup.  The supervisor is the scope's
Controller but stays outside it, so `machinectl terminate` reaches us as a
RequestStop signal instead of killing the supervisor along with the container.

dbus-fast is imported when a registration actually happens; whether to try
at all is machinepy.core.sd's cheap question.
"""

from __future__ import annotations

import asyncio  # noqa: TID253  (issue 11: the registered path goes without)
import contextlib
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from machinepy.core.sd import SIG_HALT, scope_name, unit_path

if TYPE_CHECKING:
    import uuid

    from dbus_fast import Message
    from dbus_fast.aio import MessageBus

    from machinepy.core.unitprops import UnitProperty

SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
           "org.freedesktop.systemd1.Manager")
MACHINED = ("org.freedesktop.machine1", "/org/freedesktop/machine1",
            "org.freedesktop.machine1.Manager")
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
CALL_TIMEOUT = 25.0  # sd-bus's default method timeout
GONE_TIMEOUT = 5.0  # how long we wait for systemd to drop the stopped scope
SERVICE = "machinepy"


class RegistrationError(Exception):
    """Registration failed although machined is there; one line."""


class RegistrationUnavailable(Exception):
    """No system bus, no systemd or no machined: run unregistered, with a warning."""


# ---------------------------------------------------------------------------


class BusError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{message} ({name})" if message else name)
        self.name = name


class MachineRegistration:
    """One system bus connection, holding one machine's scope and registration."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.machine: str | None = None
        self.unit: str | None = None
        self.on_request_stop: Callable[[], None] | None = None
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._removed: dict[str, asyncio.Future[None]] = {}
        self._early_jobs: dict[str, str] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        bus.add_message_handler(self._on_message)

    @classmethod
    async def connect(cls) -> MachineRegistration:
        """Connect, and make sure both systemd and machined are there to talk to."""
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except Exception as e:  # OSError, AuthError, timeouts: dbus-fast has no common base
            raise RegistrationUnavailable(f"cannot connect to the system bus: {e}") from None
        self = cls(bus)
        try:
            owned = await self._call_many(
                [(DBUS, "NameHasOwner", "s", [name]) for name in (SYSTEMD[0], MACHINED[0])])
            activatable: list[str] = []
            if not all(o[0] for o in owned):  # machined is usually bus-activated
                (activatable,) = await self._call(DBUS, "ListActivatableNames", "", [])
            for name, o in zip((SYSTEMD[0], MACHINED[0]), owned, strict=True):
                if not o[0] and name not in activatable:
                    raise RegistrationUnavailable(f"{name} is not on the system bus")
        except BusError as e:
            bus.disconnect()
            raise RegistrationUnavailable(f"asking the system bus: {e}") from None
        except BaseException:
            bus.disconnect()
            raise
        return self

    # -- plumbing -----------------------------------------------------------

    async def _call(self, target: tuple[str, str, str], member: str, signature: str,
                    body: Sequence[Any], *, interface: str | None = None) -> list[Any]:
        from dbus_fast import Message, MessageType

        msg = Message(destination=target[0], path=target[1], interface=interface or target[2],
                      member=member, signature=signature, body=list(body))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await self.bus.call(msg)
        except TimeoutError:
            raise BusError("org.freedesktop.DBus.Error.Timeout",
                           f"{target[0]} did not answer {member}") from None
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise BusError(reply.error_name or "unknown error", text)
        return list(reply.body)

    async def _call_many(self, calls: Sequence[tuple[tuple[str, str, str], str, str, list[Any]]]
                         ) -> list[list[Any]]:
        """Send all, then wait for all: one round trip instead of len(calls).

        A connection's messages reach the bus and each peer in the order sent,
        so later calls still see the effects of earlier ones.  Raises the first
        error, after every reply is in.
        """
        replies = await asyncio.gather(*(self._call(*c) for c in calls), return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies  # type: ignore[return-value]

    def _on_message(self, msg: Message) -> None:
        if msg.interface == SYSTEMD[2] and msg.path == SYSTEMD[1]:
            if msg.member == "JobRemoved":
                _id, job, _unit, result = msg.body
                fut = self._jobs.pop(job, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
                elif self._early_jobs is not None:
                    self._early_jobs[job] = result
            elif msg.member == "UnitRemoved":
                fut2 = self._removed.pop(msg.body[0], None)
                if fut2 is not None and not fut2.done():
                    fut2.set_result(None)
        elif (msg.member == "RequestStop" and msg.interface == "org.freedesktop.systemd1.Scope"
              and self.unit is not None and msg.path == unit_path(self.unit)
              and self.on_request_stop is not None):
            # Any peer may send us a signal (match rules only filter broadcasts):
            # stop only when it comes from systemd, whose unique name we ask for
            # now, as it changes when systemd re-executes.
            task = asyncio.get_running_loop().create_task(self._request_stop(msg.sender))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _request_stop(self, sender: str | None) -> None:
        with contextlib.suppress(Exception):  # closing, or no systemd: not from systemd then
            (owner,) = await self._call(DBUS, "GetNameOwner", "s", [SYSTEMD[0]])
            if owner == sender and self.unit is not None and self.on_request_stop is not None:
                self.on_request_stop()

    # -- registration -------------------------------------------------------

    async def register(self, *, name: str, machine_id: uuid.UUID | None, leader: int,
                       root_directory: str, ifindices: Sequence[int] = (),
                       properties: Sequence[UnitProperty] = (), boot: bool = False,
                       on_request_stop: Callable[[], None] | None = None) -> str:
        """Scope first, then the machine; returns the scope's name.

        On failure whatever was made is undone before RegistrationError.
        """
        from dbus_fast import Variant

        unit = scope_name(name)
        self.on_request_stop = on_request_stop
        props: list[tuple[str, Variant]] = [
            ("PIDs", Variant("au", [leader])),
            ("Description", Variant("s", f"Container {name}")),
            ("Slice", Variant("s", "machine.slice")),
            ("Delegate", Variant("b", True)),
            ("CollectMode", Variant("s", "inactive-or-failed")),
            ("AddRef", Variant("b", True)),
            ("Controller", Variant("s", self.bus.unique_name)),
            # As nspawn: the container may use ptys and /dev/net/tun, nothing else.
            ("DevicePolicy", Variant("s", "closed")),
            ("DeviceAllow", Variant("a(ss)", [["/dev/net/tun", "rwm"], ["char-pts", "rw"]])),
        ]
        if boot:
            props += [("KillSignal", Variant("i", int(SIG_HALT))),
                      ("KillMode", Variant("s", "mixed"))]
        # User properties last: systemd applies assignments in order, later wins.
        props += [(p.name, Variant(p.signature, _plain(p.value))) for p in properties]
        try:
            # Subscribe before asking: JobRemoved may arrive right behind the
            # reply.  Sent together, still in this order (see _call_many).
            self._early_jobs = {}
            calls: list[tuple[tuple[str, str, str], str, str, list[Any]]] = [
                (SYSTEMD, "Subscribe", "", []),
                (DBUS, "AddMatch", "s", [f"type='signal',sender='{SYSTEMD[0]}',"
                                         f"path='{SYSTEMD[1]}',interface='{SYSTEMD[2]}'"]),
                (DBUS, "AddMatch", "s", [f"type='signal',sender='{SYSTEMD[0]}',"
                                         f"path='{unit_path(unit)}',"
                                         "interface='org.freedesktop.systemd1.Scope',"
                                         "member='RequestStop'"]),
                (SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", props, []]),
            ]
            replies = await asyncio.gather(*(self._call(*c) for c in calls),
                                           return_exceptions=True)
            if not isinstance(replies[-1], BaseException):
                # Ours even if a call sent along with it failed: undone below.
                self.unit = unit
                (job,) = replies[-1]
            for r in replies:
                if isinstance(r, BaseException):
                    raise r
        except BusError as e:
            self._early_jobs = None
            await self.unregister()
            raise RegistrationError(f"creating {unit}: {e}") from None
        try:
            result = await self._wait_job(job)
            if result != "done":
                raise RegistrationError(f"creating {unit}: job {result}")
            machine_id_bytes = machine_id.bytes if machine_id is not None else b""
            if ifindices:
                await self._call(MACHINED, "RegisterMachineWithNetwork", "sayssusai",
                                 [name, machine_id_bytes, SERVICE, "container", leader,
                                  root_directory, list(ifindices)])
            else:
                await self._call(MACHINED, "RegisterMachine", "sayssus",
                                 [name, machine_id_bytes, SERVICE, "container", leader,
                                  root_directory])
            self.machine = name
        except (BusError, RegistrationError) as e:
            await self.unregister()
            raise RegistrationError(str(e)) from None
        return unit

    async def _wait_job(self, job: str) -> str:
        early, self._early_jobs = self._early_jobs, None
        if early is not None and job in early:
            return early[job]
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._jobs[job] = fut
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await fut
        except TimeoutError:
            raise RegistrationError(f"job {job} did not finish") from None
        finally:
            self._jobs.pop(job, None)

    async def unregister(self) -> None:
        """Machine and scope gone, before we return.  Never raises."""
        calls: list[tuple[tuple[str, str, str], str, str, list[Any]]] = []
        if self.machine is not None:
            calls.append((MACHINED, "UnregisterMachine", "s", [self.machine]))
            self.machine = None
        unit, self.unit = self.unit, None
        if unit is not None:
            calls += [(SYSTEMD, "AbandonScope", "s", [unit]),
                      (SYSTEMD, "KillUnit", "ssi", [unit, "all", int(signal.SIGKILL)]),
                      (SYSTEMD, "UnrefUnit", "s", [unit]),
                      (SYSTEMD, "GetUnit", "s", [unit])]
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._removed[unit] = gone
        # Each may fail for a good reason (machined already dropped the machine,
        # the scope is already gone): only GetUnit's answer matters.
        replies = await asyncio.gather(*(self._call(*c) for c in calls), return_exceptions=True)
        if unit is None:
            return
        if not isinstance(replies[-1], BaseException):
            # The scope is collected once empty and unreferenced; wait for that,
            # so `systemctl list-units` is clean when machinepy exits.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GONE_TIMEOUT):
                    await gone
        self._removed.pop(unit, None)

    async def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def _plain(value: object) -> object:
    """Tuples (immutable in UnitProperty) as the lists dbus-fast marshals."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
