# SPDX-License-Identifier: BSD-2-Clause
"""The daemon's restart safety, piece by piece: fd store messages, adoption of
propagation dirs, exit status of adopted leaders."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from machinepy.core import linux, sd
from machinepy.core.spec import ContainerSpec
from machinepy.service.daemon import Adopted, Daemon, Notifier, start_time
from machinepy.service.manager import Entry
from machinepy.supervise.supervisor import PROPAGATE_OWNER_XATTR, Container, sweep_propagate_dirs


def test_consoles_are_stored_unpolled(tmp_path: Path) -> None:
    # A pty master sees POLLHUP at each vhangup() of the container's console;
    # systemd drops a polled fd from its store at the first one.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    r, w = os.pipe()
    try:
        d = Daemon(str(tmp_path / "state"))
        d.notify = Notifier(str(tmp_path / "notify"))
        d._store_console(Entry("box", None), r)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        for fd in fds:
            os.close(fd)
        fields = dict(line.split("=", 1) for line in msg.decode().splitlines())
        assert fields == {"FDSTORE": "1", "FDPOLL": "0", "FDNAME": "console-box"}
        assert len(fds) == 1
    finally:
        sock.close()
        os.close(r)
        os.close(w)


class FakeService:
    def __init__(self) -> None:
        self.adopted: list[Entry] = []

    def adopt(self, entry: Entry, run: Awaitable[int]) -> None:
        self.adopted.append(entry)
        run.close()  # type: ignore[attr-defined]  # a coroutine, never awaited here


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    proc.kill()
    proc.wait()


def _record(name: str, pid: int, start: int, root: str) -> dict[str, Any]:
    return {"name": name, "leader": pid, "start_time": start, "root": root,
            "command": ["/bin/sh"], "boot": False, "machine_id": None,
            "unit": f"machine-{name}.scope", "registered": True, "since": 1,
            "ifindices": []}


@pytest.mark.root  # trusted.* xattrs
def test_adoption_claims_propagation_dirs_and_removes_dead_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        sleeper: subprocess.Popen[bytes]) -> None:
    prop = tmp_path / "propagate"
    prop.mkdir()
    monkeypatch.setattr(sd, "PROPAGATE_DIR", str(prop))  # the one both read
    dead = subprocess.Popen(["true"])
    dead.wait()
    old_daemon = b"%d 1" % dead.pid  # the supervisor that made both dirs: gone
    state = tmp_path / "state"
    state.mkdir()
    for name, pid, start in (("alive", sleeper.pid, start_time(sleeper.pid)),
                             ("dead", dead.pid, 12345)):
        (prop / name).mkdir()
        os.setxattr(prop / name, PROPAGATE_OWNER_XATTR, old_daemon)
        (state / f"{name}.json").write_text(json.dumps(_record(name, pid, start, "/srv")))
    (prop / "nspawns").mkdir()  # no mark: not ours, never touched
    d = Daemon(str(state))
    fake = FakeService()
    try:
        assert d.adopt_survivors(fake) == 1  # type: ignore[arg-type]
        assert [e.name for e in fake.adopted] == ["alive"]
        # The dead container's dir goes at once, not at some later registration.
        assert sorted(os.listdir(prop)) == ["alive", "nspawns"]
        # The next registration's sweep keeps the live one: its mark names a live process.
        sweep_propagate_dirs()
        assert sorted(os.listdir(prop)) == ["alive", "nspawns"]
        assert os.getxattr(prop / "alive", PROPAGATE_OWNER_XATTR) == \
            b"%d %d" % (sleeper.pid, start_time(sleeper.pid))
        assert not (state / "dead.json").exists()
    finally:
        for e in fake.adopted:
            assert isinstance(e.control, Adopted)
            os.close(e.control.pidfd)


def _grandchild(code: int | None, sig: int | None = None) -> tuple[int, int]:
    """A process that is not our child (its parent exits), with a pidfd on it.

    Returns (pid, pidfd); we are a subreaper, so the orphan comes to us to reap."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        g = os.fork()
        if g == 0:
            time.sleep(0.2)
            if sig is not None:
                os.kill(os.getpid(), sig)
            os._exit(code or 0)
        os.write(w, str(g).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    g = int(os.read(r, 32))
    os.close(r)
    return g, os.pidfd_open(g)


def _reap_when_dead(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.mark.parametrize(("code", "sig", "boot", "want"), [
    (7, None, False, 7),
    (0, signal.SIGKILL, False, 128 + 9),
    (0, signal.SIGINT, True, 0),  # reboot(2) in a booted container's pid namespace
])
async def test_adopted_leaders_report_their_exit_status(code: int, sig: int | None,
                                                        boot: bool, want: int) -> None:
    if not _kernel_has_exit_info():
        pytest.skip("needs PIDFD_INFO_EXIT (Linux 6.15)")
    was = ctypes.c_int(0)
    linux.prctl(37, ctypes.addressof(was))  # PR_GET_CHILD_SUBREAPER
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # as spawn() makes any supervisor
    pid, pidfd = _grandchild(code, sig)
    try:
        c = Container(ContainerSpec(command=("/bin/sh",), boot=boot))
        c.leader, c.state = pid, "running"
        adopted = Adopted(c, pidfd, 1.0, [])
        task = asyncio.ensure_future(adopted.run())
        while Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert not task.done()  # a zombie: not reaped, no status yet
        _reap_when_dead(pid)  # what systemd, its parent now, does
        assert await asyncio.wait_for(task, 10) == want
        assert c.state == "exited" and c.status == want
        assert adopted.pidfd == -1  # closed
    finally:
        _reap_when_dead(pid)
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, was.value)  # other tests' orphans: not ours


def _kernel_has_exit_info() -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (6, 15)


@pytest.mark.root  # the holder serves root only
def test_the_holder_keeps_fds_for_the_next_daemon(tmp_path: Path) -> None:
    from machinepy.service.holder import Client

    path = str(tmp_path / "holder.sock")
    proc = subprocess.Popen([sys.executable, "-m", "machinepy.service.holder", path])
    r, w = os.pipe()
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.01)
        first = Client(path)  # the daemon that made the consoles
        first.put("console-a", r)
        first.put("console-b", w)
        first.delete("console-b")
        for fd in first.take_all().values():  # answered after the above: in order
            os.close(fd)
        first.close()  # it stops
        os.close(r)
        nxt = Client(path)  # the next daemon takes them back
        held = nxt.take_all()
        assert list(held) == ["console-a"]
        os.write(w, b"same pipe")
        assert os.read(held["console-a"], 64) == b"same pipe"
        os.close(held["console-a"])
        again = nxt.take_all()  # kept until deleted: a daemon may restart twice
        assert list(again) == ["console-a"]
        os.close(again["console-a"])
        nxt.close()
        assert os.stat(path).st_mode & 0o777 == 0o700  # root's only
        pid = os.fork()
        if pid == 0:  # nobody may not connect
            code = 1
            try:
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                Client(path)
            except PermissionError:
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(OSError):
            os.close(w)
