# SPDX-License-Identifier: BSD-2-Clause
"""pflask's promises: what its documented command lines do under machinepy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from machinepy.cli.run import build_parser, spec_from_args
from machinepy.core.spec import MountSpec, NetifSpec, parse_mount, parse_netif

MACHINEPY = [sys.executable, "-m", "machinepy"]

# Only ever as PID 1 of a pid namespace: reboot(2) there ends the namespace,
# never the machine.
GUARD = '[ "$$" = 1 ] || { echo "not a pid namespace init" >&2; exit 99; }; '


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, "run", "--register=no", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.root
@pytest.mark.parametrize("verb", ["poweroff", "halt"])
def test_poweroff_of_any_payload_is_a_clean_exit(busybox_root: Path, verb: str) -> None:
    # The kernel ends a pid namespace's init that calls reboot(2) with SIGINT:
    # a clean shutdown, exit 0 (was 130 for a `run` of an init).
    r = run("-r", str(busybox_root), "--", "/bin/sh", "-c", GUARD + f"exec {verb} -f")
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.root
def test_reboot_restarts_any_payload(busybox_root: Path, tmp_path: Path) -> None:
    # SIGHUP (reboot): the container starts again, as `boot` does; the second
    # round sees the first one's mark and ends.
    script = GUARD + ("if [ -e /state/rebooted ]; then echo second; exit 5; fi; "
                      "echo first; touch /state/rebooted; exec reboot -f")
    r = run("-r", str(busybox_root), "-m", f"bind:{tmp_path}:/state", "--", "/bin/sh", "-c",
            script)
    assert (r.returncode, r.stdout) == (5, "first\nsecond\n"), r.stderr


@pytest.mark.root
def test_sigint_without_a_pid_namespace_is_still_a_signal(busybox_root: Path) -> None:
    # -P: PID 1 is no namespace init; death by SIGINT means what it says.
    r = run("-P", "-r", str(busybox_root), "--", "/bin/sh", "-c", "kill -INT $$")
    assert r.returncode == 130


@pytest.mark.root
def test_the_supervisor_is_found_by_name(busybox_root: Path) -> None:
    # pflask's attach flow starts with finding the process: comm is "machinepy"
    # (pgrep, ps -C, killall), and the installed script is found by `pidof -x`.
    script = Path(sys.executable).parent / "machinepy"
    argv = [sys.executable, str(script)] if script.exists() else MACHINEPY
    p = subprocess.Popen([*argv, "run", "--register=no", "-r", str(busybox_root), "--",
                          "/bin/sh", "-c", "echo up; read x"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "up\n"
        found = subprocess.run(["pgrep", "-x", "machinepy"], capture_output=True, text=True)
        assert str(p.pid) in found.stdout.split()
        if script.exists():
            found = subprocess.run(["pidof", "-x", "machinepy"], capture_output=True, text=True)
            assert str(p.pid) in found.stdout.split()
    finally:
        p.kill()
        p.wait()


@pytest.mark.root
def test_overlay_on_the_root_keeps_the_api_filesystems(busybox_root: Path,
                                                      tmp_path: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    r = run("-r", str(busybox_root), "-m", f"overlay:{upper}:/:{work}", "--", "/bin/sh", "-c",
            "test -e /proc/self/status && test -e /dev/null && ls /sys | grep -q kernel "
            "&& echo made > /newfile && echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    assert (upper / "newfile").read_text() == "made\n"  # writes went to UPPER
    assert not (busybox_root / "newfile").exists()


# -- pflask 0.2's comma syntax, beside the colon syntax --------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("tmp,/home/me", MountSpec("tmp", "/home/me")),
    ("bind,/tmp/trash,/home/me", MountSpec("bind", "/home/me", "/tmp/trash")),
    ("overlay,/srv/up,/usr,/srv/work", MountSpec("overlay", "/usr", "/srv/up", "/srv/work")),
    ("bind,/a\\,b,/c", MountSpec("bind", "/c", "/a,b")),  # \, keeps a comma in a path
    ("bind:/a,b:/c", MountSpec("bind", "/c", "/a,b")),  # a ':' means the colon syntax
    ("tmp:/x:size=10%,mode=0755", MountSpec("tmp", "/x", options="size=10%,mode=0755")),
])
def test_comma_mounts(text: str, want: MountSpec) -> None:
    assert parse_mount(text) == want


@pytest.mark.parametrize(("text", "want"), [
    ("pflask-vlan0,eth0", NetifSpec("move", "pflask-vlan0", "eth0")),
    ("macvlan,eth0,net0", NetifSpec("macvlan", "eth0", "net0")),
])
def test_comma_netifs(text: str, want: NetifSpec) -> None:
    assert parse_netif(text) == want


def test_comma_cgroups_and_volatile() -> None:
    args = build_parser("run").parse_args(["run", "--cgroup=memory,pids", "--volatile",
                                            "-r", "/", "--", "true"])
    args.init_args = []
    spec = spec_from_args(args)
    assert [p.name for p in spec.properties] == ["MemoryAccounting", "TasksAccounting"]
    assert spec.ephemeral


@pytest.mark.root
def test_pflask_readme_tmp_home(tmp_path: Path) -> None:
    # pflask's README: `pflask --user=$USER --mount=tmp,$HOME chromium`, as root here.
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret").write_text("x")
    r = run(f"--mount=tmp,{home}", "--", "/bin/sh", "-c", f"ls -A {home}; touch {home}/new")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    assert sorted(p.name for p in home.iterdir()) == ["secret"]
