# SPDX-License-Identifier: BSD-2-Clause
"""machinepy's own sockets, attacked from containers (issue 8).

A detached container's console is served from /run/machinepy/attach; a
container must neither take it (connect and receive the pty master) nor pose
as it (squat a name root attaches to), and the client must refuse any server
that is not the supervisor its record names.  Entries must go with the
supervisor, SIGKILL included.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.security.conftest import MACHINEPY, assert_blocked, run_in, run_probe
from tests.test_userns import REPO, SYSTEM_PYTHON
from tests.test_userns import unprivileged_user as unprivileged_user  # the fixture

pytestmark = pytest.mark.root

ATTACH_DIR = Path("/run/machinepy/attach")
TICKER = ("/bin/sh", "-c", "while :; do echo tick; sleep 0.2; done")


class Victim(NamedTuple):
    name: str
    supervisor: int
    leader: int
    target: str  # the socket's name in ATTACH_DIR: @PID.START

    @property
    def addresses(self) -> list[str]:
        """Everything an attacker would try: our paths and the old abstract names."""
        return [*(str(ATTACH_DIR / k) for k in (self.name, str(self.leader),
                                                str(self.supervisor), self.target)),
                f"@machinepy/attach/{self.name}", f"@machinepy/attach/{self.leader}"]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def entries_of(target: str) -> set[str]:
    """ATTACH_DIR's entries that are TARGET or point at it."""
    try:
        names = os.listdir(ATTACH_DIR)
    except FileNotFoundError:
        return set()
    found = set()
    for n in names:
        try:
            if n == target or os.readlink(ATTACH_DIR / n) == target:
                found.add(n)
        except OSError:
            pass
    return found


def start_detached(root: Path, name: str, *command: str) -> Victim:
    r = subprocess.run([*MACHINEPY, "run", "-d", "--register=no", "-r", str(root),
                        "--machine", name, "--", *(command or TICKER)],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, name), r.stderr
    target = os.readlink(ATTACH_DIR / name)
    supervisor = int(target[1:].split(".")[0])
    keys = entries_of(target) - {name, str(supervisor), target}
    assert len(keys) == 1, keys
    return Victim(name, supervisor, int(keys.pop()), target)


def stop(v: Victim) -> None:
    if not gone(v.supervisor):
        os.kill(v.supervisor, signal.SIGTERM)  # forwarded; sh ignores it as PID 1
        time.sleep(0.2)
        if not gone(v.supervisor):
            os.kill(v.supervisor, signal.SIGTERM)  # the second one kills
    wait_for(lambda: gone(v.supervisor), "the supervisor to exit")
    wait_for(lambda: not entries_of(v.target), "its attach entries to go")


@pytest.fixture
def victim(busybox_root: Path) -> Iterator[Victim]:
    v = start_detached(busybox_root, f"victim-{os.getpid()}")
    try:
        yield v
    finally:
        stop(v)


def janitor_of(supervisor: int) -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == supervisor and b"machinepy.runtime.janitor" in cmd:
                return int(p.name)
    raise AssertionError(f"no janitor for supervisor {supervisor}")


def attach_client(key: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*MACHINEPY, "run", "-a", key], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def attach_output(key: str, timeout: float = 5) -> tuple[int | None, str, str]:
    """Run `machinepy run -a KEY` typing a secret; (status or None if it stayed
    attached, stdout, stderr)."""
    p = attach_client(key)
    try:
        out, err = p.communicate("secret-keystrokes\n", timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=10)
        return None, out, err


# -- taking the console ---------------------------------------------------------------

def test_chroot_container_cannot_take_a_detached_console(
        victim: Victim, busybox_root: Path, probe: Callable[[str], Path],
        mode: tuple[str, ...]) -> None:
    r = run_probe(busybox_root, probe("attach_connect"), *victim.addresses, opts=mode)
    assert_blocked(r)


def test_container_that_reaches_the_socket_gets_no_console(
        victim: Victim, busybox_root: Path, probe: Callable[[str], Path]) -> None:
    # As if the directory leaked into a container (a careless bind mount): the
    # supervisor itself refuses a peer in another pid namespace.
    r = run_probe(busybox_root, probe("attach_connect"), f"/a/{victim.target}",
                  opts=("-m", f"bind:{ATTACH_DIR}:/a"))
    assert_blocked(r)
    assert "connected, then hung up" in r.stdout, r.stdout


def test_host_root_container_cannot_take_a_detached_console(
        victim: Victim, probe: Callable[[str], Path]) -> None:
    r = run_in(None, str(probe("attach_connect")), *victim.addresses)
    assert_blocked(r)
    assert "No such file or directory" in r.stdout, r.stdout  # /run/machinepy is masked
    # Past the mask (a bind of the directory), the supervisor still refuses it.
    r = run_in(None, str(probe("attach_connect")), f"/mnt/{victim.target}",
               opts=("-m", f"bind:{ATTACH_DIR}:/mnt"))
    assert_blocked(r)
    assert "connected, then hung up" in r.stdout, r.stdout


