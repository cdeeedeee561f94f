# SPDX-License-Identifier: BSD-2-Clause
"""Detached containers: their supervisor keeps the console, clients attach to it.

The supervisor of a detached container listens on one unix socket in a private
directory, /run/machinepy/attach (0700; $XDG_RUNTIME_DIR/machinepy/attach for
other users), never on an abstract name: those are per network namespace, so
any container sharing the host's network could connect or squat the name.

    attach/@PID.START      the socket, named after its supervisor (pid, start time)
    attach/KEY -> @PID.START   one symlink per key: the machine name, the
                           leader's pid and the supervisor's pid

The symlink is the record the client checks the server against: before it
sends or receives a byte, the peer (SO_PEERCRED/SO_PEERPIDFD) must be that
very process, ours (or root's), in our user and pid namespaces.  The server
checks its peers the same way, so nothing inside a container is served even
where it reaches the socket.  An attaching client receives the pty master over
SCM_RIGHTS and relays it; while a client is attached the supervisor stops
draining the console, and resumes when the client hangs up (^]^]^]).

Clean-up: the supervisor removes its entries on every path it lives through;
for SIGKILL, its janitor (machinepy.runtime.janitor) does; and every start sweeps the
entries of dead supervisors.  Changes to the directory happen under flock(2)
on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator

from machinepy.core.peer import alive, check_peer, process_key
from machinepy.runtime.console import Drain
from machinepy.runtime.loop import LoopLike

GREETING = b"machinepy-console\n"
ROOT_DIR = "/run/machinepy"
KEY_RE = re.compile(r"[0-9]+|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
TARGET_RE = re.compile(r"@([0-9]+)\.([0-9]+)")
ATTACHED = "client"  # the one attached client, as the console's drain knows it
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class AttachError(Exception):
    """One line, shown as `machinepy: MESSAGE`."""


# -- the private directory ------------------------------------------------------------

def base_dir() -> str:
    """Where our private runtime directories live: /run/machinepy for root,
    $XDG_RUNTIME_DIR/machinepy for other users."""
    if os.geteuid() == 0:
        return ROOT_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime.startswith("/"):
        raise AttachError("XDG_RUNTIME_DIR is not set: a user's detached consoles live in "
                          "$XDG_RUNTIME_DIR/machinepy/attach")
    return os.path.join(runtime, "machinepy")


def _subdir(parent: int, name: str, path: str, create: bool, private: bool) -> int:
    """Open (and make) PARENT/NAME without following symlinks; it must be ours and
    writable by nobody else (PRIVATE: not even readable)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700 if private else 0o755, dir_fd=parent)
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    st = os.fstat(fd)
    bad = 0o077 if private else 0o022
    if st.st_uid != os.geteuid() or st.st_mode & bad:
        os.close(fd)
        raise AttachError(f"{path}: not a private directory (owner {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it")
    return fd


def open_private_dir(sub: str, create: bool) -> tuple[int, str]:
    """(fd, path) of BASE/SUB, e.g. /run/machinepy/attach.  FileNotFoundError when
    it does not exist and CREATE is false."""
    base = base_dir()
    top, name = os.path.split(base)
    try:
        top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise AttachError(f"{top}: {e.strerror}") from None
    try:
        st = os.fstat(top_fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise AttachError(f"{top}: writable by others; refusing to use it")
        base_fd = _subdir(top_fd, name, base, create, private=os.geteuid() != 0)
    finally:
        os.close(top_fd)
    try:
        return _subdir(base_fd, sub, os.path.join(base, sub), create, private=True), \
            os.path.join(base, sub)
    finally:
        os.close(base_fd)


@contextlib.contextmanager
def locked_dir(sub: str) -> Iterator[int]:
    """The private directory SUB, made if needed and flock'ed; removed on the way out
    when empty (as the daemon does with its state dir: nothing left behind)."""
    for _ in range(20):
        try:
            fd, path = open_private_dir(sub, create=True)
        except FileNotFoundError:
            continue  # a parent was removed under us: make it again
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            break
        os.close(fd)  # removed while we waited for the lock
    else:
        raise AttachError(f"{base_dir()}/{sub}: keeps disappearing")
    try:
        yield fd
    finally:
        remove_if_empty(path)
        os.close(fd)  # drops the lock


def remove_if_empty(path: str) -> None:
    """rmdir PATH and then its parent if empty; the caller holds PATH's lock."""
    with contextlib.suppress(OSError):
        os.rmdir(path)
        os.rmdir(os.path.dirname(path))


def _owner_of(dir_fd: int, name: str) -> tuple[int, int] | None:
    """(pid, start) named by entry NAME (a socket `@PID.START` or a key symlink to one)."""
    if name.startswith("@"):
        target = name
    else:
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return None
    m = TARGET_RE.fullmatch(target)
    return (int(m[1]), int(m[2])) if m else None


def sweep(dir_fd: int) -> None:
    """Remove the entries of supervisors that are gone (SIGKILLed, and their janitor too)."""
    for name in os.listdir(dir_fd):
        owner = _owner_of(dir_fd, name)
        if owner is None or not alive(*owner):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)


