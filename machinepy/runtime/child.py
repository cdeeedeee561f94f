# SPDX-License-Identifier: BSD-2-Clause
"""Everything between fork and exec.

Process choreography:

    supervisor ──fork──▶ setup child: unshare(namespaces) ──fork──▶ PID 1
                          reports PID 1's pid, exits              waits for "go"
    supervisor: id maps, interfaces, scope + machine, then "go" ─▶ mounts,
                                                                  pivot_root, exec

Code here runs in forked children of a possibly asyncio-running parent: plain
syscalls only — no asyncio, no logging, no locks, no imports.  A failure is
written to the status pipe as one line (`ERR step: path: reason`) and the child
exits; the supervisor turns it into one line on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import termios
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

from machinepy.core import linux
from machinepy.runtime.mounts import (
    O_PATH,
    MountOp,
    mounts_root,
    open_in_root,
    preopen,
    propagation_ops,
)

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

NOTIFY_DIR = "/run/host"
# Where the new root is assembled before pivot_root: a tmpfs over /tmp in the
# container's own mount namespace (bwrap does the same), so nothing is created
# on the host, and nothing is left there even after a SIGKILL.
STAGING = "/tmp"
STAGED_ROOT = f"{STAGING}/root"
NOTIFY_SOCKET = "/run/host/notify"

# Signals the supervisor handles or Python sets to SIG_IGN: restore the defaults
# the exec'd program expects (SIGPIPE matters for every shell pipeline).
_RESET_SIGNALS = (
    signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
    signal.SIGCHLD, signal.SIGWINCH, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2,
)


class ChildConfig(NamedTuple):
    """All the child needs, computed before fork so the child only makes syscalls."""

    unshare_flags: int
    argv: Sequence[str]
    env: dict[str, str]
    root: str | None  # None: stay on the host root
    # A detached (idmapped) mount of the root, attached instead of binding ROOT.
    root_tree: int | None = None
    ephemeral: bool = False
    staging: str = "mode=755,size=4m"  # the staging tmpfs's data (mounts.staging_data)
    plan: Sequence[MountOp] = ()
    hostname: str | None = None
    chdir: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: Sequence[int] = ()
    cgroupns: bool = True  # unshared after "go", once the leader sits in its scope
    # With a root of its own: unshared only right before the cgroup2 mount, after
    # a second line from the supervisor ("cg": the leader's cgroup is final),
    # so the supervisor's cgroup migration (an RCU grace period, ~10 ms) runs
    # while this process makes its mounts.
    cgroup_late: bool = False
    # Whether the user namespace has a root: a user's `--user=$USER` container
    # without subordinate ids maps only the user, and PID 1 stays that id.
    root_mapped: bool = True
    console: int | None = None  # pty slave fd: becomes the controlling tty and 0-2
    caps_drop: Sequence[int] = ()
    landlock_scope: int = 0  # LANDLOCK_SCOPE_* bits; 0: no Landlock domain
    notify: int | None = None  # datagram socket bound at /run/host/notify inside
    supervisor: int = 0  # pid whose death kills the container (0: outlive it, for the daemon)
    seccomp: Sequence[bytes] = ()  # BPF programs compiled by the parent (seccomp.py)
    no_new_privs: bool = False


class ChildError(Exception):
    def __init__(self, step: str, err: OSError | str):
        if isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            text = err.strerror or str(err)
            # strerror may already start with "what:"; keep one line.
            msg = f"{step}: {where}{text}"
        else:
            msg = f"{step}: {err}"
        super().__init__(msg.replace("\n", " "))


def _report(fd: int, msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"ERR " + msg.encode(errors="replace") + b"\n")


def setup_child(cfg: ChildConfig, status_w: int, go_r: int) -> NoReturn:
    """Runs in the setup child: unshare, fork PID 1, report its pid, exit."""
    try:
        try:
            linux.unshare(cfg.unshare_flags)
        except OSError as e:
            raise ChildError("unshare", e) from None
        pid = os.fork()
        if pid == 0:
            container_init(cfg, status_w, go_r)
        os.write(status_w, f"PID {pid}\n".encode())
        os._exit(0)
    except ChildError as e:
        _report(status_w, str(e))
    except BaseException as e:  # never let a traceback escape a forked child
        _report(status_w, f"setup: {e!r}")
    os._exit(1)


def _read_go(go_r: int) -> bytes:
    """One line from the supervisor; byte by byte, since a second may follow."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(go_r, 1)
        if not chunk:  # supervisor gone: never run unsupervised
            os._exit(1)
        data += chunk
    return data[:-1]


