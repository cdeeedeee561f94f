# SPDX-License-Identifier: BSD-2-Clause
"""What is generated from the command line's parsers: shell completion
(`machinepy completion bash|zsh`, through shtab) and the machinepy(1) man
page (`machinepy man`, and setup.py at build time).

Both walk one parser that holds every verb, each verb's parser being the very
one the verb parses with, so neither can drift from the options; when the
parsers come from an option table instead, full_parser() is the one place to
change.  Imported only for these verbs (and by the build).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from machinepy import main as main_verbs
from machinepy.cli import run as cli
from machinepy.cli.args import Parser

# Verbs whose parsers live beside their code: (verb, help, parser factory).
VerbTable = list[tuple[str, str, Callable[[], argparse.ArgumentParser]]]


def _client(verb: str) -> Callable[[], Parser]:
    def make() -> Parser:
        from machinepy.cli.client import verb_parser

        return verb_parser(verb)

    return make


def _bootstrap() -> Parser:
    from machinepy.cli.bootstrap import parser

    return parser()


def _debuild() -> Parser:
    from machinepy.cli.debuild import parser

    return parser()


def completion_parser() -> Parser:
    p = Parser(prog="machinepy completion",
                   description="Print a completion script for bash or zsh.")
    p.add_argument("shell", choices=("bash", "zsh"))
    return p


def man_parser() -> Parser:
    return Parser(prog="machinepy man", description="Print the machinepy(1) man page (roff).")


def _daemon() -> argparse.ArgumentParser:
    from machinepy.service.daemon import build_parser

    return build_parser(Parser)


def _install() -> Parser:
    from machinepy.cli.install import parser

    return parser()


# Each verb's parser but run's and boot's (cli.run.build_parser has those).
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    **{verb: _client(verb) for verb in ("start", "list", "status", "attach", "poweroff",
                                         "reboot", "terminate", "kill")},
    "daemon": _daemon,
    "install-units": _install,
    "bootstrap": _bootstrap,
    "debuild": _debuild,
    "completion": completion_parser,
    "man": man_parser,
}
# In the entry point's order, with its help (machinepy.main.VERBS, the one list).
VERBS: VerbTable = [(v.name, v.help, PARSERS[v.name]) for v in main_verbs.VERBS
                    if v.name not in ("run", "boot")]

# What positional arguments and options name, for completion (by dest).
MACHINE_DESTS = {"names", "attach"}  # running machines: `machinepy list`
NAME_VERBS = {"status", "attach"}  # whose NAME is a running machine (start's is a new one)
DIR_DESTS = {"chroot", "cache_dir", "directory", "target", "state_dir"}
FILE_DESTS = {"root_password_file"}
ROOT_DESTS = {"root"}  # a directory, or a NAME in /var/lib/machines


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError("no subcommands")


def full_parser() -> Parser:
    """`machinepy` with every verb and every verb's options."""
    parser = cli.build_parser()
    sub = _subparsers(parser)
    for verb, help_, make in VERBS:
        child = make()
        sub.add_parser(verb, parents=[child], add_help=False, help=help_,
                       description=child.description)
    return parser


