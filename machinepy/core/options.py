# SPDX-License-Identifier: BSD-2-Clause
"""The container options, declared once (as mkosi's SETTINGS, nspawn's Settings).

SETTINGS has one entry per field of ContainerOptions: its command-line flags and
verbs, its CreateContainer key and D-Bus signature, a parser from text and its
inverse.  Generic over the table: argparse (cli.args), CreateContainer's a{sv}
both ways, the daemon's state files, README's reference.  One builder makes the
ContainerSpec and refuses contradictions for every front-end.  On the bus a
value is a (signature, value) pair, any D-Bus library's variant; structure is
a struct, never escaped text, and is checked by the command line's own parser.
NamedTuples, not dataclasses: dataclasses imports inspect (~6 ms a `run`); and
no `from __future__ import annotations`: NamedTuple compiles each string annotation.
"""

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from machinepy.core.spec import (
    LANDLOCK_SCOPES,
    NAMESPACES,
    OWNERSHIPS,
    ContainerSpec,
    IdMap,
    MountSpec,
    NetifAddress,
    NetifRoute,
    NetifSpec,
    Ownership,
    SpecError,
    parse_landlock_scope,
    parse_mount,
    parse_netif,
    parse_netif_address,
    parse_netif_route,
    parse_setenv,
    parse_size,
    parse_tmpfs,
    parse_user_map,
    quote,
)

if TYPE_CHECKING:
    import uuid

VERBS = ("run", "boot", "start")
NO_NAMESPACES = ("user", "mount", "net", "ipc", "uts", "pid")
NAMESPACE_FLAGS = {"user": "-U", "mount": "-M", "net": "-N", "ipc": "-I", "uts": "-H", "pid": "-P"}
INIT_CANDIDATES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init")


class ContainerOptions(NamedTuple):
    """What a front-end may ask of a container, parsed; the defaults are no option given."""

    boot: bool = False
    chdir: str | None = None
    user: str | None = None
    keepenv: bool = False
    hostname: str | None = None
    mounts: tuple[MountSpec, ...] = ()
    setenv: tuple[tuple[str, str], ...] = ()
    ephemeral: bool = False
    ephemeral_size: str | None = None
    tmpfs: tuple[MountSpec, ...] = ()
    netifs: tuple[NetifSpec, ...] | None = None  # (): a private network with only lo
    addresses: tuple[NetifAddress, ...] = ()
    routes: tuple[NetifRoute, ...] = ()
    user_maps: tuple[IdMap, ...] = ()
    private_users: Literal["no", "pick"] = "no"
    ownership: Ownership = "auto"
    caps: tuple[str, ...] = ()  # +NAME or -NAME (caps.parse_caps)
    system_call_filter: tuple[str, ...] = ()  # NAME, @GROUP, ~ to deny (parse_filter)
    no_new_privileges: bool = False
    cgroups: tuple[str, ...] = ()  # controllers
    properties: tuple[str, ...] = ()  # NAME=VALUE, checked (unitprops.parse_property)
    landlock_scope: tuple[str, ...] = ()
    register: bool = True
    no_namespaces: tuple[str, ...] = ()  # in NO_NAMESPACES' order
    uuid: "uuid.UUID | None" = None
    # What a host-root or --keepenv container inherits instead of the daemon's
    # environment: `run --detach` hands the caller's over.
    base_env: tuple[tuple[str, str], ...] | None = None

    def replace(self, **changes: Any) -> "ContainerOptions":
        return self._replace(**changes)


DEFAULTS = ContainerOptions()
CliKind = Literal["flag", "value", "bool", "bool?", "list", "list?", "namespaces"]


def _same(value: Any) -> Any:
    return value


