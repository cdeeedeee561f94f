# SPDX-License-Identifier: BSD-2-Clause
"""No host handle survives into the container, and PID 1 starts hardened:
cwd resolved inside the root, own session, own keyring, no caller groups,
/proc and /sys/firmware masked, a boot_id of its own (issue 8)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import pty
import re
import shutil
import subprocess
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.security.conftest import MACHINEPY, assert_blocked, run_in, run_probe

pytestmark = pytest.mark.root

FDS = (3, 4, 5, 6, 7)
# Far enough up from any scratch root to reach the host's /.
UP = "../" * 24


@pytest.fixture
def scratch(tmp_path: Path, busybox_root: Path) -> Path:
    """A private copy of the busybox root, next to a marker file on the host."""
    root = tmp_path / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    (tmp_path / "marker").write_text("HOST-MARKER-REACHED\n")
    return root


def set_home(root: Path, home: str) -> None:
    passwd = root / "etc/passwd"
    lines = passwd.read_text().splitlines()
    lines = [re.sub(r"^(root:[^:]*:0:0:[^:]*:)[^:]*:", rf"\g<1>{home}:", ln) for ln in lines]
    passwd.write_text("\n".join(lines) + "\n")


def escape_script(root: Path) -> str:
    """Tries the host marker relative to the cwd, and lists the cwd."""
    marker = root.parent / "marker"
    return f"pwd; ls -a; echo ===; cat ../marker ../../marker {UP}{str(marker).lstrip('/')}"


def assert_not_reached(r: subprocess.CompletedProcess[str]) -> None:
    out = r.stdout + r.stderr
    assert "HOST-MARKER-REACHED" not in out, f"host file reached from the container:\n{out}"
    listing = r.stdout.split("===")[0].split()[1:]
    assert "marker" not in listing, f"cwd lists the host directory:\n{out}"


# -- cwd escape (runc CVE-2024-21626) ---------------------------------------------------


@pytest.mark.parametrize("fd", FDS)
def test_home_through_fd_falls_back_to_root(scratch: Path, mode: tuple[str, ...],
                                            fd: int) -> None:
    set_home(scratch, f"/proc/self/fd/{fd}")
    r = run_in(scratch, "/bin/sh", "-c", escape_script(scratch), opts=mode)
    assert_not_reached(r)
    assert r.stdout.splitlines()[0] == "/", r.stdout + r.stderr


@pytest.mark.parametrize("fd", FDS)
def test_chdir_through_fd_is_refused(scratch: Path, mode: tuple[str, ...], fd: int) -> None:
    r = run_in(scratch, "/bin/sh", "-c", escape_script(scratch),
               opts=(*mode, "-c", f"/proc/self/fd/{fd}"))
    assert_not_reached(r)
    assert r.returncode == 127, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("machinepy: chdir: "), r.stderr


def test_chdir_into_a_symlink_stays_inside(scratch: Path, mode: tuple[str, ...]) -> None:
    """A symlink pointing up and out resolves against the container's root."""
    (scratch / "up").symlink_to(UP + "etc")
    r = run_in(scratch, "/bin/pwd", opts=(*mode, "-c", "/up"))
    assert (r.returncode, r.stdout) == (0, "/etc\n"), r.stderr


