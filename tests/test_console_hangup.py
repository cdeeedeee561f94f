# SPDX-License-Identifier: BSD-2-Clause
"""The console relay: hang-ups of the slave and stopping while a retry is due."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import pytest

from machinepy.runtime.console import Drain, Pty, Relay


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


async def test_drain_keeps_an_unwatched_console_writable() -> None:
    # A console nobody is attached to is read and dropped (the container never
    # blocks on it); while someone is attached, it is theirs to read.
    loop = asyncio.get_running_loop()
    pty = Pty()
    drain = Drain(loop, pty.master)
    os.set_blocking(pty.slave, False)

    async def write(total: int) -> None:
        async with asyncio.timeout(10):
            while total > 0:
                try:
                    total -= os.write(pty.slave, b"x" * 4096)
                except BlockingIOError:
                    await asyncio.sleep(0.01)

    try:
        await write(1 << 20)  # far more than a pty holds
        drain.attach("client")
        await asyncio.sleep(0.1)
        with pytest.raises(BlockingIOError):
            for _ in range(1000):
                os.write(pty.slave, b"x" * 4096)
        drain.detach("client")
        await write(1 << 20)
    finally:
        drain.close()
        pty.close()