class Setting(NamedTuple):
    field: str
    key: str | None  # CreateContainer's option; None: not on the bus
    signature: str  # of its value there
    flags: tuple[str, ...] = ()  # none: D-Bus only
    help: str = ""
    metavar: str | None = None
    # flag: no value; bool: yes|no (bool?: the value may be left out, meaning yes);
    # list: repeatable, each occurrence gives items (list?: may be empty)
    cli: CliKind = "value"
    verbs: tuple[str, ...] = VERBS
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] = _same  # text → value; a list's text → its items
    format: Callable[[Any], str] = str  # value (a list's item) → text; parse's inverse
    encode: Callable[[Any], Any] = _same  # value (item) → D-Bus
    decode: Callable[[Any], Any] | None = None  # D-Bus → value (item); None: parse the text
    also: tuple[str, ...] = ()  # other signatures the bus may send
    struct: str = ""  # README: the fields of the D-Bus struct
    spec: str = ""  # the ContainerSpec field it goes to ("": its own name)
    public: bool = True  # in a container's Options property (env: maybe secrets)

    @property
    def many(self) -> bool:
        return self.cli in ("list", "list?")

    @property
    def default(self) -> Any:
        return DEFAULTS._field_defaults[self.field]

    @property
    def long(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))

    def from_cli(self, raw: Any) -> Any:
        """argparse's value (None: not given) → the option's."""
        if raw is None:
            return self.default
        if self.cli in ("flag", "bool", "bool?"):
            return bool(raw)
        if self.cli == "namespaces":
            return tuple(n for n in NO_NAMESPACES if n in raw)
        if self.many:
            return tuple(item for text in raw if text or self.cli == "list"
                         for item in self.parse(text))
        return self.parse(raw)

    def to_argv(self, value: Any) -> list[str]:
        """The arguments that give VALUE (none for the default)."""
        if value == self.default or not self.flags:
            return []
        if self.cli == "flag":
            return [self.long]
        if self.cli in ("bool", "bool?"):
            return [f"{self.long}={'yes' if value else 'no'}"]
        if self.cli == "namespaces":
            return [NAMESPACE_FLAGS[n] for n in value]
        if self.many:
            return [f"{self.long}={self.format(item)}" for item in value] or [f"{self.long}="]
        return [f"{self.long}={self.format(value)}"]

    def to_bus(self, value: Any) -> tuple[str, object]:
        return self.signature, ([self.encode(i) for i in value] if self.many
                                else self.encode(value))

    def from_bus(self, signature: str, raw: Any) -> Any:
        if signature not in (self.signature, *self.also):
            want = " or ".join(quote(s) for s in (self.signature, *self.also))
            raise SpecError(f"option {quote(str(self.key))} must be of type {want}, "
                            f"not {quote(signature)}")
        return tuple(map(self._item, raw)) if self.many else self._item(raw)

    def _item(self, raw: Any) -> Any:
        if self.decode is not None or self.signature == "b":
            return self.decode(raw) if self.decode else bool(raw)
        if self.choices and _text(raw) not in self.choices:
            alts = (" or ".join(map(quote, self.choices)) if len(self.choices) == 2
                    else "one of " + ", ".join(self.choices))
            raise SpecError(f"{self.key} must be {alts}, not {quote(raw)}")
        value = self.parse(_text(raw))
        if self.many and len(value) != 1:  # "+a,-b" is two entries on the bus
            raise SpecError(f"invalid {self.key} entry {quote(raw)}: one item per entry")
        return value[0] if self.many else value


# ---------------------------------------------------------------------------
# Values: parsers, their inverses, D-Bus forms


def _text(raw: str) -> str:
    if "\0" in raw:
        raise SpecError("strings must not contain NUL bytes")
    return raw


