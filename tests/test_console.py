# SPDX-License-Identifier: BSD-2-Clause
"""The console relay's escape: ^]^]^] detaches and reaches the container not at all."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from machinepy.runtime.console import ESCAPE_WINDOW, Relay
from machinepy.runtime.loop import MiniLoop

ESC = b"\x1d"
Body = Callable[[MiniLoop, Relay, list[str], int], Coroutine[Any, Any, None]]


def scenario(body: Body) -> None:
    """Run BODY on a loop with a relay whose 'master' is a pipe we read back
    (stdin is not touched: the filter is fed directly)."""
    loop = MiniLoop()
    r, w = os.pipe2(os.O_NONBLOCK)
    events: list[str] = []
    relay = Relay(loop, w, lambda: events.append("escape"), interactive=False, out_fd=w)

    async def main() -> None:
        try:
            await body(loop, relay, events, r)
        finally:
            relay.stop()

    try:
        loop.run(main())
    finally:
        os.close(r)
        os.close(w)


async def sleep(loop: MiniLoop, seconds: float) -> None:
    fut = loop.create_future()
    loop.call_later(seconds, fut.set_result, None)
    await fut


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def test_completed_escape_forwards_nothing() -> None:
    async def body(loop: MiniLoop, relay: Relay, events: list[str], r: int) -> None:
        assert relay._watch_escape(b"ls" + ESC) == b"ls"
        assert relay._watch_escape(ESC + ESC + b"x") == b"x"
        assert events == []
        await sleep(loop, ESCAPE_WINDOW + 0.1)
        assert events == ["escape"]
        assert _read(r) == b""  # and no late release of the three

    scenario(body)


def test_interrupted_escape_is_forwarded_in_order() -> None:
    async def body(loop: MiniLoop, relay: Relay, events: list[str], r: int) -> None:
        assert relay._watch_escape(ESC + ESC) == b""
        assert relay._watch_escape(b"a") == ESC + ESC + b"a"
        await sleep(loop, ESCAPE_WINDOW + 0.1)
        assert _read(r) == b"" and events == []  # not forwarded twice

    scenario(body)


def test_lone_escape_goes_through_after_the_window() -> None:
    async def body(loop: MiniLoop, relay: Relay, events: list[str], r: int) -> None:
        assert relay._watch_escape(ESC) == b""
        await sleep(loop, ESCAPE_WINDOW / 2)
        assert _read(r) == b""
        await sleep(loop, ESCAPE_WINDOW / 2 + 0.2)
        assert _read(r) == ESC
        assert events == []

    scenario(body)


def test_slow_presses_are_no_escape() -> None:
    async def body(loop: MiniLoop, relay: Relay, events: list[str], r: int) -> None:
        relay._watch_escape(ESC)
        relay.held_since = time.monotonic() - ESCAPE_WINDOW - 0.1  # the first press, long ago
        assert relay._watch_escape(ESC + ESC) == ESC  # the old one goes on; two are held
        assert events == []

    scenario(body)
