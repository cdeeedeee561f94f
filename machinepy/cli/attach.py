# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy run --attach NAME|PID`: the client side of a detached container's
console socket (machinepy.runtime.attachsock), and detaching itself."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from machinepy.core.peer import check_peer
from machinepy.runtime import console as consolemod
from machinepy.runtime.attachsock import (
    GREETING,
    KEY_RE,
    TARGET_RE,
    AttachError,
    open_private_dir,
)
from machinepy.runtime.loop import MiniLoop

# -- the client -------------------------------------------------------------------------

def connect(key: str) -> socket.socket:
    """A connection to the supervisor serving KEY, checked before any byte moves.

    FileNotFoundError when nobody serves KEY; AttachError when the server is
    not the supervisor its record names."""
    if not KEY_RE.fullmatch(key) or len(key) > 64:
        raise AttachError(f"invalid name '{key}': a machine name, a leader pid or a "
                          f"supervisor pid")
    fd, path = open_private_dir("attach", create=False)
    try:
        target = os.readlink(key, dir_fd=fd)
        m = TARGET_RE.fullmatch(target)
        if m is None:
            raise AttachError(f"{path}/{key}: not a record of ours")
        st = os.stat(target, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode):
            raise AttachError(f"{path}/{target}: not a socket")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                conn.connect(f"/proc/self/fd/{fd}/{target}")
            except ConnectionRefusedError:
                raise FileNotFoundError(errno.ENOENT, "its supervisor is gone") from None
            why = check_peer(conn, (int(m[1]), int(m[2])))
            if why is not None:
                raise AttachError(f"refusing to attach to '{key}': {why}")
        except BaseException:
            conn.close()
            raise
        return conn
    finally:
        os.close(fd)


def attach(key: str, service: Callable[[str], int] | None = None) -> int:
    """`machinepy run --attach NAME|PID`: relay the console until ^]^]^].  KEY
    names no `run --detach` supervisor but a container of the D-Bus service:
    SERVICE(its name) attaches to that one."""
    try:
        conn = connect(key)
        try:
            msg, fds, _, _ = socket.recv_fds(conn, len(GREETING), 1)
        except BaseException:
            conn.close()
            raise
    except AttachError as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2 if str(e).startswith("invalid name") else 1
    except OSError as e:
        name = _service_name(key) if service is not None else None
        if service is not None and name is not None:
            return service(name)
        why = "no such detached container" if isinstance(e, FileNotFoundError) else e.strerror
        print(f"machinepy: cannot attach to '{key}': {why or e}", file=sys.stderr)
        return 1
    if msg != GREETING or not fds:
        for fd in fds:
            os.close(fd)
        conn.close()
        print(f"machinepy: cannot attach to '{key}': console busy or access denied",
              file=sys.stderr)
        return 1
    master = fds[0]
    try:
        loop = MiniLoop()
        # The supervisor closes our connection when the container is gone.
        loop.run(consolemod.attach(loop, master, key, loop.create_future(),
                                   hangup_fd=conn.fileno()))
    finally:
        os.close(master)
        conn.close()
    return 0


def _service_name(key: str) -> str | None:
    """The io.machinepy1 container KEY names: by name, by its leader's pid, or by
    the daemon's pid when it has that one container; None when there is none.

    Asked without activating anything: no service, no answer."""
    from machinepy.core.sd import system_bus_available

    if not system_bus_available():
        return None
    from machinepy.integrate.dbus import DBUS_NAME, DBUS_PATH, BusError, Connection, method_call

    manager = ("io.machinepy1", "/io/machinepy1", "io.machinepy1.Manager")
    try:
        conn = Connection.open(timeout=10)
    except BusError:
        return None
    try:
        def call(dest: str, path: str, iface: str, member: str, sig: str = "",
                 *body: object) -> tuple[Any, ...]:
            return conn.call_blocking(method_call(dest, path, iface, member, sig, body,
                                                  auto_start=False), timeout=10).body

        if not key.isdigit():
            call(*manager, "GetContainer", "s", key)
            return key
        (rows,) = call(*manager, "ListContainers")  # a(ssuo): name, state, leader, path
        for name, _state, leader, _path in rows:
            if leader == int(key):
                return str(name)
        (daemon,) = call(DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetConnectionUnixProcessID", "s",
                         "io.machinepy1")
        if daemon == int(key) and len(rows) == 1:
            return str(rows[0][0])
        return None
    except BusError:
        return None
    finally:
        conn.close()


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