def _esc(text: str) -> str:
    """A field of pflask's syntax (split_escaped): its separators escaped."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _one(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    return lambda text: (parse(text),)


def _fmt_mount(m: MountSpec) -> str:
    fields = {"tmp": (m.dest, *((m.options,) if m.options is not None else ())),
              "overlay": (m.source, m.dest, m.work)}.get(m.kind, (m.source, m.dest))
    return ":".join(_esc(f or "") for f in (m.kind, *fields))


def _mount(raw: Sequence[str]) -> MountSpec:
    m = MountSpec(raw[0], raw[1], *(f or None for f in raw[2:]))  # type: ignore[arg-type]
    for name in {"tmp": ("source", "work"), "overlay": ("options",)}.get(m.kind,
                                                                      ("work", "options")):
        if getattr(m, name):
            raise SpecError(f"invalid Mounts entry {quote(_fmt_mount(m))}: "
                            f"a {m.kind} mount takes no {name}")
    return parse_mount(_fmt_mount(m))


def _fmt_netif(n: NetifSpec) -> str:
    return ":".join(_esc(f) for f in ((n.host, n.inside) if n.kind == "move" else n))


def _fmt_route(r: NetifRoute) -> str:
    via = f",via={r.gateway}" if r.gateway is not None else ""
    return f"{r.ifname}={'default' if r.dest is None else r.dest}{via}"


def _route(raw: Sequence[str]) -> NetifRoute:
    name, dest, gateway = raw
    text = f"{name}={dest}" + (f",via={gateway}" if gateway else "")
    if "," in dest + gateway:
        raise SpecError(f"invalid NetifRoutes entry {quote(text)}: one address per field")
    return parse_netif_route(text)


def _landlock(raw: Sequence[str]) -> tuple[str, ...]:
    for name in raw:
        if name not in LANDLOCK_SCOPES:
            parse_landlock_scope(name)  # names an unknown one
            raise SpecError(f"invalid LandlockScope entry {quote(name)}: one scope per entry")
    return tuple(dict.fromkeys(raw))


def _base_env(raw: str) -> tuple[str, str]:
    name, eq, value = raw.partition("=")
    if not name or not eq or "\0" in raw:
        raise SpecError(f"BaseEnvironment entry {quote(raw)} is not NAME=VALUE")
    return name, value


def _caps(text: str) -> tuple[str, ...]:
    from machinepy.core.caps import parse_caps

    return parse_caps([text])


def _syscalls(text: str) -> tuple[str, ...]:
    from machinepy.core.syscall_groups import parse_filter

    return parse_filter([text])


def _unit(text: str, *, cgroups: bool) -> tuple[str, ...]:
    from machinepy.core.unitprops import PropertyError, accounting_property, parse_property

    items = tuple(text.split(",")) if cgroups else (text,)  # pflask 0.2: -g memory,pids
    try:
        for item in items:
            (accounting_property if cgroups else parse_property)(item)
    except PropertyError as e:
        raise SpecError(str(e)) from None
    return items


def _no_namespaces(raw: Sequence[str]) -> tuple[str, ...]:
    for ns in raw:
        if ns not in NO_NAMESPACES:
            raise SpecError(f"unknown namespace {quote(ns)} in NoNamespaces")
    return tuple(n for n in NO_NAMESPACES if n in raw)


UUID_RE = r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"


def parse_uuid(text: str | bytes) -> "uuid.UUID":
    """nspawn's --uuid (32 hex digits, or 8-4-4-4-12), or its 16 bytes; never all zeros."""
    import re
    import uuid

    if isinstance(text, str) and not re.fullmatch(UUID_RE, text, re.ASCII):
        raise SpecError(f"invalid --uuid {quote(text)}: expected 32 hexadecimal digits "
                        "(dashes allowed as in 8-4-4-4-12)")
    if not isinstance(text, str) and len(text) != 16:
        raise SpecError(f"invalid Uuid: expected 16 bytes, got {len(text)}")
    value = uuid.UUID(text) if isinstance(text, str) else uuid.UUID(bytes=bytes(text))
    if not value.int:
        raise SpecError("invalid --uuid: the machine id may not be all zeros")
    return value


# ---------------------------------------------------------------------------
# The table, in the order of --help

