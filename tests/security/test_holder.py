# SPDX-License-Identifier: BSD-2-Clause
"""The daemon's console holder (machinepy.service.holder) keeps every container's
console: a container must get none of them, even as root on the host's root."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinepy.service.holder import SOCKET, Client
from tests.security.conftest import run_in

pytestmark = pytest.mark.root
HOLDER_DIR = os.path.dirname(SOCKET)

STEAL = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
    s.send(b"GET")
    msg, fds, _, _ = socket.recv_fds(s, 512, 1)
except OSError as e:
    print("refused:", e.strerror)
else:
    print("got", msg, len(fds), "fds")
"""


@pytest.fixture
def holder() -> Iterator[str]:
    """A holder at a scratch path, holding one console (a pty master)."""
    tmp = Path(tempfile.mkdtemp(prefix="mpytest-holder-", dir="/var/tmp"))
    path = str(tmp / "consoles.sock")
    proc = subprocess.Popen([sys.executable, "-m", "machinepy.service.holder", path])
    master, slave = os.openpty()
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.01)
        client = Client(path)  # we are root on the host: trusted
        client.put("console-victim", master)
        client.close()
        yield path
    finally:
        os.close(master)
        os.close(slave)
        proc.kill()
        proc.wait()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def test_the_host_gets_the_console_back(holder: str) -> None:
    client = Client(holder)
    try:
        got = client.take_all()
    finally:
        client.close()
    assert list(got) == ["console-victim"]
    for fd in got.values():
        os.close(fd)


def test_a_host_root_container_gets_no_console(holder: str) -> None:
    # Root, on the host's root, with the host's /var/tmp: only the peer check stands.
    r = run_in(None, "python3", "-c", STEAL, holder)
    assert r.returncode == 0, r.stderr
    assert "fds" not in r.stdout, r.stdout  # refused, or an empty answer


def test_the_holder_directory_is_masked_in_host_root_containers() -> None:
    made = not os.path.isdir(HOLDER_DIR)
    if made:
        os.mkdir(HOLDER_DIR, 0o700)
    marker = Path(HOLDER_DIR) / "mpytest-marker"
    marker.touch()
    try:
        r = run_in(None, "/bin/sh", "-c", f"ls -A {HOLDER_DIR}; echo end")
        assert r.stdout == "end\n", r.stdout + r.stderr
    finally:
        marker.unlink()
        if made:
            os.rmdir(HOLDER_DIR)
