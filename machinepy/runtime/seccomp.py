# SPDX-License-Identifier: BSD-2-Clause
"""The default system call filter: systemd-nspawn's allow-list, and a bit more.

What the container may call is nspawn's list (src/nspawn/nspawn-seccomp.c):
the groups in DEFAULT_GROUPS, the calls in DEFAULT_CALLS, and the groups and
calls in CAP_GROUPS / CAP_CALLS whose capability stays in the bounding set.
Every other call systemd knows (@known: the keyring calls, bpf,
open_by_handle_at, perf_event_open, swapon/swapoff, …) fails with EPERM, which programs
take as "not allowed"; a call newer than that list (or any number above it)
fails with ENOSYS, which libc takes as "not implemented" and falls back from.
Beyond nspawn: userfaultfd is denied, and so are ioctl(TIOCSTI) (typing into
the caller's terminal) and ioctl(TIOCLINUX), compared on the low 32 bits of
the request as the kernel does; socket(AF_NETLINK, *, NETLINK_AUDIT) fails
with EAFNOSUPPORT, as nspawn makes it, which audit userspace reads as "no
audit".  --system-call-filter adds to (NAMES) or takes from (~NAMES) the list.

Built with libseccomp through a thin ctypes binding of libseccomp.so.2, not
pyseccomp: a dozen functions are all we need; pyseccomp (itself ctypes, last
released in 2021) would be one more dependency to install for no code saved;
and libseccomp2 is on every Debian system already (the -dev package is not
needed at run time).  The filter is compiled in the parent, before fork, and
exported as BPF; the child loads those bytes with seccomp(2) (linux.py), so
child.py stays plain syscalls.

The programs, stacked (the kernel takes the strictest answer): one allow-list
per ABI of the host (native and compat: x86_64, x86 and x32 on x86-64), as
nspawn builds them, each passing the other ABIs' calls through; then one
program of the rules that look at arguments (ioctl, socket), because
libseccomp drops a call's argument rules once the call is allowed outright.
That last one also kills calls of an ABI none of them knows.

Compiling costs ~12 ms here, far over a start's budget: the programs are
cached (cache_dir(): root's under /var/cache, not /run/machinepy, which holds
only live containers' state), keyed by everything that shapes them; a cache
hit neither loads libseccomp nor reads the group table.

Known gap: on x86 (32-bit), libseccomp turns the audit-socket rule into one on
socketcall(SYS_SOCKET) whose third argument it cannot see; a socketcall with
that register 9 gets EAFNOSUPPORT.  Current libcs call socket(2) directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# Bump when the rules below change in a way the cache key cannot see.
FILTER_VERSION = 1

DEFAULT_GROUPS = (
    "@aio", "@basic-io", "@chown", "@default", "@file-system", "@io-event", "@ipc", "@mount",
    "@network-io", "@process", "@resources", "@setuid", "@signal", "@sync", "@timer",
)
# nspawn's extra calls that no group above holds, less userfaultfd (a classic
# helper for winning kernel races; nothing in a container needs it), plus
# seccomp (older nspawn listed it): a filter only narrows, our own programs are
# loaded one after another, and the container's services sandbox themselves.
DEFAULT_CALLS = (
    "arm_fadvise64_64", "brk", "capget", "capset", "copy_file_range", "fadvise64",
    "fadvise64_64", "flock", "get_mempolicy", "getcpu", "getpriority", "getrandom", "ioctl",
    "ioprio_get", "kcmp", "madvise", "mincore", "mprotect", "mremap", "name_to_handle_at",
    "oldolduname", "olduname", "personality", "readahead", "readdir", "remap_file_pages",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_yield", "seccomp", "sendfile", "sendfile64",
    "setdomainname", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "sethostname",
    "setpgid", "setsid",
    "splice", "sysinfo", "tee", "umask", "uname", "vmsplice",
)
# Allowed only while the matching capability stays in the bounding set.
CAP_GROUPS = (
    ("sys_time", "@clock"), ("sys_module", "@module"), ("sys_rawio", "@raw-io"),
    ("ipc_lock", "@memlock"),
)
CAP_CALLS = (
    ("sys_pacct", "acct"), ("sys_ptrace", "process_vm_readv"),
    ("sys_ptrace", "process_vm_writev"), ("sys_ptrace", "ptrace"), ("sys_boot", "reboot"),
    ("syslog", "syslog"), ("sys_tty_config", "vhangup"),
)
CAP_NAMES_USED = tuple(sorted({cap for cap, _ in CAP_GROUPS + CAP_CALLS}))

AF_NETLINK = 16
NETLINK_AUDIT = 9
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# Native architecture (uname -m) → libseccomp's names for it and its compat ABIs.
ARCHES = {
    "x86_64": ("x86_64", "x86", "x32"), "i386": ("x86",), "i686": ("x86",),
    "aarch64": ("aarch64", "arm"), "armv7l": ("arm",), "armv6l": ("arm",),
    "ppc64le": ("ppc64le",), "ppc64": ("ppc64", "ppc"), "s390x": ("s390x", "s390"),
    "riscv64": ("riscv64",), "loongarch64": ("loongarch64",),
    "mips64": ("mips64", "mips64n32", "mips"), "mips": ("mips",),
}

# Where the dynamic loader finds libseccomp: Debian's multiarch directory first.
_MULTIARCH = getattr(sys.implementation, "_multiarch", "")
LIB_DIRS = (*((f"/usr/lib/{_MULTIARCH}", f"/lib/{_MULTIARCH}") if _MULTIARCH else ()),
            "/usr/lib64", "/usr/lib", "/lib64", "/lib")
LIB_NAME = "libseccomp.so.2"


class Filter(NamedTuple):
    """What to build: the names allowed (after ~ and capabilities), and those denied."""

    allow: frozenset[str]
    deny: frozenset[str]  # known to systemd but not allowed: EPERM


# ---------------------------------------------------------------------------
# --system-call-filter, nspawn's syntax: names and @groups, ~ to deny


def resolve(items: Sequence[str], retained: Iterable[str]) -> Filter:
    """The default list adjusted by ITEMS (from parse_filter) and the kept capabilities.

    As in nspawn, a denial wins over any allowance, whatever their order.
    """
    from machinepy.core.syscall_groups import GROUPS as groups
    from machinepy.core.syscall_groups import expand

    keep = set(retained)
    allow_names = [*DEFAULT_GROUPS, *DEFAULT_CALLS]
    allow_names += [g for cap, g in CAP_GROUPS if cap in keep]
    allow_names += [c for cap, c in CAP_CALLS if cap in keep]
    allow_names += [i for i in items if not i.startswith("~")]
    denied = expand((i[1:] for i in items if i.startswith("~")), groups)
    allow = expand(allow_names, groups) - denied
    known = expand(("@known",), groups)
    return Filter(frozenset(allow), frozenset(known - allow))


# ---------------------------------------------------------------------------
# libseccomp, through ctypes (loaded only when a filter is compiled)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_OPTIMIZE = 8
SCMP_CMP_NE = 1
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
NR_SCMP_ERROR = -1


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint))


class BuildError(Exception):
    """The filter could not be compiled; one line."""


def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIB_NAME, use_errno=True)
    except OSError as e:
        raise BuildError(f"cannot load {LIB_NAME} (install libseccomp2): {e}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.seccomp_arch_remove.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    return lib


def library_version() -> str:
    v = _lib().seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def _arch_tokens(lib: ctypes.CDLL, machine: str) -> list[tuple[str, int]]:
    names = ARCHES.get(machine)
    if names is None:
        return [("native", lib.seccomp_arch_native())]
    tokens = []
    for name in names:
        token = lib.seccomp_arch_resolve_name(name.encode())
        if token:  # 0: this libseccomp does not know the ABI
            tokens.append((name, token))
    return tokens


def _rule(lib: ctypes.CDLL, ctx: int, action: int, nr: int, *cmps: tuple[int, int, int, int],
          ) -> int:
    arr = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
    rc: int = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    return rc


def _new(lib: ctypes.CDLL, default: int, arches: Sequence[int], badarch: int | None) -> int:
    ctx: int | None = lib.seccomp_init(default)
    if not ctx:
        raise BuildError("seccomp_init failed")
    native = lib.seccomp_arch_native()
    for arch in arches:
        if arch != native:
            _check(lib.seccomp_arch_add(ctx, arch), "add architecture")
    if native not in arches:
        _check(lib.seccomp_arch_remove(ctx, native), "remove native architecture")
    if badarch is not None:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, badarch), "bad-arch action")
    # We load the program ourselves; this only keeps libseccomp from asking for NNP.
    _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0), "no-new-privs attribute")
    return ctx


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise BuildError(f"seccomp filter: {what}: {os.strerror(-rc)}")


def _allow_list(lib: ctypes.CDLL, arch: int, flt: Filter) -> bytes:
    """The allow-list for one architecture: allowed, EPERM for the known rest, ENOSYS after."""
    ctx = _new(lib, scmp_act_errno(errno.ENOSYS), (arch,), SCMP_ACT_ALLOW)
    try:
        # ~500 rules: a binary tree, not a linear walk, on every system call.
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2), "optimize")
        for names, action in ((flt.allow, SCMP_ACT_ALLOW), (flt.deny, scmp_act_errno(errno.EPERM))):
            for name in sorted(names):
                # The native number, or libseccomp's pseudo-number for a call the
                # native ABI lacks: libseccomp translates it for the filter's ABI.
                number = lib.seccomp_syscall_resolve_name(name.encode())
                if number == NR_SCMP_ERROR:
                    continue  # unknown to this libseccomp: ENOSYS, the default
                # A failure (a call this ABI lacks) leaves the call at ENOSYS: denied
                # either way, so not an error.
                _rule(lib, ctx, action, number)
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _argument_rules(lib: ctypes.CDLL, arches: Sequence[int]) -> bytes:
    """Denials that look at arguments, in a program of their own.

    libseccomp drops a syscall's argument rules once the same call is allowed
    outright, so they cannot live in the allow-list: stacked, the kernel
    takes the stricter answer of the two.  Calls of an ABI no program knows
    are killed here (the allow-lists pass each other's ABIs through).
    """
    ctx = _new(lib, SCMP_ACT_ALLOW, arches, None)
    try:
        ioctl = lib.seccomp_syscall_resolve_name(b"ioctl")
        # The kernel reads the request as an unsigned int: compare the low 32
        # bits only, or TIOCSTI | 1 << 32 would slip past.
        for request in (TIOCSTI, TIOCLINUX):
            _check(_rule(lib, ctx, scmp_act_errno(errno.EPERM), ioctl,
                         (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request)), "deny ioctl request")
        socket = lib.seccomp_syscall_resolve_name(b"socket")
        _check(_rule(lib, ctx, scmp_act_errno(errno.EAFNOSUPPORT), socket,
                     (0, SCMP_CMP_EQ, AF_NETLINK, 0), (2, SCMP_CMP_EQ, NETLINK_AUDIT, 0)),
               "deny audit sockets")
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise BuildError(f"seccomp filter: export: {os.strerror(-rc)}")
        size = os.lseek(fd, 0, os.SEEK_CUR)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not data or len(data) % 8:
        raise BuildError(f"seccomp filter: export gave {len(data)} bytes")
    return data


def build(flt: Filter, machine: str | None = None) -> tuple[bytes, ...]:
    """BPF programs to stack: an allow-list per architecture of this host (native
    first), then the argument rules."""
    lib = _lib()
    arches = [token for _, token in _arch_tokens(lib, machine or os.uname().machine)]
    return (*(_allow_list(lib, arch, flt) for arch in arches), _argument_rules(lib, arches))


# ---------------------------------------------------------------------------
# The cache: compiled programs keyed by everything that shapes them

CACHE_MAGIC = b"machinepy-seccomp 1\n"


def _library_path() -> str | None:
    """libseccomp's real file (its name carries the version), without loading it."""
    for d in LIB_DIRS:
        path = os.path.join(d, LIB_NAME)
        if os.path.exists(path):
            return os.path.realpath(path)
    return None


def cache_dir() -> str | None:
    """Root's in /var/cache, a user's in $XDG_CACHE_HOME (~/.cache); None: do not
    cache.  Not under $XDG_RUNTIME_DIR/machinepy: that is the user's private
    socket directory (machinepy.runtime.attachsock), which must be 0700."""
    if os.geteuid() == 0:
        return "/var/cache/machinepy/seccomp"
    cache = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else "")
    return os.path.join(cache, "machinepy", "seccomp") if cache.startswith("/") else None