SETTINGS: tuple[Setting, ...] = (
    Setting("chdir", "WorkingDirectory", "s", ("-c", "--chdir"), "working directory inside",
            "DIR", verbs=("run", "start")),
    Setting("user", "User", "s", ("-u", "--user"), "run the command as USER inside", "USER",
            verbs=("run", "start")),
    Setting("keepenv", "KeepEnvironment", "b", ("-k", "--keepenv"),
            "keep the environment (with --chroot)", cli="flag", verbs=("run", "start")),
    Setting("hostname", "Hostname", "s", ("-t", "--hostname"), "hostname inside the container",
            "NAME"),
    Setting("mounts", "Mounts", "a(sssss)", ("-m", "--mount"),
            "bind:HOST:CT, bind-ro:HOST:CT, tmp:CT or overlay:UPPER:CT:WORK", "SPEC", "list",
            parse=_one(parse_mount), format=_fmt_mount, encode=lambda m: tuple(f or "" for f in m),
            decode=_mount, struct="(type, destination, source, work, tmpfs options)"),
    Setting("setenv", "Environment", "as", ("-s", "--setenv"),
            "set environment variables inside", "NAME=VALUE[,...]", "list",
            parse=lambda t: tuple(parse_setenv(t)), format=lambda p: f"{p[0]}={_esc(p[1])}",
            encode=lambda p: f"{p[0]}={p[1]}",
            decode=lambda r: parse_setenv(_esc(_text(r)))[0], struct="NAME=VALUE each",
            public=False),
    Setting("ephemeral", "Ephemeral", "b", ("-w", "--ephemeral", "--volatile"),
            "run on a throw-away overlay of the root; changes vanish at exit", cli="flag"),
    Setting("ephemeral_size", "EphemeralSize", "s", ("--ephemeral-size",),
            "bound the throw-away layer: bytes[kMGT] or N% of RAM (default 25%)", "SIZE",
            parse=lambda t: parse_size(t, "--ephemeral-size")),
    Setting("tmpfs", "Tmpfs", "a(ss)", ("--tmpfs",),
            "a tmpfs at PATH; OPTIONS: size=, nr_inodes=, mode= (default size=10%,"
            "nr_inodes=400k; on /tmp, /run or /dev/shm it replaces ours)", "PATH[:OPTIONS]",
            "list", parse=_one(parse_tmpfs), spec="mounts",
            format=lambda m: _esc(m.dest) + (f":{m.options}" if m.options else ""),
            encode=lambda m: (m.dest, m.options or ""),
            decode=lambda r: parse_tmpfs(_esc(r[0]) + (f":{_esc(r[1])}" if r[1] else "")),
            struct="(path, options)"),
    Setting("netifs", "Netifs", "a(sss)", ("-n", "--netif"),
            "own network namespace; optionally add an interface: DEV:NAME, macvlan:MASTER:NAME,"
            " ipvlan:MASTER:NAME, veth:OUT:IN, bridge:BRIDGE:IN", "SPEC", "list?",
            parse=_one(parse_netif), format=_fmt_netif, encode=tuple,
            decode=lambda r: parse_netif(_fmt_netif(NetifSpec(*r))),
            struct="(kind, host side, name inside), kind one of move, macvlan, ipvlan, veth, "
            "bridge; empty: only lo"),
    Setting("addresses", "NetifAddresses", "a(ss)", ("--netif-address",),
            "an address on an interface inside", "NAME=ADDR/PREFIX", "list",
            parse=_one(parse_netif_address), format=lambda a: f"{a.ifname}={a.address}",
            encode=lambda a: (a.ifname, str(a.address)),
            decode=lambda r: parse_netif_address(f"{r[0]}={r[1]}"),
            struct="(interface, ADDRESS/PREFIX)"),
    Setting("routes", "NetifRoutes", "a(sss)", ("--netif-route",),
            "a route inside (DEST: default or ADDR/PREFIX)", "NAME=DEST[,via=GW]", "list",
            parse=_one(parse_netif_route), format=_fmt_route,
            encode=lambda r: (r.ifname, str(r.dest or "default"), str(r.gateway or "")),
            decode=_route, struct="(interface, default or ADDRESS/PREFIX, gateway or empty)"),
    Setting("user_maps", "UserMap", "a(uuu)", ("-e", "--user-map"), "user namespace id map",
            "CT_ID:HOST_ID:COUNT", "list", parse=_one(parse_user_map),
            format=lambda m: f"{m.inside}:{m.outside}:{m.count}", encode=tuple,
            decode=lambda r: parse_user_map(f"{r[0]}:{r[1]}:{r[2]}"),
            struct="(container id, host id, count)"),
    Setting("private_users", "PrivateUsers", "s", ("--private-users",),
            "pick: a free 65536-id range for the container's ids", choices=("pick", "no")),
    Setting("ownership", "PrivateUsersOwnership", "s", ("--private-users-ownership",),
            "with pick: map (idmapped mount, the tree stays as it is), chown (shift the tree's "
            "owners once), auto (map where the filesystem allows)", choices=OWNERSHIPS),
    Setting("caps", "Caps", "as", ("-b", "--caps"), "adjust the capability bounding set",
            "[+-]CAP,...", "list", parse=_caps, struct="+NAME or -NAME each"),
    Setting("system_call_filter", "SystemCallFilter", "as", ("--system-call-filter",),
            "allow (or with ~, deny) more system calls: names and @groups, space-separated, "
            "as systemd-nspawn's", "[~]NAMES", "list", parse=_syscalls,
            struct="NAME, @GROUP, ~NAME or ~@GROUP each"),
    Setting("no_new_privileges", "NoNewPrivileges", "b", ("--no-new-privileges",),
            "set no_new_privs: setuid binaries gain nothing", "yes|no", "bool?"),
    Setting("cgroups", "Cgroups", "as", ("-g", "--cgroup"),
            "enable accounting for CONTROLLER on the machine's scope", "CONTROLLER", "list",
            parse=lambda t: _unit(t, cgroups=True), spec="properties", struct="a controller each"),
    Setting("properties", "Properties", "as", ("--property", "-p"),
            "set a property on the machine's scope unit", "NAME=VALUE", "list",
            parse=lambda t: _unit(t, cgroups=False), struct="NAME=VALUE each, as systemd-run -p"),
    Setting("landlock_scope", "LandlockScope", "as", ("--landlock-scope",),
            "Landlock scopes: abstract-unix-socket (no host abstract sockets), signal (no "
            "signals to the host's processes)", "SCOPE[,...]|all|none",
            parse=parse_landlock_scope, format=",".join, encode=list,
            decode=_landlock,
            struct="scope names"),
    Setting("register", "Register", "b", ("--register",),
            "register with systemd-machined (default yes)", "yes|no", "bool"),
    Setting("no_namespaces", "NoNamespaces", "as",
            tuple(f for ns, short in NAMESPACE_FLAGS.items() for f in (short, f"--no-{ns}ns")),
            "do not create the user (-U), mount (-M), net (-N), ipc (-I), uts (-H) or pid (-P) "
            "namespace", cli="namespaces", encode=list, decode=_no_namespaces,
            spec="namespaces", struct="their names"),
    Setting("uuid", "Uuid", "ay", ("--uuid",),
            "the machine id: given to systemd-machined, and as $container_uuid", "UUID",
            parse=parse_uuid, encode=lambda u: u.bytes, decode=parse_uuid, also=("s",),
            spec="machine_id", struct="16 bytes, or s as --uuid"),
    Setting("boot", "Boot", "b", ("--boot",), "boot the init found in ROOTFS", cli="flag",
            verbs=("start",)),
    Setting("base_env", "BaseEnvironment", "as", (), cli="list", encode=lambda p: f"{p[0]}={p[1]}",
            decode=_base_env, public=False,
            struct="NAME=VALUE each: what a host-root or KeepEnvironment container inherits "
            "instead of the daemon's environment (``run --detach`` sends the caller's)"),
)
BY_KEY = {s.key: s for s in SETTINGS if s.key}


