# SPDX-License-Identifier: BSD-2-Clause
"""The container specification: parsed, validated, immutable.

Everything here is pure parsing plus read-only checks of the host (stat, passwd
look-ups).  Nothing is created, so bad input never leaves anything behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    import ipaddress
    import uuid

    from machinepy.core.unitprops import UnitProperty


class SpecError(ValueError):
    """Bad user input; its message is one line, printed as `machinepy: MESSAGE`."""


def quote(text: str) -> str:
    """TEXT as it goes into an error message: in single quotes, with quotes,
    backslashes and unprintable characters escaped, so an echoed value can
    never break the one-line error (nor pass for a different value)."""
    out = []
    for ch in text:
        if ch in "'\\":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # \n, \t, \x1b, \u2028, …
    return "'" + "".join(out) + "'"


def one_line(message: str) -> str:
    """A message made elsewhere (argparse, unit properties) kept on one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


# ---------------------------------------------------------------------------
# Escaped option lists: pflask separates fields with ':' and items with ','.


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep`, honouring backslash escapes (`\\:`, `\\,`, `\\\\`)."""
    parts: list[str] = []
    cur: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise SpecError(f"trailing backslash in {quote(text)}")
            cur.append(nxt)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _absolute(path: str, what: str, spec: str) -> str:
    if not path.startswith("/"):
        raise SpecError(f"invalid {what} {quote(spec)}: path {quote(path)} is not absolute")
    if "\0" in path:
        raise SpecError(f"invalid {what} {quote(spec)}: path contains a NUL byte")
    return os.path.normpath(path).replace("//", "/")


# ---------------------------------------------------------------------------
# Mounts

MountKind = Literal["bind", "bind-ro", "tmp", "overlay"]


class MountSpec(NamedTuple):
    kind: MountKind
    dest: str
    source: str | None = None  # host path (bind) or upper dir (overlay)
    work: str | None = None  # overlay work dir
    # tmp: the user's tmpfs options, checked (mounts.py fills in the defaults)
    options: str | None = None

    @property
    def read_only(self) -> bool:
        return self.kind == "bind-ro"


def pflask_fields(spec: str) -> list[str]:
    """A spec's fields: split on ':', or — pflask 0.2's syntax, where the spec has
    no ':' at all — on ','.  `\\:` and `\\,` escape either inside a field."""
    return split_escaped(spec, ":" if ":" in spec.replace("\\:", "") else ",")


def parse_mount(spec: str) -> MountSpec:
    fields = pflask_fields(spec)
    kind, args = fields[0], fields[1:]
    want = {"bind": 2, "bind-ro": 2, "tmp": 1, "overlay": 3}.get(kind)
    if want is None:
        raise SpecError(
            f"invalid --mount {quote(spec)}: unknown mount type {quote(kind)} "
            "(expected bind, bind-ro, tmp or overlay)"
        )
    if kind == "tmp" and len(args) == 2:  # tmp:PATH:OPTIONS
        return MountSpec("tmp", dest=_absolute(args[0], "--mount", spec),
                         options=parse_tmpfs_options(args[1], "--mount", spec))
    if len(args) != want:
        raise SpecError(
            f"invalid --mount {quote(spec)}: {kind} takes {want} path(s), got {len(args)}")
    paths = [_absolute(p, "--mount", spec) for p in args]
    if kind == "tmp":
        return MountSpec("tmp", dest=paths[0])
    if kind == "overlay":
        upper, dest, work = paths
        return MountSpec("overlay", dest=dest, source=upper, work=work)
    return MountSpec(kind, dest=paths[1], source=paths[0])  # type: ignore[arg-type]


def parse_tmpfs(spec: str) -> MountSpec:
    """--tmpfs PATH[:OPTIONS], as nspawn's (OPTIONS: size=, nr_inodes=, mode=);
    `\\:` escapes a colon in PATH, as in --mount."""
    fields = split_escaped(spec, ":")
    if len(fields) > 2:
        raise SpecError(f"invalid --tmpfs {quote(spec)}: expected PATH[:OPTIONS]")
    dest = _absolute(fields[0], "--tmpfs", spec)
    options = parse_tmpfs_options(fields[1], "--tmpfs", spec) if len(fields) == 2 else None
    return MountSpec("tmp", dest=dest, options=options)


# Sizes as the kernel reads them (memparse), bounded: 0 means no limit to tmpfs.
SIZE_RE = r"([1-9][0-9]*)([kKmMgGtT]?)|([1-9][0-9]?|100)%"
INODES_RE = r"[1-9][0-9]*[kKmMgG]?"


def parse_size(text: str, what: str, spec: str | None = None) -> str:
    """A tmpfs size: bytes with an optional k/M/G/T suffix, or 1-100% of RAM."""
    if not re.fullmatch(SIZE_RE, text, re.ASCII):
        given = f" {quote(spec)}" if spec is not None else ""
        raise SpecError(
            f"invalid {what}{given}: size {quote(text)} is not a number of bytes with an "
            "optional k, M, G or T suffix, or 1% to 100% of RAM (0 would be unbounded)")
    return text


def parse_tmpfs_options(text: str, what: str, spec: str) -> str:
    """size=SIZE,nr_inodes=N,mode=OCTAL, each at most once; returned as given."""
    seen: set[str] = set()
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if key in seen:
            raise SpecError(f"invalid {what} {quote(spec)}: {quote(key)} given twice")
        seen.add(key)
        if key == "size" and sep:
            parse_size(value, what, spec)
        elif key == "nr_inodes" and sep:
            if not re.fullmatch(INODES_RE, value, re.ASCII):
                raise SpecError(f"invalid {what} {quote(spec)}: nr_inodes {quote(value)} is "
                                "not a positive number with an optional k, M or G suffix")
        elif key == "mode" and sep:
            if not re.fullmatch(r"[0-7]{1,4}", value, re.ASCII):
                raise SpecError(f"invalid {what} {quote(spec)}: mode {quote(value)} is not "
                                "an octal mode")
        else:
            raise SpecError(f"invalid {what} {quote(spec)}: unknown tmpfs option {quote(item)} "
                            "(expected size=, nr_inodes= or mode=)")
    return text


# ---------------------------------------------------------------------------
# Network interfaces

NetifKind = Literal["move", "macvlan", "ipvlan", "veth", "bridge"]
# Patterns as strings: re compiles (and caches) one when an option needs it, not
# at every start-up.  fullmatch: `$` would let a trailing newline through.
IFNAME_RE = r"[^/:\s]{1,15}"


class NetifSpec(NamedTuple):
    kind: NetifKind
    host: str  # moved device, master, outside veth end, or bridge
    inside: str  # name inside the container


def _ifname(name: str, spec: str, what: str = "--netif") -> str:
    # The kernel counts bytes (IFNAMSIZ), and a NUL or control character would
    # cut or garble the name on its way through netlink.
    if (not re.fullmatch(IFNAME_RE, name) or name in (".", "..") or not name.isprintable()
            or len(name.encode()) > 15):
        raise SpecError(
            f"invalid {what} {quote(spec)}: {quote(name)} is not a valid interface name")
    return name


def parse_netif(spec: str) -> NetifSpec:
    fields = pflask_fields(spec)
    if len(fields) == 2:
        return NetifSpec("move", _ifname(fields[0], spec), _ifname(fields[1], spec))
    if len(fields) == 3 and fields[0] in ("macvlan", "ipvlan", "veth", "bridge"):
        kind: NetifKind = fields[0]  # type: ignore[assignment]
        return NetifSpec(kind, _ifname(fields[1], spec), _ifname(fields[2], spec))
    raise SpecError(
        f"invalid --netif {quote(spec)}: expected DEV:NAME, macvlan:MASTER:NAME, "
        "ipvlan:MASTER:NAME, veth:OUTSIDE:INSIDE or bridge:BRIDGE:INSIDE"
    )


class NetifAddress(NamedTuple):
    ifname: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_netif_address(spec: str) -> NetifAddress:
    name, sep, addr = spec.partition("=")
    if not sep or "/" not in addr:
        raise SpecError(f"invalid --netif-address {quote(spec)}: expected NAME=ADDRESS/PREFIX")
    import ipaddress  # only for --netif-address/--netif-route (~1.5 ms to import)

    try:
        iface = ipaddress.ip_interface(addr)
    except ValueError:
        raise SpecError(
            f"invalid --netif-address {quote(spec)}: bad address {quote(addr)}") from None
    return NetifAddress(_ifname(name, spec, "--netif-address"), iface)


class NetifRoute(NamedTuple):
    ifname: str
    dest: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # None: default route
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None


def parse_netif_route(spec: str) -> NetifRoute:
    """NAME=DEST[,via=GATEWAY] where DEST is `default` or ADDRESS/PREFIX."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise SpecError(f"invalid --netif-route {quote(spec)}: expected NAME=DEST[,via=GATEWAY]")
    dest_s, *opts = rest.split(",")
    import ipaddress

    bad = f"invalid --netif-route {quote(spec)}"
    try:
        dest = None if dest_s == "default" else ipaddress.ip_network(dest_s, strict=False)
    except ValueError:
        raise SpecError(f"{bad}: bad destination {quote(dest_s)}") from None
    gateway = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key != "via":
            raise SpecError(f"{bad}: unknown option {quote(key)}")
        try:
            gateway = ipaddress.ip_address(value)
        except ValueError:
            raise SpecError(f"{bad}: bad gateway {quote(value)}") from None
    if dest is None and gateway is None:
        raise SpecError(f"invalid --netif-route {quote(spec)}: a default route needs via=GATEWAY")
    return NetifRoute(_ifname(name, spec, "--netif-route"), dest, gateway)


# ---------------------------------------------------------------------------
# User namespace maps


class IdMap(NamedTuple):
    inside: int
    outside: int
    count: int  # type: ignore[assignment]  # shadows tuple.count, as pflask names it


ID_MAX = 2**32 - 1


def parse_user_map(spec: str) -> IdMap:
    fields = spec.split(":")
    if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
        raise SpecError(
            f"invalid --user-map {quote(spec)}: expected CONTAINER_ID:HOST_ID:COUNT "
            "(decimal numbers)"
        )
    inside, outside, count = (int(f) for f in fields)
    if count == 0 or inside + count > ID_MAX or outside + count > ID_MAX:
        raise SpecError(f"invalid --user-map {quote(spec)}: range is empty or exceeds 2^32-1")
    return IdMap(inside, outside, count)


def check_user_maps(maps: Sequence[IdMap]) -> None:
    def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]

    for i, a in enumerate(maps):
        for b in maps[i + 1 :]:
            if overlap((a.inside, a.count), (b.inside, b.count)) or overlap(
                (a.outside, a.count), (b.outside, b.count)
            ):
                raise SpecError(
                    f"invalid --user-map: {a.inside}:{a.outside}:{a.count} overlaps "
                    f"{b.inside}:{b.outside}:{b.count}"
                )


# ---------------------------------------------------------------------------
# Environment

ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"


def parse_setenv(spec: str) -> list[tuple[str, str]]:
    """`NAME=VALUE[,NAME=VALUE…]`; `\\,` escapes a comma inside a value."""
    out = []
    for item in split_escaped(spec, ","):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(ENV_NAME_RE, name):
            raise SpecError(f"invalid --setenv {quote(spec)}: {quote(item)} is not NAME=VALUE")
        if "\0" in value:
            raise SpecError(f"invalid --setenv {quote(spec)}: value contains a NUL byte")
        out.append((name, value))
    return out


# ---------------------------------------------------------------------------
# Landlock scopes

LANDLOCK_SCOPES = ("abstract-unix-socket", "signal")


def parse_landlock_scope(spec: str) -> tuple[str, ...]:
    """`all`, `none` or a comma-separated list of LANDLOCK_SCOPES."""
    if spec == "none":
        return ()
    if spec == "all":
        return LANDLOCK_SCOPES
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",")))
    for name in names:
        if name not in LANDLOCK_SCOPES:
            raise SpecError(f"invalid --landlock-scope {spec!r}: unknown scope {name!r} "
                            f"(expected {', '.join(LANDLOCK_SCOPES)}, all or none)")
    return names


# ---------------------------------------------------------------------------
# Machine names and hostnames: systemd's hostname_is_valid(name, 0), which
# machined applies to a machine name and nspawn to --machine and --hostname:
# dot-separated labels of letters, digits and '-', no label empty or starting
# or ending with '-', no trailing dot, at most 64 characters (HOST_NAME_MAX).

HOSTNAME_MAX = 64
HOSTNAME_LABEL_RE = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"


def hostname_is_valid(name: str) -> bool:
    return 0 < len(name) <= HOSTNAME_MAX and all(
        re.fullmatch(HOSTNAME_LABEL_RE, label, re.ASCII) for label in name.split("."))


def check_machine_name(name: str) -> str:
    if not hostname_is_valid(name):
        raise SpecError(
            f"invalid machine name {quote(name)}: use dot-separated labels of letters, digits "
            f"and '-', each starting and ending with a letter or digit, at most "
            f"{HOSTNAME_MAX} characters"
        )
    return name


def check_hostname(name: str) -> str:
    if not hostname_is_valid(name):
        raise SpecError(
            f"invalid hostname {quote(name)}: use dot-separated labels of letters, digits "
            f"and '-', each starting and ending with a letter or digit, at most "
            f"{HOSTNAME_MAX} characters"
        )
    return name


# ---------------------------------------------------------------------------
# The spec itself

NAMESPACES = ("mount", "pid", "ipc", "uts", "net", "user", "cgroup")
Namespace = Literal["mount", "pid", "ipc", "uts", "net", "user", "cgroup"]
Ownership = Literal["auto", "map", "chown"]
OWNERSHIPS = ("auto", "map", "chown")


class ContainerSpec(NamedTuple):
    command: tuple[str, ...]
    root: str | None = None  # None: the host root
    chdir: str | None = None
    hostname: str | None = None
    mounts: tuple[MountSpec, ...] = ()
    user: str | None = None
    setenv: tuple[tuple[str, str], ...] = ()
    keepenv: bool = False
    # What a host-root or --keepenv container inherits; None: our own environment.
    # The daemon gets the caller's here, so `run --detach` through it keeps it.
    base_env: tuple[tuple[str, str], ...] | None = None
    ephemeral: bool = False
    ephemeral_size: str | None = None  # the upper layer's tmpfs size; None: mounts.py's
    boot: bool = False
    namespaces: frozenset[Namespace] = frozenset({"mount", "pid", "ipc", "uts", "cgroup"})
    netifs: tuple[NetifSpec, ...] = ()
    addresses: tuple[NetifAddress, ...] = ()
    routes: tuple[NetifRoute, ...] = ()
    user_maps: tuple[IdMap, ...] = ()
    # gid_map's ranges when they differ from uid_map's (a user's own group and
    # its /etc/subgid range); None: the same as user_maps.
    group_maps: tuple[IdMap, ...] | None = None
    caps: tuple[str, ...] = ()
    machine: str | None = None  # None: pflask-<leader pid>
    register: bool = True
    properties: tuple[UnitProperty, ...] = ()
    private_users: bool = False  # --private-users=pick: maps chosen at start-up
    # How the tree's owners meet the picked range: an idmapped mount ("map"), a
    # one-time lchown ("chown"), or map where the filesystem allows it ("auto").
    ownership: Ownership = "auto"
    machine_id: uuid.UUID | None = None  # None: a random one, made when needed
    # Landlock scopes ("abstract-unix-socket", "signal"): a host-network
    # container cut off from the host's abstract sockets, and from signalling
    # anything outside it.
    landlock_scope: tuple[str, ...] = ()
    # --system-call-filter items (syscall_groups.parse_filter): NAME or @GROUP to allow, ~ to deny
    system_call_filter: tuple[str, ...] = ()
    no_new_privileges: bool = False

    @property
    def netlink(self) -> bool:
        """Interfaces, addresses or routes the host sets up (netlink: pyroute2, asyncio)."""
        return bool(self.netifs or self.addresses or self.routes)

    def replace(self, **changes: Any) -> ContainerSpec:
        return self._replace(**changes)


def validate(spec: ContainerSpec) -> ContainerSpec:
    """Cross-field and host checks.  Read-only: creates nothing."""
    if spec.root is not None:
        if not spec.root.startswith("/"):
            raise SpecError(f"chroot directory {quote(spec.root)} is not absolute")
        if not os.path.isdir(spec.root):
            raise SpecError(
                f"chroot directory {quote(spec.root)} does not exist or is not a directory")
        if spec.root == "/":
            spec = spec.replace(root=None)
    if spec.ephemeral and spec.root is None:
        raise SpecError("--ephemeral needs --chroot (it discards changes to the container's root)")
    if spec.ephemeral_size is not None and not spec.ephemeral:
        raise SpecError("--ephemeral-size needs --ephemeral")
    if spec.boot and spec.root is None:
        raise SpecError("boot needs a root directory")
    if spec.boot:
        for value, flag in ((spec.user, "--user"), (spec.chdir, "--chdir"),
                            (spec.keepenv, "--keepenv")):
            if value:
                raise SpecError(f"boot takes no {flag} (its init runs as root, in /, "
                                "with an environment of its own)")
    if spec.chdir is not None and not spec.chdir.startswith("/"):
        raise SpecError(f"--chdir {quote(spec.chdir)} is not absolute")
    if "mount" not in spec.namespaces and (spec.root or spec.mounts or spec.ephemeral):
        raise SpecError(
            "--no-mountns cannot be combined with --chroot, --mount, --tmpfs or --ephemeral")
    if spec.hostname is not None and "uts" not in spec.namespaces:
        raise SpecError("--hostname needs a UTS namespace (drop --no-utsns)")
    if spec.netlink and "net" not in spec.namespaces:
        raise SpecError("--netif needs a network namespace (drop --no-netns)")
    if spec.user_maps and "user" not in spec.namespaces:
        raise SpecError("--user-map needs a user namespace (drop --no-userns)")
    if spec.private_users:
        if spec.user_maps:
            raise SpecError("--private-users=pick picks the id maps: drop --user-map")
        if spec.root is None:
            raise SpecError("--private-users=pick needs a root directory (its tree is shifted)")
        if "user" not in spec.namespaces:
            raise SpecError("--private-users=pick needs a user namespace (drop --no-userns)")
    elif spec.ownership != "auto":
        raise SpecError("--private-users-ownership needs --private-users=pick")
    elif "user" in spec.namespaces and not spec.user_maps:
        raise SpecError("a user namespace needs at least one --user-map")
    check_user_maps(spec.user_maps)
    if spec.landlock_scope:
        from machinepy.core import linux

        if linux.landlock_abi() < linux.LANDLOCK_SCOPE_ABI:
            raise SpecError("--landlock-scope needs Landlock ABI 6 (Linux 6.12, with landlock "
                            "among the kernel's lsm=)")
    inside = {n.inside for n in spec.netifs}
    if len(inside) != len(spec.netifs):
        raise SpecError("--netif: two interfaces get the same name inside the container")
    for addr in spec.addresses:
        if addr.ifname not in inside and addr.ifname != "lo":
            raise SpecError(f"--netif-address: no --netif creates {quote(addr.ifname)}")
    for route in spec.routes:
        if route.ifname not in inside and route.ifname != "lo":
            raise SpecError(f"--netif-route: no --netif creates {quote(route.ifname)}")
    for m in spec.mounts:
        for path in (m.source, m.work):
            if path is not None and not os.path.exists(path):
                raise SpecError(f"--mount source {quote(path)} does not exist")
    if spec.machine is not None:
        check_machine_name(spec.machine)
    if spec.hostname is not None:
        check_hostname(spec.hostname)
    if spec.user is not None:
        lookup_user(spec.user, spec.root)
    return spec


# ---------------------------------------------------------------------------
# Users, looked up in the container's own passwd when it has a root


class Passwd(NamedTuple):
    name: str
    uid: int
    gid: int
    home: str
    shell: str


def _read_db(path: str) -> Iterable[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    yield line.rstrip("\n").split(":")
    except FileNotFoundError:
        return


def lookup_user(user: str, root: str | None) -> Passwd:
    """Resolve USER (name or numeric uid) in ROOT/etc/passwd (host's when ROOT is None)."""
    passwd = os.path.join(root or "/", "etc/passwd")
    for f in _read_db(passwd):
        if len(f) >= 7 and (f[0] == user or (user.isdigit() and f[2] == user)):
            try:
                return Passwd(f[0], int(f[2]), int(f[3]), f[5] or "/", f[6] or "/bin/sh")
            except ValueError:
                break
    if user.isdigit():
        return Passwd(user, int(user), int(user), "/", "/bin/sh")
    raise SpecError(f"user {quote(user)} does not exist in {passwd}")


def supplementary_groups(pw: Passwd, root: str | None) -> list[int]:
    groups = [pw.gid]
    for f in _read_db(os.path.join(root or "/", "etc/group")):
        if len(f) >= 4 and pw.name in f[3].split(",") and f[2].isdigit():
            gid = int(f[2])
            if gid not in groups:
                groups.append(gid)
    return groups
