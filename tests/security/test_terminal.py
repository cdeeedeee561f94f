# SPDX-License-Identifier: BSD-2-Clause
"""TIOCSTI into the user's terminal, in pipe mode: stdin is the user's tty,
stdout a pipe, so the container gets the tty itself, not a pty of its own."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.security.conftest import MACHINEPY

pytestmark = pytest.mark.root


def _take_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _pending(master: int) -> bytes:
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            out += os.read(master, 4096)
        except OSError:
            break
    return out


@pytest.mark.parametrize("chroot", [True, False])
def test_tiocsti_on_the_users_terminal(busybox_root: Path, probe: Callable[[str], Path],
                                       mode: tuple[str, ...], chroot: bool) -> None:
    if not chroot and mode:
        pytest.skip("--private-users=pick needs a root directory")
    master, slave = os.openpty()  # the user's terminal, as the test holds it
    try:
        where = ("-r", str(busybox_root), "-m", f"bind-ro:{probe('tiocsti_stdin')}:/probe",
                 "--", "/probe") if chroot else ("--", str(probe("tiocsti_stdin")))
        # machinepy in a session whose controlling terminal it is, as in a shell.
        r = subprocess.run([*MACHINEPY, "run", "--register=no", *mode, *where], stdin=slave,
                           capture_output=True, text=True, timeout=60,
                           preexec_fn=_take_terminal)
        assert r.returncode != 2, r.stdout + r.stderr
        assert r.returncode == 0, f"escape got through:\n{r.stdout}{r.stderr}"
        # And nothing waits in the terminal's input for the user's shell.
        os.set_blocking(slave, False)
        try:
            typed = os.read(slave, 4096)
        except BlockingIOError:
            typed = b""
        assert b"PWNED" not in typed and b"PWNED" not in _pending(master)
    finally:
        os.close(master)
        os.close(slave)
