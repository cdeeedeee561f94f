# SPDX-License-Identifier: BSD-2-Clause
"""The `machinepy` command: which verb goes to which front-end.

Above both front-ends (cli and service), so neither imports the other; each
verb's module is imported only when that verb runs, and this one imports
nothing a one-shot `run` would not load anyway (start-up is benchmarked).
VERBS is the one list of verbs: dispatch, `machinepy --help`, and docgen's man
page and completion come from it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple, NoReturn


class Verb(NamedTuple):
    name: str
    module: str
    function: str  # takes the arguments after the verb (see SHARED)
    help: str


VERBS = (
    Verb("run", "machinepy.cli.run", "main", "run a command in a container (pflask-compatible)"),
    Verb("boot", "machinepy.cli.run", "main", "boot an OS tree"),
    Verb("start", "machinepy.cli.client", "main",
         "start a container in the background, managed by the service"),
    Verb("list", "machinepy.cli.client", "main", "list the service's containers"),
    Verb("status", "machinepy.cli.client", "main", "show a container of the service"),
    Verb("attach", "machinepy.cli.client", "main", "attach to a container's console"),
    Verb("poweroff", "machinepy.cli.client", "main", "shut containers down cleanly"),
    Verb("reboot", "machinepy.cli.client", "main", "reboot containers"),
    Verb("terminate", "machinepy.cli.client", "main", "kill containers at once"),
    Verb("kill", "machinepy.cli.client", "main", "send a signal to containers"),
    Verb("daemon", "machinepy.main", "daemon", "run the io.machinepy1 service"),
    Verb("install-units", "machinepy.cli.install", "main",
         "install the systemd units and D-Bus files"),
    Verb("bootstrap", "machinepy.cli.bootstrap", "main", "make a bootable Debian or Ubuntu tree"),
    Verb("debuild", "machinepy.cli.debuild", "main",
         "build a Debian package in a throw-away container"),
    Verb("completion", "machinepy.docgen", "completion_main",
         "print a bash or zsh completion script"),
    Verb("man", "machinepy.docgen", "man_main", "print the man page"),
)
BY_NAME = {v.name: v for v in VERBS}
# A function that serves several verbs is told which: it gets the verb too.
SHARED = frozenset(v.name for v in VERBS
                   if sum(w.module == v.module and w.function == v.function for w in VERBS) > 1)

HELP = """\
usage: machinepy COMMAND [ARGS...]
       machinepy [OPTIONS] [--] CMD [ARGS...]   (pflask's form: `run` without the verb)

Linux containers, registered with machined.

commands:
{verbs}

options:
  -h, --help  show this help and exit
  --version   show the version and exit

'machinepy COMMAND --help' shows the options of a command.
"""


def usage() -> str:
    width = max(len(v.name) for v in VERBS) + 2
    return HELP.format(verbs="\n".join(f"    {v.name:<{width}}{v.help}" for v in VERBS))


def daemon(argv: list[str]) -> int:
    """The service's verb, its options parsed as every verb's are (one line, exit 2)."""
    from machinepy.cli.args import Parser
    from machinepy.cli.run import _import_asyncio

    _import_asyncio()  # the service's loop, without the TLS support it never uses
    from machinepy.service.daemon import main as daemon_main

    return daemon_main(argv, parser_class=Parser)


def _fail(message: str) -> int:
    print(f"machinepy: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    if first in ("-h", "--help") and len(argv) == 1:
        print(usage(), end="")
        return 0
    if first == "--version" and len(argv) == 1:
        from machinepy import __version__

        print(f"machinepy {__version__}")
        return 0
    if first is not None and first not in BY_NAME:
        if not first.startswith("-"):
            # Not a verb, not an option, not after `--`: a typo, never a command to run.
            return _fail(f"unknown command '{first}' (see 'machinepy --help')")
        argv = ["run", *argv]  # pflask: `machinepy [options] [--] CMD` means run
    verb = BY_NAME[argv[0] if argv else "run"]
    func = getattr(importlib.import_module(verb.module), verb.function)
    try:
        status: int = func(argv if verb.name in SHARED or not argv else argv[1:])
    except Exception as e:
        from machinepy.cli.args import UsageError

        if not isinstance(e, UsageError):
            raise
        from machinepy.core.spec import one_line

        return _fail(one_line(str(e)))
    return status


def entry() -> NoReturn:
    """The `machinepy` command: main(), then exit without tearing the interpreter down.

    By then the container's resources are released (the supervisor's clean-up
    stack has run); what is left is freeing module state, ~20 ms with asyncio
    and a D-Bus library loaded, which every one-shot run and every poweroff would pay.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
