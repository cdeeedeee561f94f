# SPDX-License-Identifier: BSD-2-Clause
"""The daemon through restart and SIGKILL rounds, with containers running.

Rounds: restart, SIGKILL, stop and start (on systemd < 254, the console
holder's case).  After every round each container must still be there, the same
process, with its console, state file, propagation dir, machine and scope, and
the daemon's fd table no bigger than after the first adoption.  Small by default (CI); by
hand: MPY_SOAK_CONTAINERS=50 MPY_SOAK_ROUNDS=20.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from integration.test_service import (
    CONSOLE,
    DEST,
    WATCH_REMOVED,
    busctl,
    create,
    host,
    installed,
    main_pid,
    manager,
    names,
    wait_for,
)
from machinepy.service.manager import container_path

__all__ = ["host", "installed"]  # fixtures

CONTAINERS = int(os.environ.get("MPY_SOAK_CONTAINERS", "3"))
ROUNDS = int(os.environ.get("MPY_SOAK_ROUNDS", "6"))
SHELL = "while read x; do echo got-$x; done"  # PID 1 is a shell on its console
PROPAGATE = "/run/systemd/nspawn/propagate"

# Runs in the test host: each dir's owner mark, as JSON.
MARKS = ("import json, os, sys\n"
         "d = sys.argv[1]\n"
         "print(json.dumps({n: os.getxattr(os.path.join(d, n), 'trusted.machinepy.owner')"
         ".decode() for n in sorted(os.listdir(d))}))")


def _leaders(host: Any) -> dict[str, int]:
    r = busctl(host, "--json=short", "--", "call", *DEST, "ListContainers")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["data"][0]
    assert all(state == "running" for _, state, _, _ in rows), rows
    return {name: leader for name, _, leader, _ in rows}


def _start_time(host: Any, pid: int) -> int:
    stat = host.run(["cat", f"/proc/{pid}/stat"]).stdout
    return int(stat.rsplit(")", 1)[1].split()[19])


def _fds(host: Any, pid: int) -> int:
    return len(host.run(["ls", f"/proc/{pid}/fd"]).stdout.split())


def _check(host: Any, leaders: dict[str, int], tag: str) -> int:
    """Everything each container had; returns the daemon's fd count."""
    assert _leaders(host) == leaders
    ls = host.run(["ls", "-A", "/run/machinepy"]).stdout.split()
    assert sorted(ls) == sorted(f"{n}.json" for n in leaders), ls  # and no .tmp
    r = host.run([sys.executable, "-c", MARKS, PROPAGATE])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {n: f"{pid} {_start_time(host, pid)}"
                                    for n, pid in leaders.items()}
    machines = host.run(["machinectl", "list", "--no-legend"]).stdout
    assert sorted(line.split()[0] for line in machines.splitlines() if line) == sorted(leaders)
    scopes = host.run(["systemctl", "list-units", "--state=running", "--no-legend",
                       "machine-*.scope"]).stdout
    assert len([s for s in scopes.splitlines() if s.strip()]) == len(leaders), scopes
    for name in leaders:
        r = host.run([sys.executable, "-c", CONSOLE, name, tag, f"got-{tag}"])
        assert r.stdout.split("\n")[:2] == ["tty True", "found"], (name, r.stdout + r.stderr)
    return _fds(host, main_pid(host))


def _new_daemon(host: Any, old: int) -> None:
    wait_for(lambda: main_pid(host) not in (0, old) and host.run(
        ["systemctl", "is-active", "machinepy.service"]).stdout.strip() == "active",
        30, "a new daemon")
    wait_for(lambda: manager(host, "ListContainers").returncode == 0, 30, "its name")


def test_soak_restart_and_sigkill_rounds(host: Any, busybox_root: Path) -> None:
    started = time.monotonic()
    manager(host, "ListContainers")
    want = [f"soak-{i}" for i in range(CONTAINERS)]
    for name in want:
        create(host, name, busybox_root, "/bin/sh", "-c", SHELL)
    leaders = _leaders(host)
    assert sorted(leaders) == want
    baseline = _check(host, leaders, "r0")
    for i in range(1, ROUNDS + 1):
        old = main_pid(host)
        kind = ("restart", "sigkill", "stop")[(i - 1) % 3]
        if kind == "restart":
            assert host.run(["systemctl", "restart", "machinepy.service"]).returncode == 0
        elif kind == "sigkill":  # the daemon dies hard; Restart=on-failure brings it back
            assert host.run(["systemctl", "kill", "-s", "SIGKILL", "--kill-who=main",
                             "machinepy.service"]).returncode == 0
        else:  # systemd < 254 empties the fd store: the console holder has them
            assert host.run(["systemctl", "stop", "machinepy.service"]).returncode == 0
            time.sleep(0.5)  # a while with no daemon at all
            assert manager(host, "ListContainers").returncode == 0  # activation
        _new_daemon(host, old)
        fds = _check(host, leaders, f"r{i}")
        if i == 1:
            baseline = fds
        assert fds <= baseline, f"round {i}: {fds} fds, {baseline} after the first"
    # An adopted container's exit status is known (SIGKILL: 128 + 9), not -1.
    first = want[0]
    watcher = host.popen([sys.executable, "-c", WATCH_REMOVED, first],
                         stdout=__import__("subprocess").PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "subscribed\n"
        assert manager(host, "TerminateContainer", "s", first).returncode == 0
        out, _ = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert out.split() == [first, container_path(first), "137"], out
    for name in want[1:]:
        assert manager(host, "TerminateContainer", "s", name).returncode == 0
    wait_for(lambda: not names(host), 30, "the containers to go")
    wait_for(lambda: host.run(["ls", "-A", PROPAGATE]).stdout.strip() == "", 10,
             "their propagation dirs to go")
    wait_for(lambda: host.run(["test", "-e", "/run/machinepy"]).returncode != 0, 10,
             "the state dir to go")
    assert time.monotonic() - started < 60 + 30 * ROUNDS  # bounded, by construction
    holder = host.run(["systemctl", "show", "-P", "MainPID", "machinepy-consoles.service"])
    if int(holder.stdout.strip() or 0):  # systemd < 254: its cost, for the record
        status = host.run(["cat", f"/proc/{holder.stdout.strip()}/status"]).stdout
        print("console holder:", next(x for x in status.splitlines() if x.startswith("VmRSS")))
