# SPDX-License-Identifier: BSD-2-Clause
"""What the host's systemd offers, checked without a D-Bus library.

`machinepy run` asks these before deciding whether to register at all, so
they live apart from machinepy.integrate.machined, whose import brings asyncio along.
"""

from __future__ import annotations

import os
import signal

SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
# What systemd halts on: the orderly stop of a booted container (nspawn's too).
SIG_HALT = signal.SIGRTMIN + 3
# nspawn's (and so machinectl bind's) per-machine propagation directories.
PROPAGATE_DIR = "/run/systemd/nspawn/propagate"


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


def systemd_version() -> int | None:
    import subprocess

    try:
        r = subprocess.run(["systemctl", "--version"], capture_output=True, text=True)
        return int(r.stdout.split()[1])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------
# Names, escaped the way systemd escapes them.

# Spelt out: the string module costs the one-shot `run` 0.6 ms to import.
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def unit_name_escape(name: str) -> str:
    """systemd's unit_name_escape(): '-' and other specials become \\xNN, '/' becomes '-'."""
    out = []
    for i, ch in enumerate(name):
        if ch == "/":
            out.append("-")
        elif ch in _ALNUM or ch in ":_" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def scope_name(machine: str) -> str:
    return f"machine-{unit_name_escape(machine)}.scope"


def bus_label_escape(label: str) -> str:
    """sd-bus's bus_label_escape(): how unit names become object path elements."""
    if not label:
        return "_"
    return "".join(ch if ch in _ALNUM and not (i == 0 and ch.isdigit())
                   else "".join(f"_{b:02x}" for b in ch.encode())
                   for i, ch in enumerate(label))


def unit_path(unit: str) -> str:
    return f"/org/freedesktop/systemd1/unit/{bus_label_escape(unit)}"