def verbs(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    sub = _subparsers(parser)
    yield from sub.choices.items()


# ---------------------------------------------------------------------------
# Completion

BASH_PREAMBLE = r"""
_machinepy_machines() {
  compgen -W "$(machinepy list --no-legend 2>/dev/null | awk '{print $1}')" -- "$1"
}
_machinepy_roots() {
  compgen -d -- "$1"
  compgen -W "$(ls /var/lib/machines 2>/dev/null)" -- "$1"
}
"""
ZSH_PREAMBLE = r"""
_machinepy_machines() {
  local -a machines
  machines=(${(f)"$(machinepy list --no-legend 2>/dev/null | awk '{print $1}')"})
  compadd -a machines
}
_machinepy_roots() {
  local -a images
  images=(${(f)"$(ls /var/lib/machines 2>/dev/null)"})
  _alternative 'directories:directory:_files -/' 'images:machine image:compadd -a images'
}
"""


def _mark_completions(parser: argparse.ArgumentParser) -> None:
    import shtab

    for verb, child in verbs(parser):
        for action in child._actions:
            if action.dest in MACHINE_DESTS or (action.dest == "name" and verb in NAME_VERBS):
                action.complete = {"bash": "_machinepy_machines",  # type: ignore[attr-defined]
                                   "zsh": "_machinepy_machines"}
            elif action.dest in ROOT_DESTS and not action.option_strings:
                action.complete = {"bash": "_machinepy_roots",  # type: ignore[attr-defined]
                                   "zsh": "_machinepy_roots"}
            elif action.dest in DIR_DESTS:
                action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
            elif action.dest in FILE_DESTS:
                action.complete = shtab.FILE  # type: ignore[attr-defined]


def completion(shell: str) -> str:
    import shtab

    parser = full_parser()
    _mark_completions(parser)
    preamble = {"bash": BASH_PREAMBLE, "zsh": ZSH_PREAMBLE}[shell]
    script: str = shtab.complete(parser, shell=shell, preamble=preamble)
    return script


def completion_main(argv: Sequence[str]) -> int:
    args = completion_parser().parse_args(list(argv))  # bad input: main's one line
    try:
        sys.stdout.write(completion(args.shell))
    except ImportError:
        print("machinepy: completion needs shtab (pip install shtab)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# The man page

MAN_INTRO = """\
machinepy runs Linux containers in the spirit of pflask and systemd-nspawn:
each container's PID 1 is registered with systemd-machined, so machinectl(1)
works on it.  Without a verb, the arguments are those of run, as with pflask.
"""
MAN_EXAMPLES = [
    ("Make a bootable Debian tree in /var/lib/machines/deb and boot it:",
     "machinepy bootstrap deb --root-password-file pw\nmachinepy boot deb"),
    ("Run a command in a throw-away copy of a tree:",
     "machinepy run -w -r /var/lib/machines/deb -- apt-get moo"),
    ("Build the Debian package in the current directory:",
     "machinepy debuild --create --suite bookworm\nmachinepy debuild --suite bookworm"),
    ("Enable bash completion:", "source <(machinepy completion bash)"),
]


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, leading dots and quotes, hyphens in options."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"[^\x00-\x7f]", lambda m: f"\\[u{ord(m.group()):04X}]", text)
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _option_head(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
        if action.nargs == 0:
            return names
        meta = action.metavar or (
            "|".join(map(str, action.choices)) if action.choices else action.dest.upper())
        if isinstance(meta, tuple):
            meta = " ".join(meta)
        sep = "=" if action.option_strings[-1].startswith("--") else " "
        return f"{names}{sep}\\fI{_roff(str(meta))}\\fR"
    meta = action.metavar or action.dest
    if isinstance(meta, tuple):
        meta = " ".join(meta)
    return f"\\fI{_roff(str(meta))}\\fR"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _option_head(action)]
        text = action.help or ""
        if action.choices and not action.option_strings and not text:
            text = "one of: " + ", ".join(map(str, action.choices))
        out.append(_roff(text) if text else "\\&")
    return out


def _synopsis_arg(action: argparse.Action) -> str:
    meta = action.metavar or action.dest.upper()
    text = f"\\fI{_roff(' '.join(meta) if isinstance(meta, tuple) else str(meta))}\\fR"
    if action.nargs == argparse.REMAINDER:
        return f"[{text}...]"
    if action.nargs == "+":
        return f"{text}..."
    return text


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return " ".join(formatter.format_help().split())


def manpage(date: str | None = None) -> str:
    parser = full_parser()
    if date is None:
        # SOURCE_DATE_EPOCH: reproducible builds get the same page.
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
                else datetime.datetime.now(datetime.UTC))
        date = when.strftime("%Y-%m-%d")
    from machinepy import __version__

    lines = [
        f'.TH MACHINEPY 1 "{date}" "machinepy {__version__}" "User Commands"',
        ".SH NAME",
        "machinepy \\- Linux containers, registered with systemd\\-machined",
        ".SH SYNOPSIS",
    ]
    for verb, child in verbs(parser):
        args = " ".join(_synopsis_arg(a) for a in child._actions if not a.option_strings)
        lines += [f"\\fBmachinepy {_roff(verb)}\\fR [\\fIOPTIONS\\fR] {args}".rstrip(), ".br"]
    lines += [".SH DESCRIPTION", _roff(MAN_INTRO), ".SH COMMANDS"]
    sub = _subparsers(parser)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for verb, child in verbs(parser):
        lines += [f".SS {_roff(verb)}", _roff(_usage(child))]
        text = child.description or helps.get(verb) or ""
        if text:
            lines += [".PP", _roff(text)]
        lines += _options(child)
    lines += [".SH EXAMPLES"]
    for what, commands in MAN_EXAMPLES:
        lines += [".PP", _roff(what), ".PP", ".nf", ".RS 4", _roff(commands), ".RE", ".fi"]
    lines += [
        ".SH EXIT STATUS",
        "0 on success; 2 for bad input (one line naming the problem, nothing created); "
        "1 when something failed; a container's own exit status, 128+N when it was killed "
        "by signal N.",
        ".SH FILES",
        ".TP", "\\fI/var/lib/machines/NAME\\fR",
        "the tree that a bare NAME means for \\fBboot\\fR and \\fBbootstrap\\fR",
        ".TP", "\\fI/var/cache/machinepy/debuild\\fR", "build roots of \\fBdebuild\\fR",
        ".SH SEE ALSO",
        "\\fBmachinectl\\fR(1), \\fBsystemd\\-nspawn\\fR(1), \\fBmmdebstrap\\fR(1), "
        "\\fBdpkg\\-buildpackage\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def man_main(argv: Sequence[str]) -> int:
    man_parser().parse_args(list(argv))  # bad input: main's one line
    sys.stdout.write(manpage())
    return 0


# ---------------------------------------------------------------------------
# README's reference of the container options


def options_reference() -> str:
    """The option table as an RST table: README has this very text (tests/test_options.py)."""
    from machinepy.core.options import NAMESPACE_FLAGS, SETTINGS, VERBS

    rows = [("Command line", "CreateContainer option", "What it does")]
    for s in SETTINGS:
        meta = s.metavar or "|".join(s.choices)
        shown = NAMESPACE_FLAGS.values() if s.cli == "namespaces" else s.flags
        cli_ = ", ".join(f"``{f}={meta}``" if f == s.long and meta and s.cli != "flag"
                         else f"``{f}``" for f in shown) or "(none)"
        if s.verbs != VERBS:
            cli_ += f" ({', '.join(s.verbs)})"
        bus = " or ".join(f"``{sig}``" for sig in (s.signature, *s.also))
        what = "; ".join(x for x in (s.help, s.struct and f"on the bus: {s.struct}") if x)
        rows.append((cli_, f"``{s.key}`` {bus}", what))
    widths = [max(len(r[i]) for r in rows) for i in range(2)] + [len(rows[0][2])]
    rule = "  ".join("=" * w for w in widths)
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([rule, lines[0], rule, *lines[1:], rule]) + "\n"
