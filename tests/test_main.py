# SPDX-License-Identifier: BSD-2-Clause
"""The `machinepy` entry point: one verb table, --help and --version, bad input as
one line and exit 2 for every verb, a mistyped verb never run as a command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import machinepy
from machinepy import docgen, main

REPO = Path(__file__).resolve().parent.parent
MACHINEPY = [sys.executable, "-m", "machinepy"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def machinepy_(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, *argv], capture_output=True, text=True, timeout=60,
                          env=ENV, stdin=subprocess.DEVNULL)


def test_version() -> None:
    r = machinepy_("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"machinepy {machinepy.__version__}\n", "")


def test_help_has_every_verb_once_with_its_line() -> None:
    r = machinepy_("--help")
    assert r.returncode == 0, r.stderr
    lines = [line.split(None, 1) for line in r.stdout.splitlines()
             if line.startswith("    ") and not line.startswith("     ")]
    assert [(name, text) for name, text in lines] == [(v.name, v.help) for v in main.VERBS]
    assert "--version" in r.stdout


def test_docgen_lists_the_same_verbs() -> None:
    listed = [verb for verb, _ in docgen.verbs(docgen.full_parser())]
    assert sorted(listed) == sorted(v.name for v in main.VERBS)
    helps = {verb: text for verb, text, _ in docgen.VERBS}
    assert helps == {v.name: v.help for v in main.VERBS if v.name not in ("run", "boot")}


@pytest.mark.parametrize("verb", [v.name for v in main.VERBS])
def test_every_verb_answers_bad_input_with_one_line(verb: str) -> None:
    r = machinepy_(verb, "--bogus")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("machinepy: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("word", ["lsit", "sh", "/bin/true"])
def test_a_mistyped_verb_is_not_run(word: str) -> None:
    r = machinepy_(word, "-l")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"machinepy: unknown command '{word}' (see 'machinepy --help')\n"


@pytest.mark.parametrize("argv", [["-r", "/srv", "--", "ls"], ["--", "lsit"], ["-k", "ls"]])
def test_options_first_mean_run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # pflask's form: `machinepy [options] [--] CMD` is `machinepy run [options] [--] CMD`.
    import machinepy.cli.run

    seen: list[list[str]] = []
    monkeypatch.setattr(machinepy.cli.run, "main", lambda a: seen.append(a) or 0)
    assert main.main(argv) == 0
    assert seen == [["run", *argv]]


def test_the_dispatcher_imports_no_verb_module() -> None:
    # Start-up: importing the entry point costs nothing a verb would not pay.
    code = ("import sys, machinepy.main; print(sorted(m for m in sys.modules "
            "if m.startswith('machinepy.') or m in ('argparse', 'asyncio', 'dbus_fast')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.stdout.strip() == "['machinepy.main']", r.stderr


def test_the_daemon_verb_loads_asyncio_without_ssl() -> None:
    # The service runs on asyncio but never speaks TLS: libssl is ~5 ms and RSS it need not pay.
    code = ("import sys\nfrom machinepy import main\nstatus = main.main(['daemon', '--bogus'])\n"
            "print(status, 'asyncio' in sys.modules, 'ssl' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.stdout.split() == ["2", "True", "False"], r.stderr
