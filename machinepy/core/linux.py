# SPDX-License-Identifier: BSD-2-Clause
"""Thin typed wrappers around the Linux syscalls that `os` lacks.

Each wrapper raises OSError carrying errno and the path it acted on, so callers
(and the child's error pipe) can name exactly what failed.  These are safe to
call between fork and exec: no locks, no allocation beyond ctypes buffers.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

# unshare(2) / setns(2) / clone(2) flags
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

NAMESPACE_FLAGS: Final = {
    "mount": CLONE_NEWNS,
    "cgroup": CLONE_NEWCGROUP,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "user": CLONE_NEWUSER,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
}

# mount(2) flags
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_SLAVE: Final = 0x80000
MS_STRICTATIME: Final = 0x1000000

MNT_DETACH: Final = 0x2

# prctl(2)
PR_SET_PDEATHSIG: Final = 1
PR_SET_NAME: Final = 15
PR_SET_SECCOMP: Final = 22
PR_CAPBSET_DROP: Final = 24
PR_SET_CHILD_SUBREAPER: Final = 36
PR_SET_NO_NEW_PRIVS: Final = 38

# openat2(2)
SYS_openat2: Final = 437
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_IN_ROOT: Final = 0x10

# pivot_root(2) predates the unified numbering: per architecture (uname -m).
# aarch64, riscv64 and loongarch64 use asm-generic's table.
SYS_PIVOT_ROOT_BY_MACHINE: Final = {
    "x86_64": 155, "i386": 217, "i686": 217, "aarch64": 41, "riscv64": 41,
    "loongarch64": 41, "armv7l": 218, "armv6l": 218, "ppc64le": 203, "ppc64": 203,
    "s390x": 217,
}
SYS_pivot_root: Final = SYS_PIVOT_ROOT_BY_MACHINE.get(os.uname().machine, -1)

# seccomp(2): a late arrival too, numbered per architecture; prctl is the fallback.
SYS_SECCOMP_BY_MACHINE: Final = {
    "x86_64": 317, "i386": 354, "i686": 354, "aarch64": 277, "riscv64": 277,
    "loongarch64": 277, "armv7l": 383, "armv6l": 383, "ppc64le": 358, "ppc64": 358,
    "s390x": 348,
}
SYS_seccomp: Final = SYS_SECCOMP_BY_MACHINE.get(os.uname().machine, -1)
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_MODE_FILTER: Final = 2

# The new mount API (same numbers on every architecture since 5.1)
SYS_open_tree: Final = 428
SYS_move_mount: Final = 429
SYS_fsopen: Final = 430
SYS_fsconfig: Final = 431
SYS_fsmount: Final = 432
SYS_mount_setattr: Final = 442
AT_FDCWD: Final = -100
OPEN_TREE_CLONE: Final = 0x1
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOVE_MOUNT_T_EMPTY_PATH: Final = 0x40
FSOPEN_CLOEXEC: Final = 0x1
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_CMD_CREATE: Final = 6
FSMOUNT_CLOEXEC: Final = 0x1
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
MOUNT_ATTR_IDMAP: Final = 0x00100000

# Landlock (same numbers on every architecture since 5.13)
SYS_landlock_create_ruleset: Final = 444
SYS_landlock_restrict_self: Final = 446
LANDLOCK_CREATE_RULESET_VERSION: Final = 0x1
# Scopes (ABI 6, Linux 6.12): no connecting to abstract unix sockets, no
# signals, outside the domain.
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: Final = 0x1
LANDLOCK_SCOPE_SIGNAL: Final = 0x2
LANDLOCK_SCOPE_ABI: Final = 6
# keyctl(2): like pivot_root, numbered per architecture
SYS_KEYCTL_BY_MACHINE: Final = {
    "x86_64": 250, "i386": 288, "i686": 288, "aarch64": 219, "riscv64": 219,
    "loongarch64": 219, "armv7l": 311, "armv6l": 311, "ppc64le": 271, "ppc64": 271,
    "s390x": 280,
}
SYS_keyctl: Final = SYS_KEYCTL_BY_MACHINE.get(os.uname().machine, -1)
KEYCTL_JOIN_SESSION_KEYRING: Final = 1

# socket(2) and bind(2): PID 1's only socket calls, so the child needs no socket module
AF_UNIX: Final = 1
AF_INET: Final = 2
SOCK_DGRAM: Final = 2
SOCK_CLOEXEC: Final = os.O_CLOEXEC  # the same bit, by definition


class _SockaddrUn(ctypes.Structure):
    _fields_ = [("sun_family", ctypes.c_ushort), ("sun_path", ctypes.c_char * 108)]


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(rc, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    if SYS_pivot_root < 0:
        raise OSError(errno.ENOSYS, f"pivot_root: not known on {os.uname().machine}", new_root)
    rc = _libc.syscall(ctypes.c_long(SYS_pivot_root), _b(new_root), _b(put_old))
    _check(rc, "pivot_root", new_root)


def socket(family: int, type_: int) -> int:
    return _check(_libc.socket(ctypes.c_int(family), ctypes.c_int(type_), ctypes.c_int(0)),
                  "socket")


def bind_unix(fd: int, path: str) -> None:
    raw = os.fsencode(path)
    if len(raw) >= 108:
        raise OSError(errno.ENAMETOOLONG, f"bind: {os.strerror(errno.ENAMETOOLONG)}", path)
    addr = _SockaddrUn(AF_UNIX, raw)
    size = _SockaddrUn.sun_path.offset + len(raw) + 1
    _check(_libc.bind(ctypes.c_int(fd), ctypes.byref(addr), ctypes.c_uint(size)), "bind", path)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), "prctl")


def set_process_name(name: str) -> None:
    """Our comm (what `pidof NAME`, ps -C and top show): "python3" otherwise."""
    _libc.prctl(ctypes.c_int(PR_SET_NAME), name.encode()[:15], 0, 0, 0)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_load(program: bytes) -> None:
    """Install a classic-BPF seccomp PROGRAM (struct sock_filter[]) on this thread.

    Needs CAP_SYS_ADMIN in our user namespace, or no_new_privs set first.
    """
    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, "seccomp: program is not whole BPF instructions")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    if SYS_seccomp >= 0:
        rc = _libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                           ctypes.c_uint(0), ctypes.byref(prog))
    else:
        rc = _libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                         ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0))
    _check(rc, "seccomp")


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    rc = _libc.syscall(
        ctypes.c_long(SYS_openat2),
        ctypes.c_int(dirfd),
        _b(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(rc, "openat2", path)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """A detached copy of the mount tree at PATH (OPEN_TREE_CLONE), as an fd."""
    rc = _libc.syscall(ctypes.c_long(SYS_open_tree), ctypes.c_int(dirfd), _b(path),
                       ctypes.c_uint(flags | os.O_CLOEXEC))
    return _check(rc, "open_tree", path or None)


def move_mount(from_fd: int, to_path: str = "", to_fd: int = AT_FDCWD) -> None:
    """Attach the detached tree FROM_FD at TO_PATH, or onto the fd TO_FD itself
    (an O_PATH fd: no path is looked up again, so nothing can be swapped in)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (0 if to_path else MOVE_MOUNT_T_EMPTY_PATH)
    rc = _libc.syscall(ctypes.c_long(SYS_move_mount), ctypes.c_int(from_fd), b"",
                       ctypes.c_int(to_fd), _b(to_path), ctypes.c_uint(flags))
    _check(rc, "move_mount", to_path or None)


