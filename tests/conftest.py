# SPDX-License-Identifier: BSD-2-Clause
"""Shared fixtures: cached rootfs, root-only skipping and a leak check for real containers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rootfs import cached_busybox_rootfs

SETTLE_TIMEOUT = 3.0


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root: creates namespaces, mounts and network links")


@pytest.fixture(scope="session")
def busybox_root() -> Path:
    return cached_busybox_rootfs()


def _listdir(path: str, prefix: str = "") -> set[str]:
    try:
        return {f"{path}/{n}" for n in os.listdir(path) if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


def _walk(path: str) -> set[str]:
    found: set[str] = set()
    for top, dirs, files in os.walk(path):
        found.update(os.path.join(top, n) for n in dirs + files)
    return found


def _mountpoints() -> set[str]:
    # Counted, so a mount stacked on an existing mount point shows up too.
    seen: dict[str, int] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            seen[point] = seen.get(point, 0) + 1
    return {p if n == 1 else f"{p} (x{i})" for p, n in seen.items() for i in range(1, n + 1)}


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 0:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _machinepy_processes(exclude: set[int]) -> set[str]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # Other sessions' `flock …machinepy-suite.lock` waiters are not containers.
        if "machinepy" in cmdline and not cmdline.startswith("flock "):
            found.add(f"pid {entry}: {cmdline}")
    return found


def _payload_cgroups() -> set[str]:
    from machinepy.runtime.cgroup import PAYLOAD_PREFIX, cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        return set()
    return {top for top, _dirs, _files in os.walk(mount)
            if os.path.basename(top).startswith(PAYLOAD_PREFIX)}


def snapshot(exclude_pids: set[int]) -> dict[str, set[str]]:
    """What a container run may leave behind on the host."""
    return {
        "mounts": _mountpoints(),
        "links": _listdir("/sys/class/net"),
        "temp": _listdir("/tmp", "machinepy") | _listdir("/var/tmp", "machinepy"),
        "run": _walk("/run/machinepy") | _walk("/run/systemd/nspawn/propagate"),
        "processes": _machinepy_processes(exclude_pids),
        "cgroups": _payload_cgroups(),
    }


def leaks(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, set[str]]:
    """Only what appeared: things that vanished during the test are not leaks."""
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


@pytest.fixture
def leak_check() -> Iterator[None]:
    exclude = _ancestors()
    before = snapshot(exclude)
    # Processes already running (a session's test host, another suite) are not ours.
    yield
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        found = leaks(before, snapshot(exclude))
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # supervisors exit and links disappear asynchronously
    if found:
        report = "\n".join(
            f"  {kind}:\n" + "\n".join(f"    {x}" for x in sorted(items))
            for kind, items in found.items()
        )
        pytest.fail(f"left behind on the host after the test:\n{report}", pytrace=False)


@pytest.fixture(autouse=True)
def _leak_check_for_root_tests(request: pytest.FixtureRequest) -> Any:
    if request.node.get_closest_marker("root") is not None and os.geteuid() == 0:
        request.getfixturevalue("leak_check")
