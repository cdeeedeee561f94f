# SPDX-License-Identifier: BSD-2-Clause
"""`--private-users=pick`: a free 65536-id range, and a root tree usable in it.

As systemd-nspawn: a tree whose root directory is already owned by a
multiple of 65536 keeps that range (it was shifted before); otherwise a range
is picked from a hash of the root's path, checked against /etc/subuid,
/etc/subgid, the users in passwd and the maps of every running user
namespace.  The range is held for the supervisor's lifetime by a small child
living in a user namespace with that very map, so every later pick sees it as
taken, and it dies with the supervisor (PDEATHSIG): nothing to squat, nothing
left behind even after SIGKILL.  Picks exclude each other with flock(2) on
/run/machinepy/locks (0700), out of any container's reach.

Ownership, as nspawn's --private-users-ownership: "map" leaves the tree as it
is and gives the container an idmapped mount of it (the kernel shows 0… as the
range's ids inside and writes them back as 0…); "chown" shifts the tree's
owners into the range once, with lchown — idempotent, the root directory last,
so an interrupted shift is finished by the next run; "auto" maps where the
filesystem allows it and chowns elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
import zlib
from collections.abc import Iterator
from typing import TextIO

from machinepy.core import linux

RANGE = 0x10000
FIRST_BASE = 0x80000  # nspawn's pick range: 0x00080000 … 0x6FFF0000
LAST_BASE = 0x6FFF0000
TRIES = 128


class UsernsError(Exception):
    """One line, shown as `machinepy: MESSAGE`."""


def _ranges_from(path: str) -> Iterator[tuple[int, int]]:
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    yield int(fields[1]), int(fields[2])
    except OSError:
        return


def _maps_in_use() -> Iterator[tuple[int, int]]:
    """Outside ranges of every user namespace a process lives in (not the initial one)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("uid_map", "gid_map"):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                inside, outside, count = (int(x) for x in line.split())
                if (inside, outside, count) != (0, 0, 0xFFFFFFFF):
                    yield outside, count


def _taken(base: int) -> bool:
    def overlaps(start: int, count: int) -> bool:
        return start < base + RANGE and base < start + count

    import pwd

    if any(base <= p.pw_uid < base + RANGE for p in pwd.getpwall()):
        return True
    for start, count in (*_ranges_from("/etc/subuid"), *_ranges_from("/etc/subgid")):
        if overlaps(start, count):
            return True
    return any(overlaps(start, count) for start, count in _maps_in_use())


class RangeHold:
    """A child in a fresh user namespace mapping 0… to BASE…: the range is in use
    (_maps_in_use sees it) while it lives; it exits when released or when we die."""

    def __init__(self, base: int) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        release_r, self._release = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # plain syscalls only
            try:
                # Only our two pipes: a copy of, say, `run -d`'s report pipe
                # would keep the foreground process waiting for its end.
                low, high = sorted((ready_w, release_r))
                os.closerange(0, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, 1 << 20)
                linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() == parent:  # else the parent died before the prctl
                    linux.unshare(linux.CLONE_NEWUSER)
                    os.write(ready_w, b"1")
                    os.read(release_r, 1)  # EOF: released, or the parent is gone
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(release_r)
        self.pid = pid
        try:
            if os.read(ready_r, 1) != b"1":
                raise OSError(1, "unshare(CLONE_NEWUSER) failed")
            text = f"0 {base} {RANGE}\n"
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)

    def close(self) -> None:
        if self.pid:
            os.close(self._release)
            os.waitpid(self.pid, 0)
            self.pid = 0


def shifted_base(root: str) -> int | None:
    """The range a tree was shifted into before, from its root directory's owner."""
    st = os.lstat(root)
    if st.st_uid >= RANGE and st.st_uid % RANGE == 0 and st.st_gid == st.st_uid:
        return st.st_uid
    return None


