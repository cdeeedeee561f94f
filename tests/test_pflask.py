# SPDX-License-Identifier: BSD-2-Clause
"""pflask's promises: what its documented command lines do under machinepy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
