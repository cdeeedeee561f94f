# SPDX-License-Identifier: BSD-2-Clause
"""Registration with systemd-machined: a scope unit for the leader, then the machine.

The order is the one systemd-nspawn uses: the leader goes into a transient
`machine-NAME.scope` in machine.slice (Delegate=yes, so the container owns its
cgroup subtree), then machined learns about it with RegisterMachine; machined
finds the unit through the leader's cgroup.  The supervisor is the scope's
Controller but stays outside it, so `machinectl terminate` reaches us as a
RequestStop signal instead of killing the supervisor along with the container.

On machinepy.integrate.dbus: the connection is begun (connected, AUTH and
Hello sent) as early as the supervisor likes, and driven by the supervisor's
loop, MiniLoop or asyncio's; whether to try at all is machinepy.core.sd's
cheap question.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from machinepy.core.sd import SIG_HALT, scope_name, unit_path
from machinepy.integrate.dbus import (
    DBUS_NAME,
    DBUS_PATH,
    BusError,
    Connection,
    EventLoop,
    Received,
    conform,
    method_call,
)
from machinepy.runtime.loop import FutureLike

if TYPE_CHECKING:
    import uuid

    from machinepy.core.unitprops import UnitProperty

SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
           "org.freedesktop.systemd1.Manager")
MACHINED = ("org.freedesktop.machine1", "/org/freedesktop/machine1",
            "org.freedesktop.machine1.Manager")
DBUS = (DBUS_NAME, DBUS_PATH, DBUS_NAME)
CALL_TIMEOUT = 25.0  # sd-bus's default method timeout
GONE_TIMEOUT = 5.0  # how long we wait for systemd to drop the stopped scope
SERVICE = "machinepy"

Call = tuple[tuple[str, str, str], str, str, Sequence[object]]


class RegistrationError(Exception):
    """Registration failed although machined is there; one line."""


class RegistrationUnavailable(Exception):
    """No system bus, no systemd or no machined: run unregistered, with a warning."""


# ---------------------------------------------------------------------------


class MachineRegistration:
    """One system bus connection, holding one machine's scope and registration."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn  # its unique name is the scope's Controller
        self.loop: EventLoop | None = None
        self.machine: str | None = None
        self.unit: str | None = None
        self.on_request_stop: Callable[[], None] | None = None
        self._jobs: dict[str, FutureLike[str]] = {}
        self._removed: dict[str, FutureLike[None]] = {}
        self._early_jobs: dict[str, str] | None = None
        self._owned: list[FutureLike[Received]] = []
        conn.add_handler(self._on_message)

    @classmethod
    def begin(cls, loop: EventLoop, address: str | None = None) -> MachineRegistration:
        """Connect, on LOOP; authentication, Hello and the questions check() needs
        answered are sent, nothing waits for them yet."""
        try:
            conn = Connection.begin(address)
        except BusError as e:
            raise RegistrationUnavailable(f"cannot connect to the system bus: {e}") from None
        self = cls(conn)
        self.loop = loop
        try:
            conn.attach(loop)
            self._owned = [self._send(DBUS, "NameHasOwner", "s", [name])
                           for name in (SYSTEMD[0], MACHINED[0])]
        except BusError as e:
            self.close()
            raise RegistrationUnavailable(f"cannot connect to the system bus: {e}") from None
        return self

    @classmethod
    async def connect(cls, loop: EventLoop) -> MachineRegistration:
        """begin() and check()."""
        self = cls.begin(loop)
        await self.check()
        return self

    async def check(self) -> None:
        """Make sure both systemd and machined are there to talk to."""
        try:
            owned = [bool((await fut).body[0]) for fut in self._owned]
            activatable: list[object] = []
            if not all(owned):  # machined is usually bus-activated
                (names,) = await self._call(DBUS, "ListActivatableNames", "", [])
                activatable = list(names) if isinstance(names, list) else []
            for name, has_owner in zip((SYSTEMD[0], MACHINED[0]), owned, strict=True):
                if not has_owner and name not in activatable:
                    raise RegistrationUnavailable(f"{name} is not on the system bus")
        except BusError as e:
            self.close()
            what = "asking" if self.conn.unique_name else "cannot connect to"
            raise RegistrationUnavailable(f"{what} the system bus: {e}") from None
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------

    async def _call(self, target: tuple[str, str, str], member: str, signature: str,
                    body: Sequence[object]) -> list[object]:
        return list((await self._send(target, member, signature, body)).body)

    def _send(self, target: tuple[str, str, str], member: str, signature: str,
              body: Sequence[object]) -> FutureLike[Received]:
        msg = method_call(target[0], target[1], target[2], member, signature, body)
        return self.conn.call(msg, timeout=CALL_TIMEOUT)

    async def _call_many(self, calls: Sequence[Call]) -> list[list[object] | BusError]:
        """Send all, then wait for all: one round trip instead of len(calls).

        A connection's messages reach the bus and each peer in the order sent,
        so later calls still see the effects of earlier ones.  Each reply, or
        the BusError it was.
        """
        futures: list[FutureLike[Received] | BusError] = []
        for target, member, signature, body in calls:
            try:
                futures.append(self._send(target, member, signature, body))
            except BusError as e:
                futures.append(e)
        out: list[list[object] | BusError] = []
        for fut in futures:
            try:
                if isinstance(fut, BusError):
                    raise fut
                out.append(list((await fut).body))
            except BusError as e:
                out.append(e)
        return out

    def _on_message(self, msg: Received) -> bool:
        if msg.interface == SYSTEMD[2] and msg.path == SYSTEMD[1]:
            if msg.member == "JobRemoved" and msg.signature == "uoss":
                _id, job, _unit, result = msg.body
                fut = self._jobs.pop(job, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
                elif self._early_jobs is not None:
                    self._early_jobs[job] = result
            elif msg.member == "UnitRemoved" and msg.signature == "so":
                fut2 = self._removed.pop(msg.body[0], None)
                if fut2 is not None and not fut2.done():
                    fut2.set_result(None)
        elif (msg.member == "RequestStop" and msg.interface == "org.freedesktop.systemd1.Scope"
              and self.unit is not None and msg.path == unit_path(self.unit)
              and self.on_request_stop is not None):
            # Any peer may send us a signal (match rules only filter broadcasts):
            # stop only when it comes from systemd, whose unique name we ask for
            # now, as it changes when systemd re-executes.
            self._check_request_stop(msg.sender)
        return False

    def _check_request_stop(self, sender: str | None) -> None:
        try:
            fut = self.conn.call(method_call(*DBUS, "GetNameOwner", "s", [SYSTEMD[0]]))
        except BusError:
            return  # closing

        def owner_known(fut: FutureLike[Received]) -> None:
            with contextlib.suppress(BusError):  # no systemd: not from systemd then
                if fut.result().body[0] == sender and self.unit is not None and \
                        self.on_request_stop is not None:
                    self.on_request_stop()

        fut.add_done_callback(owner_known)

    # -- registration -------------------------------------------------------

    async def register(self, *, name: str, machine_id: uuid.UUID | None, leader: int,
                       root_directory: str, ifindices: Sequence[int] = (),
                       properties: Sequence[UnitProperty] = (), boot: bool = False,
                       on_request_stop: Callable[[], None] | None = None) -> str:
        """Scope first, then the machine; returns the scope's name.

        On failure whatever was made is undone before RegistrationError.
        """
        unit = scope_name(name)
        self.on_request_stop = on_request_stop
        props: list[tuple[str, tuple[str, object]]] = [
            ("PIDs", ("au", [leader])),
            ("Description", ("s", f"Container {name}")),
            ("Slice", ("s", "machine.slice")),
            ("Delegate", ("b", True)),
            ("CollectMode", ("s", "inactive-or-failed")),
            ("AddRef", ("b", True)),
            ("Controller", ("s", self.conn.unique_name)),
            # As nspawn: the container may use ptys and /dev/net/tun, nothing else.
            ("DevicePolicy", ("s", "closed")),
            ("DeviceAllow", ("a(ss)", [("/dev/net/tun", "rwm"), ("char-pts", "rw")])),
        ]
        if boot:
            props += [("KillSignal", ("i", int(SIG_HALT))),
                      ("KillMode", ("s", "mixed"))]
        # User properties last: systemd applies assignments in order, later wins.
        props += [(p.name, (p.signature, conform(p.signature, p.value))) for p in properties]
        # Subscribe before asking: JobRemoved may arrive right behind the
        # reply.  Sent together, still in this order (see _call_many).
        self._early_jobs = {}
        replies = await self._call_many([
            (SYSTEMD, "Subscribe", "", []),
            (DBUS, "AddMatch", "s", [f"type='signal',sender='{SYSTEMD[0]}',"
                                     f"path='{SYSTEMD[1]}',interface='{SYSTEMD[2]}'"]),
            (DBUS, "AddMatch", "s", [f"type='signal',sender='{SYSTEMD[0]}',"
                                     f"path='{unit_path(unit)}',"
                                     "interface='org.freedesktop.systemd1.Scope',"
                                     "member='RequestStop'"]),
            (SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", props, []]),
        ])
        started = replies[-1]
        if not isinstance(started, BusError):
            # Ours even if a call sent along with it failed: undone below.
            self.unit = unit
            (job,) = started
        failed = next((r for r in replies if isinstance(r, BusError)), None)
        if failed is not None:
            self._early_jobs = None
            await self.unregister()
            raise RegistrationError(f"creating {unit}: {failed.with_name()}") from None
        try:
            result = await self._wait_job(str(job))
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
        except BusError as e:
            await self.unregister()
            raise RegistrationError(e.with_name()) from None
        except RegistrationError:
            await self.unregister()
            raise
        return unit

    async def _wait_job(self, job: str) -> str:
        early, self._early_jobs = self._early_jobs, None
        if early is not None and job in early:
            return early[job]
        assert self.loop is not None
        fut: FutureLike[str] = self.loop.create_future()
        self._jobs[job] = fut

        def expire() -> None:
            if not fut.done():
                fut.set_exception(RegistrationError(f"job {job} did not finish"))

        timer = self.loop.call_later(CALL_TIMEOUT, expire)
        try:
            return await fut
        finally:
            timer.cancel()
            self._jobs.pop(job, None)

    async def unregister(self) -> None:
        """Machine and scope gone, before we return.  Never raises."""
        calls: list[Call] = []
        if self.machine is not None:
            calls.append((MACHINED, "UnregisterMachine", "s", [self.machine]))
            self.machine = None
        unit, self.unit = self.unit, None
        gone: FutureLike[None] | None = None
        if unit is not None:
            calls += [(SYSTEMD, "AbandonScope", "s", [unit]),
                      (SYSTEMD, "KillUnit", "ssi", [unit, "all", int(signal.SIGKILL)]),
                      (SYSTEMD, "UnrefUnit", "s", [unit]),
                      (SYSTEMD, "GetUnit", "s", [unit])]
            assert self.loop is not None
            gone = self.loop.create_future()
            self._removed[unit] = gone
        # Each may fail for a good reason (machined already dropped the machine,
        # the scope is already gone): only GetUnit's answer matters.
        replies = await self._call_many(calls)
        if unit is None or gone is None:
            return
        if not isinstance(replies[-1], BusError):
            # The scope is collected once empty and unreferenced; wait for that,
            # so `systemctl list-units` is clean when machinepy exits.
            assert self.loop is not None
            def give_up() -> None:
                if not gone.done():
                    gone.set_result(None)

            timer = self.loop.call_later(GONE_TIMEOUT, give_up)
            await gone
            timer.cancel()
        self._removed.pop(unit, None)

    def close(self) -> None:
        self.conn.close()