@pytest.mark.parametrize("fd", FDS[:3])
def test_boot_with_home_through_fd(scratch: Path, mode: tuple[str, ...], fd: int) -> None:
    set_home(scratch, f"/proc/self/fd/{fd}")
    init = scratch / "sbin/init"
    init.unlink(missing_ok=True)
    init.write_text(f"#!/bin/sh\n{escape_script(scratch)}\nexit 0\n")
    init.chmod(0o755)
    r = subprocess.run([*MACHINEPY, "boot", "--register=no", *mode, str(scratch)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert_not_reached(r)
    assert r.stdout.replace("\r", "").splitlines()[0] == "/", r.stdout + r.stderr


# -- no fds beyond 0-2 ------------------------------------------------------------------


def test_only_stdio_crosses_exec(busybox_root: Path, probe: Callable[[str], Path],
                                 mode: tuple[str, ...], tmp_path: Path) -> None:
    # Bind sources are preopened: one more bind shows they are closed too.
    r = run_probe(busybox_root, probe("fds"),
                  opts=(*mode, "-m", f"bind-ro:{tmp_path}:/mnt/x", "-c", "/mnt"))
    assert_blocked(r)


def test_only_stdio_crosses_exec_on_the_host_root(probe: Callable[[str], Path],
                                                  tmp_path: Path) -> None:
    r = run_in(None, str(probe("fds")), opts=("-m", f"bind-ro:{tmp_path}:/mnt"))
    assert_blocked(r)


# -- session ----------------------------------------------------------------------------


def _stat_fields(line: str) -> list[str]:
    return line.rsplit(")", 1)[1].split()  # state ppid pgrp session tty_nr ...


@pytest.mark.parametrize("chroot", [True, False])
def test_own_session_when_stdin_is_the_users_tty(busybox_root: Path, chroot: bool) -> None:
    """stdin is a terminal, stdout a pipe (pipe mode): the terminal is the
    controlling tty of machinepy's session, never of the container's."""
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)

        def take_tty() -> None:  # what a login shell has: the tty as controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        root = ("-r", str(busybox_root)) if chroot else ()
        p = subprocess.run([*MACHINEPY, "run", "--register=no", *root, "--",
                            "/bin/cat", "/proc/self/stat"],
                           stdin=slave, capture_output=True, text=True, timeout=60,
                           start_new_session=True, preexec_fn=take_tty)
        assert p.returncode == 0, p.stderr
        pid = p.stdout.split()[0]
        _state, _ppid, _pgrp, session, tty_nr = _stat_fields(p.stdout)[:5]
        assert pid == "1" and session == pid, p.stdout
        assert tty_nr == "0", f"the container holds a controlling terminal: {p.stdout}"
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# -- keyring ----------------------------------------------------------------------------

HOST_KEYRING = "mpytest-host-session"


def _join_named_session_keyring() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    from machinepy.core import linux

    if libc.syscall(linux.SYS_keyctl, linux.KEYCTL_JOIN_SESSION_KEYRING,
                    HOST_KEYRING.encode()) < 0:
        raise OSError(ctypes.get_errno(), "join session keyring")


def test_session_keyring_is_not_the_callers(busybox_root: Path, probe: Callable[[str], Path],
                                            mode: tuple[str, ...]) -> None:
    # The seccomp filter denies keyctl anyway: let it through, to see the join.
    r = subprocess.run([*MACHINEPY, "run", "--register=no", "-r", str(busybox_root), *mode,
                        "--system-call-filter=@keyring",
                        "-m", f"bind-ro:{probe('keyring')}:/probe", "--", "/probe",
                        HOST_KEYRING],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=_join_named_session_keyring)
    assert_blocked(r)


def test_probe_sees_the_callers_keyring_without_a_container(probe: Callable[[str], Path]) -> None:
    """The probe itself can tell: run on the host, it finds the caller's keyring."""
    r = subprocess.run([str(probe("keyring")), HOST_KEYRING], capture_output=True, text=True,
                       preexec_fn=_join_named_session_keyring)
    assert r.returncode == 1, r.stdout + r.stderr


# -- groups -----------------------------------------------------------------------------


@pytest.mark.parametrize("chroot", [True, False])
def test_callers_supplementary_groups_are_dropped(busybox_root: Path, mode: tuple[str, ...],
                                                  chroot: bool) -> None:
    if mode and not chroot:
        pytest.skip("--private-users=pick needs a root directory")
    root = ("-r", str(busybox_root)) if chroot else ()
    r = subprocess.run([*MACHINEPY, "run", "--register=no", *root, *mode, "--",
                        "/bin/sh", "-c", "grep '^Groups:' /proc/self/status"],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: os.setgroups([4242, 4343]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Groups:"], r.stdout


# -- /proc, /sys/firmware, boot_id ------------------------------------------------------

HIDDEN = [f for f in ("kallsyms", "kcore", "keys", "timer_list", "sysrq-trigger", "sched_debug")
          if os.path.exists(f"/proc/{f}")]
READ_ONLY = [d for d in ("acpi", "bus", "fs", "irq", "scsi", "asound")
             if os.path.isdir(f"/proc/{d}")]


@pytest.fixture(params=["chroot", "pick", "host"])
def where(request: pytest.FixtureRequest, busybox_root: Path) -> tuple[Path | None,
                                                                      tuple[str, ...]]:
    if request.param == "host":
        return None, ()
    return busybox_root, ("--private-users=pick",) if request.param == "pick" else ()


def test_kernel_internals_are_empty_inaccessible_nodes(
        where: tuple[Path | None, tuple[str, ...]]) -> None:
    assert HIDDEN, "the host shows none of the masked /proc files"
    root, opts = where
    script = "".join(
        f"stat -c '{f} %a %s' /proc/{f}; wc -c < /proc/{f}; "
        f"echo 1 > /proc/{f} && echo WROTE {f}; " for f in HIDDEN)
    script += "stat -c 'firmware %a' /sys/firmware; ls -A /sys/firmware | wc -l"
    r = run_in(root, "/bin/sh", "-c", script, opts=opts)
    lines = r.stdout.split()
    assert "WROTE" not in r.stdout, r.stdout + r.stderr
    for f in HIDDEN:
        at = lines.index(f)
        assert lines[at + 1:at + 4] == ["0", "0", "0"], f"/proc/{f}: {r.stdout}"
    at = lines.index("firmware")
    assert lines[at + 1:at + 3] == ["0", "0"], r.stdout


def test_the_host_shows_what_is_masked() -> None:
    """The masks hide something: the host's own files are not empty."""
    with open("/proc/kallsyms") as f:
        assert f.read(64)
    assert os.listdir("/sys/firmware")


def test_hardware_dirs_are_read_only(where: tuple[Path | None, tuple[str, ...]]) -> None:
    assert READ_ONLY, "the host has none of the read-only /proc directories"
    root, opts = where
    r = run_in(root, "/bin/sh", "-c", "cat /proc/self/mountinfo", opts=opts)
    assert r.returncode == 0, r.stderr
    options = {ln.split()[4]: ln.split()[5].split(",") for ln in r.stdout.splitlines()}
    for d in READ_ONLY:
        assert "ro" in options.get(f"/proc/{d}", []), f"/proc/{d} writable:\n{r.stdout}"
    if os.path.exists("/proc/irq/default_smp_affinity"):
        # Writes back the current value: harmless even if it got through.
        r = run_in(root, "/bin/sh", "-c", "v=$(cat /proc/irq/default_smp_affinity); "
                   "echo $v > /proc/irq/default_smp_affinity && echo WROTE", opts=opts)
        assert "WROTE" not in r.stdout and "Read-only" in r.stderr, r.stdout + r.stderr


def test_boot_id_is_the_containers_own(where: tuple[Path | None, tuple[str, ...]]) -> None:
    root, opts = where
    path = "/proc/sys/kernel/random/boot_id"
    with open(path) as f:
        host = f.read().strip()
    script = f"cat {path}; cat {path}; echo x > {path} && echo WROTE"
    r = run_in(root, "/bin/sh", "-c", script, opts=opts)
    first, second = r.stdout.split()[:2]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        first), r.stdout
    assert first == second != host
    assert "WROTE" not in r.stdout
    again = run_in(root, "/bin/cat", path, opts=opts).stdout.strip()
    assert again not in (host, first)


# -- read-only binds keep locked flags ----------------------------------------------------


@pytest.fixture
def nosuid_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a nosuid,nodev mount: flags a user namespace cannot clear."""
    d = tmp_path / "locked"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,size=1m", "mpytest", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_bind_ro_is_read_only_and_keeps_locked_flags(busybox_root: Path, nosuid_dir: Path,
                                                     mode: tuple[str, ...]) -> None:
    r = run_in(busybox_root, "/bin/sh", "-c",
               "grep ' /mnt/ro ' /proc/self/mountinfo; touch /mnt/ro/x && echo WROTE",
               opts=(*mode, "-m", f"bind-ro:{nosuid_dir}:/mnt/ro"))
    assert "WROTE" not in r.stdout, r.stdout + r.stderr
    flags = r.stdout.split()[5].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(flags), r.stdout
    assert not (nosuid_dir / "x").exists()
