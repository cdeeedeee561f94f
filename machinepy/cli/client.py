# SPDX-License-Identifier: BSD-2-Clause
"""CLI verbs on top of io.machinepy1: start, list, status, poweroff, reboot,
terminate, kill, attach.

Every verb is one or two D-Bus calls; the first call D-Bus-activates the
daemon when it is installed (units/).  Output follows machinectl's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from machinepy.cli.args import Parser, UsageError, add_options, signal_number
from machinepy.core.spec import SpecError
from machinepy.integrate.dbus import (
    DBUS_NAME,
    DBUS_PATH,
    BusError,
    Connection,
    Received,
    method_call,
)
from machinepy.service.api import BUS_NAME, CONTAINER_IFACE, MANAGER_IFACE, MANAGER_PATH

if TYPE_CHECKING:
    from machinepy.core.options import ContainerOptions

# `list` and `status` should cost little more than the interpreter: json and
# the options table are imported by the verbs that use them.

CALL_TIMEOUT = 60.0  # CreateContainer of a big root with registration can take a while


Variant = tuple[str, object]  # (signature, value), as jeepney has them


class Client:
    """Blocking calls on one system bus connection: no loop, no asyncio."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @classmethod
    def connect(cls) -> Client:
        return cls(Connection.open(fds=True))

    def call(self, path: str, iface: str, member: str, sig: str = "",
             body: Sequence[object] = (), destination: str = BUS_NAME, *,
             keep_fds: bool = False) -> Received:
        return self.conn.call_blocking(method_call(destination, path, iface, member, sig, body),
                                       timeout=CALL_TIMEOUT, keep_fds=keep_fds)

    def bus(self, member: str, sig: str = "", *body: object) -> list[Any]:
        return list(self.call(DBUS_PATH, DBUS_NAME, member, sig, body, DBUS_NAME).body)

    def manager(self, member: str, sig: str = "", *body: object) -> list[Any]:
        return list(self.call(MANAGER_PATH, MANAGER_IFACE, member, sig, body).body)

    def properties(self, path: str) -> dict[str, Any]:
        """Each property's value (Options: CreateContainer's a{sv}, (signature, value) pairs)."""
        reply = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                          [CONTAINER_IFACE])
        return {k: v[1] for k, v in reply.body[0].items()}

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------
# start: the run/boot options, sent as CreateContainer's a{sv}


def start_parser() -> Parser:
    p = Parser(prog="machinepy start",
               description="Start a container in the background, managed by the service.")
    p.add_argument("name", metavar="NAME", help="machine name ('' picks one)")
    p.add_argument("root", metavar="ROOTFS", help="root directory ('/' for the host's root)")
    add_options(p, "start")
    return p


def variants(options: ContainerOptions) -> dict[str, Variant]:
    """CreateContainer's a{sv}: the options that differ from the defaults."""
    from machinepy.core.options import options_to_bus

    return dict(options_to_bus(options))


def start(client: Client, argv: list[str]) -> int:
    from machinepy.core.options import options_from_cli

    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = start_parser().parse_args(argv)
    root = args.root if args.root == "/" else os.path.abspath(args.root)
    (path,) = client.manager("CreateContainer", "ssasa{sv}", args.name, root, command,
                             variants(options_from_cli(vars(args), "start")))
    props = client.properties(path)
    print(props["Name"])
    return 0


def _service_available(client: Client) -> bool:
    """io.machinepy1 runs, or D-Bus can activate it (its units are installed)."""
    try:
        if client.bus("NameHasOwner", "s", BUS_NAME)[0]:
            return True
        names = client.bus("ListActivatableNames")[0]
    except BusError:
        return False
    return BUS_NAME in names


def hand_off(options: ContainerOptions, name: str | None, root: str | None,
             command: Sequence[str]) -> int | None:
    """`run --detach` / `boot --detach`: the container goes to io.machinepy1 when
    that runs or can be activated, so `machinepy list`, busctl and a daemon
    restart see it.  None: no service here; the caller detaches by itself."""
    try:
        client = Client.connect()
    except BusError:  # no system bus
        return None
    try:
        if not _service_available(client):
            return None
        # What a foreground run would inherit from us, not from the daemon.
        options = options.replace(base_env=tuple(os.environ.items()))
        if not options.boot and root is None and options.chdir is None:  # pflask's cwd
            options = options.replace(chdir=os.getcwd())
        try:
            (path,) = client.manager("CreateContainer", "ssasa{sv}", name or "",
                                     root or "/", list(command), variants(options))
            name = client.properties(path)["Name"]
        except BusError as e:
            print(f"machinepy: {e}", file=sys.stderr)
            return _status_of(e)
        print(name)
        return 0
    finally:
        client.close()


def _status_of(e: BusError) -> int:
    return 2 if e.name.endswith(".InvalidArgument") else 1


# ---------------------------------------------------------------------------
# list, status, lifecycle


def verb_parser(verb: str) -> Parser:
    """The parser of a client verb (also read by docgen: completion, man page)."""
    if verb == "start":
        return start_parser()
    if verb == "list":
        p = Parser(prog="machinepy list", description="List the service's containers.")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                       help="json: every property of every container")
        p.add_argument("--no-legend", action="store_true", help="no header and footer")
        p.add_argument("--no-pager", action="store_true", help="accepted, as by machinectl "
                       "(machinepy never pages)")
        return p
    if verb in ("status", "attach"):
        p = Parser(prog=f"machinepy {verb}")
        p.add_argument("name", metavar="NAME")
        return p
    p = _names_parser(verb)
    if verb == "kill":
        p.add_argument("-s", "--signal", default="SIGTERM", type=signal_number)
        p.add_argument("--kill-whom", choices=("leader", "all"), default="all")
    return p


