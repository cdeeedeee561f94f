# SPDX-License-Identifier: BSD-2-Clause
"""Mount plans: built from the spec in the parent, applied in the child.

A plan is a list of small frozen operations on *container* paths.  Applying
one resolves its destination inside the new root with openat2(RESOLVE_IN_ROOT),
so a symlink in the rootfs can never lead a mount out of it, and creates
missing directories (or an empty file for a file bind) on the way.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol

from machinepy.core import linux
from machinepy.core.linux import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_SLAVE,
    MS_STRICTATIME,
)
from machinepy.core.spec import ContainerSpec, MountSpec

Create = Literal["dir", "file"] | None

O_PATH = getattr(os, "O_PATH", 0o10000000)
_RESOLVE = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS


# ---------------------------------------------------------------------------
# Resolution inside the root


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_in_root(root_fd: int, path: str, create: Create = None, depth: int = 0) -> int:
    """An O_PATH fd for container PATH below ROOT_FD, created if asked (mkdir -p)."""
    rel = path.lstrip("/") or "."
    try:
        return linux.openat2(root_fd, rel, O_PATH, _RESOLVE)
    except FileNotFoundError as e:
        e.filename = "/" + rel
        if create is None or rel == "." or depth > 40:
            raise
    parent, name = posixpath.split(rel)
    pfd = open_in_root(root_fd, parent, "dir", depth + 1)
    try:
        try:
            if create == "dir":
                os.mkdir(name, 0o755, dir_fd=pfd)
            else:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644, dir_fd=pfd))
        except FileExistsError:
            # A dangling symlink: create what it points to, resolved inside the root.
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                raise
            target = os.readlink(name, dir_fd=pfd)
            if not target.startswith("/"):
                base = os.readlink(_fd_path(pfd))
                root = os.readlink(_fd_path(root_fd))
                inside = "/" + posixpath.relpath(base, root) if base != root else "/"
                target = posixpath.join(inside, target)
            fd = open_in_root(root_fd, posixpath.normpath(target), create, depth + 1)
            os.close(fd)
    finally:
        os.close(pfd)
    return linux.openat2(root_fd, rel, O_PATH, _RESOLVE)


# ---------------------------------------------------------------------------
# Operations


class MountOp(Protocol):
    def apply(self, root_fd: int) -> None: ...


def _mount_at(root_fd: int, target: str, create: Create, source: str | None, fstype: str | None,
              flags: int, data: str | None) -> None:
    fd = open_in_root(root_fd, target, create)
    try:
        linux.mount(source, _fd_path(fd), fstype, flags, data)
    except OSError as e:
        what = f"mount {fstype or 'bind'}: {e.strerror}"
        raise OSError(e.errno, what, target) from None
    finally:
        os.close(fd)


def _attach_clone(root_fd: int, target: str, create: Create, source_fd: int, source: str,
                  recursive: bool, attrs: int) -> None:
    """Bind SOURCE (relative to SOURCE_FD) at container path TARGET, race-free:
    a detached clone (open_tree) gets its flags (mount_setattr) before it is
    attached (move_mount) onto an fd, so the tree is never visible writable and
    no path is looked up a second time."""
    fd = open_in_root(root_fd, target, create)
    try:
        flags = linux.OPEN_TREE_CLONE | (linux.AT_RECURSIVE if recursive else 0)
        tree = linux.open_tree(source_fd, source, flags | (0 if source else linux.AT_EMPTY_PATH))
        try:
            if attrs:
                linux.set_mount_attr(tree, attrs)
            linux.move_mount(tree, to_fd=fd)
        finally:
            os.close(tree)
    except OSError as e:
        what = "bind read-only" if attrs & linux.MOUNT_ATTR_RDONLY else "bind"
        raise OSError(e.errno, f"mount {what}: {e.strerror}", target) from None
    finally:
        os.close(fd)


class FsMount(NamedTuple):
    """Mount a fresh filesystem instance (tmpfs, proc, sysfs, devpts, …)."""

    fstype: str
    target: str
    flags: int = 0
    data: str | None = None
    source: str | None = None

    def apply(self, root_fd: int) -> None:
        _mount_at(root_fd, self.target, "dir", self.source or self.fstype, self.fstype,
                  self.flags, self.data)


class Sysfs(NamedTuple):
    """A read-only sysfs; in a user namespace without its own network namespace
    the kernel refuses a new instance, so bind the host's read-only instead."""

    target: str = "/sys"

    def apply(self, root_fd: int) -> None:
        try:
            _mount_at(root_fd, self.target, "dir", "sysfs", "sysfs",
                      NOSUID_NODEV_NOEXEC | MS_RDONLY, None)
        except PermissionError:
            BindMount("/sys", self.target, read_only=True).apply(root_fd)
            # The host's cgroup tree is not the container's business, and its own
            # cgroup2 could not be mounted right on top of it: the kernel refuses a
            # superblock over a mount of itself (EBUSY).  An empty layer between.
            FsMount("tmpfs", f"{self.target}/fs/cgroup", NOSUID_NODEV_NOEXEC | MS_RDONLY,
                    "mode=755,size=0").apply(root_fd)


