# SPDX-License-Identifier: BSD-2-Clause
"""MiniLoop: the asyncio subset the supervisor runs on for one-shot containers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from machinepy.runtime.loop import Future, MiniLoop


def test_awaits_readers_timers_and_call_soon() -> None:
    loop = MiniLoop()
    r, w = os.pipe()
    events: list[str] = []

    async def main() -> bytes:
        fut = loop.create_future()
        loop.add_reader(r, lambda: fut.set_result(os.read(r, 10)))
        loop.call_later(0.05, os.write, w, b"ping")
        loop.call_soon(events.append, "soon")
        late = loop.call_later(10, events.append, "never")
        late.cancel()
        data = await fut
        assert loop.remove_reader(r) and not loop.remove_reader(r)
        return data

    start = time.monotonic()
    assert loop.run(main()) == b"ping"
    assert 0.04 < time.monotonic() - start < 2
    assert events == ["soon"]
    os.close(r)
    os.close(w)


def test_exceptions_propagate_through_await() -> None:
    loop = MiniLoop()

    async def main() -> None:
        fut = loop.create_future()
        loop.call_soon(fut.set_exception, ValueError("boom"))
        await fut

    with pytest.raises(ValueError, match="boom"):
        loop.run(main())


def test_signal_handlers_run_in_the_loop_and_are_removed() -> None:
    loop = MiniLoop()
    got: list[int] = []

    async def main() -> None:
        fut = loop.create_future()

        def on_usr1() -> None:
            got.append(signal.SIGUSR1)
            fut.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        await fut

    loop.run(main())
    assert got == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_future_done_callbacks() -> None:
    fut = Future()
    seen: list[object] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.set_result(3)
    fut.set_result(4)  # ignored: a future completes once
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [3, 3]
