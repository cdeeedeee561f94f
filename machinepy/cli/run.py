# SPDX-License-Identifier: BSD-2-Clause
"""Command line: argv → validated ContainerSpec → supervisor.

Heavy modules (asyncio, dbus-fast, pyroute2) are imported only on the paths
that need them, so `machinepy run` starts about as fast as Python itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from machinepy.cli.args import Parser, UsageError, _bool
from machinepy.core.spec import (
    NAMESPACES,
    OWNERSHIPS,
    ContainerSpec,
    SpecError,
    one_line,
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
    validate,
)

INIT_CANDIDATES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init")
MACHINES_DIR = "/var/lib/machines"


def _container_options(p: argparse.ArgumentParser, *, boot: bool) -> None:
    if not boot:
        p.add_argument("-r", "--chroot", metavar="DIR", help="root directory of the container")
        p.add_argument("-c", "--chdir", metavar="DIR", help="working directory inside")
        p.add_argument("-u", "--user", metavar="USER", help="run the command as USER inside")
        p.add_argument("-k", "--keepenv", action="store_true",
                       help="keep the environment (with --chroot)")
    p.add_argument("-t", "--hostname", metavar="NAME", help="hostname inside the container")
    p.add_argument("-m", "--mount", action="append", default=[], metavar="SPEC",
                   help="bind:HOST:CT, bind-ro:HOST:CT, tmp:CT or overlay:UPPER:CT:WORK")
    p.add_argument("-s", "--setenv", action="append", default=[], metavar="NAME=VALUE[,...]",
                   help="set environment variables inside")
    p.add_argument("-w", "--ephemeral", "--volatile", action="store_true",
                   help="run on a throw-away overlay of the root; changes vanish at exit")
    p.add_argument("--ephemeral-size", metavar="SIZE",
                   help="bound the throw-away layer: bytes[kMGT] or N%% of RAM (default 25%%)")
    p.add_argument("--tmpfs", action="append", default=[], metavar="PATH[:OPTIONS]",
                   help="a tmpfs at PATH; OPTIONS: size=, nr_inodes=, mode= (default "
                   "size=10%%,nr_inodes=400k; on /tmp, /run or /dev/shm it replaces ours)")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    p.add_argument("-n", "--netif", action="append", nargs="?", const="", default=[],
                   metavar="SPEC", help="own network namespace; optionally add an interface: "
                   "DEV:NAME, macvlan:MASTER:NAME, ipvlan:MASTER:NAME, veth:OUT:IN, "
                   "bridge:BRIDGE:IN")
    p.add_argument("--netif-address", action="append", default=[], metavar="NAME=ADDR/PREFIX")
    p.add_argument("--netif-route", action="append", default=[], metavar="NAME=DEST[,via=GW]")
    p.add_argument("-e", "--user-map", action="append", default=[],
                   metavar="CT_ID:HOST_ID:COUNT", help="user namespace id map")
    p.add_argument("--private-users", choices=("pick", "no"), default="no",
                   help="pick: a free 65536-id range for the container's ids")
    p.add_argument("--private-users-ownership", choices=OWNERSHIPS, default="auto",
                   help="with pick: map (idmapped mount, the tree stays as it is), chown "
                   "(shift the tree's owners once), auto (map where the filesystem allows)")
    p.add_argument("-b", "--caps", action="append", default=[], metavar="[+-]CAP,...",
                   help="adjust the capability bounding set")
    p.add_argument("--system-call-filter", action="append", default=[], metavar="[~]NAMES",
                   help="allow (or with ~, deny) more system calls: names and @groups, "
                   "space-separated, as systemd-nspawn's")
    p.add_argument("--no-new-privileges", type=_bool, nargs="?", const=True, default=False,
                   metavar="yes|no", help="set no_new_privs: setuid binaries gain nothing")
    p.add_argument("-g", "--cgroup", action="append", default=[], metavar="CONTROLLER",
                   help="enable accounting for CONTROLLER on the machine's scope")
    p.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="set a property on the machine's scope unit")
    p.add_argument("--landlock-scope", default="none", metavar="SCOPE[,...]|all|none",
                   help="Landlock scopes: abstract-unix-socket (no host abstract sockets), "
                   "signal (no signals to the host's processes)")
    p.add_argument("--machine", metavar="NAME", help="machine name (default pflask-<pid>)")
    p.add_argument("--register", type=_bool, default=True, metavar="yes|no",
                   help="register with systemd-machined (default yes)")
    p.add_argument("--notify-ready", action="store_true",
                   help="forward the container's READY=1 to our NOTIFY_SOCKET")
    for short, ns in (("U", "user"), ("M", "mount"), ("N", "net"), ("I", "ipc"), ("H", "uts"),
                      ("P", "pid")):
        long = "mountns" if ns == "mount" else f"{ns}ns"
        p.add_argument(f"-{short}", f"--no-{long}", dest=f"no_{ns}", action="store_true",
                       help=f"do not create a {ns} namespace")


def build_parser(verb: str | None = None) -> Parser:
    """The parser; given VERB, only that command gets its options.

    argparse checks each option as it is added (~0.1 ms apiece): the other
    command's fifty are not worth building for a one-shot run.
    """
    parser = Parser(prog="machinepy", description="Linux containers, registered with machined.")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    run = sub.add_parser("run", help="run a command in a container (pflask-compatible)")
    if verb in (None, "run"):
        _container_options(run, boot=False)
        run.add_argument("-a", "--attach", metavar="NAME|PID",
                         help="attach to a detached container")
        run.add_argument("command", nargs=argparse.REMAINDER)
    boot = sub.add_parser("boot", help="boot an OS tree")
    if verb in (None, "boot"):
        boot.add_argument("root", metavar="ROOTFS|NAME",
                          help="a directory, or NAME for /var/lib/machines/NAME")
        _container_options(boot, boot=True)
    return parser


def _namespaces(args: argparse.Namespace) -> frozenset[str]:
    ns = {"mount", "pid", "ipc", "uts", "cgroup"}
    if args.netif:
        ns.add("net")
    if args.user_map or args.private_users == "pick":
        ns.add("user")
    return frozenset(n for n in ns if not getattr(args, f"no_{n}", False) and n in NAMESPACES)


def find_init(root: str) -> str:
    for init in INIT_CANDIDATES:
        path = os.path.join(root, init.lstrip("/"))
        if os.path.lexists(path):
            return init
    raise SpecError(f"no init found in {quote(root)} (looked for {', '.join(INIT_CANDIDATES)})")


def check_contradictions(args: argparse.Namespace) -> None:
    """Options that ask for opposite things; the D-Bus options come through here too.

    Caught on the parsed options because the spec no longer shows some of them:
    `-N -n` would leave a spec without a network namespace and without netifs,
    and run on the host's network.
    """
    def given(dest: str) -> bool:
        return bool(getattr(args, dest, None))

    if given("no_net"):
        for dest, flag in (("netif", "--netif"), ("netif_address", "--netif-address"),
                           ("netif_route", "--netif-route")):
            if given(dest):
                raise SpecError(f"--no-netns contradicts {flag} (a private network)")
    elif not given("netif"):
        for dest, flag in (("netif_address", "--netif-address"), ("netif_route", "--netif-route")):
            if given(dest):
                raise SpecError(f"{flag} needs --netif (a private network)")
    if given("no_user"):
        for dest, flag in (("user_map", "--user-map"), ("private_users", "--private-users=pick")):
            if given(dest) and getattr(args, dest) != "no":
                raise SpecError(f"--no-userns contradicts {flag}")
    if args.verb == "boot":
        # Its init must be PID 1, and sets the hostname: in the host's UTS
        # namespace that would rename the host.
        for dest, flag, why in (("no_pid", "--no-pidns", "its init runs as PID 1"),
                                ("no_uts", "--no-utsns", "its init sets the hostname")):
            if given(dest):
                raise SpecError(f"boot contradicts {flag} ({why})")
    elif given("notify_ready"):
        raise SpecError("--notify-ready needs boot (only a booted init sends READY=1)")
    if not args.register:
        for dest, flag in (("property", "--property"), ("cgroup", "--cgroup")):
            if given(dest):
                raise SpecError(f"{flag} sets the machine's scope: it needs --register=yes")


def machine_path(arg: str) -> tuple[str, str | None]:
    """ROOTFS or NAME → (absolute path, machine name or None), as nspawn's -M:
    a NAME has no '/' and names nothing here, and means /var/lib/machines/NAME."""
    if "/" in arg or arg in (".", "..") or os.path.lexists(arg):
        return os.path.abspath(arg), None
    from machinepy.core.spec import check_machine_name

    return os.path.join(MACHINES_DIR, check_machine_name(arg)), arg


def spec_from_args(args: argparse.Namespace) -> ContainerSpec:
    props = []
    if args.cgroup or args.property:
        from machinepy.core.unitprops import PropertyError, accounting_property, parse_property

        try:
            # pflask 0.2: --cgroup=memory,pids
            props += [accounting_property(c) for arg in args.cgroup for c in arg.split(",")]
            props += [parse_property(p) for p in args.property]
        except PropertyError as e:
            raise SpecError(str(e)) from None
    setenv = tuple(kv for item in args.setenv for kv in parse_setenv(item))
    command = tuple(args.init_args if args.verb == "boot" else args.command)
    if command[:1] == ("--",):
        command = command[1:]
    root = os.path.abspath(args.root) if args.verb == "boot" else args.chroot
    if args.verb == "boot" and os.path.isdir(root):
        command = (find_init(root), *command)
    if args.caps:
        from machinepy.core.caps import parse_caps

        caps = parse_caps(args.caps)
    else:
        caps = ()
    if args.system_call_filter:
        from machinepy.runtime.seccomp import parse_filter

        syscalls = parse_filter(args.system_call_filter)
    else:
        syscalls = ()
    spec = ContainerSpec(
        command=command,
        root=root,
        chdir=getattr(args, "chdir", None),
        hostname=args.hostname,
        mounts=(*(parse_mount(m) for m in args.mount), *(parse_tmpfs(t) for t in args.tmpfs)),
        user=getattr(args, "user", None),
        setenv=setenv,
        keepenv=getattr(args, "keepenv", False),
        ephemeral=args.ephemeral,
        ephemeral_size=(None if args.ephemeral_size is None
                        else parse_size(args.ephemeral_size, "--ephemeral-size")),
        detach=args.detach,
        boot=args.verb == "boot",
        namespaces=_namespaces(args),  # type: ignore[arg-type]
        netifs=tuple(parse_netif(n) for n in args.netif if n),
        addresses=tuple(parse_netif_address(a) for a in args.netif_address),
        routes=tuple(parse_netif_route(r) for r in args.netif_route),
        user_maps=tuple(parse_user_map(m) for m in args.user_map),
        caps=caps,
        machine=args.machine,
        register=args.register,
        properties=tuple(props),
        notify_ready=args.notify_ready,
        private_users=args.private_users == "pick",
        ownership=args.private_users_ownership,
        landlock_scope=parse_landlock_scope(args.landlock_scope),
        system_call_filter=syscalls,
        no_new_privileges=args.no_new_privileges,
    )
    check_contradictions(args)  # after the parsers: a malformed value is named first
    return spec


def with_caller_maps(spec: ContainerSpec) -> ContainerSpec:
    """Without root and without --user-map: a user namespace in which the caller
    is root — or, with --user, that user — as pflask and `unshare -r` do."""
    from machinepy.core.spec import lookup_user
    from machinepy.core.subids import caller_maps

    pw = lookup_user(spec.user, spec.root) if spec.user is not None else None
    uids, gids = caller_maps(pw.uid if pw else 0, pw.gid if pw else 0)
    return spec.replace(user_maps=uids, group_maps=gids,
                        namespaces=spec.namespaces | {"user"})


def _needs_asyncio(spec: ContainerSpec) -> bool:
    """D-Bus (dbus-fast) and netlink (pyroute2) need asyncio; nothing else does."""
    if spec.netifs or spec.addresses or spec.routes:
        return True
    if not spec.register:
        return False
    from machinepy.core.sd import can_register

    return can_register()


def _import_asyncio() -> ModuleType:
    """asyncio without its TLS support, which machinepy never uses.

    asyncio imports ssl (loading libssl: ~5 ms of every registered start) when
    it can; while None stands in sys.modules for ssl, that import fails and
    asyncio goes on without.  ssl itself stays importable afterwards (pyroute2
    imports it).
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        import asyncio

        return asyncio
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio
    finally:
        del sys.modules["ssl"]
    return asyncio