def list_(client: Client, argv: list[str]) -> int:
    args = verb_parser("list").parse_args(argv)
    (rows,) = client.manager("ListContainers")
    if args.output == "json":
        out = []
        for _name, _state, _leader, path in rows:
            with contextlib.suppress(BusError):  # gone meanwhile
                props = client.properties(path)
                props["Options"] = {k: v for k, (_, v) in props["Options"].items()}
                out.append(_jsonable(props))
        import json

        print(json.dumps(out, indent=None))
        return 0
    if rows:
        width = max(4, *(len(r[0]) for r in rows))
        if not args.no_legend:
            print(f"{'NAME':<{width}} {'STATE':<9} LEADER")
        for name, state, leader, _path in sorted(rows):
            print(f"{name:<{width}} {state:<9} {leader}")
        if not args.no_legend:
            print()
    if not args.no_legend:
        print(f"{len(rows)} containers listed.")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value.hex() if isinstance(value, bytes) else value


def status(client: Client, argv: list[str]) -> int:
    args = verb_parser("status").parse_args(argv)
    (path,) = client.manager("GetContainer", "s", args.name)
    props = client.properties(path)
    import time

    since = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(props["Since"] / 1e6))
    print(f"{props['Name']}")
    print(f"           Since: {since}")
    print(f"           State: {props['State']}")
    print(f"          Leader: {props['Leader']}")
    print(f"            Root: {props['RootDirectory']}")
    print(f"         Command: {' '.join(props['Command']) or '(default shell)'}")
    if props["Boot"]:
        print("            Boot: yes")
    print(f"            Unit: {props['Unit'] or '-'}")
    print(f"      Registered: {'yes' if props['MachineRegistered'] else 'no'}")
    if props["NetworkInterfaces"]:
        print(f"   Network links: {' '.join(map(str, props['NetworkInterfaces']))}")
    from machinepy.core.options import options_from_bus, options_to_argv

    options = options_from_bus(props["Options"])
    argv = options_to_argv(options.replace(boot=False))
    if argv:
        import shlex

        print(f"         Options: {shlex.join(argv)}")
    return 0


def _names_parser(prog: str) -> Parser:
    p = Parser(prog=f"machinepy {prog}")
    p.add_argument("names", metavar="NAME", nargs="+")
    return p


def lifecycle(client: Client, verb: str, argv: list[str]) -> int:
    if verb == "kill":
        args = verb_parser(verb).parse_args(argv)
        for name in args.names:
            client.manager("KillContainer", "ssi", name, args.kill_whom, args.signal)
        return 0
    args = verb_parser(verb).parse_args(argv)
    member = {"poweroff": "PoweroffContainer", "reboot": "RebootContainer",
              "terminate": "TerminateContainer"}[verb]
    for name in args.names:
        client.manager(member, "s", name)
    return 0


# ---------------------------------------------------------------------------
# attach: the console fd from OpenConsole, relayed until ^]^]^] or the end


def attach(client: Client, argv: list[str]) -> int:
    from machinepy.runtime import console as consolemod
    from machinepy.runtime.loop import MiniLoop

    args = verb_parser("attach").parse_args(argv)
    client.bus("AddMatch", "s", f"type='signal',interface='{MANAGER_IFACE}',"
                                f"member='ContainerRemoved',arg0='{args.name}'")
    reply = client.call(MANAGER_PATH, MANAGER_IFACE, "OpenConsole", "s", [args.name],
                        keep_fds=True)
    master = reply.take_fd(reply.body[0])
    reply.close_fds()
    loop = MiniLoop()
    done = loop.create_future()

    def finish(*_: object) -> None:
        if not done.done():
            done.set_result(None)

    def on_signal(msg: Received) -> bool:
        if msg.member == "ContainerRemoved" and msg.signature == "soi" and \
                msg.body[0] == args.name:
            finish()
        return False

    client.conn.add_handler(on_signal)
    client.conn.on_close(finish)  # the bus gone: so is the service's side
    client.conn.attach(loop)

    async def relaying() -> None:
        try:
            await consolemod.attach(loop, master, args.name, done)
        finally:
            client.conn.detach()

    try:
        loop.run(relaying())
    finally:
        os.close(master)
    return 0


# ---------------------------------------------------------------------------


def _run(verb: str, argv: list[str]) -> int:
    try:
        client = Client.connect()
    except BusError as e:  # no bus
        print(f"machinepy: cannot connect to the system bus: {e}", file=sys.stderr)
        return 1
    try:
        if verb == "start":
            return start(client, argv)
        if verb == "list":
            return list_(client, argv)
        if verb == "status":
            return status(client, argv)
        if verb == "attach":
            return attach(client, argv)
        return lifecycle(client, verb, argv)
    finally:
        client.close()


def main(argv: Sequence[str]) -> int:
    verb, rest = argv[0], list(argv[1:])
    try:
        # Bad input is exit 2, bus or no bus: checked before connecting.
        cut = rest.index("--") if verb == "start" and "--" in rest else len(rest)
        verb_parser(verb).parse_args(rest[:cut])  # (start's command follows its --)
        return _run(verb, rest)
    except (UsageError, SpecError) as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2
    except BusError as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return _status_of(e)
