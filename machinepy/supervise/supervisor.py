# SPDX-License-Identifier: BSD-2-Clause
"""The event-driven supervisor of one container.

It owns every host-side resource of the container and an exit stack that
releases them on every path: normal exit, setup error, signals, and the leader
dying under it (SIGKILL, `machinectl terminate`).  The leader is watched with a
pidfd, so an idle container costs no wake-ups.  It runs on an asyncio loop,
or on machinepy.runtime.loop.MiniLoop when no D-Bus or netlink is involved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from machinepy.core import notify as notifymod
from machinepy.core import sd
from machinepy.core.spec import ContainerSpec
from machinepy.runtime import console as consolemod
from machinepy.runtime.loop import LoopLike
from machinepy.runtime.spawn import Spawned, SpawnError, child_config, spawn, write_id_maps
from machinepy.supervise.stop import STOP_TIMEOUT, StopPolicy

if TYPE_CHECKING:
    from machinepy.integrate.machined import MachineRegistration
    from machinepy.runtime.attachsock import AttachServer

# Marks a propagation dir as ours, with the supervisor that made it ("pid starttime").
PROPAGATE_OWNER_XATTR = "trusted.machinepy.owner"


def _asyncio_loop() -> LoopLike:
    import asyncio

    return asyncio.get_running_loop()


def with_machine_id(spec: ContainerSpec) -> ContainerSpec:
    """A random machine id where none was asked for (--uuid)."""
    if spec.machine_id is not None:
        return spec
    import uuid  # not on the plain `run` path: it drags in platform

    return spec.replace(machine_id=uuid.uuid4())


def warn(msg: str) -> None:
    print(f"machinepy: warning: {msg}", file=sys.stderr, flush=True)


def _process_key(pid: int) -> bytes:
    """pid plus start time: survives pid reuse."""
    from machinepy.core.peer import start_time  # not at the top: it imports socket

    return b"%d %d" % (pid, start_time(pid))


def sweep_propagate_dirs() -> None:
    """Remove propagation dirs whose supervisor was SIGKILLed and could not clean up.

    Only ours (marked with an xattr) and only empty ones; the next registration
    on the host does it, since a killed process cleans nothing.
    """
    try:
        names = os.listdir(sd.PROPAGATE_DIR)
    except OSError:
        return
    for name in names:
        path = os.path.join(sd.PROPAGATE_DIR, name)
        try:
            owner = os.getxattr(path, PROPAGATE_OWNER_XATTR)
        except OSError:
            continue  # not ours (nspawn's), or gone
        try:
            alive = _process_key(int(owner.split()[0])) == owner
        except (OSError, ValueError, IndexError):
            alive = False
        if not alive:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def exit_status(res: os.waitid_result) -> int:
    if res.si_code == os.CLD_EXITED:
        return res.si_status
    return 128 + res.si_status


class Container:
    """A container as the supervisor sees it (what the D-Bus service shows)."""

    def __init__(self, spec: ContainerSpec) -> None:
        self.spec = spec
        self.name = ""
        self.leader = 0
        self.unit: str | None = None
        self.registered = False
        self.state = "starting"
        self.status: int | None = None
        self.on_state: Callable[[Container], None] | None = None

    def set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(self)


# "service": the daemon keeps the pty master (OpenConsole), see on_console.
ConsoleMode = Literal["interactive", "passive", "pipe", "detached", "service"]


def default_console_mode(spec: ContainerSpec) -> ConsoleMode:
    """A pty when we have a terminal; a booted OS always gets one for /dev/console."""
    if consolemod.interactive():
        return "interactive"
    return "passive" if spec.boot else "pipe"


class Supervisor:
    def __init__(self, spec: ContainerSpec, *, console: ConsoleMode | None = None,
                 stop_timeout: float = STOP_TIMEOUT, die_with_supervisor: bool = True,
                 on_error: Callable[[str], None] | None = None,
                 on_started: Callable[[Container], None] | None = None,
                 on_console: Callable[[int], Callable[[], None]] | None = None,
                 handle_signals: bool = True, loop: LoopLike | None = None,
                 notify_ready: bool = False) -> None:
        if spec.machine_id is None and spec.boot:
            spec = with_machine_id(spec)  # container_uuid, and machined's id
        self.spec = spec
        self.container = Container(spec)
        self.console = console or default_console_mode(spec)
        self.die_with_supervisor = die_with_supervisor
        self.on_error = on_error or (lambda msg: print(f"machinepy: {msg}", file=sys.stderr))
        self.on_started = on_started
        self.notify_ready = notify_ready  # forward READY=1 to our own NOTIFY_SOCKET
        # Console "service": gets the pty master, returns what lets go of it.
        self.on_console = on_console
        # False in the daemon: its SIGTERM stops the daemon, never the containers.
        self.handle_signals = handle_signals
        self.child: Spawned | None = None
        # --private-users=pick with ownership "map": the user namespace whose
        # maps each run's idmapped root mount carries.
        self.idmap_userns: int | None = None
        self.restart = False
        self.relay: consolemod.Relay | None = None
        self.attach_server: AttachServer | None = None
        self.loop: LoopLike = loop if loop is not None else _asyncio_loop()
        self.stop_policy = StopPolicy(boot=spec.boot, timeout=stop_timeout, loop=self.loop)
        self.is_ready = False  # booted: READY=1 came (forwarded once); run: exec'd
        self.ifindices: list[int] = []
        # Cleans what a SIGKILL would leave (see machinepy.runtime.janitor); forked on
        # first use, so most runs have none.
        from machinepy.runtime.janitor import Janitor

        self.janitor = Janitor()

    # -- stopping (machinepy.supervise.stop) --------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop_policy.stopping

    def kill(self, sig: int) -> None:
        self.stop_policy.kill(sig)

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGINT/SIGTERM/SIGHUP to us: forwarded (run) or orderly halt (boot)."""
        self.stop_policy.forward(sig)

    def poweroff(self) -> None:
        self.stop_policy.poweroff()

    def terminate(self) -> None:
        """`machinectl terminate`: systemd stops the scope and asks us, its
        Controller, to end it; terminate means no clean shutdown."""
        self.stop_policy.terminate()

    # -- main ---------------------------------------------------------------

    async def run(self) -> int:
        try:
            status = await self._run_held()
        except BaseException:
            self.janitor.close()  # it cleans whatever we may not have
            raise
        self.janitor.close(clean=True)  # all undone by us: nothing for it to do
        return status

    async def _run_held(self) -> int:
        with contextlib.ExitStack() as hold:
            if self.spec.private_users and not self.spec.user_maps:
                from machinepy.core.spec import IdMap
                from machinepy.runtime.userns import RANGE, UsernsError, private_root

                assert self.spec.root is not None
                try:
                    base, self.idmap_userns = hold.enter_context(
                        private_root(self.spec.root, self.spec.ownership))
                except UsernsError as e:
                    self.on_error(str(e))
                    return 1
                self.spec = self.container.spec = self.spec.replace(
                    user_maps=(IdMap(0, base, RANGE),))
            return await self._run()

    async def _run(self) -> int:
        loop = self.loop
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if self.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, sig)
        try:
            while True:
                status = await self._run_once()
                if not self.restart or self.stopping:
                    return status
                self.restart = False
                self.is_ready = False
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _run_once(self) -> int:
        c = self.container
        async with contextlib.AsyncExitStack() as stack:
            pty: consolemod.Pty | None = None
            if self.console != "pipe":
                pty = consolemod.Pty()
                stack.callback(pty.close)
            notify = self._notify_socket(stack) if self.spec.boot else None
            root_tree = None
            if self.idmap_userns is not None:
                from machinepy.runtime.userns import idmapped_tree

                assert self.spec.root is not None
                try:
                    root_tree = idmapped_tree(self.spec.root, self.idmap_userns)
                except OSError as e:
                    self.on_error(f"idmapped mount of {self.spec.root}: {e.strerror}")
                    return 1
                stack.callback(os.close, root_tree)
            regs: list[MachineRegistration | None] = []
            stack.callback(self._close_registration, regs)
            try:
                cfg = child_config(
                    self.spec,
                    console=pty.slave if pty else None,
                    console_path=pty.slave_path if pty and self.spec.root else None,
                    notify=notify,
                    die_with_supervisor=self.die_with_supervisor,
                    root_tree=root_tree,
                )
                # Connecting to the bus (and importing its module) overlaps the
                # setup child's unshare and fork of PID 1.
                self.child = child = spawn(cfg, meanwhile=lambda: regs.append(
                    self._begin_registration()))
            except SpawnError as e:
                self.on_error(str(e))
                return 1
            self.stop_policy.started(child.pidfd)
            stack.callback(self._reap)
            c.leader = child.leader
            # Keep the first name across reboots of a booted container.
            c.name = c.name or self.spec.machine or f"pflask-{child.leader}"
            if pty is not None:
                pty.close_slave()
            reg = regs[0] if regs else None
            try:
                write_id_maps(child.leader, self.spec)
                await self._setup_network(stack)
                if reg is not None and not await self._check_registration(reg):
                    reg = None
                late = cfg.cgroupns and cfg.cgroup_late
                if late and reg is not None:
                    # PID 1 assembles its root while systemd makes the scope
                    # (nspawn does so before it asks); it waits at
                    # cgroup_ready() for its cgroup namespace, so nothing of
                    # the container runs before it is registered.
                    child.go(self._propagate_dir(stack), more=True)
                    await self._register(stack, reg, child)
                    await self._own_cgroup_late(stack, child)
                else:
                    propagate = None
                    if reg is not None and await self._register(stack, reg, child):
                        propagate = self._propagate_dir(stack)
                    if not late:
                        self._own_cgroup(stack)
                    # PID 1 makes its mounts meanwhile; it roots its cgroup
                    # namespace only once cgroup_ready() says where it sits.
                    child.go(propagate, more=late)
                    if late:
                        await self._own_cgroup_late(stack, child)
            except SpawnError as e:
                self.on_error(str(e))
                return 1
            if pty is not None:
                self._start_console(pty.master, stack)
            setup_error = await self._read_setup_errors(child)
            if not setup_error:
                c.set_state("running")
                if not self.spec.boot:
                    self._set_ready()
                if self.on_started is not None:
                    self.on_started(c)
            res = await self._wait_leader(child)
            self.stop_policy.gone()
            c.set_state("stopping")
            status = exit_status(res)
            if setup_error:
                self._stop_console()
                self.on_error(setup_error)
            if "pid" in self.spec.namespaces and res.si_code != os.CLD_EXITED:
                # reboot(2) in a pid namespace kills its PID 1 with SIGHUP
                # (restart) or SIGINT (power-off/halt): both are clean exits,
                # whatever the payload (`run` of an init, too).  No other
                # death by these two can reach a pid namespace's init: the
                # kernel delivers it only the signals it has handlers for.
                if res.si_status == signal.SIGHUP and not self.stopping:
                    self.restart = True
                if res.si_status in (signal.SIGINT, signal.SIGHUP):
                    status = 0
            c.status = status
        c.set_state("exited")
        return status

    def _start_console(self, master: int, stack: contextlib.AsyncExitStack) -> None:
        if self.console == "service":
            assert self.on_console is not None
            stack.callback(self.on_console(master))
            return
        if self.console == "detached":
            from machinepy.runtime.attachsock import AttachError, AttachServer

            stack.callback(self._stop_console)
            keys = [self.container.name, str(self.container.leader), str(os.getpid())]
            from machinepy.runtime import janitor

            try:
                self.attach_server = AttachServer(
                    self.loop, master, keys,
                    on_sigkill=lambda path: self.janitor.add(janitor.ATTACH, path))
            except (AttachError, OSError) as e:
                # No console to reach: the container must not run on unreachable.
                self.on_error(f"console socket: {e.strerror if isinstance(e, OSError) else e}")
                self.terminate()
            return
        self.relay = consolemod.Relay(self.loop, master, self.on_escape,
                                      interactive=self.console == "interactive")
        self.relay.start()
        stack.callback(self._stop_console)
        if self.console == "interactive":
            loop = self.loop
            loop.add_signal_handler(signal.SIGWINCH, self.relay.resize)
            stack.callback(loop.remove_signal_handler, signal.SIGWINCH)

    def _stop_console(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self.attach_server is not None:
            self.attach_server.close()
            self.attach_server = None

    # -- pieces -------------------------------------------------------------

    async def _read_setup_errors(self, child: Spawned) -> str:
        """PID 1 reports a failure before exec as a line; exec closes the pipe."""
        loop = self.loop
        fut = loop.create_future()
        data = bytearray()

        def readable() -> None:
            chunk = os.read(child.status_r, 4096)
            data.extend(chunk)
            if not chunk:
                loop.remove_reader(child.status_r)
                fut.set_result(bytes(data))

        loop.add_reader(child.status_r, readable)
        raw: bytes = await fut
        return raw.decode(errors="replace").strip().removeprefix("ERR ")

    async def _wait_leader(self, child: Spawned) -> os.waitid_result:
        loop = self.loop
        fut = loop.create_future()
        loop.add_reader(child.pidfd, fut.set_result, None)
        try:
            await fut
        finally:
            loop.remove_reader(child.pidfd)
        res = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        assert res is not None
        return res

    def _notify_socket(self, stack: contextlib.ExitStack | contextlib.AsyncExitStack) -> int:
        """Our end of the container's NOTIFY_SOCKET: READY=1 tells us it has booted."""
        import socket  # only a booted container has one

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        stack.callback(sock.close)
        loop = self.loop

        def readable() -> None:
            try:
                msg = notifymod.parse(sock.recv(4096))
            except OSError:
                return
            if msg.get("READY") == "1" and not self.is_ready:
                self._set_ready()
                if self.notify_ready:
                    notifymod.sd_notify("READY=1")

        loop.add_reader(sock.fileno(), readable)
        stack.callback(loop.remove_reader, sock.fileno())
        return sock.fileno()

    def _set_ready(self) -> None:
        self.is_ready = True

    def _reap(self) -> None:
        if self.child is not None:
            self.child.abort()
            self.child = None

    def on_escape(self) -> None:
        self.request_stop(signal.SIGTERM)

    # -- registration and network (host side, before "go") -------------------

    async def _setup_network(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.spec.netlink:
            return
        from machinepy.integrate import network

        assert self.child is not None
        try:
            links = await network.setup(self.spec, self.child.leader)
        except network.NetworkError as e:
            raise SpawnError(str(e)) from None
        stack.push_async_callback(links.teardown)
        self.ifindices = links.host_ifindices

    def _begin_registration(self) -> MachineRegistration | None:
        """Connect to the system bus, if this container is to be registered."""
        if not self.spec.register:
            return None
        if not sd.can_register():
            warn("no systemd system bus; not registering with systemd-machined")
            return None
        from machinepy.integrate import machined

        if self.spec.machine_id is None:
            self.spec = self.container.spec = with_machine_id(self.spec)
        try:
            return machined.MachineRegistration.begin(self.loop)
        except machined.RegistrationUnavailable as e:
            warn(f"not registering with systemd-machined: {e}")
            return None

    @staticmethod
    def _close_registration(regs: list[MachineRegistration | None]) -> None:
        for reg in regs:
            if reg is not None:
                reg.close()

    async def _check_registration(self, reg: MachineRegistration) -> bool:
        from machinepy.integrate import machined

        try:
            await reg.check()
        except machined.RegistrationUnavailable as e:
            warn(f"not registering with systemd-machined: {e}")
            return False
        return True

    async def _register(self, stack: contextlib.AsyncExitStack, reg: MachineRegistration,
                        child: Spawned) -> bool:
        """Scope + machined registration; False: running unregistered (a user's)."""
        from machinepy.integrate import machined

        c = self.container
        try:
            c.unit = await reg.register(
                name=c.name, machine_id=self.spec.machine_id, leader=c.leader,
                root_directory=self.spec.root or "/", ifindices=self.ifindices,
                properties=self.spec.properties, boot=self.spec.boot,
                on_request_stop=self.terminate)
        except machined.RegistrationError as e:
            if os.geteuid() != 0:
                # Without root, systemd and machined refuse unless polkit lets us:
                # a user's container runs unregistered (and without --property).
                props = " (its --property settings are not applied)" if \
                    self.spec.properties else ""
                warn(f"not registering machine '{c.name}' with systemd-machined: {e}{props}")
                return False
            child.cancel_go()  # a PID 1 already making its mounts ends there
            # It may have failed first (and gone, so no scope could take it).
            reason = await self._read_setup_errors(child)
            raise SpawnError(reason or f"registering machine '{c.name}': {e}") from None
        stack.push_async_callback(self._unregister, reg)
        c.registered = True
        return True

    def _propagate_dir(self, stack: contextlib.AsyncExitStack) -> str | None:
        """The directory `machinectl bind` mounts into (root's containers with a root)."""
        if self.spec.root is None or os.geteuid() != 0:
            return None
        sweep_propagate_dirs()
        propagate = os.path.join(sd.PROPAGATE_DIR, self.container.name)
        try:
            os.makedirs(propagate, exist_ok=True)
        except OSError as e:
            warn(f"no `machinectl bind` for this container: {propagate}: {e.strerror}")
            return None
        stack.callback(self._remove_propagate, propagate)
        # Owned by whatever outlives the other: a daemon's container outlives its
        # supervisor, and its dir must survive the daemon's stop.
        owner = os.getpid() if self.die_with_supervisor else self.container.leader
        with contextlib.suppress(OSError):
            os.setxattr(propagate, PROPAGATE_OWNER_XATTR, _process_key(owner))
        return propagate

    async def _own_cgroup_late(self, stack: contextlib.AsyncExitStack, child: Spawned) -> None:
        """_own_cgroup while PID 1 already makes its mounts, then cgroup_ready()."""
        try:
            payload = self._own_cgroup(stack)
        except SpawnError:
            # PID 1 may have failed first (and gone, so it could not be moved):
            # its reason is the one to give.
            child.cancel_go()
            reason = await self._read_setup_errors(child)
            if reason:
                raise SpawnError(reason) from None
            raise
        child.cgroup_ready()
        if payload is not None and self.die_with_supervisor:
            # After PID 1 goes on, off its path; the daemon's containers outlive
            # it, and so must their cgroups.
            from machinepy.runtime import janitor

            self.janitor.add(janitor.CGROUP, payload)

    def _own_cgroup(self, stack: contextlib.AsyncExitStack) -> str | None:
        """Registered: hand the scope to a user-namespaced root.  Unregistered:
        a cgroup of the container's own below ours, which its cgroup namespace
        (unshared after "go") is then rooted at (see machinepy.runtime.cgroup)."""
        if "cgroup" not in self.spec.namespaces:
            return None
        from machinepy.runtime import cgroup

        c = self.container
        try:
            if c.registered:
                if self.spec.user_maps:
                    cgroup.delegate(c.leader, self.spec.user_maps[0].outside)
                return None
            if self.spec.root is None:
                # On the host's root the container has the host's /sys anyway: a
                # cgroup of its own would change nothing it can reach.
                return None
            try:
                path = cgroup.make_payload(c.leader)
            except cgroup.CgroupError:
                if os.geteuid() == 0 and not self.spec.user_maps:
                    raise  # its root would see (and could kill) our whole subtree
                return None  # a user's container: its root has no more rights there than the user
            if path is not None:
                stack.callback(cgroup.remove, path)
            return path
        except cgroup.CgroupError as e:
            raise SpawnError(str(e)) from None

    async def _unregister(self, reg: MachineRegistration) -> None:
        await reg.unregister()
        self.container.registered = False

    @staticmethod
    def _remove_propagate(path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)