def _supervise(spec: ContainerSpec, **kw: Any) -> int:
    from machinepy.supervise.supervisor import Supervisor

    if _needs_asyncio(spec):
        asyncio = _import_asyncio()

        async def main() -> int:
            return await Supervisor(spec, **kw).run()

        status: int = asyncio.run(main())
        return status
    from machinepy.runtime.loop import MiniLoop

    loop = MiniLoop()
    status = loop.run(Supervisor(spec, loop=loop, **kw).run())
    return status


def _run_detached(spec: ContainerSpec) -> int:
    """Start the container under a background supervisor; print its name."""
    from machinepy.cli.attach import daemonize
    from machinepy.runtime.attachsock import AttachError, base_dir

    try:
        base_dir()  # a user without XDG_RUNTIME_DIR has nowhere to put the console socket
    except AttachError as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2
    report = daemonize()  # the foreground process exits in there, with the report
    assert report is not None
    fd = report[0]

    def send(line: str) -> None:
        nonlocal fd
        if fd >= 0:
            os.write(fd, line.encode() + b"\n")
            os.close(fd)
            fd = -1

    return _supervise(spec, on_error=lambda msg: send(f"ERR {msg}"),
                      on_started=lambda c: send(f"OK {c.name}"))


def _attach_alone(parser: Parser, args: argparse.Namespace) -> None:
    """--attach joins a running container: an option for a new one contradicts it
    (--register=no, which scripts pass to every run, is harmless: nothing registers)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["run"]._actions:
        if action.dest in ("attach", "help", "register") or not action.option_strings:
            continue
        if getattr(args, action.dest) != action.default:
            raise UsageError(f"--attach contradicts {action.option_strings[-1]}")
    if args.command:
        raise UsageError("--attach takes no command")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] not in ("run", "boot", "-h", "--help") and not argv[0].startswith(
            "--version"
        ):
            # pflask compatibility: `machinepy [options] [--] [command]` means run.
            argv = ["run", *argv]
        parser = build_parser(argv[0] if argv[:1] in (["run"], ["boot"]) else None)
        init_args: list[str] = []
        if argv[:1] == ["boot"] and "--" in argv:
            # Options may follow ROOTFS; only what comes after -- goes to init.
            cut = argv.index("--")
            argv, init_args = argv[:cut], argv[cut + 1 :]
        args = parser.parse_args(argv)
        args.init_args = init_args
        if args.verb == "boot":
            # A bare NAME boots /var/lib/machines/NAME as machine NAME.
            args.root, name = machine_path(args.root)
            args.machine = args.machine or name
        if args.verb is None:
            raise UsageError("no command given (try 'machinepy run --help')")
        if args.verb == "run" and args.attach:
            _attach_alone(parser, args)
            from machinepy.cli import client
            from machinepy.cli.attach import attach

            return attach(args.attach, service=lambda name: client.main(["attach", name]))
        spec = spec_from_args(args)
        if os.geteuid() != 0 and not spec.user_maps and not spec.private_users:
            if args.no_user:
                raise UsageError("without root a container needs a user namespace: "
                                 "drop --no-userns")
            spec = with_caller_maps(spec)
        spec = validate(spec)
    except (UsageError, SpecError) as e:
        print(f"machinepy: {one_line(str(e))}", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and spec.private_users:
        print("machinepy: --private-users=pick must be run as root (it shifts the tree's "
              "owners)", file=sys.stderr)
        return 2
    from machinepy.core.linux import set_process_name

    set_process_name("machinepy")  # pflask's attach flow: `pidof machinepy`, then -a PID
    if not spec.detach:
        return _supervise(spec)
    # The daemon serves root only, and cannot forward READY=1 to our NOTIFY_SOCKET.
    from machinepy.core.sd import system_bus_available

    if os.geteuid() == 0 and not spec.notify_ready and system_bus_available():
        from machinepy.cli.client import hand_off

        status = hand_off(args)
        if status is not None:
            return status
    return _run_detached(spec)
