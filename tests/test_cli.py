# SPDX-License-Identifier: BSD-2-Clause
"""Command line → spec, without running anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from machinepy.cli.run import build_parser, main, spec_from_args
from machinepy.core.options import find_init
from machinepy.core.spec import SpecError


def parse(*argv: str) -> object:
    args = build_parser().parse_args(list(argv))
    if not hasattr(args, "init_args"):
        args.init_args = []
    return spec_from_args(args)


def test_pflask_short_options() -> None:
    spec = parse("run", "-r", "/srv", "-c", "/tmp", "-t", "box", "-m", "tmp:/x", "-u", "user",
                 "-s", "A=1,B=2", "-k", "-w", "-n", "veth:a:b", "-e", "0:1000:10", "-b", "+all",
                 "--", "cmd", "--flag")
    assert spec.command == ("cmd", "--flag")  # type: ignore[attr-defined]
    assert spec.root == "/srv" and spec.hostname == "box"  # type: ignore[attr-defined]
    assert spec.setenv == (("A", "1"), ("B", "2"))  # type: ignore[attr-defined]
    assert {"net", "user"} <= spec.namespaces  # type: ignore[attr-defined]


def test_tmpfs_and_ephemeral_size_options() -> None:
    spec = parse("run", "-r", "/srv", "-w", "--ephemeral-size=2G", "--tmpfs", "/tmp:size=1m",
                 "--tmpfs=/scratch", "-m", "tmp:/t:mode=700", "true")
    assert spec.ephemeral_size == "2G"  # type: ignore[attr-defined]
    assert [(m.dest, m.options) for m in spec.mounts] == [  # type: ignore[attr-defined]
        ("/t", "mode=700"), ("/tmp", "size=1m"), ("/scratch", None)]


def test_namespace_flags() -> None:
    spec = parse("run", "-M", "-I", "-H", "-P", "-U", "-N", "true")
    assert spec.namespaces == frozenset({"cgroup"})  # type: ignore[attr-defined]


def test_command_without_double_dash_keeps_its_options() -> None:
    assert parse("run", "ls", "-l").command == ("ls", "-l")  # type: ignore[attr-defined]


def test_find_init(tmp_path: Path) -> None:
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/init").symlink_to("/bin/busybox")  # dangling on the host is fine
    assert find_init(str(tmp_path)) == "/sbin/init"
    with pytest.raises(SpecError, match="no init found"):
        find_init(str(tmp_path / "sbin"))


def test_boot_options_after_rootfs_and_init_args(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Validation fails on purpose (no init): what matters is where each argument went.
    assert main(["boot", str(tmp_path), "--machine", "x y", "--", "--unit=rescue"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("machinepy: no init found") or "invalid machine name" in err


@pytest.mark.parametrize("argv, fragment", [
    ([], "no command given"),
    (["run", "--netif-address", "eth0"], "expected NAME=ADDRESS/PREFIX"),
    (["run", "--register", "maybe", "true"], "expected yes or no"),
    (["run", "-m"], "expected one argument"),
    (["run", "--machine=-rel", "true"], "invalid machine name '-rel'"),
    (["run", "--machine", "rel-", "true"], "invalid machine name 'rel-'"),
    (["run", "--machine", "rel_x", "true"], "invalid machine name 'rel_x'"),
    (["run", "--machine", "a\nmachinepy: b", "true"], "invalid machine name 'a\\nmachinepy: b'"),
    (["run", "-t", "rel_x", "true"], "invalid hostname 'rel_x'"),
    (["run", "-t", "x\n", "true"], "invalid hostname 'x\\n'"),
    (["run", "-m", "tmp:/a\nb:/c", "true"], "'tmp:/a\\nb:/c'"),
    (["run", "--netif-route", "eth0=default,via=x", "true"],
     "invalid --netif-route 'eth0=default,via=x': bad gateway 'x'"),
    (["run", "--bogus\nline", "true"], "unrecognized arguments: --bogus\\nline"),
    (["run", "--tmpfs", "/tmp:size=0", "true"], "invalid --tmpfs '/tmp:size=0': size '0'"),
    (["run", "-w", "-r", "/tmp", "--ephemeral-size=lots", "true"],
     "invalid --ephemeral-size: size 'lots'"),
])
def test_usage_errors_are_one_line(argv: list[str], fragment: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


@pytest.fixture
def init_root(tmp_path: Path) -> Path:
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/init").symlink_to("/bin/busybox")
    return tmp_path


@pytest.mark.parametrize("argv, fragment", [
    (["run", "-n", "-N", "true"], "--no-netns contradicts --netif"),
    (["run", "-N", "-n", "veth:a:b", "true"], "--no-netns contradicts --netif"),
    (["run", "-N", "--netif-address", "lo=10.0.0.1/8", "true"],
     "--no-netns contradicts --netif-address"),
    (["run", "-N", "--netif-route", "lo=10.0.0.0/8", "true"],
     "--no-netns contradicts --netif-route"),
    (["run", "--netif-address", "lo=10.0.0.1/8", "true"], "--netif-address needs --netif"),
    (["run", "--netif-route", "lo=10.0.0.0/8", "true"], "--netif-route needs --netif"),
    (["run", "-U", "-e", "0:100000:65536", "true"], "--no-userns contradicts --user-map"),
    (["run", "-U", "-r", "/", "--private-users=pick", "true"],
     "--no-userns contradicts --private-users=pick"),
    (["run", "-e", "0:100000:65536", "--private-users=pick", "-r", "/tmp", "true"],
     "drop --user-map"),
    (["run", "-M", "-r", "/tmp", "true"], "--no-mountns cannot be combined"),
    (["run", "-M", "-m", "tmp:/x", "true"], "--no-mountns cannot be combined"),
    (["run", "-H", "-t", "box", "true"], "--hostname needs a UTS namespace"),
    (["run", "--private-users-ownership=chown", "true"], "needs --private-users=pick"),
    (["run", "--notify-ready", "true"], "--notify-ready needs boot"),
    (["run", "--register=no", "-p", "CPUQuota=20%", "true"], "--property sets the machine's scope"),
    (["run", "--register=no", "-g", "memory", "true"], "--cgroup sets the machine's scope"),
    (["run", "--ephemeral-size=1G", "-r", "/tmp", "true"], "--ephemeral-size needs --ephemeral"),
    (["run", "-a", "box", "-d"], "--attach contradicts --detach"),
    (["run", "-a", "box", "-r", "/srv"], "--attach contradicts --chroot"),
    (["run", "-a", "box", "--", "ls"], "--attach takes no command"),
    (["boot", "{root}", "-P"], "boot contradicts --no-pidns"),
    (["boot", "{root}", "-H"], "boot contradicts --no-utsns"),
])
def test_contradictions_are_one_line_usage_errors(argv: list[str], fragment: str,
                                                  init_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Refused while parsing: nothing runs, nothing is created.
    assert main([a.format(root=init_root) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("argv", [
    ["run", "-r", "/srv", "-w", "--machine", "m", "-p", "CPUQuota=20%", "--", "sh", "-c", "x"],
    ["run", "--netif", "--netif-address", "eth0=10.0.0.2/24", "-s", "A=1", "true"],
    ["boot", "/srv", "--machine", "b", "--notify-ready", "-d", "--caps=-chown"],
])
def test_parser_for_one_verb_parses_as_the_full_parser(argv: list[str]) -> None:
    assert vars(build_parser(argv[0]).parse_args(argv)) == vars(build_parser().parse_args(argv))


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_asyncio_for_the_command_is_imported_without_ssl() -> None:
    out = _python(
        "import sys; from machinepy.cli.run import _import_asyncio; _import_asyncio()\n"
        "import asyncio.base_events, asyncio.sslproto\n"
        "print(asyncio.base_events.ssl, asyncio.sslproto.ssl, 'ssl' in sys.modules)\n"
        "import ssl; print(ssl.__name__)")  # still there for whoever needs it (pyroute2)
    assert out.splitlines() == ["None None False", "ssl"]


@pytest.mark.root
def test_run_without_systemd_imports_no_bus_or_netlink_library() -> None:
    # What `machinepy run` costs on a host whose PID 1 is not systemd: the
    # registration is skipped, so asyncio, dbus-fast and pyroute2 stay out.
    out = _python(
        "import sys, machinepy.core.sd as sd; sd.systemd_booted = lambda: False\n"
        "from machinepy.cli.run import main; status = main(['run', '--', 'true'])\n"
        "print(status, [m for m in ('asyncio', 'dbus_fast', 'pyroute2') if m in sys.modules])")
    assert out == "0 []"


def test_help_fits_the_terminal_width(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit) as e:
        main(["boot", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: machinepy boot")
    assert "--private-users-ownership" in out
    options = out[out.index("\noptions:"):].splitlines()  # the usage may hold longer groups
    assert max(len(line) for line in options) <= 60
