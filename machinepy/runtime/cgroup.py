# SPDX-License-Identifier: BSD-2-Clause
"""The container's cgroup, host side: its own below ours, or its scope handed over.

PID 1 unshares its cgroup namespace after "go", so the namespace is rooted at
whatever cgroup it sits in then.  Registered, that is machine-NAME.scope.
Unregistered, it would be the supervisor's own cgroup — on a host whose
supervisor sits at the root, the container's cgroup2 mount would be the
host's whole tree, every `cgroup.kill` in it writable by the container's root.
So an unregistered container gets a cgroup of its own below ours first
(systemd-nspawn splits off a "payload" cgroup for the same reason).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

PAYLOAD_PREFIX = "machinepy-payload-"
REMOVE_TIMEOUT = 2.0  # seconds for killed processes to leave the cgroup


class CgroupError(Exception):
    """One line: what could not be done to which cgroup."""


def cgroup2_mount() -> str | None:
    """Where this mount namespace has the unified hierarchy's root (none on v1-only hosts)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2" and fields[3] == "/":
                return fields[4]
    return None


def cgroup_dir(pid: int) -> str | None:
    """The directory of PID's cgroup2 cgroup, or None without a cgroup2 mount."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    with open(f"/proc/{pid}/cgroup") as f:
        path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    if path is None:
        return None
    return os.path.join(mount, path.lstrip("/"))


def delegate(leader: int, uid: int) -> None:
    """Hand the scope's cgroup to the container's root, as nspawn does with -U.

    The scope is delegated (Delegate=yes), but its directory and the files a
    delegatee writes belong to the host's root: systemd inside a user namespace
    could not create its own subtree.  The list of files is the kernel's.
    """
    try:
        directory = cgroup_dir(leader)
        with open("/sys/kernel/cgroup/delegate") as f:
            files = f.read().split()
    except OSError as e:
        raise CgroupError(f"delegating the cgroup to the container: {e}") from None
    if directory is None:
        raise CgroupError("delegating the cgroup to the container: no cgroup2 hierarchy")
    for name in (".", *files):
        try:
            os.chown(os.path.join(directory, name), uid, uid)
        except FileNotFoundError:
            pass  # that controller's file: not enabled here
        except OSError as e:
            raise CgroupError(f"chown {directory}/{name}: {e.strerror}") from None


def _empty(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 0" in f.read()
    except OSError:
        return False


def sweep(parent: str) -> None:
    """Remove empty payload cgroups a SIGKILLed supervisor (or an adopted
    container's) left below PARENT; a populated one is still somebody's."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PAYLOAD_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if _empty(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def make_payload(leader: int) -> str | None:
    """Move LEADER into a new cgroup below ours; its path, or None without cgroup2."""
    parent = cgroup_dir(os.getpid())
    if parent is None:
        return None
    sweep(parent)
    path = os.path.join(parent, f"{PAYLOAD_PREFIX}{leader}")
    for _ in range(3):
        try:
            with contextlib.suppress(FileExistsError):  # a stale one of a recycled pid
                os.mkdir(path, 0o755)
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(leader))
            return path
        except FileNotFoundError:
            continue  # another supervisor's sweep took it between mkdir and write
        except OSError as e:
            remove(path)
            raise CgroupError(f"moving the container into {path}: {e.strerror}") from None
    raise CgroupError(f"moving the container into {path}: {os.strerror(errno.ENOENT)}")


def remove(path: str) -> None:
    """Kill what is left in PATH (the container's) and remove it.  Never raises."""
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
        f.write("1")
    deadline = time.monotonic() + REMOVE_TIMEOUT
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # Killed processes leave asynchronously; a cgroup the container made
            # below its own root (systemd inside does) goes first.
            if e.errno == errno.EBUSY and _remove_children(path):
                continue
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _remove_children(path: str) -> bool:
    removed = False
    for top, _dirs, _files in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        if top != path:
            with contextlib.suppress(OSError):
                os.rmdir(top)
                removed = True
    return removed
