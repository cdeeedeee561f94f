# SPDX-License-Identifier: BSD-2-Clause
"""The asyncio supervisor of one container.

It owns every host-side resource of the container and an exit stack that
releases them on every path: normal exit, setup error, signals, and the leader
dying under it (SIGKILL, `machinectl terminate`).  The leader is watched with a
pidfd, so an idle container costs no wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from machinepy import console as consolemod
from machinepy.spawn import Spawned, SpawnError, child_config, spawn, write_id_maps
from machinepy.spec import ContainerSpec

PROPAGATE_DIR = "/run/systemd/nspawn/propagate"
STOP_TIMEOUT = 30.0  # seconds between an orderly poweroff request and SIGKILL

# systemd's requests: poweroff, reboot, halt (sent to PID 1 of a booted container)
SIGRTMIN = signal.SIGRTMIN
SIG_POWEROFF = SIGRTMIN + 4
SIG_HALT = SIGRTMIN + 3


def warn(msg: str) -> None:
    print(f"machinepy: warning: {msg}", file=sys.stderr, flush=True)


def exit_status(res: os.waitid_result) -> int:
    if res.si_code == os.CLD_EXITED:
        return res.si_status
    return 128 + res.si_status


@dataclass
class Container:
    """A container as the supervisor sees it."""

    spec: ContainerSpec
    name: str = ""
    leader: int = 0
    unit: str | None = None
    registered: bool = False
    state: str = "starting"
    status: int | None = None
    on_state: Callable[[Container], None] | None = field(default=None, repr=False)

    def set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(self)


class Supervisor:
    def __init__(self, spec: ContainerSpec, *, interactive: bool | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.spec = spec
        self.container = Container(spec)
        self.interactive = consolemod.interactive() if interactive is None else interactive
        self.stop_timeout = stop_timeout
        self.child: Spawned | None = None
        self.exited = asyncio.Event()
        self.stopping = False
        self.restart = False
        self.relay: consolemod.Relay | None = None
        self.registration: object | None = None

    # -- signals ----------------------------------------------------------

    def _signal(self, leader: int, sig: int) -> None:
        try:
            assert self.child is not None
            signal.pidfd_send_signal(self.child.pidfd, sig)
        except (OSError, AssertionError):
            pass

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGINT/SIGTERM/SIGHUP to us: forwarded (run) or orderly poweroff (boot)."""
        if self.child is None:
            return
        if self.stopping:  # second request: no more patience
            self._signal(self.child.leader, signal.SIGKILL)
            return
        self.stopping = True
        if self.spec.boot:
            self._signal(self.child.leader, SIG_HALT if sig == SIG_HALT else SIG_POWEROFF)
            asyncio.get_running_loop().call_later(
                self.stop_timeout, self._signal, self.child.leader, signal.SIGKILL)
        else:
            self.stopping = sig != signal.SIGHUP and sig != signal.SIGINT
            self._signal(self.child.leader, sig)

    # -- main ---------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_stop, sig)
        try:
            while True:
                status = await self._run_once()
                if not self.restart or self.stopping:
                    return status
                self.restart = False
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _run_once(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            pty: consolemod.Pty | None = None
            if self.interactive:
                pty = consolemod.Pty()
                stack.callback(pty.close)
            cfg = child_config(
                self.spec,
                console=pty.slave if pty else None,
                console_path=pty.slave_path if pty and self.spec.root else None,
            )
            try:
                self.child = child = spawn(cfg)
            except SpawnError as e:
                print(f"machinepy: {e}", file=sys.stderr)
                return 1
            stack.callback(self._reap)
            c = self.container
            c.leader = child.leader
            c.name = self.spec.machine or f"pflask-{child.leader}"
            if pty is not None:
                pty.close_slave()
            try:
                write_id_maps(child.leader, self.spec)
                await self._setup_network(stack)
                propagate = await self._register(stack)
            except SpawnError as e:
                print(f"machinepy: {e}", file=sys.stderr)
                child.abort()
                return 1
            child.go(propagate)
            if pty is not None:
                self.relay = consolemod.Relay(pty.master, self.on_escape)
                self.relay.start()
                stack.callback(self._stop_relay)
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGWINCH, self.relay.resize)
                stack.callback(loop.remove_signal_handler, signal.SIGWINCH)
            setup_error = await self._read_setup_errors(child)
            c.set_state("running")
            res = await self._wait_leader(child)
            c.set_state("stopping")
            status = exit_status(res)
            if setup_error:
                self._stop_relay()
                print(f"machinepy: {setup_error}", file=sys.stderr)
            if self.spec.boot and res.si_code != os.CLD_EXITED:
                if res.si_status == signal.SIGHUP and not self.stopping:
                    self.restart = True  # reboot(2) in the container's pid namespace
                if res.si_status in (signal.SIGINT, signal.SIGHUP):
                    status = 0
            c.status = status
        c.set_state("exited")
        return status

    # -- pieces -------------------------------------------------------------

    async def _read_setup_errors(self, child: Spawned) -> str:
        """PID 1 reports a failure before exec as a line; exec closes the pipe."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        data = bytearray()

        def readable() -> None:
            chunk = os.read(child.status_r, 4096)
            data.extend(chunk)
            if not chunk:
                loop.remove_reader(child.status_r)
                fut.set_result(bytes(data))

        loop.add_reader(child.status_r, readable)
        raw = await fut
        return raw.decode(errors="replace").strip().removeprefix("ERR ")

    async def _wait_leader(self, child: Spawned) -> os.waitid_result:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(child.pidfd, fut.set_result, None)
        try:
            await fut
        finally:
            loop.remove_reader(child.pidfd)
        res = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        assert res is not None
        return res

    def _reap(self) -> None:
        if self.child is not None:
            self.child.abort()
            self.child = None

    def _stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def on_escape(self) -> None:
        self.request_stop(signal.SIGTERM)

    # -- registration and network (host side, before "go") -------------------

    async def _setup_network(self, stack: contextlib.AsyncExitStack) -> None:
        return None

    async def _register(self, stack: contextlib.AsyncExitStack) -> str | None:
        return None