class BindMount(NamedTuple):
    """Bind a host path (resolved on the host) to a container path."""

    source: str
    target: str
    read_only: bool = False
    recursive: bool = True
    optional: bool = False  # skip silently when the source is missing

    def apply(self, root_fd: int) -> None:
        try:
            is_dir = os.path.isdir(self.source)
            if not is_dir and not os.path.exists(self.source):
                raise FileNotFoundError(2, "bind source missing", self.source)
        except FileNotFoundError:
            if self.optional:
                return
            raise
        _attach_clone(root_fd, self.target, "dir" if is_dir else "file", linux.AT_FDCWD,
                      self.source, self.recursive,
                      linux.MOUNT_ATTR_RDONLY if self.read_only else 0)


class ReadOnly(NamedTuple):
    """Make an existing container path read-only by binding it onto itself."""

    target: str
    optional: bool = False  # skip when the path does not exist

    def apply(self, root_fd: int) -> None:
        try:
            fd = open_in_root(root_fd, self.target)
        except FileNotFoundError:
            if self.optional:
                return
            raise
        try:
            _attach_clone(root_fd, self.target, None, fd, "", True, linux.MOUNT_ATTR_RDONLY)
        finally:
            os.close(fd)


# Empty nodes bound over what a container must not see (nspawn's "inaccessible"
# nodes): mode 0000, read-only, on a tmpfs of their own.
_MASK_ATTRS = (linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
               | linux.MOUNT_ATTR_NOEXEC)


class Masks(NamedTuple):
    """Hide each of INACCESSIBLE (where it exists) behind an empty mode-0000 file
    or directory, and give the container a boot_id of its own at BOOT_ID.

    The nodes live on a small tmpfs made for them (fsmount), attached on top of
    the container's root only while they are cloned: nothing is created on the
    host, the binds keep the tmpfs alive, and it goes with the mount namespace.
    """

    inaccessible: tuple[str, ...]
    boot_id: str | None = None

    def apply(self, root_fd: int) -> None:
        scratch = linux.fsmount_tmpfs(mode="0755", size="64k")
        try:
            os.close(os.open("reg", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0,
                             dir_fd=scratch))
            os.mkdir("dir", 0, dir_fd=scratch)
            os.chmod("reg", 0, dir_fd=scratch)
            os.chmod("dir", 0, dir_fd=scratch)
            if self.boot_id is not None:
                fd = os.open("boot_id", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                             0o444, dir_fd=scratch)
                try:
                    os.write(fd, random_uuid().encode() + b"\n")
                finally:
                    os.close(fd)
            # A clone must come from a mount in our namespace (before Linux 6.15
            # a detached one is refused): stack the tmpfs on the root for now.
            # Paths resolved from ROOT_FD start below it and never see it.
            linux.move_mount(scratch, to_fd=root_fd)
            try:
                self._bind_all(root_fd, scratch)
            finally:
                linux.umount2(_fd_path(scratch), linux.MNT_DETACH)
        finally:
            os.close(scratch)

    def _bind_all(self, root_fd: int, scratch: int) -> None:
        for target in self.inaccessible:
            try:
                fd = open_in_root(root_fd, target)
            except FileNotFoundError:
                continue
            try:
                node = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "reg"
                _attach_clone(root_fd, target, None, scratch, node, False, _MASK_ATTRS)
            finally:
                os.close(fd)
        if self.boot_id is not None:
            _attach_clone(root_fd, self.boot_id, None, scratch, "boot_id", False, _MASK_ATTRS)


def random_uuid() -> str:
    """A random (version 4) UUID, without importing uuid (this runs in the child)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Slave(NamedTuple):
    """Receive the host's mount events below TARGET (machinectl bind)."""

    target: str

    def apply(self, root_fd: int) -> None:
        fd = open_in_root(root_fd, self.target)
        try:
            linux.mount(None, _fd_path(fd), None, MS_SLAVE)
        finally:
            os.close(fd)


class Symlink(NamedTuple):
    target: str  # what the link points to
    link: str  # container path of the link

    def apply(self, root_fd: int) -> None:
        parent, name = posixpath.split(self.link)
        pfd = open_in_root(root_fd, parent, "dir")
        try:
            os.symlink(self.target, name, dir_fd=pfd)
        except FileExistsError:
            pass
        finally:
            os.close(pfd)