def test_host_root_still_attaches(victim: Victim) -> None:
    for key in (victim.name, str(victim.leader), str(victim.supervisor)):
        status, out, err = attach_output(key, timeout=2)
        assert status is None and "tick" in out, (key, status, err)
        assert f"Attached to {key}." in err


# -- posing as the console --------------------------------------------------------------

def _squat(root: Path, probe_path: Path, *addresses: str,
           opts: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    p = subprocess.Popen([*MACHINEPY, "run", "--register=no", "-r", str(root),
                          "-m", f"bind-ro:{probe_path}:/probe", *opts, "--", "/probe",
                          *addresses], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    assert p.stdout is not None
    lines = []
    while (line := p.stdout.readline()) and line != "ready\n":
        lines.append(line)
    assert line == "ready\n", "".join(lines)
    return p


def _squatter_output(p: subprocess.Popen[str]) -> str:
    p.terminate()  # PID 1 of its container: forwarded, and the probe has no handler
    out, _ = p.communicate(timeout=20)
    return out


def test_squatted_abstract_names_are_not_used(
        victim: Victim, busybox_root: Path, probe: Callable[[str], Path],
        mode: tuple[str, ...]) -> None:
    squatter = _squat(busybox_root, probe("attach_squat"), f"@machinepy/attach/{victim.name}",
                      f"@machinepy/attach/{victim.leader}", opts=mode)
    try:
        status, out, err = attach_output(victim.name, timeout=2)
    finally:
        said = _squatter_output(squatter)
    assert status is None and "tick" in out, err  # the real supervisor's console
    assert "a client connected" not in said and "secret" not in said, said


def test_socket_planted_by_a_container_is_refused(
        victim: Victim, busybox_root: Path, probe: Callable[[str], Path]) -> None:
    # The container replaces the supervisor's socket file with its own.
    squatter = _squat(busybox_root, probe("attach_squat"), f"/a/{victim.target}",
                      opts=("-m", f"bind:{ATTACH_DIR}:/a"))
    try:
        status, out, err = attach_output(victim.name)
    finally:
        said = _squatter_output(squatter)
    assert status == 1, (status, out, err)
    assert err.count("\n") == 1 and "refusing to attach" in err, err
    assert "not by its supervisor" in err, err
    assert "Attached" not in err and out == ""
    assert "secret" not in said and "ESCAPED" not in said, said


class FakeServer:
    """A server in the attach directory that is not a supervisor: it counts the
    bytes it receives and greets like the real one (with an fd)."""

    def __init__(self, name: str) -> None:
        self.path = ATTACH_DIR / name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.received = b""
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.connected.set()
        with conn:
            conn.settimeout(3)
            try:
                socket.send_fds(conn, [b"machinepy-console\n"], [1])
                while chunk := conn.recv(64):
                    self.received += chunk
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)
        self.path.unlink(missing_ok=True)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("who", ["dead-supervisor", "pid-reused"])
def test_impersonating_server_is_refused(victim: Victim, who: str) -> None:
    # A key whose record names a supervisor that is gone (its pid dead, or
    # reused by another process), and someone else serving its socket path.
    start = victim.target.split(".")[1]
    target = f"@{_dead_pid()}.{start}" if who == "dead-supervisor" else \
        f"@{os.getpid()}.{int(start) + 1}"
    key = f"fake-{os.getpid()}"
    fake = FakeServer(target)
    os.symlink(target, ATTACH_DIR / key)
    try:
        status, out, err = attach_output(key)
        assert fake.connected.wait(5)
    finally:
        (ATTACH_DIR / key).unlink(missing_ok=True)
        fake.close()
    assert status == 1, (status, out, err)
    assert err.count("\n") == 1 and "refusing to attach" in err, err
    assert "Attached" not in err and out == ""
    assert fake.received == b""


# -- nothing left behind --------------------------------------------------------------------

def _listing() -> set[str]:
    return set(os.listdir(ATTACH_DIR)) if ATTACH_DIR.exists() else set()


def test_plain_runs_make_no_socket(busybox_root: Path) -> None:
    before = _listing()
    p = subprocess.Popen([*MACHINEPY, "run", "--register=no", "-r", str(busybox_root), "--",
                          "/bin/sh", "-c", "echo up; sleep 1"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "up\n"
        assert _listing() <= before
    finally:
        assert p.wait(10) == 0


def test_entries_go_when_the_container_exits(busybox_root: Path) -> None:
    v = start_detached(busybox_root, f"short-{os.getpid()}", "/bin/sh", "-c", "sleep 1")
    assert entries_of(v.target) == {v.name, str(v.leader), str(v.supervisor), v.target}
    wait_for(lambda: gone(v.supervisor), "the container to end")
    wait_for(lambda: not entries_of(v.target), "its attach entries to go", timeout=3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_entries_go_with_a_signalled_supervisor(busybox_root: Path, sig: int) -> None:
    v = start_detached(busybox_root, f"sig-{os.getpid()}", "/bin/sleep", "1000")
    janitor = janitor_of(v.supervisor)
    os.kill(v.supervisor, sig)
    if sig == signal.SIGTERM:
        time.sleep(0.2)
        os.kill(v.supervisor, sig)  # sleep ignores the first as PID 1
    wait_for(lambda: gone(v.supervisor), "the supervisor to go")
    wait_for(lambda: not entries_of(v.target), "its attach entries to go", timeout=3)
    wait_for(lambda: gone(janitor) and gone(v.leader), "janitor and container to go")


def test_next_start_sweeps_what_a_double_sigkill_left(busybox_root: Path) -> None:
    v = start_detached(busybox_root, f"stale-{os.getpid()}", "/bin/sleep", "1000")
    janitor = janitor_of(v.supervisor)
    os.kill(janitor, signal.SIGKILL)
    wait_for(lambda: gone(janitor), "the janitor to go")
    os.kill(v.supervisor, signal.SIGKILL)
    wait_for(lambda: gone(v.supervisor), "the supervisor to go")
    assert entries_of(v.target), "nothing was left to sweep: the test proves nothing"
    # The same name again: the stale record must not block it, and is swept.
    again = start_detached(busybox_root, v.name, "/bin/sleep", "1000")
    try:
        assert not entries_of(v.target)
        assert os.readlink(ATTACH_DIR / v.name) == again.target
    finally:
        stop(again)


# -- a user's own detached containers ---------------------------------------------------------

def _as_user(user: pwd.struct_passwd, xdg: Path | None, *args: str,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = ["env", "-u", "XDG_RUNTIME_DIR", f"PYTHONPATH={REPO}"]
    if xdg is not None:
        env.append(f"XDG_RUNTIME_DIR={xdg}")
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *env, SYSTEM_PYTHON, "-m",
                           "machinepy", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def test_user_detach_needs_a_runtime_dir(unprivileged_user: pwd.struct_passwd,
                                         busybox_root: Path) -> None:
    r = _as_user(unprivileged_user, None, "-d", "--register=no", "-e",
                 f"0:{unprivileged_user.pw_uid}:1", "-r", str(busybox_root), "--", "true")
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.splitlines() == ["machinepy: XDG_RUNTIME_DIR is not set: a user's "
                                     "detached consoles live in $XDG_RUNTIME_DIR/machinepy/attach"]


def test_user_detaches_and_attaches_in_its_runtime_dir(unprivileged_user: pwd.struct_passwd,
                                                       busybox_root: Path) -> None:
    uid = unprivileged_user.pw_uid
    xdg = Path(tempfile.mkdtemp(prefix="mpytest-xdg-", dir="/var/tmp"))
    os.chown(xdg, uid, unprivileged_user.pw_gid)
    name = f"user-{os.getpid()}"
    attach_dir = xdg / "machinepy" / "attach"
    supervisor = 0
    try:
        r = _as_user(unprivileged_user, xdg, "-d", "--register=no", "-e", f"0:{uid}:1",
                     "-r", str(busybox_root), "--machine", name, "--", *TICKER)
        assert (r.returncode, r.stdout.strip()) == (0, name), r.stderr
        assert stat.S_IMODE(attach_dir.stat().st_mode) == 0o700
        assert attach_dir.stat().st_uid == uid
        target = os.readlink(attach_dir / name)
        supervisor = int(target[1:].split(".")[0])
        p = subprocess.Popen(["runuser", "-u", unprivileged_user.pw_name, "--", "env",
                              f"PYTHONPATH={REPO}", f"XDG_RUNTIME_DIR={xdg}", SYSTEM_PYTHON,
                              "-m", "machinepy", "run", "-a", name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            out, err = p.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            p.terminate()
            out, err = p.communicate(timeout=10)
        assert "tick" in out and f"Attached to {name}." in err, err
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: gone(supervisor), "the supervisor to go")
        wait_for(lambda: not (xdg / "machinepy").exists(), "its runtime dir entries to go")
    finally:
        if supervisor and not gone(supervisor):
            os.kill(supervisor, signal.SIGKILL)
        shutil.rmtree(xdg)


# -- the uid-range locks of --private-users=pick -------------------------------------------

def test_container_cannot_squat_a_uid_range(busybox_root: Path, probe: Callable[[str], Path],
                                            mode: tuple[str, ...]) -> None:
    from machinepy.runtime.userns import pick

    tree = Path(tempfile.mkdtemp(prefix="mpytest-range-", dir="/var/tmp"))
    try:
        first, hold = pick(str(tree))  # the range this tree's hash points at
        assert hold is not None
        hold.close()
        # The old lock was this abstract name: whoever bound it first had the range.
        squatter = _squat(busybox_root, probe("attach_squat"), f"@machinepy/uid-range/{first}",
                          opts=mode)
        try:
            again, hold = pick(str(tree))
            assert hold is not None
            hold.close()
        finally:
            _squatter_output(squatter)
        assert again == first
    finally:
        tree.rmdir()
