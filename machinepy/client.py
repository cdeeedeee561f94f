# SPDX-License-Identifier: BSD-2-Clause
"""CLI verbs on top of io.machinepy1."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    if argv[0] == "daemon":
        from machinepy.daemon import main as daemon_main

        return daemon_main(list(argv[1:]))
    return 2