def settings(verb: str) -> Iterator[Setting]:
    """The settings VERB takes on the command line."""
    return (s for s in SETTINGS if s.flags and verb in s.verbs)


def options_from_cli(values: Mapping[str, object], verb: str) -> ContainerOptions:
    """argparse's namespace (vars) → the options; SpecError names a bad value."""
    return DEFAULTS._replace(**{s.field: s.from_cli(values.get(s.field)) for s in settings(verb)})


def options_to_argv(options: ContainerOptions, verb: str = "start") -> list[str]:
    return [a for s in settings(verb) for a in s.to_argv(getattr(options, s.field))]


def options_from_bus(options: Mapping[str, tuple[str, object]]) -> ContainerOptions:
    """CreateContainer's a{sv}, as (signature, value) pairs → the options."""
    values = {}
    for key, (signature, raw) in options.items():
        setting = BY_KEY.get(key)
        if setting is None:
            raise SpecError(f"unknown option {quote(key)} (known: {', '.join(sorted(BY_KEY))})")
        values[setting.field] = setting.from_bus(signature, raw)
    return DEFAULTS._replace(**values)


def options_to_bus(options: ContainerOptions, *,
                   public: bool = False) -> dict[str, tuple[str, object]]:
    """The options that differ from the defaults (PUBLIC: only those anyone may read)."""
    return {s.key: s.to_bus(getattr(options, s.field)) for s in SETTINGS
            if s.key and getattr(options, s.field) != s.default and (s.public or not public)}


