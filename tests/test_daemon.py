# SPDX-License-Identifier: BSD-2-Clause
"""The daemon's restart safety, piece by piece: fd store messages, adoption of
propagation dirs, exit status of adopted leaders."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from machinepy.daemon import Daemon, Notifier
from machinepy.service import Entry


def test_consoles_are_stored_unpolled(tmp_path: Path) -> None:
    # A pty master sees POLLHUP at each vhangup() of the container's console;
    # systemd drops a polled fd from its store at the first one.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    r, w = os.pipe()
    try:
        d = Daemon(str(tmp_path / "state"))
        d.notify = Notifier(str(tmp_path / "notify"))
        d._store_console(Entry("box", None), r)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        for fd in fds:
            os.close(fd)
        fields = dict(line.split("=", 1) for line in msg.decode().splitlines())
        assert fields == {"FDSTORE": "1", "FDPOLL": "0", "FDNAME": "console-box"}
        assert len(fds) == 1
    finally:
        sock.close()
        os.close(r)
        os.close(w)
