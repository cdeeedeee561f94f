# SPDX-License-Identifier: BSD-2-Clause
"""How a container is stopped: one policy for the supervisor's own containers
and for those the service adopted after a restart (known only by a pidfd).

- poweroff (`machinectl poweroff`, PoweroffContainer, SIGTERM to a booted
  container's supervisor): the orderly signal — SIG_HALT to a booted init, as
  nspawn sends, SIGTERM to a command — then SIGKILL once the grace time has
  passed, since a PID 1 without a handler ignores it; a second request kills
  at once.
- forward (SIGINT/SIGTERM/SIGHUP to a foreground `run`): the signal as it
  came, no grace time (the user is there); a second one kills.  A booted
  container gets a poweroff instead.
- terminate (`machinectl terminate`, systemd stopping the scope): SIGKILL,
  no clean shutdown.

The grace timer is for the leader it was armed for: a booted container that
rebooted in place meanwhile is not killed by an old poweroff's timer.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from machinepy.core.sd import SIG_HALT
from machinepy.runtime.loop import LoopLike

STOP_TIMEOUT = 30.0  # seconds between an orderly poweroff request and SIGKILL


class StopPolicy:
    def __init__(self, *, boot: bool, timeout: float = STOP_TIMEOUT,
                 loop: LoopLike | None = None) -> None:
        self.boot = boot
        self.timeout = timeout
        self.loop = loop  # None: asyncio's running loop, when a timer is armed
        self.pidfd = -1  # the leader's; -1 while there is none
        self.stopping = False
        self._leader = 0  # counts leaders (a reboot in place makes a new one)
        self._timer: Any = None

    def started(self, pidfd: int) -> None:
        """A (new) leader, watched through PIDFD."""
        self.gone()
        self.pidfd = pidfd
        self._leader += 1

    def gone(self) -> None:
        """The leader exited: nothing more to signal, no timer to keep."""
        self.pidfd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def kill(self, sig: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):  # gone meanwhile
                signal.pidfd_send_signal(self.pidfd, sig)

    def poweroff(self) -> None:
        if self._again():
            return
        self.kill(SIG_HALT if self.boot else signal.SIGTERM)
        loop = self.loop
        if loop is None:
            import asyncio

            loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.timeout, self._expired, self._leader)

    def forward(self, sig: int) -> None:
        if self.boot:
            self.poweroff()
        elif not self._again():
            self.kill(sig)

    def terminate(self) -> None:
        self.stopping = True
        self.kill(signal.SIGKILL)

    def _again(self) -> bool:
        """True when this is not the first request (the container is killed now), or
        when there is nothing to stop."""
        if self.pidfd < 0:
            return True
        if self.stopping:
            self.kill(signal.SIGKILL)
            return True
        self.stopping = True
        return False

    def _expired(self, leader: int) -> None:
        self._timer = None
        if leader == self._leader:
            self.kill(signal.SIGKILL)