# ---------------------------------------------------------------------------
# The one builder


def find_init(root: str) -> str:
    for init in INIT_CANDIDATES:
        if os.path.lexists(os.path.join(root, init.lstrip("/"))):
            return init
    raise SpecError(f"no init found in {quote(root)} (looked for {', '.join(INIT_CANDIDATES)})")


def check_contradictions(o: ContainerOptions) -> None:
    """Options that ask for opposite things, on the options because the spec no
    longer shows some: `-N -n` would make a spec with neither a network
    namespace nor netifs, running on the host's network."""
    no, net = set(o.no_namespaces), o.netifs is not None
    private = "(a private network)"
    for wrong, message in (
        ("net" in no and net, f"--no-netns contradicts --netif {private}"),
        ("net" in no and o.addresses, f"--no-netns contradicts --netif-address {private}"),
        ("net" in no and o.routes, f"--no-netns contradicts --netif-route {private}"),
        (not net and o.addresses, f"--netif-address needs --netif {private}"),
        (not net and o.routes, f"--netif-route needs --netif {private}"),
        ("user" in no and o.user_maps, "--no-userns contradicts --user-map"),
        ("user" in no and o.private_users == "pick",
         "--no-userns contradicts --private-users=pick"),
        # A booted init must be PID 1; in the host's UTS namespace it would rename the host.
        (o.boot and "pid" in no, "boot contradicts --no-pidns (its init runs as PID 1)"),
        (o.boot and "uts" in no, "boot contradicts --no-utsns (its init sets the hostname)"),
        (not o.register and o.properties, "--property sets the machine's scope: it needs "
         "--register=yes"),
        (not o.register and o.cgroups, "--cgroup sets the machine's scope: it needs "
         "--register=yes"),
    ):
        if wrong:
            raise SpecError(message)


def build_spec(o: ContainerOptions, *, name: str | None, root: str | None,
               command: Sequence[str], init: bool = True) -> ContainerSpec:
    """The ContainerSpec of every front-end (run, boot, start, CreateContainer, a state
    file).  A booted COMMAND is init's arguments: INIT puts the init found in ROOT first."""
    command = tuple(command)
    if o.boot and init and root is not None and os.path.isdir(root):
        command = (find_init(root), *command)
    check_contradictions(o)
    props: tuple[Any, ...] = ()
    if o.cgroups or o.properties:
        from machinepy.core.unitprops import accounting_property, parse_property

        props = (*map(accounting_property, o.cgroups), *map(parse_property, o.properties))
    ns = {"mount", "pid", "ipc", "uts", "cgroup"}
    if o.netifs is not None:
        ns.add("net")
    if o.user_maps or o.private_users == "pick":
        ns.add("user")
    same = {f: getattr(o, f) for f in ContainerOptions._fields if f in ContainerSpec._fields}
    return ContainerSpec(**{
        **same, "command": command, "root": root, "machine": name, "properties": props,
        "mounts": o.mounts + o.tmpfs, "netifs": o.netifs or (), "machine_id": o.uuid,
        "namespaces": frozenset(ns - set(o.no_namespaces)) & set(NAMESPACES),
        "private_users": o.private_users == "pick"})