# -- peer checks -------------------------------------------------------------------------

# -- the server (in the detached supervisor) ----------------------------------------------

def _forget(dir_fd: int, target: str) -> None:
    """Remove the socket TARGET and the keys naming it; the caller holds the lock."""
    for name in os.listdir(dir_fd):
        with contextlib.suppress(OSError):
            if name == target or (not name.startswith("@") and
                                  os.readlink(name, dir_fd=dir_fd) == target):
                os.unlink(name, dir_fd=dir_fd)


def forget(sock_path: str) -> None:
    """The janitor's job (machinepy.runtime.janitor ATTACH) after a supervisor is gone:
    its socket at SOCK_PATH and its keys, and only those (a key may meanwhile
    name another supervisor); then the directory if that left it empty."""
    path, target = os.path.split(sock_path)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return  # the supervisor got there first
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not TARGET_RE.fullmatch(target):
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        _forget(fd, target)
        remove_if_empty(path)
    finally:
        os.close(fd)


class AttachServer:
    """Serve MASTER to attaching clients, as KEYS (name, leader pid, our pid).

    ON_SIGKILL(path) hands the socket's path to what cleans after a SIGKILL
    (the supervisor's janitor)."""

    def __init__(self, loop: LoopLike, master: int, keys: list[str],
                 on_sigkill: Callable[[str], None] | None = None) -> None:
        self.master = master
        self.loop = loop
        self.client: socket.socket | None = None
        start = process_key(os.getpid())
        assert start is not None
        self.target = f"@{os.getpid()}.{start[0]}"
        self.keys: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with locked_dir("attach") as fd:
                if on_sigkill is not None:
                    on_sigkill(os.path.join(base_dir(), "attach", self.target))
                sweep(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.target, dir_fd=fd)  # ours, from before a reboot
                # By the directory's fd: sun_path holds 108 bytes, $XDG_RUNTIME_DIR may be long.
                self.listener.bind(f"/proc/self/fd/{fd}/{self.target}")
                os.chmod(self.target, 0o600, dir_fd=fd, follow_symlinks=False)
                self.listener.listen(4)
                for key in keys:
                    try:
                        os.symlink(self.target, key, dir_fd=fd)
                    except FileExistsError:
                        continue  # a live supervisor has that name; our pid still works
                    self.keys.append(key)
        except BaseException:
            self.listener.close()
            self._unlink()
            raise
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._accept)
        # While nobody watches, keep reading so the container never blocks on output.
        self.drain = Drain(loop, master)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        # Not a byte to anyone in a container, nor to another user.
        if self.client is not None or check_peer(conn) is not None:
            conn.close()
            return
        self.client = conn
        self.drain.attach(ATTACHED)
        socket.send_fds(conn, [GREETING], [self.master])
        conn.setblocking(False)
        self.loop.add_reader(conn.fileno(), self._client_readable)

    def _client_readable(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # detached
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None
            self.drain.detach(ATTACHED)

    def _unlink(self) -> None:
        """Our entries, and only ours: a key may meanwhile name another supervisor."""
        with contextlib.suppress(AttachError, OSError), locked_dir("attach") as fd:
            _forget(fd, self.target)
        self.keys.clear()

    def close(self) -> None:
        if self.listener.fileno() >= 0:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self._unlink()
        self.drain.close()
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None