def _join_cgroup_namespace(go_r: int) -> None:
    if _read_go(go_r) != b"cg":
        os._exit(1)
    os.close(go_r)
    _step("unshare cgroup namespace", linux.unshare, linux.CLONE_NEWCGROUP)


def container_init(cfg: ChildConfig, status_w: int, go_r: int) -> NoReturn:
    """Runs as the container's PID 1 until exec."""
    try:
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # A session of our own in every console mode: the container must never
        # hold the user's controlling terminal (TIOCSTI, job control signals).
        _step("setsid", os.setsid)
        go = _read_go(go_r).split(b" ", 1)
        late = cfg.cgroupns and cfg.cgroup_late
        if not late:
            os.close(go_r)
            go_r = -1
        if go[0] != b"go":
            os._exit(1)
        plan = list(cfg.plan)
        if len(go) == 2 and cfg.root is not None:
            # machinectl bind: machined mounts into the host's propagation
            # directory; the container receives it at /run/host/incoming.
            plan += propagation_ops(os.fsdecode(go[1]))
        _close_fds(keep=(status_w, *(fd for fd in (cfg.console, cfg.notify, cfg.root_tree)
                                     if fd is not None),
                         *((go_r,) if late else ())))
        # Host paths are opened while we still have our host credentials.
        host_root = _open_root(cfg.root) if cfg.root is not None and cfg.root_tree is None else -1
        try:
            plan, host_fds = preopen(plan)
        except OSError as e:
            raise ChildError("mount source", e) from None
        # Handles on the host's tree: closed as soon as the mounts are made,
        # before anything (chdir to HOME, exec) could go through them.
        host_fds += [fd for fd in (host_root, cfg.root_tree) if fd is not None and fd >= 0]
        if cfg.unshare_flags & linux.CLONE_NEWUSER:
            # Our host uid is unmapped in the new namespace until we become its root.
            _step("become root in the user namespace", _become_ns_root, cfg.root_mapped)
        else:
            # The container's root is the host's root: not the caller's groups, too.
            _step("drop supplementary groups", os.setgroups, [])
        _join_session_keyring()
        if cfg.cgroupns and not late:
            _step("unshare cgroup namespace", linux.unshare, linux.CLONE_NEWCGROUP)
        if cfg.unshare_flags & linux.CLONE_NEWNET:
            _step("bring up lo", _loopback_up)
        if cfg.hostname is not None:
            _step("sethostname", linux.sethostname, cfg.hostname)
        if cfg.unshare_flags & linux.CLONE_NEWNS:
            _step("make mounts private", linux.mount, None, "/", None,
                  linux.MS_REC | linux.MS_SLAVE)
        if cfg.root is not None:
            _enter_root(cfg, host_root, plan, host_fds,
                        (lambda: _join_cgroup_namespace(go_r)) if late else None)
        else:
            _apply_plan(plan, "/")
            _close_all(host_fds)
        if cfg.console is not None:
            _take_console(cfg.console)
        _drop_caps(cfg.caps_drop)
        if cfg.landlock_scope:
            # While still privileged: restrict_self needs CAP_SYS_ADMIN or no_new_privs.
            _step("landlock", linux.landlock_scope, cfg.landlock_scope)
        if cfg.no_new_privs:
            _step("set no_new_privs", linux.prctl, linux.PR_SET_NO_NEW_PRIVS, 1)
        # After the mounts, pivot_root, the bounding set and Landlock (calls the
        # filter denies); before the uid switch, while CAP_SYS_ADMIN in our namespace
        # still lets us load it without no_new_privs.
        for program in cfg.seccomp:
            _step("load seccomp filter", linux.seccomp_load, program)
        _become_user(cfg)
        _die_with_supervisor(cfg.supervisor, status_w)
        _chdir(cfg)
        _exec(cfg)
    except ChildError as e:
        _report(status_w, str(e))
    except BaseException as e:
        _report(status_w, f"container setup: {e!r}")
    os._exit(127)


