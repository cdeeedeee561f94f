# SPDX-License-Identifier: BSD-2-Clause
"""CLI verbs on top of io.machinepy1: start, list, status, poweroff, reboot,
terminate, kill, attach.

Every verb is one or two D-Bus calls; the first call D-Bus-activates the
daemon when it is installed (units/).  Output follows machinectl's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from machinepy.cli.args import Parser, UsageError, signal_number
from machinepy.cli.run import _container_options
from machinepy.core.spec import SpecError, parse_setenv
from machinepy.service.api import BUS_NAME, CONTAINER_IFACE, MANAGER_IFACE, MANAGER_PATH

CALL_TIMEOUT = 60.0  # CreateContainer of a big root with registration can take a while


class CallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text or name)
        self.name = name


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls) -> Client:
        from dbus_fast import BusType

        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        return cls(bus)

    async def call(self, path: str, iface: str, member: str, sig: str = "",
                   body: Sequence[Any] = (), destination: str = BUS_NAME) -> Message:
        msg = Message(destination=destination, path=path, interface=iface, member=member,
                      signature=sig, body=list(body))
        async with asyncio.timeout(CALL_TIMEOUT):
            reply = await self.bus.call(msg)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise CallError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return reply

    async def manager(self, member: str, sig: str = "", *body: Any) -> list[Any]:
        return list((await self.call(MANAGER_PATH, MANAGER_IFACE, member, sig, body)).body)

    async def properties(self, path: str) -> dict[str, Any]:
        reply = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                [CONTAINER_IFACE])
        return {k: v.value for k, v in reply.body[0].items()}

    async def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------
# start: the run/boot options, sent as CreateContainer's a{sv}


def start_parser() -> Parser:
    p = Parser(prog="machinepy start",
               description="Start a container in the background, managed by the service.")
    p.add_argument("name", metavar="NAME", help="machine name ('' picks one)")
    p.add_argument("root", metavar="ROOTFS", help="root directory ('/' for the host's root)")
    p.add_argument("--boot", action="store_true", help="boot the init found in ROOTFS")
    p.add_argument("-c", "--chdir", metavar="DIR", help="working directory inside")
    p.add_argument("-u", "--user", metavar="USER", help="run the command as USER inside")
    p.add_argument("-k", "--keepenv", action="store_true", help="keep the environment")
    _container_options(p, boot=True)
    return p


def options_from_args(args: argparse.Namespace) -> dict[str, Variant]:
    """The inverse of service.spec_from_options: only what was given."""
    opts: dict[str, Variant] = {}

    def put(key: str, sig: str, value: Any) -> None:
        if value:
            opts[key] = Variant(sig, value)

    put("Boot", "b", getattr(args, "boot", False) or getattr(args, "verb", "") == "boot")
    put("Hostname", "s", args.hostname)
    # `boot` has no --chdir, --user or --keepenv.
    put("WorkingDirectory", "s", getattr(args, "chdir", None))
    put("User", "s", getattr(args, "user", None))
    put("KeepEnvironment", "b", getattr(args, "keepenv", False))
    put("Ephemeral", "b", args.ephemeral)
    put("EphemeralSize", "s", args.ephemeral_size)
    put("Mounts", "as", args.mount)
    put("Tmpfs", "as", args.tmpfs)
    put("Environment", "as", [f"{k}={v}" for item in args.setenv for k, v in parse_setenv(item)])
    put("Netifs", "as", args.netif)
    put("NetifAddresses", "as", args.netif_address)
    put("NetifRoutes", "as", args.netif_route)
    put("UserMap", "as", args.user_map)
    if args.private_users != "no":
        put("PrivateUsers", "s", args.private_users)
    if args.private_users_ownership != "auto":
        put("PrivateUsersOwnership", "s", args.private_users_ownership)
    put("Caps", "as", args.caps)
    if args.landlock_scope != "none":
        put("LandlockScope", "s", args.landlock_scope)
    put("SystemCallFilter", "as", args.system_call_filter)
    put("NoNewPrivileges", "b", args.no_new_privileges)
    put("Cgroups", "as", args.cgroup)
    put("Properties", "as", args.property)
    put("NoNamespaces", "as", [ns for ns in ("user", "mount", "net", "ipc", "uts", "pid")
                               if getattr(args, f"no_{ns}", False)])
    if not args.register:
        opts["Register"] = Variant("b", False)
    return opts


async def start(client: Client, argv: list[str]) -> int:
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = start_parser().parse_args(argv)
    root = args.root if args.root == "/" else os.path.abspath(args.root)
    (path,) = await client.manager("CreateContainer", "ssasa{sv}", args.name, root, command,
                                   options_from_args(args))
    props = await client.properties(path)
    print(props["Name"])
    return 0


async def _service_available(client: Client) -> bool:
    """io.machinepy1 runs, or D-Bus can activate it (its units are installed)."""
    dbus = ("/org/freedesktop/DBus", "org.freedesktop.DBus")
    try:
        owned = (await client.call(*dbus, "NameHasOwner", "s", [BUS_NAME],
                                   destination="org.freedesktop.DBus")).body[0]
        if owned:
            return True
        names = (await client.call(*dbus, "ListActivatableNames",
                                   destination="org.freedesktop.DBus")).body[0]
    except (CallError, TimeoutError):
        return False
    return BUS_NAME in names


async def _hand_off(args: argparse.Namespace) -> int | None:
    try:
        client = await Client.connect()
    except Exception:  # no system bus: OSError, auth errors
        return None
    try:
        if not await _service_available(client):
            return None
        if args.verb == "boot":
            root, command = os.path.abspath(args.root), args.init_args
        else:
            root, command = args.chroot or "/", args.command
            if command[:1] == ["--"]:
                command = command[1:]
        opts = options_from_args(args)
        # What a foreground run would inherit from us, not from the daemon.
        opts["BaseEnvironment"] = Variant("as", [f"{k}={v}" for k, v in os.environ.items()])
        if args.verb == "run" and args.chroot is None and args.chdir is None:  # pflask's cwd
            opts["WorkingDirectory"] = Variant("s", os.getcwd())
        try:
            (path,) = await client.manager("CreateContainer", "ssasa{sv}", args.machine or "",
                                           root, command, opts)
            name = (await client.properties(path))["Name"]
        except CallError as e:
            print(f"machinepy: {e}", file=sys.stderr)
            return 2 if e.name.endswith(".InvalidArgument") else 1
        except TimeoutError:
            print("machinepy: io.machinepy1 did not answer in time", file=sys.stderr)
            return 1
        print(name)
        return 0
    finally:
        await client.close()


def hand_off(args: argparse.Namespace) -> int | None:
    """`run --detach` / `boot --detach`: the container goes to io.machinepy1 when
    that runs or can be activated, so `machinepy list`, busctl and a daemon
    restart see it.  None: no service here; the caller detaches by itself."""
    return asyncio.run(_hand_off(args))


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


async def list_(client: Client, argv: list[str]) -> int:
    args = verb_parser("list").parse_args(argv)
    (rows,) = await client.manager("ListContainers")
    if args.output == "json":
        out = []
        for _name, _state, _leader, path in rows:
            with contextlib.suppress(CallError):  # gone meanwhile
                out.append(_jsonable(await client.properties(path)))
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


def _jsonable(props: dict[str, Any]) -> dict[str, Any]:
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in props.items()}


async def status(client: Client, argv: list[str]) -> int:
    args = verb_parser("status").parse_args(argv)
    (path,) = await client.manager("GetContainer", "s", args.name)
    props = await client.properties(path)
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
    return 0


def _names_parser(prog: str) -> Parser:
    p = Parser(prog=f"machinepy {prog}")
    p.add_argument("names", metavar="NAME", nargs="+")
    return p


async def lifecycle(client: Client, verb: str, argv: list[str]) -> int:
    if verb == "kill":
        args = verb_parser(verb).parse_args(argv)
        for name in args.names:
            await client.manager("KillContainer", "ssi", name, args.kill_whom, args.signal)
        return 0
    args = verb_parser(verb).parse_args(argv)
    member = {"poweroff": "PoweroffContainer", "reboot": "RebootContainer",
              "terminate": "TerminateContainer"}[verb]
    for name in args.names:
        await client.manager(member, "s", name)
    return 0


# ---------------------------------------------------------------------------
# attach: the console fd from OpenConsole, relayed until ^]^]^] or the end


async def attach(client: Client, argv: list[str]) -> int:
    from machinepy.runtime import console as consolemod

    args = verb_parser("attach").parse_args(argv)
    await client.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                      [f"type='signal',interface='{MANAGER_IFACE}',member='ContainerRemoved',"
                       f"arg0='{args.name}'"], destination="org.freedesktop.DBus")
    reply = await client.call(MANAGER_PATH, MANAGER_IFACE, "OpenConsole", "s", [args.name])
    master = reply.unix_fds[reply.body[0]]
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish(*_: Any) -> None:
        if not done.done():
            done.set_result(None)

    def on_signal(msg: Message) -> None:
        if msg.member == "ContainerRemoved" and msg.body and msg.body[0] == args.name:
            finish()

    client.bus.add_message_handler(on_signal)
    try:
        await consolemod.attach(loop, master, args.name, done)
    finally:
        os.close(master)
    return 0


# ---------------------------------------------------------------------------


async def _run(verb: str, argv: list[str]) -> int:
    try:
        client = await Client.connect()
    except Exception as e:  # no bus: OSError, auth errors
        print(f"machinepy: cannot connect to the system bus: {e}", file=sys.stderr)
        return 1
    try:
        if verb == "start":
            return await start(client, argv)
        if verb == "list":
            return await list_(client, argv)
        if verb == "status":
            return await status(client, argv)
        if verb == "attach":
            return await attach(client, argv)
        return await lifecycle(client, verb, argv)
    finally:
        await client.close()


def main(argv: Sequence[str]) -> int:
    verb, rest = argv[0], list(argv[1:])
    try:
        # Bad input is exit 2, bus or no bus: checked before connecting.
        cut = rest.index("--") if verb == "start" and "--" in rest else len(rest)
        verb_parser(verb).parse_args(rest[:cut])  # (start's command follows its --)
        return asyncio.run(_run(verb, rest))
    except (UsageError, SpecError) as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2
    except CallError as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2 if e.name.endswith(".InvalidArgument") else 1
    except TimeoutError:
        print("machinepy: io.machinepy1 did not answer in time", file=sys.stderr)
        return 1
