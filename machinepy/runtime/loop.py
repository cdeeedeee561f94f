# SPDX-License-Identifier: BSD-2-Clause
"""A tiny event loop for the common one-shot `machinepy run`.

Importing asyncio costs about 15 ms, a third of machinepy's start-up budget.
A container that needs no D-Bus and no netlink only waits on a few fds
(pidfd, pty, status pipe) and signals, so the supervisor runs on this
selectors-based loop instead, D-Bus included (machinepy.integrate.dbus runs
on either).  It implements the subset of asyncio's loop API the supervisor,
console, attach and D-Bus code use, so the same code runs on either; paths
that talk netlink (pyroute2) get a real asyncio loop.
"""

from __future__ import annotations

import heapq
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Protocol, Self, TypeVar

T = TypeVar("T")


class Handle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Handle) -> bool:
        return self.when < other.when


class Future(Generic[T]):
    """Awaitable result; enough of asyncio.Future for `await fut`."""

    __slots__ = ("_callbacks", "_done", "_exception", "_result")

    def __init__(self) -> None:
        self._done = False
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], object]] = []

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        if self._exception is not None:
            raise self._exception
        # Set before it is done (T may itself include None).
        return self._result  # type: ignore[return-value]

    def _finish(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def set_result(self, value: T, /) -> None:
        if not self._done:
            self._result = value
            self._finish()

    def set_exception(self, exc: BaseException, /) -> None:
        if not self._done:
            self._exception = exc
            self._finish()

    def add_done_callback(self, cb: Callable[[Future[T]], object], /) -> None:
        if self._done:
            cb(self)
        else:
            self._callbacks.append(cb)

    def __await__(self) -> Generator[Future[T], None, T]:
        if not self._done:
            yield self
        return self.result()


class FutureLike(Protocol[T]):
    """A future of either loop: asyncio.Future or Future."""

    def done(self) -> bool: ...
    def result(self) -> T: ...
    def set_result(self, result: T, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def add_done_callback(self, fn: Callable[[Self], object], /) -> None: ...
    def __await__(self) -> Generator[Any, None, T]: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class LoopLike(Protocol):
    """What the supervisor needs of a loop: asyncio's or MiniLoop."""

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_writer(self, fd: int) -> bool: ...
    def add_signal_handler(self, sig: int, callback: Callable[..., object],
                           *args: Any) -> None: ...
    def remove_signal_handler(self, sig: int) -> bool: ...
    def call_soon(self, callback: Callable[..., object], *args: Any) -> Cancellable: ...
    def call_later(self, delay: float, callback: Callable[..., object],
                   *args: Any) -> Cancellable: ...
    def create_future(self) -> FutureLike[Any]: ...


class MiniLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.ready: deque[Handle] = deque()
        self.timers: list[Handle] = []
        self.signals: dict[int, Handle] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)

    # -- fds ----------------------------------------------------------------

    def _modify(self, fd: int, event: int, handle: Handle | None) -> None:
        try:
            key = self.selector.get_key(fd)
        except KeyError:
            if handle is not None:
                data = (handle, None) if event == selectors.EVENT_READ else (None, handle)
                self.selector.register(fd, event, data)
            return
        reader, writer = key.data
        if event == selectors.EVENT_READ:
            reader = handle
        else:
            writer = handle
        mask = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        if mask:
            self.selector.modify(fd, mask, (reader, writer))
        else:
            self.selector.unregister(fd)

    def _has(self, fd: int, index: int) -> bool:
        try:
            return self.selector.get_key(fd).data[index] is not None
        except KeyError:
            return False

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._modify(fd, selectors.EVENT_READ, Handle(0, callback, args))

    def remove_reader(self, fd: int) -> bool:
        had = self._has(fd, 0)
        self._modify(fd, selectors.EVENT_READ, None)
        return had

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._modify(fd, selectors.EVENT_WRITE, Handle(0, callback, args))

    def remove_writer(self, fd: int) -> bool:
        had = self._has(fd, 1)
        self._modify(fd, selectors.EVENT_WRITE, None)
        return had

    # -- signals: handlers only note the signal; the wakeup fd carries it here.

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        if not self.signals:
            signal.set_wakeup_fd(self.wake_w)
        self.signals[sig] = Handle(0, callback, args)
        signal.signal(sig, _noop)

    def remove_signal_handler(self, sig: int) -> bool:
        if self.signals.pop(sig, None) is None:
            return False
        signal.signal(sig, signal.SIG_DFL)
        if not self.signals:
            signal.set_wakeup_fd(-1)
        return True

    # -- callbacks ------------------------------------------------------------

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(0, callback, args)
        self.ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(time.monotonic() + delay, callback, args)
        heapq.heappush(self.timers, handle)
        return handle

    def create_future(self) -> Future[Any]:
        return Future()

    # -- running --------------------------------------------------------------

    def _run_once(self) -> None:
        timeout: float | None = None
        if self.ready:
            timeout = 0
        elif self.timers:
            timeout = max(0.0, self.timers[0].when - time.monotonic())
        for key, mask in self.selector.select(timeout):
            if key.fd == self.wake_r:
                self._dispatch_signals()
                continue
            reader, writer = key.data
            if mask & selectors.EVENT_READ and reader is not None:
                self.ready.append(reader)
            if mask & selectors.EVENT_WRITE and writer is not None:
                self.ready.append(writer)
        now = time.monotonic()
        while self.timers and self.timers[0].when <= now:
            self.ready.append(heapq.heappop(self.timers))
        for _ in range(len(self.ready)):
            handle = self.ready.popleft()
            if not handle.cancelled:
                handle.callback(*handle.args)

    def _dispatch_signals(self) -> None:
        try:
            data = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        for sig in data:
            handle = self.signals.get(sig)
            if handle is not None:
                self.ready.append(handle)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Drive CORO to completion; it may only await this loop's futures."""
        outcome: Future[Any] = Future()

        def step() -> None:
            try:
                fut = coro.send(None)
            except StopIteration as stop:
                outcome.set_result(stop.value)
                return
            except BaseException as exc:
                outcome.set_exception(exc)
                return
            fut.add_done_callback(lambda _: self.call_soon(step))

        self.call_soon(step)
        try:
            while not outcome.done():
                self._run_once()
        finally:
            self.close()
        return outcome.result()

    def close(self) -> None:
        for sig in list(self.signals):
            self.remove_signal_handler(sig)
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def _noop(signum: int, frame: object) -> None:
    pass
