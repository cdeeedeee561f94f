# SPDX-License-Identifier: BSD-2-Clause
"""The `machinepy` command: which verb goes to which front-end.

Above both front-ends (cli and service), so neither imports the other; each
verb's module is imported only when that verb runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# verb: (module, function); the function takes the arguments after the verb.
VERBS = {
    "start": ("machinepy.cli.client", "main"),
    "list": ("machinepy.cli.client", "main"),
    "status": ("machinepy.cli.client", "main"),
    "poweroff": ("machinepy.cli.client", "main"),
    "reboot": ("machinepy.cli.client", "main"),
    "terminate": ("machinepy.cli.client", "main"),
    "kill": ("machinepy.cli.client", "main"),
    "attach": ("machinepy.cli.client", "main"),
    "install-units": ("machinepy.cli.client", "main"),
    "daemon": ("machinepy.service.daemon", "main"),
    "bootstrap": ("machinepy.cli.bootstrap", "main"),
    "debuild": ("machinepy.cli.debuild", "main"),
    "completion": ("machinepy.docgen", "completion_main"),
    "man": ("machinepy.docgen", "man_main"),
}
# These take the verb itself as their first argument.
WITH_VERB = frozenset(v for v, (m, _) in VERBS.items() if m == "machinepy.cli.client")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VERBS:
        if argv[0] == "daemon":  # the service's loop; the client verbs need none
            from machinepy.cli.run import _import_asyncio

            _import_asyncio()
        module, func = VERBS[argv[0]]
        rest = argv if argv[0] in WITH_VERB else argv[1:]
        status: int = getattr(importlib.import_module(module), func)(rest)
        return status
    if argv in (["-h"], ["--help"]):  # every verb, not only run and boot
        from machinepy.docgen import full_parser

        full_parser().print_help()
        return 0
    from machinepy.cli.run import main as run_main

    return run_main(argv)


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
