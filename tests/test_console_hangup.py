# SPDX-License-Identifier: BSD-2-Clause
"""The console relay: hang-ups of the slave and stopping while a retry is due."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from machinepy.runtime.console import Pty, Relay


async def test_stop_cancels_the_hangup_retry() -> None:
    # The container's systemd vhangup()s /dev/console; the relay retries the
    # master 100 ms later.  A stop in between must not leave that retry armed:
    # it would add a reader on a closed fd, and asyncio prints a traceback.
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    pty = Pty()
    r, w = os.pipe()
    try:
        relay = Relay(loop, pty.master, lambda: None, interactive=False, out_fd=w)
        relay.start()
        pty.close_slave()  # nobody has the slave open: the master reads EIO
        async with asyncio.timeout(5):
            while relay.out.reading:
                await asyncio.sleep(0.01)
        relay.stop()
        pty.close()
        await asyncio.sleep(0.2)
        assert errors == []
    finally:
        pty.close()
        os.close(r)
        os.close(w)


async def test_a_reopened_slave_is_relayed_again() -> None:
    # The other half of the same mechanism: after the hang-up, output resumes.
    loop = asyncio.get_running_loop()
    pty = Pty()
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        relay = Relay(loop, pty.master, lambda: None, interactive=False, out_fd=w)
        relay.start()
        path = pty.slave_path
        pty.close_slave()
        async with asyncio.timeout(5):
            while relay.out.reading:
                await asyncio.sleep(0.01)
        slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(slave, b"again\n")
            out = b""
            async with asyncio.timeout(5):
                while b"again" not in out:
                    await asyncio.sleep(0.02)
                    with contextlib.suppress(BlockingIOError):
                        out += os.read(r, 4096)
        finally:
            os.close(slave)
        relay.stop()
    finally:
        pty.close()
        os.close(r)
        os.close(w)