def cache_key(items: Sequence[str], retained: Iterable[str], machine: str) -> str | None:
    """Everything that shapes the programs, as one line; None: libseccomp not found."""
    lib = _library_path()
    if lib is None:
        return None
    # The files that define the filter, too: an upgrade of machinepy or of
    # libseccomp must not meet programs built by the old one.
    stamps = []
    # By path: importing the groups is what a cache hit saves.
    groups = os.path.join(os.path.dirname(os.path.dirname(__file__)), "core", "syscall_groups.py")
    for path in (lib, __file__, groups):
        st = os.stat(path)
        stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
    keep = sorted(set(retained) & set(CAP_NAMES_USED))
    return " ".join((f"v{FILTER_VERSION}", machine, lib, *stamps, ",".join(keep) or "-", *items))


def _file_name(key: str) -> str:
    # FNV-1a: hashlib would load OpenSSL (~3 ms) on every start for a file name;
    # the file holds the whole key, so a collision is only a miss.
    h = 0xCBF29CE484222325
    for byte in key.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}.bpf"


def _trusted_dir(path: str) -> bool:
    """Ours and writable by us alone: a planted program would be loaded as our filter."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _pack(key: str, programs: Sequence[bytes]) -> bytes:
    head = CACHE_MAGIC + key.encode() + b"\n"
    return head + b"".join(struct.pack("<I", len(p)) + p for p in programs)


def _unpack(key: str, data: bytes) -> tuple[bytes, ...] | None:
    head = CACHE_MAGIC + key.encode() + b"\n"
    if not data.startswith(head):
        return None
    out, pos = [], len(head)
    while pos < len(data):
        if pos + 4 > len(data):
            return None
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size == 0 or size % 8 or pos + size > len(data):
            return None
        out.append(data[pos:pos + size])
        pos += size
    return tuple(out) or None


def _read_cache(path: str, key: str) -> tuple[bytes, ...] | None:
    if not _trusted_dir(os.path.dirname(path)):
        return None
    try:
        with open(path, "rb") as f:
            return _unpack(key, f.read())
    except OSError:
        return None


def _write_cache(path: str, key: str, programs: Sequence[bytes]) -> None:
    """Atomically, best effort: a start never fails for want of a cache."""
    d = os.path.dirname(path)
    with contextlib.suppress(OSError):
        os.makedirs(d, mode=0o755, exist_ok=True)
        if not _trusted_dir(d):
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_pack(key, programs))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def programs_for(items: Sequence[str], retained: Iterable[str], *,
                 use_cache: bool = True) -> tuple[bytes, ...]:
    """The compiled filter for this container: from the cache, or built (and cached)."""
    machine = os.uname().machine
    retained = frozenset(retained)
    key = None
    if use_cache:
        with contextlib.suppress(OSError):  # a file to stamp is missing: build
            key = cache_key(items, retained, machine)
    directory = cache_dir() if key is not None else None
    path = os.path.join(directory, _file_name(key)) if directory and key else None
    if path is not None and key is not None:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    programs = build(resolve(items, retained), machine)
    if path is not None and key is not None:
        _write_cache(path, key, programs)
    return programs