def pick(root: str) -> tuple[int, RangeHold | None]:
    """(base, hold): the tree's own range, or a free one held by the returned RangeHold."""
    base = shifted_base(root)
    if base is not None:
        return base, None
    from machinepy.runtime.attachsock import AttachError, locked_dir

    slots = (LAST_BASE - FIRST_BASE) // RANGE
    start = zlib.crc32(os.path.realpath(root).encode()) % slots
    try:
        with locked_dir("locks"):  # the map is visible to the next picker before it unlocks
            for i in range(TRIES):
                base = FIRST_BASE + ((start + i) % slots) * RANGE
                if not _taken(base):
                    return base, RangeHold(base)
    except (AttachError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise UsernsError(f"--private-users=pick: holding a range: {why}") from None
    raise UsernsError("--private-users=pick: no free 65536-id range found")


def shift(root: str, base: int, progress: TextIO | None = None) -> int:
    """Make the tree owned by ids BASE… instead of 0…; returns how many entries changed.

    Stays on the root's filesystem.  chown(2) clears setuid/setgid bits, which
    are put back; file capabilities (security.capability) are lost, as with
    nspawn's chown mode.  A big tree takes a while: on a terminal (stderr, or
    PROGRESS) one line counts the entries; elsewhere nothing is shown.
    """
    root_dev = os.lstat(root).st_dev
    changed = seen = 0
    out = progress if progress is not None else sys.stderr
    tty, shown = out.isatty(), 0.0

    def report(final: bool = False) -> None:
        nonlocal shown
        now = time.monotonic()
        if final:
            if shown:
                out.write("\r\x1b[K")
                out.flush()
        elif now - shown >= 0.1:
            shown = now
            out.write(f"\r\x1b[Kmachinepy: shifting {root} into {base}…: {seen} entries, "
                      f"{changed} changed")
            out.flush()

    def fix(path: str, st: os.stat_result) -> None:
        nonlocal changed
        uid, gid = st.st_uid, st.st_gid
        if base <= uid < base + RANGE and base <= gid < base + RANGE:
            return  # done by an earlier, interrupted run
        if uid >= RANGE or gid >= RANGE:
            raise UsernsError(f"--private-users=pick: {path} is owned by {uid}:{gid}, outside "
                              f"0…65535: the tree belongs to another range")
        os.lchown(path, uid + base, gid + base)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    try:
        for top, dirs, files in os.walk(root, topdown=True):
            for name in files + dirs:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if st.st_dev != root_dev:
                    if name in dirs:
                        dirs.remove(name)  # a mount point: not ours to change
                    continue
                fix(path, st)
                seen += 1
                if tty and not seen % 256:
                    report()
        fix(root, os.lstat(root))  # last: marks the tree as shifted
    finally:
        if tty:
            report(final=True)
    return changed


def _userns_with_map(base: int) -> int:
    """An fd of a fresh user namespace mapping 0… to BASE…, for idmapped mounts:
    a RangeHold's namespace, which lives on through the fd once it is let go."""
    hold = RangeHold(base)
    try:
        return os.open(f"/proc/{hold.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        hold.close()


def idmapped_tree(root: str, userns: int) -> int:
    """A detached, idmapped copy of the mount tree at ROOT, ready for move_mount."""
    tree = linux.open_tree(linux.AT_FDCWD, root, linux.OPEN_TREE_CLONE | linux.AT_RECURSIVE)
    try:
        linux.idmap_tree(tree, userns)
    except OSError:
        os.close(tree)
        raise
    return tree


@contextlib.contextmanager
def private_root(root: str, ownership: str = "auto") -> Iterator[tuple[int, int | None]]:
    """Pick (and hold) a range for ROOT; yields (base, userns fd for idmapped
    mounts of ROOT, or None when the tree was shifted instead)."""
    shifted = shifted_base(root)
    if shifted is not None and ownership == "map":
        raise UsernsError(f"--private-users-ownership=map: {root} was shifted into the range "
                          f"{shifted} before: use chown or auto for it")
    base, lock = pick(root)
    userns: int | None = None
    try:
        if shifted is None and ownership != "chown":
            try:
                userns = _userns_with_map(base)
                os.close(idmapped_tree(root, userns))  # the filesystem must allow it
            except OSError as e:
                if userns is not None:
                    os.close(userns)
                    userns = None
                if ownership == "map":
                    raise UsernsError(f"--private-users-ownership=map: {root}: "
                                      f"{e.strerror or e}") from None
        if userns is None:
            try:
                shift(root, base)
            except OSError as e:
                raise UsernsError(f"--private-users=pick: chown {e.filename}: "
                                  f"{e.strerror}") from None
        yield base, userns
    finally:
        if userns is not None:
            os.close(userns)
        if lock is not None:
            lock.close()
