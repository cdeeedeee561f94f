# SPDX-License-Identifier: BSD-2-Clause
"""Detached containers: their supervisor keeps the console, clients attach to it.

As pflask does, the supervisor of a detached container listens on abstract
unix sockets (no file to clean up, gone with the process) named after the
machine and its leader pid.  An attaching client receives the pty master over
SCM_RIGHTS and relays it; while a client is attached the supervisor stops
draining the console, and resumes when the client hangs up (^]^]^]).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys

from machinepy import console as consolemod
from machinepy.loop import LoopLike, MiniLoop

GREETING = b"machinepy-console\n"


def socket_address(key: str) -> str:
    return f"\0machinepy/attach/{key}"


class AttachServer:
    def __init__(self, loop: LoopLike, master: int, keys: list[str]) -> None:
        self.master = master
        self.loop = loop
        self.socks: list[socket.socket] = []
        for key in keys:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.bind(socket_address(key))
            s.listen(4)
            s.setblocking(False)
            self.loop.add_reader(s.fileno(), self._accept, s)
            self.socks.append(s)
        self.client: socket.socket | None = None
        os.set_blocking(master, False)
        self._drain_on()

    # While nobody watches, keep reading so the container never blocks on output.
    def _drain_on(self) -> None:
        self.loop.add_reader(self.master, self._drain)

    def _drain(self) -> None:
        try:
            os.read(self.master, 65536)
        except BlockingIOError:
            pass
        except OSError:
            # Slave hung up (vhangup, or nothing has it open): retry shortly.
            self.loop.remove_reader(self.master)
            if self.client is None:
                self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        if self.client is None and self.master >= 0:
            self.loop.remove_reader(self.master)
            self._drain_on()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        uid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if (uid not in (0, os.geteuid())) or self.client is not None:
            conn.close()
            return
        self.client = conn
        self.loop.remove_reader(self.master)
        socket.send_fds(conn, [GREETING], [self.master])
        conn.setblocking(False)
        self.loop.add_reader(conn.fileno(), self._client_readable)

    def _client_readable(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # detached
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None
            self._resume()

    def close(self) -> None:
        for s in self.socks:
            self.loop.remove_reader(s.fileno())
            s.close()
        self.socks.clear()
        self.loop.remove_reader(self.master)
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None


async def _relay(loop: MiniLoop, master: int, conn: socket.socket) -> None:
    done = loop.create_future()

    def finish() -> None:
        done.set_result(None)

    def check_closed() -> None:
        if relay.out.closed:
            finish()
        elif not done.done():
            loop.call_later(0.2, check_closed)

    relay = consolemod.Relay(loop, master, finish, interactive=os.isatty(0))
    relay.start()
    # The supervisor closes our connection when the container is gone.
    loop.add_reader(conn.fileno(), finish)
    loop.add_signal_handler(signal.SIGWINCH, relay.resize)
    check_closed()
    try:
        await done
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_reader(conn.fileno())
        relay.stop()


def attach(key: str) -> int:
    """`machinepy run --attach NAME|PID`: relay the console until ^]^]^]."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(socket_address(key))
        msg, fds, _, _ = socket.recv_fds(conn, len(GREETING), 1)
    except OSError as e:
        if not key.isdigit() and _service_has(key):
            # Not a `run --detach` supervisor's: a container of the D-Bus service.
            from machinepy import client

            return client.main(["attach", key])
        print(f"machinepy: cannot attach to '{key}': {e.strerror or e}", file=sys.stderr)
        return 1
    if msg != GREETING or not fds:
        print(f"machinepy: cannot attach to '{key}': console busy or access denied",
              file=sys.stderr)
        return 1
    master = fds[0]
    print(f"Attached to {key}. Press ^] three times within 1s to detach.", file=sys.stderr)
    try:
        loop = MiniLoop()
        loop.run(_relay(loop, master, conn))
    finally:
        os.close(master)
        conn.close()
    print(f"\nDetached from {key}.", file=sys.stderr)
    return 0


def _service_has(name: str) -> bool:
    """Whether io.machinepy1 runs and knows NAME; False on any trouble."""
    from machinepy.sd import system_bus_available

    if not system_bus_available():
        return False
    import subprocess

    try:
        r = subprocess.run(["busctl", "--system", "--auto-start=no", "call", "io.machinepy1",
                            "/io/machinepy1", "io.machinepy1.Manager", "GetContainer", "s",
                            name], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def daemonize() -> tuple[int, int] | None:
    """Fork into the background.  Returns (None) in the original process after
    the daemon reported, or (report_fd, 0) in the daemon.  Must run before any
    event loop exists."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        report = b""
        while chunk := os.read(r, 4096):
            report += chunk
        os.close(r)
        text = report.decode(errors="replace").strip()
        if text.startswith("OK "):
            print(text[3:])
            sys.exit(0)
        print(f"machinepy: {text.removeprefix('ERR ') or 'detached supervisor died'}",
              file=sys.stderr)
        sys.exit(1)
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    with contextlib.suppress(OSError):
        os.chdir("/")
    return w, 0
