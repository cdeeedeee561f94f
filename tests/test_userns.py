# SPDX-License-Identifier: BSD-2-Clause
"""User namespaces: `-e/--user-map` as root and as a real unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
MACHINEPY = [sys.executable, "-m", "machinepy", "run", "--register=no"]
SYSTEM_PYTHON = "/usr/bin/python3"
TEST_USER = "mpytest"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,  # type: ignore[call-overload]
                          **kw)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the container's root (an unprivileged uid outside) may write to."""
    path = Path(tempfile.mkdtemp(prefix="mpytest-userns-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_root_maps_any_range_without_subuid(busybox_root: Path, shared_dir: Path) -> None:
    """As root the maps go straight to /proc: no /etc/subuid entry needed (pflask's bug)."""
    tmp_path = shared_dir
    r = run([*MACHINEPY, "-e", "0:200000:65536", "-r", str(busybox_root),
             "-m", f"bind:{tmp_path}:/tmp", "--",
             "/bin/sh", "-c", "id -u; cat /proc/self/uid_map /proc/self/gid_map; "
                              "stat -c %u /bin; touch /tmp/made"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "200000", "65536"]
    assert lines[2].split() == ["0", "200000", "65536"]
    assert lines[3] == "65534"  # host root's files: unmapped, shown as nobody
    made = (tmp_path / "made").stat()
    assert (made.st_uid, made.st_gid) == (200000, 200000)  # root inside is 200000 outside


def _readable_by_others(path: Path) -> bool:
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH or (p == path and not mode & stat.S_IROTH):
            return False
    return True


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    for need in (SYSTEM_PYTHON, "/usr/bin/newuidmap", "/usr/sbin/useradd", "/usr/sbin/runuser"):
        if not os.path.exists(need):
            pytest.skip(f"needs {need}")
    if not _readable_by_others(REPO / "machinepy"):
        pytest.skip(f"{REPO} is not readable by other users, so a non-root user cannot run it")
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", TEST_USER], check=True)
        created = True
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], check=False)


def as_user(user: pwd.struct_passwd, *args: str) -> subprocess.CompletedProcess[str]:
    # The system python: the test interpreter may live under root's home.
    # Without a bus or netifs machinepy needs nothing beyond the standard library.
    return run(["runuser", "-u", user.pw_name, "--", "env", f"PYTHONPATH={REPO}",
                SYSTEM_PYTHON, "-m", "machinepy", "run", "--register=no", *args],
               cwd="/")


def _subuid_range(user: str) -> tuple[int, int] | None:
    with open("/etc/subuid") as f:
        for line in f:
            name, start, count = line.strip().split(":")
            if name == user:
                return int(start), int(count)
    return None


def test_unprivileged_user_runs_a_container(unprivileged_user: pwd.struct_passwd,
                                            busybox_root: Path) -> None:
    uid = unprivileged_user.pw_uid
    r = as_user(unprivileged_user, "-e", f"0:{uid}:1", "-r", str(busybox_root), "--",
                "/bin/sh", "-c", "id -u; echo $$; cat /proc/self/uid_map; hostname x && hostname")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[:2] == ["0", "1"]
    assert out[2].split() == ["0", str(uid), "1"]
    assert out[3] == "x"


def test_unprivileged_user_maps_its_subuid_range(unprivileged_user: pwd.struct_passwd,
                                                 busybox_root: Path) -> None:
    sub = _subuid_range(unprivileged_user.pw_name)
    if sub is None:
        pytest.skip(f"{unprivileged_user.pw_name} has no /etc/subuid range")
    uid = unprivileged_user.pw_uid
    r = as_user(unprivileged_user, "-e", f"0:{uid}:1", "-e", f"1:{sub[0]}:{sub[1]}",
                "-r", str(busybox_root), "--", "/bin/sh", "-c", "cat /proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    assert [line.split() for line in r.stdout.splitlines()] == [
        ["0", str(uid), "1"], ["1", str(sub[0]), str(sub[1])]]


def test_unprivileged_user_outside_its_range_is_one_line(
        unprivileged_user: pwd.struct_passwd, busybox_root: Path) -> None:
    r = as_user(unprivileged_user, "-e", "0:0:1", "-r", str(busybox_root), "--", "true")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "newuidmap" in r.stderr


def test_unprivileged_user_without_user_map_is_root_inside(
        unprivileged_user: pwd.struct_passwd) -> None:
    # pflask's promise (was: "must be run as root"): the caller is root of a user
    # namespace of its own, with no privilege on the host.
    r = as_user(unprivileged_user, "--", "/bin/sh", "-c", "id -u; head -n1 /proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    uid, first_map = r.stdout.splitlines()
    assert uid == "0" and first_map.split() == ["0", str(unprivileged_user.pw_uid), "1"]


def test_root_only_parents_do_not_stop_the_container(busybox_root: Path) -> None:
    """Root directory, bind sources and overlay layers below a mode-0700 directory
    are opened with machinepy's own credentials, not the mapped root's."""
    parent = Path(tempfile.mkdtemp(prefix="mpytest-private-", dir="/var/tmp"))
    try:
        shutil.copytree(busybox_root, parent / "root", symlinks=True)
        (parent / "src").mkdir()
        (parent / "src" / "f").write_text("from a private dir\n")
        for d in ("upper", "work"):
            (parent / d).mkdir()
            (parent / d).chmod(0o777)  # written by the container's root
        for ephemeral in ([], ["-w"]):
            r = run([*MACHINEPY, *ephemeral, "-e", "0:300000:65536", "-r", str(parent / "root"),
                     "-m", f"bind-ro:{parent}/src:/tmp/src",
                     "-m", f"overlay:{parent}/upper:/tmp/over:{parent}/work",
                     "--", "/bin/sh", "-c", "cat /tmp/src/f; echo x > /tmp/over/made"])
            assert (r.returncode, r.stdout) == (0, "from a private dir\n"), r.stderr
            assert (parent / "upper" / "made").stat().st_uid == 300000
            (parent / "upper" / "made").unlink()
    finally:
        shutil.rmtree(parent)


# -- --private-users=pick -------------------------------------------------------------


@pytest.fixture
def own_root(busybox_root: Path) -> Iterator[Path]:
    """A copy of the busybox root: pick shifts its owners for good."""
    # Mode 0700, as /var/lib/machines: the container's root (an unprivileged uid
    # outside) could not walk it, so machinepy opens the root before it becomes that.
    parent = Path(tempfile.mkdtemp(prefix="mpytest-pick-", dir="/var/tmp"))
    assert parent.stat().st_mode & 0o777 == 0o700
    root = parent / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    suid = root / "usr" / "suid-tool"
    suid.write_text("#!/bin/sh\n")
    suid.chmod(0o4755)
    yield root
    shutil.rmtree(parent)


def test_private_users_pick_maps_the_tree(own_root: Path) -> None:
    """ownership=map: an idmapped mount; the tree on disk is left as it is."""
    script = ("id -u; cat /proc/self/uid_map; stat -c %u:%g /bin /etc/passwd; touch /root/new; "
              "stat -c %u:%g /root/new")
    r = run([*MACHINEPY, "--private-users=pick", "--private-users-ownership=map",
             "-r", str(own_root), "--", "/bin/sh", "-c", script])
    if r.returncode == 1 and "mount_setattr" in r.stderr:
        pytest.skip(f"no idmapped mounts on {own_root}'s filesystem: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    inside, base, count = (int(x) for x in lines[1].split())
    assert (lines[0], inside, count) == ("0", 0, 65536)
    assert base % 65536 == 0 and 0x80000 <= base <= 0x6FFF0000
    assert lines[2:5] == ["0:0", "0:0", "0:0"]  # root's files, and what root makes, inside
    for path in (own_root, own_root / "bin", own_root / "root" / "new"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path  # … and the same on disk
    assert (own_root / "usr" / "suid-tool").stat().st_mode & 0o7777 == 0o4755


def test_private_users_pick_shifts_the_tree_once(own_root: Path) -> None:
    """ownership=chown: the tree is shifted into the range for good."""
    script = "id -u; cat /proc/self/uid_map; stat -c %u:%g /bin /etc/passwd; touch /root/new"
    r = run([*MACHINEPY, "--private-users=pick", "--private-users-ownership=chown",
             "-r", str(own_root), "--", "/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    inside, base, count = (int(x) for x in lines[1].split())
    assert (lines[0], inside, count) == ("0", 0, 65536)
    assert base % 65536 == 0 and 0x80000 <= base <= 0x6FFF0000
    assert lines[2:4] == ["0:0", "0:0"]  # root's files are root's inside
    for path in (own_root, own_root / "bin", own_root / "root" / "new"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (base, base), path
    assert (own_root / "usr" / "suid-tool").stat().st_mode & 0o7777 == 0o4755  # kept
    # The tree now carries its range: the next run (auto) takes the same one, changing nothing.
    r = run([*MACHINEPY, "--private-users=pick", "-r", str(own_root), "--", "cat",
             "/proc/self/uid_map"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", str(base), "65536"]
    assert own_root.stat().st_uid == base
    # An idmapped mount of a shifted tree would shift it twice: refused, in one line.
    r = run([*MACHINEPY, "--private-users=pick", "--private-users-ownership=map",
             "-r", str(own_root), "--", "true"])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"machinepy: --private-users-ownership=map: {own_root} was "
                                     f"shifted into the range {base} before: use chown or auto "
                                     "for it"]


@pytest.mark.parametrize(("args", "message"), [
    (["--private-users=pick", "--", "true"], "needs a root directory"),
    (["--private-users=pick", "-e", "0:100000:65536", "-r", "/", "--", "true"],
     "drop --user-map"),
    (["--private-users=maybe", "--", "true"], "invalid choice"),
    (["--private-users-ownership=map", "-e", "0:100000:65536", "-r", "/", "--", "true"],
     "--private-users-ownership needs --private-users=pick"),
    (["--private-users=pick", "--private-users-ownership=bind", "--", "true"], "invalid choice"),
])
def test_private_users_bad_input_is_one_line(args: list[str], message: str) -> None:
    r = run([*MACHINEPY, *args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_picked_range_is_held_until_released(own_root: Path) -> None:
    """Held by a process in a namespace with its map: the next pick moves on, and
    nothing (no lock file, no process) stays once it is released."""
    from machinepy.runtime.userns import pick

    base, hold = pick(str(own_root))
    assert hold is not None
    try:
        with open(f"/proc/{hold.pid}/uid_map") as f:
            assert f.read().split() == ["0", str(base), "65536"]
        other, hold2 = pick(str(own_root))  # same tree, same first choice: taken
        assert hold2 is not None
        hold2.close()
        assert other != base
    finally:
        pid = hold.pid
        hold.close()
    assert not os.path.exists(f"/proc/{pid}")
    again, hold3 = pick(str(own_root))
    assert hold3 is not None
    hold3.close()
    assert again == base
    assert not os.path.exists("/run/machinepy/locks")


def _processes_with(arg: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and arg.encode() in (p / "cmdline").read_bytes().split(b"\0"):
                found.append(int(p.name))
        except OSError:
            pass
    return found


def test_private_users_pick_detaches(own_root: Path) -> None:
    # The range's holder must not keep `run -d`'s report pipe open: the
    # foreground process returns as soon as the container runs.
    name = f"pick-detached-{os.getpid()}"
    try:
        r = run([*MACHINEPY, "-d", "--private-users=pick", "--machine", name, "-r",
                 str(own_root), "--", "/bin/sleep", "1000"])
        assert (r.returncode, r.stdout.strip()) == (0, name), r.stderr
        target = os.readlink(f"/run/machinepy/attach/{name}")
        os.kill(int(target[1:].split(".")[0]), 9)  # container, range, attach entries: all go
        for _ in range(100):
            if not os.path.exists(f"/run/machinepy/attach/{target}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/run/machinepy/attach/{target}")
    finally:
        for pid in _processes_with(name):  # only when it went wrong
            os.kill(pid, 9)


def test_chown_shift_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    import io

    from machinepy.runtime.userns import shift

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for i in range(600):
        (tmp_path / f"f{i}").write_text("")
    tty, pipe = Terminal(), io.StringIO()
    assert shift(str(tmp_path), 0x80000, progress=tty) == 601
    assert f"machinepy: shifting {tmp_path} into {0x80000}…: 256 entries" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the line is gone when done
    assert shift(str(tmp_path), 0x80000, progress=pipe) == 0  # idempotent
    assert pipe.getvalue() == ""
