# SPDX-License-Identifier: BSD-2-Clause
"""Command line: argv → validated ContainerSpec → supervisor.

Heavy modules (jeepney, asyncio and pyroute2) are imported only on the paths
that need them, so `machinepy run` starts about as fast as Python itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from machinepy.cli.args import Parser, UsageError, add_options
from machinepy.core.options import ContainerOptions, build_spec, options_from_cli
from machinepy.core.spec import ContainerSpec, SpecError, one_line, validate

MACHINES_DIR = "/var/lib/machines"


def _front_end(p: Parser) -> None:
    """What only the command line says: how to run the container, not what it is."""
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    p.add_argument("--machine", metavar="NAME", help="machine name (default pflask-<pid>)")
    p.add_argument("--notify-ready", action="store_true",
                   help="forward the container's READY=1 to our NOTIFY_SOCKET")


def build_parser(verb: str | None = None) -> Parser:
    """The parser; given VERB, only that command gets its options.

    argparse checks each option as it is added (~0.1 ms apiece): the other
    command's fifty are not worth building for a one-shot run.
    """
    parser = Parser(prog="machinepy", description="Linux containers, registered with machined.")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    run = sub.add_parser("run", help="run a command in a container (pflask-compatible)")
    if verb in (None, "run"):
        run.add_argument("-r", "--chroot", metavar="DIR", help="root directory of the container")
        add_options(run, "run")
        _front_end(run)
        run.add_argument("-a", "--attach", metavar="NAME|PID",
                         help="attach to a detached container")
        run.add_argument("command", nargs=argparse.REMAINDER)
    boot = sub.add_parser("boot", help="boot an OS tree")
    if verb in (None, "boot"):
        boot.add_argument("root", metavar="ROOTFS|NAME",
                          help="a directory, or NAME for /var/lib/machines/NAME")
        add_options(boot, "boot")
        _front_end(boot)
    return parser


def machine_path(arg: str) -> tuple[str, str | None]:
    """ROOTFS or NAME → (absolute path, machine name or None), as nspawn's -M:
    a NAME has no '/' and names nothing here, and means /var/lib/machines/NAME."""
    if "/" in arg or arg in (".", "..") or os.path.lexists(arg):
        return os.path.abspath(arg), None
    from machinepy.core.spec import check_machine_name

    return os.path.join(MACHINES_DIR, check_machine_name(arg)), arg


def options_from_args(args: argparse.Namespace) -> ContainerOptions:
    return options_from_cli(vars(args), args.verb).replace(boot=args.verb == "boot")


def request(args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
    """The root directory and the command (a booted init's arguments) asked for."""
    if args.verb == "boot":
        return os.path.abspath(args.root), tuple(getattr(args, "init_args", ()))
    command = tuple(args.command)
    return args.chroot, command[1:] if command[:1] == ("--",) else command


def spec_from_args(args: argparse.Namespace,
                   options: ContainerOptions | None = None) -> ContainerSpec:
    root, command = request(args)
    spec = build_spec(options or options_from_args(args), name=args.machine, root=root,
                      command=command)
    if args.notify_ready and args.verb != "boot":
        raise SpecError("--notify-ready needs boot (only a booted init sends READY=1)")
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

    if spec.netlink:  # pyroute2 needs asyncio; nothing else does (D-Bus runs on MiniLoop)
        asyncio = _import_asyncio()

        async def main() -> int:
            return await Supervisor(spec, **kw).run()

        status: int = asyncio.run(main())
        return status
    from machinepy.runtime.loop import MiniLoop

    loop = MiniLoop()
    status = loop.run(Supervisor(spec, loop=loop, **kw).run())
    return status


def _run_detached(spec: ContainerSpec, **kw: Any) -> int:
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

    return _supervise(spec, console="detached", on_error=lambda msg: send(f"ERR {msg}"),
                      on_started=lambda c: send(f"OK {c.name}"), **kw)


def _attach_alone(parser: Parser, args: argparse.Namespace) -> None:
    """--attach joins a running container: an option for a new one contradicts it
    (--register=no, which scripts pass to every run, is harmless: nothing registers)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["run"]._actions:
        if action.dest in ("attach", "help", "register") or not action.option_strings:
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._AppendConstAction):  # -U … -P share theirs
            value = action.const in (value or ())
        if value not in (action.default, False):
            raise UsageError(f"--attach contradicts {action.option_strings[-1]}")
    if args.command:
        raise UsageError("--attach takes no command")


def _service_attach(name: str) -> int:
    """`run -a NAME` of a container of io.machinepy1 (its D-Bus client loads only then)."""
    from machinepy.cli import client

    return client.main(["attach", name])


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
            from machinepy.cli.attach import attach

            return attach(args.attach, service=_service_attach)
        options = options_from_args(args)
        spec = spec_from_args(args, options)
        if os.geteuid() != 0 and not spec.user_maps and not spec.private_users:
            if "user" in options.no_namespaces:
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
    if not args.detach:
        return _supervise(spec, notify_ready=args.notify_ready)
    # The daemon serves root only, and cannot forward READY=1 to our NOTIFY_SOCKET.
    from machinepy.core.sd import system_bus_available

    if os.geteuid() == 0 and not args.notify_ready and system_bus_available():
        from machinepy.cli.client import hand_off

        root, command = request(args)
        status = hand_off(options, args.machine, root, command)
        if status is not None:
            return status
    return _run_detached(spec, notify_ready=args.notify_ready)
