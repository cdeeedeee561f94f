# SPDX-License-Identifier: BSD-2-Clause
"""io.machinepy1's API, declared once: bus names, object paths, errors, and the
methods, signals and properties of its two interfaces.  Dispatch, signature
checks and introspection (service.manager) and the clients (cli.client) read it.

    /io/machinepy1                   io.machinepy1.Manager
    /io/machinepy1/container/NAME    io.machinepy1.Container (NAME bus-label escaped)
"""

from __future__ import annotations

from typing import NamedTuple

from machinepy.core.sd import bus_label_escape

BUS_NAME = "io.machinepy1"
MANAGER_PATH = "/io/machinepy1"
CONTAINERS_PATH = "/io/machinepy1/container"
MANAGER_IFACE = "io.machinepy1.Manager"
CONTAINER_IFACE = "io.machinepy1.Container"
ERROR = "io.machinepy1.Error."
DBUS = "org.freedesktop.DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
VERSION = "1"


class ServiceError(Exception):
    """Becomes a D-Bus error reply: NAME and a one-line message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name if "." in name else ERROR + name


def container_path(name: str) -> str:
    return f"{CONTAINERS_PATH}/{bus_label_escape(name)}"


class Method(NamedTuple):
    name: str
    args: tuple[tuple[str, str], ...]  # (name, signature)
    returns: tuple[tuple[str, str], ...]
    privileged: bool  # creates, changes or attaches: root only


def _m(name: str, args: str, returns: str, privileged: bool) -> Method:
    def pairs(text: str) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(p.split(":", 1)) for p in text.split()) if text else ()  # type: ignore[misc]

    return Method(name, pairs(args), pairs(returns), privileged)


MANAGER_METHODS = (
    _m("CreateContainer", "name:s root_directory:s command:as options:a{sv}", "path:o", True),
    _m("ListContainers", "", "containers:a(ssuo)", False),
    _m("GetContainer", "name:s", "path:o", False),
    _m("PoweroffContainer", "name:s", "", True),
    _m("RebootContainer", "name:s", "", True),
    _m("TerminateContainer", "name:s", "", True),
    _m("KillContainer", "name:s whom:s signal:i", "", True),
    _m("OpenConsole", "name:s", "pty:h", True),
)
CONTAINER_METHODS = (
    _m("Poweroff", "", "", True),
    _m("Reboot", "", "", True),
    _m("Terminate", "", "", True),
    _m("Kill", "whom:s signal:i", "", True),
    _m("OpenConsole", "", "pty:h", True),
)
MANAGER_SIGNALS = (
    ("ContainerNew", (("name", "s"), ("path", "o"))),
    ("ContainerRemoved", (("name", "s"), ("path", "o"), ("exit_status", "i"))),
)
MANAGER_PROPERTIES = (("Version", "s"), ("Containers", "u"))
CONTAINER_PROPERTIES = (
    ("Name", "s"), ("Id", "ay"), ("State", "s"), ("Leader", "u"), ("RootDirectory", "s"),
    ("Command", "as"), ("Boot", "b"), ("Unit", "s"), ("MachineRegistered", "b"),
    ("Since", "t"), ("ExitStatus", "i"), ("NetworkInterfaces", "ai"),
    ("Options", "a{sv}"),  # CreateContainer's, less the environment (it may hold secrets)
)
METHODS = {MANAGER_IFACE: {m.name: m for m in MANAGER_METHODS},
           CONTAINER_IFACE: {m.name: m for m in CONTAINER_METHODS}}


