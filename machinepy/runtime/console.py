# SPDX-License-Identifier: BSD-2-Clause
"""The container's console: a pty whose master the supervisor relays.

Used only when stdin and stdout are terminals; otherwise the container simply
inherits fds 0-2 (pipes, files, CI) and nothing is relayed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import termios
import time
import tty
from collections.abc import Callable
from typing import Any

from machinepy.runtime.loop import LoopLike

ESCAPE = 0x1D  # ^]
ESCAPE_COUNT = 3
ESCAPE_WINDOW = 1.0  # seconds, as systemd-nspawn


def interactive() -> bool:
    return os.isatty(0) and os.isatty(1)


def copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


class Pty:
    """A pty pair; the slave goes to the container, the master stays here."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.slave, False)
        self.slave_path = os.ttyname(self.slave)

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class _Pipe:
    """Non-blocking one-way copy with a bounded buffer."""

    def __init__(self, loop: LoopLike, src: int, dst: int,
                 filter: Callable[[bytes], bytes] | None = None,
                 on_eio: Callable[[], None] | None = None) -> None:
        self.loop, self.src, self.dst = loop, src, dst
        self.filter, self.on_eio = filter, on_eio
        self.buf = bytearray()
        self.reading = False
        self.wanted = False  # started, and not stopped: what a drained buffer resumes
        self.closed = False

    def start(self) -> None:
        self.wanted = True
        if not self.reading and not self.closed:
            self.loop.add_reader(self.src, self._readable)
            self.reading = True

    def _pause(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.src, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._pause()
            if e.errno == errno.EIO and self.on_eio is not None:
                self.on_eio()  # hang-up of the slave (vhangup): not necessarily the end
            else:
                self.closed = True
            return
        if not data:
            self._pause()
            self.closed = True
            return
        if self.filter is not None:
            data = self.filter(data)
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """Send DATA on (buffered while the destination is full)."""
        self.buf += data
        self._flush()

    def _flush(self) -> None:
        while self.buf:
            try:
                n = os.write(self.dst, self.buf)
            except BlockingIOError:
                break
            except OSError:
                self.buf.clear()
                break
            del self.buf[:n]
        if self.buf:
            self._pause()
            self.loop.add_writer(self.dst, self._writable)
        elif self.wanted:
            self.start()

    def _writable(self) -> None:
        self.loop.remove_writer(self.dst)
        self._flush()

    def drain(self) -> None:
        """Copy whatever is readable now, synchronously (at container exit)."""
        self._pause()
        if self.closed:
            return
        while True:
            try:
                data = os.read(self.src, 65536)
            except OSError:
                break
            if not data:
                break
            self.buf += data
            try:
                while self.buf:
                    n = os.write(self.dst, self.buf)
                    del self.buf[:n]
            except BlockingIOError:
                os.set_blocking(self.dst, True)
            except OSError:
                break

    def stop(self) -> None:
        self.wanted = False
        self._pause()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_writer(self.dst)


class Relay:
    """Relay between our stdio and a pty master.

    Interactive: raw mode, both directions, ^]^]^] within a second calls
    ON_ESCAPE.  Otherwise (a booted container whose stdio are pipes): the
    console's output only, as nspawn's --console=read-only.
    """

    def __init__(self, loop: LoopLike, master: int, on_escape: Callable[[], None], *,
                 interactive: bool = True, out_fd: int = 1) -> None:
        self.master = master
        self.on_escape = on_escape
        self.interactive = interactive
        # ^] presses not forwarded yet: the start of an escape, perhaps.
        self.held = 0
        self.held_since = 0.0
        self._release_timer: Any = None
        self.saved: list[object] | None = None
        self.loop = loop
        self.inp = _Pipe(self.loop, 0, master, filter=self._watch_escape)
        self.out = _Pipe(self.loop, master, out_fd, on_eio=self._hangup)
        fds = (0, out_fd) if interactive else (out_fd,)
        self._blocking = {fd: os.get_blocking(fd) for fd in fds}
        self._retry: Any = None  # the loop's timer handle of a hang-up retry

    def start(self) -> None:
        if self.interactive:
            self.saved = termios.tcgetattr(0)
            tty.setraw(0)
            copy_winsize(1, self.master)
            self.inp.start()
        for fd in (*self._blocking, self.master):
            os.set_blocking(fd, False)
        self.out.start()

    def resize(self) -> None:
        if self.interactive:
            copy_winsize(1, self.master)

    def _watch_escape(self, data: bytes) -> bytes:
        """Hold ^] back: forwarded once another key follows or the window
        passes, dropped when the third completes the escape — so nothing of
        ^]^]^] reaches the container (systemd's ptyfwd does the same)."""
        now = time.monotonic()
        out = bytearray()
        for byte in data:
            if byte != ESCAPE:
                out += self._take_held()
                out.append(byte)
                continue
            if self.held and now - self.held_since >= ESCAPE_WINDOW:
                out += self._take_held()
            if not self.held:
                self.held_since = now
                self._release_timer = self.loop.call_later(ESCAPE_WINDOW, self._release)
            self.held += 1
            if self.held >= ESCAPE_COUNT:
                self._take_held()
                self.loop.call_soon(self.on_escape)
        return bytes(out)

    def _take_held(self) -> bytes:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        held, self.held = self.held, 0
        return bytes([ESCAPE]) * held

    def _release(self) -> None:
        # A lone ^] (or two): no escape after all.
        self._release_timer = None
        self.inp.feed(self._take_held())

    def _hangup(self) -> None:
        # systemd re-opens /dev/console and calls vhangup() while booting; the
        # master reads EIO until the slave is opened again.  Retry, don't quit.
        self._retry = self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self.out.start()

    def stop(self) -> None:
        self._take_held()  # the release timer with it
        # Cancelled first: once we return, the caller may close the master.
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.inp.stop()
        self.out.drain()
        self.out.stop()
        self.out.closed = True  # nothing may start reading it again
        for fd, blocking in self._blocking.items():
            os.set_blocking(fd, blocking)
        if self.saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)  # type: ignore[arg-type]
            self.saved = None
