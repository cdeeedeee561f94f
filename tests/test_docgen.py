# SPDX-License-Identifier: BSD-2-Clause
"""Generated from the parsers: bash and zsh completion, and the machinepy(1) man page."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from machinepy import docgen

REPO = Path(__file__).resolve().parent.parent
MACHINEPY = [sys.executable, "-m", "machinepy"]

# Completes the words given as arguments the way bash does on TAB, one candidate a line.
BASH_COMPLETE = r"""
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
_shtab_machinepy machinepy "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def generated(tmp_path: Path, shell: str) -> Path:
    r = subprocess.run([*MACHINEPY, "completion", shell], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    path = tmp_path / f"completion.{shell}"
    path.write_text(r.stdout)
    return path


def fake_machinepy(tmp_path: Path, names: list[str]) -> Path:
    """A `machinepy` on PATH whose `list --no-legend` shows these machines."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    rows = "".join(f"{n} running {100 + i}\\n" for i, n in enumerate(names))
    (bindir / "machinepy").write_text(
        f'#!/bin/sh\n[ "$*" = "list --no-legend" ] && printf "{rows}"\n')
    (bindir / "machinepy").chmod(0o755)
    return bindir


def bash_complete(script: Path, words: list[str], path: Path | None = None,
                  cwd: Path | None = None) -> list[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    r = subprocess.run(["bash", "--norc", "-c", BASH_COMPLETE, "bash", str(script), *words],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=30)
    assert r.returncode == 0, r.stderr
    return sorted(r.stdout.split())


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory.mktemp("bash"), "bash")


@pytest.mark.parametrize("words, want", [
    (["machinepy", "boo"], ["boot", "bootstrap"]),
    (["machinepy", "de"], ["debuild"]),
    (["machinepy", "run", "--private-u"], ["--private-users", "--private-users-ownership"]),
    (["machinepy", "run", "--private-users", ""], ["no", "pick"]),
    (["machinepy", "bootstrap", "--distribution", ""], ["debian", "ubuntu"]),
    (["machinepy", "bootstrap", "--root-password-"],
     ["--root-password-file", "--root-password-hashed"]),
    (["machinepy", "list", "--no-"], ["--no-legend", "--no-pager"]),
    (["machinepy", "completion", ""], ["bash", "zsh"]),
    (["machinepy", "debuild", "--cr"], ["--create"]),
])
def test_bash_completes_verbs_options_and_choices(bash_script: Path, words: list[str],
                                                  want: list[str]) -> None:
    assert bash_complete(bash_script, words) == want


def test_bash_completes_machine_names_from_machinepy_list(bash_script: Path,
                                                          tmp_path: Path) -> None:
    bindir = fake_machinepy(tmp_path, ["web", "web2", "db"])
    assert bash_complete(bash_script, ["machinepy", "status", "w"], bindir) == ["web", "web2"]
    assert bash_complete(bash_script, ["machinepy", "poweroff", "web", ""], bindir) == [
        "db", "web", "web2"]
    assert bash_complete(bash_script, ["machinepy", "run", "-a", "d"], bindir) == ["db"]


def test_bash_completes_directories(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfile").write_text("")
    for words in (["machinepy", "run", "-r", "roo"], ["machinepy", "bootstrap", "roo"],
                  ["machinepy", "debuild", "-C", "roo"]):
        assert bash_complete(bash_script, words, cwd=tmp_path) == ["rootfs"], words
    assert bash_complete(bash_script, ["machinepy", "bootstrap", "--root-password-file", "roo"],
                         cwd=tmp_path) == ["rootfile", "rootfs"]


ZSH_COMPLETE = r"""
zmodload zsh/zpty
script=$1; shift
zpty z "PATH=$PATH TERM=dumb zsh -f -i"
zpty -w z "autoload -U compinit && compinit -u -d $TMPDIR/zcompdump && \
eval \"\$(<$script)\" && PS1='> ' && unsetopt beep; print READY-NOW"
zpty -r z out '*READY-NOW*'
sleep 0.5; while zpty -r -t z out; do :; done
for line in "$@"; do
  zpty -w -n z "$line"$'\t'
  sleep 1.5
  out=""; chunk=""
  while zpty -r -t z chunk; do out+=$chunk; done
  print -r -- "$out" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' | tr -s ' \n' '  '
  print -r -- "@@"
  zpty -w -n z $'\C-a\C-k'
  sleep 0.3
  while zpty -r -t z chunk; do :; done
done
zpty -d z
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_completes_verbs_options_and_machine_names(tmp_path: Path) -> None:
    script = generated(tmp_path, "zsh")
    bindir = fake_machinepy(tmp_path, ["web"])
    (tmp_path / "rootfs").mkdir()
    r = subprocess.run(["zsh", "-f", "-c", ZSH_COMPLETE, "zsh", str(script),
                        "machinepy bootst", "machinepy status ", "machinepy bootstrap --dist",
                        "machinepy run -r roo"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                            "TMPDIR": str(tmp_path)})
    answers = r.stdout.split("@@")
    assert len(answers) == 5, r.stdout + r.stderr
    assert "machinepy bootstrap" in answers[0], answers
    assert "machinepy status web" in answers[1], answers
    assert "machinepy bootstrap --distribution" in answers[2], answers
    assert "machinepy run -r rootfs/" in answers[3], answers


def test_completion_bad_shell_is_one_line() -> None:
    r = subprocess.run([*MACHINEPY, "completion", "fish"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("machinepy: argument shell: invalid choice: 'fish'")
    assert r.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# The man page


@pytest.fixture(scope="module")
def page() -> str:
    r = subprocess.run([*MACHINEPY, "man"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "0"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("needs groff")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, "")
    assert page.startswith('.TH MACHINEPY 1 "1970-01-01" "machinepy ')  # reproducible date


def test_man_page_has_every_verb_and_option_of_the_parser(page: str) -> None:
    """Generated from the parser: what the parser knows, the page says."""
    parser = docgen.full_parser()
    text = page.replace("\\-", "-")
    for verb, child in docgen.verbs(parser):
        assert f".SS {verb}\n" in text, verb
        for action in child._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"\\fB{option}\\fR" in text, (verb, option)
    for verb in ("run", "boot", "start", "list", "bootstrap", "debuild", "completion", "man"):
        assert f"\\fBmachinepy {verb}\\fR" in text


def test_full_parser_has_each_verbs_own_options() -> None:
    from machinepy.cli import bootstrap, client

    parser = docgen.full_parser()
    children = dict(docgen.verbs(parser))
    own = {a.dest for a in bootstrap.parser()._actions}
    assert {a.dest for a in children["bootstrap"]._actions} == own
    assert {a.dest for a in children["list"]._actions} == {
        a.dest for a in client.verb_parser("list")._actions}


def test_the_build_writes_the_man_page(tmp_path: Path) -> None:
    """setup.py's build_py generates machinepy(1) into build/man, which data_files installs
    as share/man/man1/machinepy.1 (checked by hand in a wheel: machinepy-*.data/data/...)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "lib")],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    built = (REPO / "build/man/machinepy.1").read_text()
    r = subprocess.run([*MACHINEPY, "man"], capture_output=True, text=True, timeout=30, env=env)
    assert built == r.stdout


def test_top_level_help_lists_every_verb() -> None:
    r = subprocess.run([*MACHINEPY, "--help"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.splitlines()
              if line.startswith("    ") and not line.startswith("     ")}
    assert listed == {verb for verb, _ in docgen.verbs(docgen.full_parser())}