def _step(what: str, fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        raise ChildError(what, e) from None


def _become_ns_root(root_mapped: bool) -> None:
    if root_mapped:
        os.setresgid(0, 0, 0)
    try:
        os.setgroups([])
    except PermissionError:
        # newgidmap denies setgroups when it maps only the user's own group:
        # then there are no supplementary groups of ours to drop anyway.
        with open("/proc/self/setgroups", "rb") as f:
            if f.read().strip() != b"deny":
                raise
    if root_mapped:
        os.setresuid(0, 0, 0)


def _join_session_keyring() -> None:
    # The caller's session keyring (its credentials, tokens) is not the
    # container's: a new anonymous one.  Where keyrings are compiled out or
    # denied by policy there is nothing to leak: go on.
    try:
        linux.join_session_keyring()
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise ChildError("join session keyring", e) from None


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _loopback_up() -> None:
    # Two ioctls instead of netlink: nothing to import between fork and exec.
    fd = linux.socket(linux.AF_INET, linux.SOCK_DGRAM | linux.SOCK_CLOEXEC)
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(fd, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        os.close(fd)


def _close_fds(keep: Sequence[int]) -> None:
    last = 2
    for fd in sorted(k for k in keep if k > 2):
        os.closerange(last + 1, fd)
        last = fd
    os.closerange(last + 1, 1 << 20)


def _apply_plan(plan: Sequence[MountOp], root: str,
                before_cgroup: Callable[[], None] | None = None) -> None:
    """Apply PLAN below ROOT; BEFORE_CGROUP runs right before the cgroup2 mount
    (or at the end, when there is none)."""
    root_fd = os.open(root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for op in plan:
            if before_cgroup is not None and getattr(op, "fstype", None) == "cgroup2":
                before_cgroup()
                before_cgroup = None
            try:
                op.apply(root_fd)
                if mounts_root(op) and root != "/":
                    # The fd still names the directory under the new mount.
                    os.close(root_fd)
                    root_fd = -1
                    root_fd = os.open(root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise ChildError(type(op).__name__.lower(), e) from None
    finally:
        if root_fd >= 0:
            os.close(root_fd)
    if before_cgroup is not None:
        before_cgroup()


def _open_root(root: str) -> int:
    try:
        return os.open(root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ChildError("open root", e) from None


def _enter_root(cfg: ChildConfig, host_root: int, plan: Sequence[MountOp],
                host_fds: Sequence[int], before_cgroup: Callable[[], None] | None) -> None:
    _step("mount staging tmpfs", linux.mount, "tmpfs", STAGING, "tmpfs", linux.MS_NOSUID,
          cfg.staging)
    _step("mkdir", os.mkdir, STAGED_ROOT, 0o755)
    if cfg.root_tree is not None:
        # The supervisor's idmapped copy of the root (--private-users=pick).
        lower = f"{STAGING}/lower" if cfg.ephemeral else STAGED_ROOT
        if cfg.ephemeral:
            _step("mkdir", os.mkdir, lower, 0o755)
        _step("attach idmapped root", linux.move_mount, cfg.root_tree, lower)
    else:
        lower = f"/proc/self/fd/{host_root}"
    if cfg.ephemeral:
        _ephemeral_root(lower)
    elif cfg.root_tree is None:
        _step("bind root", linux.mount, lower, STAGED_ROOT, None, linux.MS_BIND | linux.MS_REC)
    _apply_plan(plan, STAGED_ROOT, before_cgroup)
    if cfg.notify is not None:
        _bind_notify(cfg.notify, STAGED_ROOT)
    try:
        os.chdir(STAGED_ROOT)
        linux.pivot_root(".", ".")
        # The old root now sits on top of the new one: detach it, staging and all.
        linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
    except OSError as e:
        raise ChildError("pivot_root", e) from None
    _close_all(host_fds)


def _bind_notify(fd: int, root: str) -> None:
    """Bind the supervisor's socket at /run/host/notify (the container's NOTIFY_SOCKET)."""
    root_fd = os.open(root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dir_fd = open_in_root(root_fd, NOTIFY_DIR, "dir")
        os.fchdir(dir_fd)  # relative bind: sun_path is too short for long roots
        os.close(dir_fd)
        try:
            linux.bind_unix(fd, "notify")
        finally:
            os.close(fd)
    except OSError as e:
        raise ChildError("bind notify socket", e) from None
    finally:
        os.close(root_fd)


def _ephemeral_root(lower: str) -> None:
    """An overlay of the root (LOWER) at STAGED_ROOT, its upper layer on the
    staging tmpfs: all writes vanish with the mount namespace."""
    for d in ("upper", "work"):
        _step("mkdir", os.mkdir, f"{STAGING}/{d}", 0o755)
    data = f"lowerdir={lower},upperdir={STAGING}/upper,workdir={STAGING}/work"
    _step("mount ephemeral overlay", linux.mount, "overlay", STAGED_ROOT, "overlay", 0, data)
    # The upper layer's root mode becomes the container's / mode.
    os.chmod(f"{STAGING}/upper", os.stat(lower).st_mode & 0o7777)


def _take_console(fd: int) -> None:
    # Our session (setsid at start) has no terminal yet: this one becomes it.
    try:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    except OSError as e:
        raise ChildError("console", e) from None
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _drop_caps(caps: Sequence[int]) -> None:
    for cap in caps:
        try:
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != 22:  # EINVAL: the kernel does not know this capability
                raise ChildError(f"drop capability {cap}", e) from None


def _become_user(cfg: ChildConfig) -> None:
    if cfg.uid is None:
        return
    assert cfg.gid is not None
    # Order matters: groups and gid while still privileged, uid last.
    try:
        os.setgroups(list(cfg.groups))
        os.setresgid(cfg.gid, cfg.gid, cfg.gid)
        os.setresuid(cfg.uid, cfg.uid, cfg.uid)
    except OSError as e:
        raise ChildError(f"switch to uid {cfg.uid}", e) from None


def _die_with_supervisor(supervisor: int, status_w: int) -> None:
    # The setup child, our first parent, is gone by now: the supervisor adopted
    # us.  Set after the uid change, which would clear it.  If the supervisor
    # died before that, its end of the status pipe is closed: POLLERR.
    if supervisor:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        poller = select.poll()
        poller.register(status_w, select.POLLOUT)
        if any(ev & select.POLLERR for _, ev in poller.poll(0)):
            os._exit(1)


def _chdir(cfg: ChildConfig) -> None:
    target = cfg.chdir or (cfg.env.get("HOME") if cfg.root is not None else None)
    if target is not None:
        try:
            _chdir_in_root(target)
        except OSError as e:
            if cfg.chdir is not None:
                raise ChildError("chdir", e) from None
            os.chdir("/")  # an unusable HOME: start in / as login(1) does
    if cfg.root is None and target is None:
        return  # the caller's own cwd on the host's own root
    # The cwd must lie below the container's root: the kernel tells through
    # getcwd, whose path would be "(unreachable)…", which glibc reports as ENOENT.
    try:
        os.getcwd()
    except OSError as e:
        raise ChildError("chdir", OSError(e.errno, "working directory outside the container",
                                          target or "/")) from None


def _chdir_in_root(target: str) -> None:
    """chdir to TARGET resolved inside "/": no symlink leads out of it, and no
    magic link (/proc/self/fd/N, /proc/PID/cwd) leads anywhere."""
    root = os.open("/", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = linux.openat2(root, target.lstrip("/") or ".", O_PATH | os.O_DIRECTORY,
                           linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or 0), target) from None
    finally:
        os.close(root)
    try:
        os.fchdir(fd)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or 0), target) from None
    finally:
        os.close(fd)


def _exec(cfg: ChildConfig) -> NoReturn:
    try:
        os.execvpe(cfg.argv[0], list(cfg.argv), cfg.env)
    except OSError as e:
        raise ChildError(f"exec {cfg.argv[0]}", e.strerror or str(e)) from None
