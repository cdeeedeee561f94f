# SPDX-License-Identifier: BSD-2-Clause
"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import os


def sd_notify(message: str, fds: list[int] | None = None) -> bool:
    """Send MESSAGE (e.g. "READY=1") to our service manager; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    import socket  # not at the top: `machinepy run` never notifies

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            if fds:
                socket.send_fds(sock, [message.encode()], fds)
            else:
                sock.sendall(message.encode())
        except OSError:
            return False
    return True


def parse(datagram: bytes) -> dict[str, str]:
    """KEY=VALUE lines of a notification."""
    out = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out
