# SPDX-License-Identifier: BSD-2-Clause
"""The daemon's restart safety, piece by piece: fd store messages, adoption of
propagation dirs, exit status of adopted leaders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from machinepy import daemon as daemon_mod
from machinepy import supervisor
from machinepy.daemon import Adopted, Daemon, Notifier, start_time
from machinepy.service import Entry
from machinepy.supervisor import PROPAGATE_OWNER_XATTR, sweep_propagate_dirs


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
    monkeypatch.setattr(daemon_mod, "PROPAGATE_DIR", str(prop))
    monkeypatch.setattr(supervisor, "PROPAGATE_DIR", str(prop))
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
