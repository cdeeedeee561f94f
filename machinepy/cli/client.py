# SPDX-License-Identifier: BSD-2-Clause
"""CLI verbs on top of io.machinepy1: start, list, status, poweroff, reboot,
terminate, kill, attach.

Every verb is one or two D-Bus calls; the first call D-Bus-activates the
daemon when it is installed (units/).  Output follows machinectl's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from machinepy.cli.args import Parser, UsageError, add_options, signal_number
from machinepy.core.options import (
    ContainerOptions,
    options_from_bus,
    options_from_cli,
    options_to_argv,
    options_to_bus,
)
from machinepy.core.spec import SpecError
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
    add_options(p, "start")
    return p


def variants(options: ContainerOptions) -> dict[str, Variant]:
    """CreateContainer's a{sv}: the options that differ from the defaults."""
    return {k: Variant(sig, v) for k, (sig, v) in options_to_bus(options).items()}


async def start(client: Client, argv: list[str]) -> int:
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = start_parser().parse_args(argv)
    root = args.root if args.root == "/" else os.path.abspath(args.root)
    (path,) = await client.manager("CreateContainer", "ssasa{sv}", args.name, root, command,
                                   variants(options_from_cli(vars(args), "start")))
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


async def _hand_off(options: ContainerOptions, name: str | None, root: str | None,
                    command: Sequence[str]) -> int | None:
    try:
        client = await Client.connect()
    except Exception:  # no system bus: OSError, auth errors
        return None
    try:
        if not await _service_available(client):
            return None
        # What a foreground run would inherit from us, not from the daemon.
        options = options.replace(base_env=tuple(os.environ.items()))
        if not options.boot and root is None and options.chdir is None:  # pflask's cwd
            options = options.replace(chdir=os.getcwd())
        try:
            (path,) = await client.manager("CreateContainer", "ssasa{sv}", name or "",
                                           root or "/", list(command), variants(options))
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


def hand_off(options: ContainerOptions, name: str | None, root: str | None,
             command: Sequence[str]) -> int | None:
    """`run --detach` / `boot --detach`: the container goes to io.machinepy1 when
    that runs or can be activated, so `machinepy list`, busctl and a daemon
    restart see it.  None: no service here; the caller detaches by itself."""
    return asyncio.run(_hand_off(options, name, root, command))


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Variant):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value.hex() if isinstance(value, bytes) else value


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
    options = options_from_bus({k: (v.signature, v.value) for k, v in props["Options"].items()})
    argv = options_to_argv(options.replace(boot=False))
    if argv:
        import shlex

        print(f"         Options: {shlex.join(argv)}")
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
