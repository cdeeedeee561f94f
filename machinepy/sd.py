# SPDX-License-Identifier: BSD-2-Clause
"""What the host's systemd offers, checked without a D-Bus library.

`machinepy run` asks these before deciding whether to register at all, so
they live apart from machinepy.machined, whose import brings asyncio along.
"""

from __future__ import annotations

import os

SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"


def system_bus_available() -> bool:
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    if address:
        return True
    return os.path.exists(SYSTEM_BUS_SOCKET)


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 of this (pid namespace's) host."""
    return os.path.isdir("/run/systemd/system")


def can_register() -> bool:
    """A system bus and systemd as PID 1: registering with machined may work."""
    return system_bus_available() and systemd_booted()
