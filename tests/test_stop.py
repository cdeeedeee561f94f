# SPDX-License-Identifier: BSD-2-Clause
"""The stop policy shared by the supervisor and the service's adopted containers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from machinepy.runtime.loop import MiniLoop
from machinepy.supervise.stop import StopPolicy

# Ignores SIGTERM (a PID 1 without a handler does the same); says so once it does.
STUBBORN = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(60)"


@pytest.fixture
def stubborn() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def start(procs: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p, os.pidfd_open(p.pid)


def run_for(loop: MiniLoop, seconds: float) -> None:
    async def wait() -> None:
        fut = loop.create_future()
        loop.call_later(seconds, fut.set_result, None)
        await fut

    loop.run(wait())


def test_poweroff_kills_after_the_grace_time(stubborn: list[subprocess.Popen[bytes]]) -> None:
    loop = MiniLoop()
    proc, pidfd = start(stubborn)
    policy = StopPolicy(boot=False, timeout=0.2, loop=loop)
    policy.started(pidfd)
    policy.poweroff()  # SIGTERM, ignored
    assert proc.poll() is None
    run_for(loop, 0.6)
    assert proc.wait(5) == -signal.SIGKILL
    os.close(pidfd)


def test_an_old_poweroff_spares_the_next_leader(stubborn: list[subprocess.Popen[bytes]]) -> None:
    # A booted container that rebooted in place meanwhile has a new leader.
    loop = MiniLoop()
    first, fd1 = start(stubborn)
    policy = StopPolicy(boot=False, timeout=0.2, loop=loop)
    policy.started(fd1)
    policy.poweroff()
    second, fd2 = start(stubborn)
    policy.started(fd2)
    run_for(loop, 0.6)
    assert second.poll() is None and first.poll() is None  # the timer went with its leader
    policy.terminate()
    assert second.wait(5) == -signal.SIGKILL
    os.close(fd1)
    os.close(fd2)


def test_a_second_request_kills_at_once(stubborn: list[subprocess.Popen[bytes]]) -> None:
    loop = MiniLoop()
    proc, pidfd = start(stubborn)
    policy = StopPolicy(boot=False, loop=loop)
    policy.started(pidfd)
    policy.forward(signal.SIGTERM)
    assert proc.poll() is None and policy.stopping
    policy.forward(signal.SIGTERM)
    assert proc.wait(5) == -signal.SIGKILL
    os.close(pidfd)
    loop.close()


def test_nothing_to_stop_before_a_leader() -> None:
    loop = MiniLoop()
    policy = StopPolicy(boot=True, loop=loop)
    policy.poweroff()
    assert not policy.stopping
    loop.close()
