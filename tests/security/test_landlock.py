# SPDX-License-Identifier: BSD-2-Clause
"""--landlock-scope: a host-network container cut off from the host's abstract
unix sockets and from signalling the host's processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from machinepy.core import linux
from tests.security.conftest import run_in

pytestmark = pytest.mark.root

needs_scopes = pytest.mark.skipif(linux.landlock_abi() < linux.LANDLOCK_SCOPE_ABI,
                                  reason="this kernel has no Landlock scopes (ABI 6)")

CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1].replace("@", "\\0", 1))
except OSError as e:
    print("refused:", e.strerror)
else:
    print("connected")
"""
KILL = """
import os, sys
try:
    os.kill(int(sys.argv[1]), 0)
except OSError as e:
    print("refused:", e.strerror)
else:
    print("signalled")
"""


@pytest.fixture
def host_socket() -> Iterator[str]:
    """An abstract socket of the host's, as a desktop session or a bus has."""
    name = f"@sectest-landlock-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(name.replace("@", "\0", 1))
    s.listen(8)
    try:
        yield name
    finally:
        s.close()


@needs_scopes
@pytest.mark.parametrize("scope", ["none", "abstract-unix-socket", "all"])
def test_abstract_sockets(host_socket: str, scope: str) -> None:
    r = run_in(None, "python3", "-c", CONNECT, host_socket, opts=(f"--landlock-scope={scope}",))
    assert r.returncode == 0, r.stderr
    # Without the scope the attack works: the test shows what the option stops.
    assert r.stdout.strip() == ("connected" if scope == "none" else
                                "refused: Operation not permitted"), r.stdout


@needs_scopes
@pytest.mark.parametrize("scope", ["none", "signal"])
def test_signals(scope: str) -> None:
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        # -P: no pid namespace, so the host's processes are in plain sight.
        r = run_in(None, "python3", "-c", KILL, str(sleeper.pid),
                   opts=("-P", f"--landlock-scope={scope}"))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == ("signalled" if scope == "none" else
                                    "refused: Operation not permitted"), r.stdout
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_bad_scope_is_one_line() -> None:
    r = run_in(None, "true", opts=("--landlock-scope=files",))
    assert r.returncode == 2
    assert r.stderr == ("machinepy: invalid --landlock-scope 'files': unknown scope 'files' "
                        "(expected abstract-unix-socket, signal, all or none)\n")
