# SPDX-License-Identifier: BSD-2-Clause
"""Who is at the other end of a unix socket: a process of ours, on the host?

machinepy's own sockets (a detached container's console, the daemon's
console holder) must serve and trust only processes outside every
container: the same uid (or root), in our user and pid namespaces, and —
where the caller knows which process it expects — exactly that one, proven
by pid and start time while a pidfd holds the pid.  Standard library only:
the console holder imports it at start.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

SO_PEERPIDFD = 77  # Linux >= 6.5; not in Python 3.11's socket module


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (which may hold ')')."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: with the pid, names a process for good.
    OSError when PID is gone."""
    return int(_stat(pid)[19])


def process_key(pid: int) -> tuple[int, str] | None:
    """(start time, state) of PID from /proc/PID/stat, None when gone."""
    try:
        fields = _stat(pid)
    except (OSError, IndexError):
        return None
    return int(fields[19]), fields[0].decode()


def alive(pid: int, start: int) -> bool:
    """Whether the process PID that started at START still runs (not a zombie)."""
    key = process_key(pid)
    return key is not None and key[0] == start and key[1] not in ("Z", "X")


def same_namespaces(pid: int) -> bool:
    for ns in ("user", "pid"):
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{ns}")
            ours = os.stat(f"/proc/self/ns/{ns}")
        except OSError:
            return False
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            return False
    return True


def check_peer(conn: socket.socket, expect: tuple[int, int] | None = None) -> str | None:
    """Why the peer of CONN is not to be trusted, or None.

    It must be ours or root's, in our user and pid namespaces (so in no
    container), and with EXPECT = (pid, start time), exactly that process.  The
    peer's pidfd (SO_PEERPIDFD) still running after /proc was read proves the
    pid was not reused in between.
    """
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if pid <= 0:
        return "peer outside our pid namespace"
    if uid not in (0, os.geteuid()):
        return f"peer runs as uid {uid}"
    try:
        pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            return f"peer: {e.strerror}"
        try:  # before 6.5: a pid reused meanwhile fails the start-time check below
            pidfd = os.pidfd_open(pid)
        except OSError:
            return "peer is gone"
    try:
        if expect is not None:
            if pid != expect[0]:
                return f"served by pid {pid}, not by its supervisor {expect[0]}"
            key = process_key(pid)
            if key is None or key[0] != expect[1]:
                return f"pid {pid} is not the supervisor that made the socket"
        if not same_namespaces(pid):
            return f"peer pid {pid} is in another user or pid namespace (a container)"
        if select.select([pidfd], [], [], 0)[0]:
            return "peer is gone"
    finally:
        os.close(pidfd)
    return None