def fsmount_tmpfs(**options: str) -> int:
    """A new tmpfs, not attached anywhere: a detached mount's fd (fsopen + fsmount)."""
    fs = _check(_libc.syscall(ctypes.c_long(SYS_fsopen), b"tmpfs", ctypes.c_uint(FSOPEN_CLOEXEC)),
                "fsopen")
    try:
        for key, value in options.items():
            _check(_libc.syscall(ctypes.c_long(SYS_fsconfig), ctypes.c_int(fs),
                                 ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(),
                                 value.encode(), ctypes.c_int(0)), f"fsconfig {key}")
        _check(_libc.syscall(ctypes.c_long(SYS_fsconfig), ctypes.c_int(fs),
                             ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)),
               "fsconfig create")
        return _check(_libc.syscall(ctypes.c_long(SYS_fsmount), ctypes.c_int(fs),
                                    ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(0)), "fsmount")
    finally:
        os.close(fs)


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def set_mount_attr(tree_fd: int, attr_set: int, propagation: int = 0,
                   userns_fd: int = 0) -> None:
    """mount_setattr(2) on every mount of the tree TREE_FD: set ATTR_SET (MOUNT_ATTR_*),
    leave every other flag as it is (locked flags in a user namespace included)."""
    attr = _MountAttr(attr_set, 0, propagation, userns_fd)
    rc = _libc.syscall(ctypes.c_long(SYS_mount_setattr), ctypes.c_int(tree_fd), b"",
                       ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(rc, "mount_setattr")


def idmap_tree(tree_fd: int, userns_fd: int) -> None:
    """Map the owners seen through the detached tree TREE_FD by USERNS_FD's maps.

    Also makes it a slave: a clone of a shared mount would otherwise stay in
    its peer group, and the container's mounts below its root would reach the host.
    """
    set_mount_attr(tree_fd, MOUNT_ATTR_IDMAP, MS_SLAVE, userns_fd)

class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock."""
    rc = _libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(rc), 0)


def landlock_scope(scoped: int) -> None:
    """Confine this process and its future children to a Landlock domain that
    only scopes (SCOPED: LANDLOCK_SCOPE_* bits) and restricts no file access.
    Needs no_new_privs or CAP_SYS_ADMIN in our user namespace."""
    attr = _LandlockRulesetAttr(0, 0, scoped)
    fd = _check(_libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), ctypes.byref(attr),
                              ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
                "landlock_create_ruleset")
    try:
        _check(_libc.syscall(ctypes.c_long(SYS_landlock_restrict_self), ctypes.c_int(fd),
                             ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(fd)



def keyctl(op: int, arg2: int = 0) -> int:
    if SYS_keyctl < 0:
        raise OSError(errno.ENOSYS, f"keyctl: not known on {os.uname().machine}")
    rc = _libc.syscall(ctypes.c_long(SYS_keyctl), ctypes.c_int(op), ctypes.c_long(arg2),
                       ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    return _check(rc, "keyctl")


def join_session_keyring() -> int:
    """A new anonymous session keyring for this process (KEYCTL_JOIN_SESSION_KEYRING, NULL)."""
    return keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
