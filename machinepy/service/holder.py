# SPDX-License-Identifier: BSD-2-Clause
"""`python3 -m machinepy.service.holder`: keeps the daemon's console fds across its stop.

systemd < 254 empties a service's fd store when it stops (254 brought
FileDescriptorStorePreserve=).  A container's console then loses its last
master, and a container whose PID 1 is a shell on it gets a hang-up and ends.
So where systemd predates Preserve, the daemon also hands every console master
to this process, which lives in a unit of its own (machinepy-consoles.service,
started by the daemon with systemd-run), and takes them back at start.

One holder for all consoles, not conmon's one per container: at 1000
containers that would be 1000 processes (a small C one is still of the order of
1 MiB RSS each; this Python one measured 10 MiB with -S, 14 MiB without),
where one holder costs one process per host and one fd per console.  It only
holds, never reads: while no daemon runs, nobody drains the fd store either.
Standard library only, no other machinepy import: it starts fast and small.

Protocol, SOCK_SEQPACKET on SOCKET: "PUT name" with one fd, "DEL name",
"GET" (answered by one "FD name" with its fd per console, then "END").  Whoever
may GET holds every container's console, so both ends trust only root outside
every container (machinepy.core.peer): a host-root container's root has the host's
/run, but not SOCKET's directory (masked in it) nor our pid namespace.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import sys

from machinepy.core.peer import check_peer

# Not in /run/machinepy, which holds only live containers' state (and goes
# when they do); masked in host-root containers all the same (mounts.py).
SOCKET = "/run/machinepy-holder/consoles.sock"
UNIT = "machinepy-consoles.service"
MAX_MSG = 512


def _untrusted(sock: socket.socket) -> str | None:
    """Why the peer is not root outside every container, or None."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != 0:
        return "not root"
    return check_peer(sock)


def serve(path: str = SOCKET) -> None:
    fds: dict[str, int] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as srv:
        old = os.umask(0o077)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv.bind(path)
        os.umask(old)
        srv.listen(4)
        sel = selectors.DefaultSelector()
        sel.register(srv, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is srv:
                    conn, _ = srv.accept()
                    if _untrusted(conn) is not None:
                        conn.close()
                        continue
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    msg, got, _, _ = socket.recv_fds(sock, MAX_MSG, 1)
                except OSError:
                    msg, got = b"", []
                if not msg:
                    sel.unregister(sock)
                    sock.close()
                    continue
                _handle(sock, msg, got, fds)


def _handle(sock: socket.socket, msg: bytes, got: list[int], fds: dict[str, int]) -> None:
    verb, _, name = msg.decode(errors="replace").partition(" ")
    if verb == "PUT" and name and len(got) == 1:
        old = fds.pop(name, -1)
        if old >= 0:
            os.close(old)
        fds[name] = got.pop()
    elif verb == "DEL":
        old = fds.pop(name, -1)
        if old >= 0:
            os.close(old)
    elif verb == "GET":
        try:
            for n, fd in fds.items():
                socket.send_fds(sock, [f"FD {n}".encode()], [fd])
            sock.send(b"END")
        except OSError:
            pass
    for fd in got:  # anything else that came along
        os.close(fd)


class Client:
    """The daemon's end."""

    def __init__(self, path: str = SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
            why = _untrusted(self.sock)
            if why is not None:
                raise PermissionError(f"{path}: not our console holder ({why})")
        except OSError:
            self.sock.close()
            raise

    def take_all(self) -> dict[str, int]:
        self.sock.send(b"GET")
        out: dict[str, int] = {}
        while True:
            msg, got, _, _ = socket.recv_fds(self.sock, MAX_MSG, 1)
            if msg == b"END" or not msg:
                for fd in got:
                    os.close(fd)
                return out
            name = msg.decode(errors="replace").partition(" ")[2]
            for fd in got:
                os.set_inheritable(fd, False)
                if name in out:
                    os.close(out[name])
                out[name] = fd

    def put(self, name: str, fd: int) -> None:
        socket.send_fds(self.sock, [f"PUT {name}".encode()], [fd])

    def delete(self, name: str) -> None:
        self.sock.send(f"DEL {name}".encode())

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else SOCKET)
