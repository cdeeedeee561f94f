# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy install-units`: the systemd units, the D-Bus policy and the D-Bus
activation file of io.machinepy1, written for the interpreter that runs this.

The files come from units/ at the top of the source tree; a wheel carries a
copy as package data (machinepy/data/units, put there by setup.py's build), so
an installed machinepy needs no checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from machinepy.cli.args import Parser
from machinepy.core import sd

PACKAGE = Path(__file__).resolve().parents[1]
# Installed: the package data.  A source checkout (or an editable install): units/.
UNITS_DIRS = (PACKAGE / "data" / "units", PACKAGE.parent / "units")
# Where each file goes (under --root).
INSTALL = {
    "machinepy.service": "etc/systemd/system",
    "machinepy@.service": "etc/systemd/system",
    "io.machinepy1.conf": "etc/dbus-1/system.d",
    "io.machinepy1.service": "usr/share/dbus-1/system-services",
}
# Unit settings and the systemd version that brought them.
SINCE = {"FileDescriptorStorePreserve=": 254}


def units_dir() -> Path | None:
    return next((d for d in UNITS_DIRS if all((d / name).is_file() for name in INSTALL)), None)


def for_systemd(text: str, version: int | None) -> str:
    """Drop the settings this systemd predates (unknown: keep them all)."""
    if version is None:
        return text
    return "".join(line for line in text.splitlines(keepends=True)
                   if not any(line.startswith(key) and version < since
                              for key, since in SINCE.items()))


def parser() -> Parser:
    p = Parser(prog="machinepy install-units",
               description="Install the systemd units, D-Bus policy and activation file.")
    p.add_argument("--root", default="/", help="install under this directory (default /)")
    p.add_argument("--no-reload", action="store_true",
                   help="do not reload systemd and dbus-daemon afterwards")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))  # bad input: main's one line
    units = units_dir()
    if units is None:
        print(f"machinepy: no units found (looked in {', '.join(map(str, UNITS_DIRS))})",
              file=sys.stderr)
        return 1
    exec_start = f"{sys.executable} -m machinepy"
    # A source checkout (not site-packages): the units must run this very tree,
    # not whatever `import machinepy` finds from / (an editable install of
    # another checkout, say).
    here = PACKAGE.parent
    env_line = "" if here.name in ("site-packages", "dist-packages") else \
        f"Environment=PYTHONPATH={here}"
    version = sd.systemd_version()
    for name, where in INSTALL.items():
        text = (units / name).read_text()
        # Units name `machinepy`; systemd needs the interpreter that has it installed.
        text = text.replace("ExecStart=machinepy ", f"ExecStart={exec_start} ")
        if "ExecStart=" in text and env_line:
            text = text.replace("\nExecStart=", f"\n{env_line}\nExecStart=", 1)
        text = for_systemd(text, version)
        dest = Path(args.root) / where / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(dest)
        print(dest)
    if args.root == "/" and not args.no_reload:
        for cmd in (["systemctl", "daemon-reload"],
                    ["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                     "org.freedesktop.DBus", "ReloadConfig"]):
            if shutil.which(cmd[0]) is None:
                continue
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"machinepy: warning: {' '.join(cmd)}: {r.stderr.strip()}",
                      file=sys.stderr)
    return 0
