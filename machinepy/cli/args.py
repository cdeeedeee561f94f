# SPDX-License-Identifier: BSD-2-Clause
"""argparse as every verb uses it: errors as one line (exit 2), sized without shutil."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from machinepy.core.spec import quote
from machinepy.core.values import parse_bool, parse_signal


class UsageError(Exception):
    pass


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized without shutil: argparse makes one for every option
    it adds, and its own sizing imports shutil (and bz2, lzma, …) for that."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 80
        super().__init__(prog, width=columns - 2)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # One line naming the problem, exit 2 (not argparse's usage dump).
        raise UsageError(message)


def _bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected yes or no, got {quote(value)}") from None


def signal_number(value: str) -> int:
    """An option's signal: SIGTERM, term, 15, RTMIN+3 (machinectl's, any case)."""
    try:
        return parse_signal(value.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown signal {quote(value)}") from None


def add_options(p: argparse.ArgumentParser, verb: str) -> None:
    """The container options VERB takes (run, boot, start), from the option table."""
    from machinepy.core.options import NAMESPACE_FLAGS, settings

    for s in settings(verb):
        if s.cli == "namespaces":
            for ns, short in NAMESPACE_FLAGS.items():
                p.add_argument(short, f"--no-{ns}ns", dest=s.field, action="append_const",
                               const=ns, help=f"do not create a {ns} namespace")
            continue
        kw: dict[str, Any] = {"dest": s.field, "help": s.help.replace("%", "%%") or None}
        if s.cli == "flag":
            kw["action"] = "store_true"
        else:
            kw.update(metavar=s.metavar, choices=s.choices or None)
        if s.cli in ("bool", "bool?"):
            kw["type"] = _bool
        if s.cli.endswith("?"):
            kw.update(nargs="?", const=True if s.cli == "bool?" else "")
        if s.many:
            kw["action"] = "append"
        p.add_argument(*s.flags, **kw)