class Overlay(NamedTuple):
    """pflask's overlay: UPPER stacked on the container's DEST (lower), WORK beside UPPER."""

    upper: str
    target: str
    work: str

    def apply(self, root_fd: int) -> None:
        fd = open_in_root(root_fd, self.target, "dir")
        try:
            lower = _fd_path(fd)
            data = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"
            linux.mount("overlay", lower, "overlay", 0, data)
        except OSError as e:
            raise OSError(e.errno, f"mount overlay: {e.strerror}", self.target) from None
        finally:
            os.close(fd)


def _open_host(path: str, what: str) -> int:
    try:
        return os.open(path, O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{what} missing", path) from None


def preopen(plan: Sequence[MountOp]) -> tuple[list[MountOp], list[int]]:
    """The plan with every host path replaced by /proc/self/fd/N of an fd opened now.

    Called before the container's PID 1 becomes root of its user namespace: that
    root is an unprivileged host uid, which a root-only parent directory (say
    /var/lib/machines, mode 0700) would stop; nspawn mounts these before it
    enters the namespace.  The fds are O_CLOEXEC and reached through the host's
    /proc, which is still mounted at this point.
    """
    out: list[MountOp] = []
    fds: list[int] = []
    for op in plan:
        if isinstance(op, BindMount):
            try:
                fd = _open_host(op.source, "bind source")
            except FileNotFoundError:
                if op.optional:
                    continue
                raise
            fds.append(fd)
            op = op._replace(source=_fd_path(fd))
        elif isinstance(op, Overlay):
            upper = _open_host(op.upper, "overlay upper")
            fds.append(upper)
            work = _open_host(op.work, "overlay work")
            fds.append(work)
            op = op._replace(upper=_fd_path(upper), work=_fd_path(work))
        out.append(op)
    return out, fds


# ---------------------------------------------------------------------------
# Plans

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
NOSUID_NODEV = MS_NOSUID | MS_NODEV
NOSUID_NODEV_NOEXEC = MS_NOSUID | MS_NODEV | MS_NOEXEC

# tmpfs limits, nspawn's (systemd's mount-util.h): a tmpfs left at the kernel's
# default may take half the RAM, and a container has several.
TMPFS_RUN = "size=20%,nr_inodes=800k"  # TMPFS_LIMITS_RUN
TMPFS_NESTED = "size=10%,nr_inodes=400k"  # NESTED_TMPFS_LIMITS: /tmp, /dev/shm, --tmpfs
TMPFS_ROOT = "size=25%,nr_inodes=1m"  # TMPFS_LIMITS_ROOTFS: the ephemeral upper layer
TMPFS_EMPTY = "size=4m,nr_inodes=1k"  # TMPFS_LIMITS_EMPTY_OR_ALMOST: staging mount points
# The API tmpfs mounts of a container with its own root; a user tmp mount on
# one of these paths takes its place, starting from the same defaults.
API_TMPFS = {"/dev/shm": "mode=1777," + TMPFS_NESTED, "/run": "mode=755," + TMPFS_RUN,
             "/tmp": "mode=1777," + TMPFS_NESTED}
USER_TMPFS = "mode=1777," + TMPFS_NESTED


def tmpfs_data(defaults: str, options: str | None) -> str:
    """DEFAULTS with the user's OPTIONS laid over them, key by key."""
    merged = dict(item.partition("=")[::2] for item in defaults.split(","))
    if options:
        merged.update(item.partition("=")[::2] for item in options.split(","))
    return ",".join(f"{k}={v}" for k, v in merged.items())


def staging_data(spec: ContainerSpec) -> str:
    """The child's staging tmpfs: only mount points, or the ephemeral upper layer."""
    if not spec.ephemeral:
        return "mode=755," + TMPFS_EMPTY
    size = f"size={spec.ephemeral_size}" if spec.ephemeral_size else None
    return tmpfs_data("mode=755," + TMPFS_ROOT, size)


def user_mount_ops(mounts: Sequence[MountSpec], api: bool = False) -> list[MountOp]:
    """API: the container has its own root (and API_TMPFS mounts, which a tmp
    mount on their path replaces)."""
    ops: list[MountOp] = []
    for m in mounts:
        if m.kind in ("bind", "bind-ro"):
            assert m.source is not None
            ops.append(BindMount(m.source, m.dest, read_only=m.read_only))
        elif m.kind == "tmp":
            data = tmpfs_data(API_TMPFS.get(m.dest, USER_TMPFS) if api else USER_TMPFS,
                              m.options)
            ops.append(FsMount("tmpfs", m.dest, NOSUID_NODEV, data))
        else:
            assert m.source is not None and m.work is not None
            ops.append(Overlay(m.source, m.dest, m.work))
    return ops


def api_mount_ops(spec: ContainerSpec, console: str | None = None) -> list[MountOp]:
    """proc, sys, dev, run, tmp and cgroup2 for a container with its own root."""
    userns = "user" in spec.namespaces
    ops: list[MountOp] = [
        *proc_ops(),
        Sysfs(),
        masks(),
        FsMount("tmpfs", "/dev", MS_NOSUID | MS_STRICTATIME, "mode=755,size=4m"),
    ]
    ops += [BindMount(f"/dev/{d}", f"/dev/{d}", recursive=False) for d in DEVICES]
    ops += [
        FsMount("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620" + ("" if userns else ",gid=5")),
        Symlink("pts/ptmx", "/dev/ptmx"),
        Symlink("/proc/self/fd", "/dev/fd"),
        Symlink("/proc/self/fd/0", "/dev/stdin"),
        Symlink("/proc/self/fd/1", "/dev/stdout"),
        Symlink("/proc/self/fd/2", "/dev/stderr"),
    ]
    # The user's tmp mount on an API path replaces it (see user_mount_ops).
    replaced = {m.dest for m in spec.mounts if m.kind == "tmp"}
    if "/dev/shm" not in replaced:
        ops.append(FsMount("tmpfs", "/dev/shm", NOSUID_NODEV, API_TMPFS["/dev/shm"]))
    if "ipc" in spec.namespaces:
        ops.append(FsMount("mqueue", "/dev/mqueue", NOSUID_NODEV_NOEXEC))
    if console is not None:
        ops.append(BindMount(console, "/dev/console", recursive=False))
    ops += [FsMount("tmpfs", path, NOSUID_NODEV, API_TMPFS[path]) for path in ("/run", "/tmp")
            if path not in replaced]
    if "cgroup" in spec.namespaces:
        ops.append(FsMount("cgroup2", "/sys/fs/cgroup", NOSUID_NODEV_NOEXEC))
    return ops


# What nspawn hides in /proc: hardware tunables stay visible but read-only;
# kernel internals and the host's secrets become empty mode-0000 nodes.
PROC_READ_ONLY = tuple(f"/proc/{d}" for d in ("acpi", "apm", "asound", "bus", "fs", "irq", "scsi"))
INACCESSIBLE = (
    *(f"/proc/{f}" for f in ("kallsyms", "kcore", "keys", "sysrq-trigger", "timer_list",
                             "sched_debug")),
    "/sys/firmware",
)
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def proc_ops() -> list[MountOp]:
    """A /proc of the container's pid namespace, its tunables read-only."""
    return [FsMount("proc", "/proc", NOSUID_NODEV_NOEXEC), ReadOnly("/proc/sys"),
            *(ReadOnly(d, optional=True) for d in PROC_READ_ONLY)]


def masks() -> Masks:
    """After /proc and /sys are in place: the inaccessible nodes and a boot_id."""
    return Masks(INACCESSIBLE, BOOT_ID)


def propagation_ops(host_dir: str) -> list[MountOp]:
    return [BindMount(host_dir, "/run/host/incoming", recursive=False),
            Slave("/run/host/incoming")]


def host_root_ops(spec: ContainerSpec) -> list[MountOp]:
    """Without --chroot: the host's tree, with a /proc for the new pid namespace."""
    ops = user_mount_ops(spec.mounts)
    if "pid" in spec.namespaces:
        ops += proc_ops()
    if "net" in spec.namespaces:
        # /sys/class/net must show the container's interfaces, not the host's.
        ops.append(Sysfs())
    if "pid" in spec.namespaces:
        ops.append(masks())
    ops.append(Masks(own_runtime_dirs()))
    return ops


def own_runtime_dirs() -> tuple[str, ...]:
    """Where machinepy keeps its sockets and locks (machinepy.runtime.attachsock.base_dir): a
    container on the host's root must not reach them, with or without a pid namespace."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.geteuid() != 0 and runtime.startswith("/"):
        return ("/run/machinepy", f"{runtime}/machinepy")
    # And the daemon's console holder (machinepy.service.holder), which holds them all.
    return ("/run/machinepy", "/run/machinepy-holder")


def build_plan(spec: ContainerSpec, console: str | None = None) -> list[MountOp]:
    if spec.root is None:
        return host_root_ops(spec)
    # A mount on / (an overlay of the whole root, say) goes first: made after
    # them, it would hide /proc, /sys and /dev; the other user mounts go last,
    # so they can land on the API filesystems (a bind over /etc/resolv.conf).
    on_root = [m for m in spec.mounts if m.dest == "/"]
    rest = [m for m in spec.mounts if m.dest != "/"]
    return (user_mount_ops(on_root, api=True) + api_mount_ops(spec, console)
            + user_mount_ops(rest, api=True))


def mounts_root(op: MountOp) -> bool:
    """Whether OP mounts over the root itself (after it, the root fd is stale)."""
    return getattr(op, "target", None) == "/"
