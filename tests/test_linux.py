# SPDX-License-Identifier: BSD-2-Clause
"""The ctypes syscall wrappers that need no privileges to try."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from machinepy.core import linux


def test_bound_unix_datagram_socket_receives(tmp_path: Path) -> None:
    # What PID 1 does with the supervisor's notify socket, relative to its cwd.
    fd = linux.socket(linux.AF_UNIX, linux.SOCK_DGRAM | linux.SOCK_CLOEXEC)
    cwd = os.getcwd()
    try:
        assert os.get_inheritable(fd) is False
        os.chdir(tmp_path)
        linux.bind_unix(fd, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer:
            peer.sendto(b"READY=1", str(tmp_path / "notify"))
        assert os.read(fd, 64) == b"READY=1"
    finally:
        os.chdir(cwd)
        os.close(fd)


def test_bind_errors_name_the_path(tmp_path: Path) -> None:
    fd = linux.socket(linux.AF_UNIX, linux.SOCK_DGRAM | linux.SOCK_CLOEXEC)
    try:
        with pytest.raises(OSError) as e:
            linux.bind_unix(fd, "x" * 108)
        assert e.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as e:
            linux.bind_unix(fd, str(tmp_path / "missing-dir" / "notify"))
        assert e.value.errno == errno.ENOENT and "missing-dir" in str(e.value)
    finally:
        os.close(fd)
