# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy daemon`: the io.machinepy1 service process.

Restart safety: each running container has a state file under the state
directory (/run/machinepy), and its console's pty master sits in systemd's file
descriptor store.  Stopping the daemon leaves the containers alone (they never
die with their supervisor, and live in their own scopes); the next daemon
adopts every survivor by a pidfd on its leader and takes its console back from
the store.

The console fds are stored with FDPOLL=0: a pty master sees POLLHUP each time
the container's systemd vhangup()s /dev/console, and systemd drops a polled fd
at the first one.  A stop empties the store unless systemd has
FileDescriptorStorePreserve= (254; the unit sets it, install-units drops it on
older ones).

Where systemd predates Preserve, the consoles go to a holder process too
(holder.py, which says why one for all and not one per container).  Exit status
needs no holder: an adopted leader's comes from its pidfd (PIDFD_INFO_EXIT) once
its parent, systemd, reaps it; a leader that ends while no daemon runs is not
watched by anyone, and its status is lost (its pidfd could go to the store or
the holder too).

No threads, ever: Supervisor.spawn() forks, and refuses in a threaded process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from machinepy.core import sd
from machinepy.core.options import DEFAULTS, build_spec, options_from_bus, options_to_bus
from machinepy.core.peer import start_time
from machinepy.runtime.console import Drain
from machinepy.service.manager import Entry, Hooks, Service
from machinepy.supervise.stop import STOP_TIMEOUT, StopPolicy
from machinepy.supervise.supervisor import PROPAGATE_OWNER_XATTR, Container

if TYPE_CHECKING:
    from machinepy.service.holder import Client as HolderClient

log = logging.getLogger("machinepy.service.daemon")

STATE_DIR = "/run/machinepy"
CONSOLE_FDNAME = "console-"


class Notifier:
    """sd_notify to our service manager, its socket kept out of the environment
    (the containers of a host-root `run` would inherit it)."""

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address

    def __call__(self, message: str, fds: list[int] | None = None) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                socket.send_fds(sock, [message.encode()], fds or [])
            except OSError as e:
                log.warning("sd_notify %r: %s", message.split("\n", 1)[0], e)
                return False
        return True


def take_listen_fds() -> dict[str, int]:
    """What systemd hands back from the fd store (sd_listen_fds_with_names)."""
    env = os.environ
    fds: dict[str, int] = {}
    try:
        mine = int(env.get("LISTEN_PID", "0")) == os.getpid()
        count = int(env.get("LISTEN_FDS", "0")) if mine else 0
    except ValueError:
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) else f"unknown-{i}"] = fd
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return fds


def claim_propagate_dir(name: str, leader: int, leader_start: int) -> None:
    """Mark an adopted container's `machinectl bind` dir as owned by its leader.

    The mark named the supervisor (the old daemon), now dead: the next
    registration's sweep would remove the dir, and a new one would not reach
    into the container (its /run/host/incoming is a slave of the old dentry).
    The leader, not this daemon, so the dir also outlives our own stop.
    """
    path = os.path.join(sd.PROPAGATE_DIR, name)
    with contextlib.suppress(OSError):
        os.setxattr(path, PROPAGATE_OWNER_XATTR, b"%d %d" % (leader, leader_start))


def remove_propagate_dir(name: str) -> None:
    path = os.path.join(sd.PROPAGATE_DIR, name)
    with contextlib.suppress(OSError):
        os.getxattr(path, PROPAGATE_OWNER_XATTR)  # ours only, never nspawn's
        os.rmdir(path)


class Record(NamedTuple):
    """A container's state file: enough to adopt it after a daemon restart."""

    name: str
    leader: int
    start_time: int
    root: str | None
    command: list[str]
    boot: bool
    machine_id: str | None
    unit: str | None
    registered: bool
    since: int
    ifindices: list[int]
    # CreateContainer's options, as on the bus: KEY → [signature, value]
    options: dict[str, list[Any]] = {}  # noqa: RUF012 - never changed

    @classmethod
    def of(cls, entry: Entry) -> Record:
        c = entry.container
        assert c is not None
        return cls(entry.name, c.leader, start_time(c.leader), c.spec.root,
                   list(c.spec.command), c.spec.boot,
                   c.spec.machine_id.hex if c.spec.machine_id else None, c.unit,
                   c.registered, entry.since,
                   list(getattr(entry.control, "ifindices", []) or []),
                   {k: [sig, v] for k, (sig, v) in options_to_bus(entry.options).items()})


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / f"{name}.json"

    def write(self, entry: Entry) -> None:
        """Atomically; OSError (ENOSPC: /run full) leaves no temp file behind."""
        try:
            record = Record.of(entry)
        except OSError:
            return  # the leader is already gone
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.path / f".{entry.name}.tmp"
        try:
            # Root's only: the container's environment is in there.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as f:
                json.dump(record._asdict(), f, default=list)  # bytes (ay) as a list
            tmp.replace(self.file(entry.name))
        except BaseException:
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty
            raise

    def sweep(self) -> None:
        """Temp files of a daemon killed mid-write."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file(name).unlink()
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only when empty: leave nothing behind

    def records(self) -> list[Record]:
        out = []
        for f in sorted(self.path.glob("*.json")):
            try:
                out.append(Record(**json.loads(f.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring state file %s: %s", f, e)
                f.unlink(missing_ok=True)
        return out


# ioctl(PIDFD_GET_INFO) (Linux 6.13) with PIDFD_INFO_EXIT (6.15): the wait
# status of a process we are not the parent of, once its parent reaped it.
PIDFD_GET_INFO = 0xC040FF0B  # _IOWR(0xFF, 11, struct pidfd_info), 64 bytes
PIDFD_INFO_EXIT = 1 << 3
EXIT_INFO_WAIT = 5.0  # seconds for the leader's parent (systemd) to reap it


def pidfd_wait_status(pidfd: int) -> int | None:
    import fcntl
    import struct

    buf = bytearray(struct.pack("=Q56x", PIDFD_INFO_EXIT))
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError:  # an older kernel
        return None
    if not struct.unpack_from("=Q", buf)[0] & PIDFD_INFO_EXIT:
        return None  # not reaped yet
    return int(struct.unpack_from("=i", buf, 60)[0])


def exit_status_of(wstatus: int, boot: bool) -> int:
    """As the supervisor reports it: the exit code, or 128 + the signal."""
    if os.WIFEXITED(wstatus):
        return os.WEXITSTATUS(wstatus)
    sig = os.WTERMSIG(wstatus)
    if boot and sig in (signal.SIGINT, signal.SIGHUP):
        return 0  # reboot(2) inside a pid namespace: a clean end
    return 128 + sig


class Adopted:
    """A container an earlier daemon started: all we have is a pidfd on its leader.

    Not our child (its parent is now our service manager), so its exit status
    comes from the pidfd once the parent has reaped it (-1 on kernels before
    6.15); a reboot inside ends it, since nobody is there to start it again.
    """

    def __init__(self, container: Container, pidfd: int, stop_timeout: float,
                 ifindices: list[int]) -> None:
        self.container = container
        self.pidfd = pidfd
        self.ifindices = ifindices
        self.stop_policy = StopPolicy(boot=container.spec.boot, timeout=stop_timeout)
        self.stop_policy.started(pidfd)

    def kill(self, sig: int) -> None:
        self.stop_policy.kill(sig)

    def poweroff(self) -> None:
        self.stop_policy.poweroff()

    def terminate(self) -> None:
        self.stop_policy.terminate()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(self.pidfd, fut.set_result, None)
        status = -1
        try:
            await fut
            loop.remove_reader(self.pidfd)
            delay, deadline = 0.005, loop.time() + EXIT_INFO_WAIT
            while (wstatus := pidfd_wait_status(self.pidfd)) is None and \
                    loop.time() < deadline:
                await asyncio.sleep(delay)  # a zombie until its parent reaps it
                delay = min(delay * 2, 0.25)
            if wstatus is not None:
                status = exit_status_of(wstatus, self.container.spec.boot)
        finally:
            self.stop_policy.gone()
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        self.container.status = status
        self.container.set_state("exited")
        return status


class Daemon:
    def __init__(self, state_dir: str = STATE_DIR, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.state = StateDir(state_dir)
        self.stop_timeout = stop_timeout
        self.notify = Notifier(os.environ.pop("NOTIFY_SOCKET", None))
        self.stored = take_listen_fds()
        self.in_store = set(self.stored)
        self.service: Service | None = None
        self.holder: HolderClient | None = None

    # -- the console holder, where systemd's fd store does not survive a stop -------------

    def _connect_holder(self) -> HolderClient | None:
        if not self.notify.address:
            return None  # not run by systemd: no fd store either
        from machinepy.core.sd import systemd_version
        from machinepy.service.holder import UNIT, Client

        version = systemd_version()
        if version is None or version >= 254:
            return None  # FileDescriptorStorePreserve=yes does it
        with contextlib.suppress(OSError):
            return Client()
        # -S: no site (4 MiB less RSS); so the path to this package, explicitly.
        here = Path(__file__).resolve().parents[2]
        r = subprocess.run(["systemd-run", "--quiet", "--collect", f"--unit={UNIT}",
                            "--description=machinepy console holder",
                            f"--setenv=PYTHONPATH={here}", "--",
                            sys.executable, "-S", "-m", "machinepy.service.holder"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("no console holder: systemd-run: %s", r.stderr.strip())
            return None
        for _ in range(100):
            try:
                return Client()
            except OSError:
                time.sleep(0.02)
        log.warning("no console holder: it never listened")
        return None

    def _holder_call(self, what: str, *args: Any) -> None:
        if self.holder is None:
            return
        try:
            getattr(self.holder, what)(*args)
        except OSError as e:
            log.warning("console holder: %s; a stop will lose the consoles", e)
            self.holder.close()
            self.holder = None

    # -- hooks called by the service ------------------------------------------------------

    def _running(self, entry: Entry) -> None:
        self.state.write(entry)

    def _gone(self, entry: Entry) -> None:
        self.state.remove(entry.name)
        c = entry.container
        if isinstance(entry.control, Adopted) and c is not None and c.registered and c.spec.root:
            # Its supervisor, which made it, is gone: nobody else removes it.
            remove_propagate_dir(entry.name)

    def _store_console(self, entry: Entry, fd: int) -> None:
        # FDPOLL=0: systemd would drop the fd at the first POLLHUP, which a pty
        # master sees each time the container's systemd vhangup()s its console.
        self.notify(f"FDSTORE=1\nFDPOLL=0\nFDNAME={CONSOLE_FDNAME}{entry.name}", [fd])
        self._holder_call("put", CONSOLE_FDNAME + entry.name, fd)

    def _unstore_console(self, entry: Entry) -> None:
        self.notify(f"FDSTOREREMOVE=1\nFDNAME={CONSOLE_FDNAME}{entry.name}")
        self._holder_call("delete", CONSOLE_FDNAME + entry.name)

    # -- adoption --------------------------------------------------------------------------

    def adopt_survivors(self, service: Service) -> int:
        adopted = 0
        self.state.sweep()
        for rec in self.state.records():
            entry = self._adopt(rec)
            if entry is None:
                log.info("container %s ended while no daemon ran", rec.name)
                self.state.remove(rec.name)
                if rec.registered and rec.root:
                    remove_propagate_dir(rec.name)
                continue
            assert isinstance(entry.control, Adopted)
            service.adopt(entry, entry.control.run())
            adopted += 1
            log.info("adopted container %s (leader %d)", rec.name, rec.leader)
        for name, fd in self.stored.items():  # consoles of containers that died meanwhile
            os.close(fd)
            self.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
            self._holder_call("delete", name)
        self.stored.clear()
        return adopted

    def _adopt(self, rec: Record) -> Entry | None:
        import uuid

        try:
            pidfd = os.pidfd_open(rec.leader)
        except OSError:
            return None
        try:
            alive = start_time(rec.leader) == rec.start_time  # not a recycled pid
        except OSError:
            alive = False
        if not alive:
            os.close(pidfd)
            return None
        try:
            options = options_from_bus({k: (sig, v) for k, (sig, v) in rec.options.items()})
        except ValueError as e:  # SpecError: a value this version no longer takes
            log.warning("container %s: forgetting its options: %s", rec.name, e)
            options = DEFAULTS
        options = options.replace(boot=rec.boot)
        spec = build_spec(options, name=rec.name, root=rec.root, command=rec.command,
                          init=False).replace(
            machine_id=uuid.UUID(rec.machine_id) if rec.machine_id else None)
        c = Container(spec)
        c.name, c.leader, c.unit, c.registered = rec.name, rec.leader, rec.unit, rec.registered
        if rec.registered and rec.root:
            claim_propagate_dir(rec.name, rec.leader, rec.start_time)
        c.state = "running"
        entry = Entry(rec.name, Adopted(c, pidfd, self.stop_timeout, rec.ifindices),
                      since=rec.since, options=options)
        fd = self.stored.pop(CONSOLE_FDNAME + rec.name, -1)
        if fd >= 0:
            entry.console = Drain(asyncio.get_running_loop(), fd, owned=True)
            if CONSOLE_FDNAME + rec.name not in self.in_store:  # the holder's only
                self.notify(f"FDSTORE=1\nFDPOLL=0\nFDNAME={CONSOLE_FDNAME}{rec.name}", [fd])
        return entry

    # -- main ------------------------------------------------------------------------------

    async def run(self, bus_address: str | None = None) -> None:
        from machinepy.integrate.dbus import Connection

        bus = Connection.open(bus_address, fds=True)  # blocking: the daemon has nothing else yet
        hooks = Hooks(running=self._running, gone=self._gone, console=self._store_console,
                      console_gone=self._unstore_console)
        self.service = service = Service(bus, hooks=hooks, stop_timeout=self.stop_timeout)
        self.holder = self._connect_holder()
        if self.holder is not None:
            try:
                held = self.holder.take_all()
            except OSError as e:
                log.warning("console holder: %s", e)
                held = {}
            for name, fd in held.items():  # after a restart the store has them too
                if name in self.stored:
                    os.close(fd)
                else:
                    self.stored[name] = fd
        adopted = self.adopt_survivors(service)
        await service.start()
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def request_stop() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        disconnected: asyncio.Future[None] = loop.create_future()

        def lost() -> None:
            if not disconnected.done():
                disconnected.set_result(None)

        bus.on_close(lost)
        self.notify(f"READY=1\nSTATUS={len(service.entries)} containers "
                    f"({adopted} adopted)")
        log.info("io.machinepy1 ready; %d containers adopted", adopted)
        await asyncio.wait([stop, disconnected], return_when=asyncio.FIRST_COMPLETED)
        self.notify(f"STOPPING=1\nSTATUS=leaving {len(service.entries)} containers running")
        # Every running container already has its state file and its console in
        # the fd store.  Leave now, without unwinding the supervisors: their
        # clean-up would stop the containers.
        for entry in service.entries.values():
            if entry.state == "running":
                self.state.write(entry)
        log.info("stopping; %d containers keep running", len(service.entries))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if stop.done() else 1)


ParserClass = type[argparse.ArgumentParser]


def build_parser(parser_class: ParserClass = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Also read by docgen (completion, man page).  PARSER_CLASS: the entry point's
    (machinepy.main), which makes bad input one line and exit 2 as for every verb."""
    parser = parser_class(prog="machinepy daemon",
                          description="Run the io.machinepy1 D-Bus service.")
    parser.add_argument("--state-dir", default=os.environ.get("MACHINEPY_STATE_DIR", STATE_DIR),
                        help=f"where container state files live (default {STATE_DIR})")
    parser.add_argument("--bus-address", help="D-Bus address (default: the system bus)")
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT,
                        help="seconds from Poweroff to SIGKILL")
    return parser


def main(argv: list[str] | None = None,
         parser_class: ParserClass = argparse.ArgumentParser) -> int:
    args = build_parser(parser_class).parse_args(argv)
    if os.geteuid() != 0:
        print("machinepy: the daemon must run as root", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    daemon = Daemon(args.state_dir, args.stop_timeout)
    try:
        asyncio.run(daemon.run(args.bus_address))
    except Exception as e:  # connecting, owning the name
        print(f"machinepy: daemon: {e}", file=sys.stderr)
        return 1
    return 0
