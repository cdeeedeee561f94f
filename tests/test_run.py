# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy run` against real namespaces: host root and a busybox chroot."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

MACHINEPY = [sys.executable, "-m", "machinepy"]


def run(*args: str, input: str | None = None, timeout: float = 30,
        **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, "run", "--register=no", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def sh(
    root: Path | None, script: str, *opts: str, **kw: object
) -> subprocess.CompletedProcess[str]:
    chroot = ("-r", str(root)) if root is not None else ()
    return run(*chroot, *opts, "--", "/bin/sh", "-c", script, **kw)


@pytest.fixture(params=["host", "chroot"])
def root(request: pytest.FixtureRequest, busybox_root: Path) -> Path | None:
    return None if request.param == "host" else busybox_root


def test_pid1_and_private_proc(root: Path | None) -> None:
    r = sh(root, "echo $$; ls /proc | grep -c '^[0-9]'")
    assert r.returncode == 0, r.stderr
    pid, nprocs = r.stdout.split()
    assert pid == "1"
    assert int(nprocs) <= 3  # sh, ls, grep — none of the host's processes


def test_hostname_is_isolated(root: Path | None) -> None:
    host = socket.gethostname()
    r = sh(root, "hostname", "-t", "inbox")
    assert r.stdout.strip() == "inbox"
    assert socket.gethostname() == host


def test_exit_codes_propagate(root: Path | None) -> None:
    assert sh(root, "exit 7").returncode == 7
    assert sh(root, "exit 0").returncode == 0


def test_pipes_pass_through(root: Path | None) -> None:
    r = sh(root, "tr a-z A-Z; echo err >&2", input="hello\n")
    assert (r.stdout, r.stderr) == ("HELLO\n", "err\n")
    # SIGPIPE is back to its default for the container (Python ignores it).
    r = sh(root, "yes | head -n 2")
    assert r.stdout == "y\ny\n" and r.returncode == 0


def test_no_stray_fds(root: Path | None) -> None:
    rfd, wfd = os.pipe()
    os.set_inheritable(wfd, True)
    chroot = ("-r", str(root)) if root is not None else ()
    try:
        p = subprocess.Popen([*MACHINEPY, "run", "--register=no", *chroot, "--", "sleep",
                              "1234.6"], pass_fds=(wfd,))
    finally:
        os.close(rfd)
        os.close(wfd)
    try:
        leader = _leader_of(p, "1234.6")
        time.sleep(0.2)  # let it exec
        assert sorted(os.listdir(f"/proc/{leader}/fd")) == ["0", "1", "2"]
    finally:
        p.kill()  # the container dies with its supervisor
        p.wait(10)


def test_no_new_privs_not_forced(root: Path | None) -> None:
    r = sh(root, "grep NoNewPrivs /proc/1/status")
    assert r.stdout.split() == ["NoNewPrivs:", "0"]


def test_proc_sys_read_only(root: Path | None) -> None:
    r = sh(root, "echo 1 > /proc/sys/kernel/ns_last_pid && echo writable")
    assert "writable" not in r.stdout
    assert "Read-only" in r.stderr


def test_sysfs_read_only_in_chroot(busybox_root: Path) -> None:
    r = sh(busybox_root, "grep ' /sys ' /proc/self/mountinfo; mkdir /sys/x && echo writable")
    assert "writable" not in r.stdout
    assert " ro," in r.stdout or " ro " in r.stdout
    assert "Read-only" in r.stderr


def test_bind_ro_bind_and_tmp(root: Path | None, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "file").write_text("content")
    dest = "/mnt/m" if root is not None else str(tmp_path / "dst")
    if root is None:
        (tmp_path / "dst").mkdir()
        (tmp_path / "dst2").mkdir()
    dest2 = dest + "2" if root is None else "/mnt/m2"
    tmpdest = "/scratch" if root is not None else str(tmp_path / "dst3")
    r = sh(root,
           f"cat {dest2}/file; echo new > {dest}/out; touch {dest2}/x 2>&1; "
           f"grep ' {tmpdest} ' /proc/self/mountinfo",
           "-m", f"bind:{rw}:{dest}", "-m", f"bind-ro:{ro}:{dest2}", "-m", f"tmp:{tmpdest}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("content")
    assert "Read-only file system" in r.stdout
    assert " - tmpfs " in r.stdout
    assert (rw / "out").read_text() == "new\n"
    assert not (ro / "x").exists()


def test_chroot_environment(busybox_root: Path) -> None:
    env = {**os.environ, "SECRET": "leak"}
    r = sh(busybox_root, "env | sort", "-s", "A=1,B=two", env=env)
    got = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert "SECRET" not in got
    assert got["container"] == "machinepy"
    assert (got["A"], got["B"], got["HOME"], got["USER"]) == ("1", "two", "/root", "root")
    assert got["PATH"].startswith("/usr/local/sbin")
    kept = sh(busybox_root, "echo $SECRET", "-k", env=env)
    assert kept.stdout.strip() == "leak"


def test_uuid_is_container_uuid(busybox_root: Path) -> None:
    r = sh(busybox_root, "echo $container_uuid", "--uuid=0123456789ABCDEF0123456789abcdef")
    assert (r.returncode, r.stdout) == (0, "01234567-89ab-cdef-0123-456789abcdef\n"), r.stderr
    r = sh(busybox_root, "echo ${container_uuid-none}")
    assert r.stdout == "none\n"  # unregistered, unbooted: no machine id, as before
    r = sh(busybox_root, "true", "--uuid=00000000000000000000000000000000")
    assert (r.returncode, r.stderr) == (2, "machinepy: invalid --uuid: the machine id may not "
                                           "be all zeros\n")


def test_user_and_chdir(busybox_root: Path) -> None:
    r = sh(busybox_root, "id -u; id -g; pwd; echo $HOME", "-u", "user", "-c", "/tmp")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1000", "1000", "/tmp", "/home/user"]


def test_default_command_is_the_users_shell(busybox_root: Path) -> None:
    r = run("-r", str(busybox_root), input="echo from-shell $0\n")
    assert r.stdout.strip() == "from-shell /bin/sh"


def test_symlinked_destination_stays_inside(busybox_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    name = f"machinepy-escape-{os.getpid()}"
    host_target = Path("/var") / name
    links = {
        busybox_root / "mnt" / "abs": f"/../../../../var/{name}/abs",  # absolute, with ..
        busybox_root / "mnt" / "rel": f"../../../../../../var/{name}/rel",  # relative
    }
    for link, target in links.items():
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    try:
        r = sh(busybox_root, "cat /mnt/abs/f /mnt/rel/f",
               "-m", f"bind:{src}:/mnt/abs", "-m", f"bind:{src}:/mnt/rel")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "xx"
        assert not host_target.exists()  # the host's /var was never touched
        assert (busybox_root / "var" / name / "abs").is_dir()  # created inside the root
        assert (busybox_root / "var" / name / "rel").is_dir()
    finally:
        for link in links:
            link.unlink()
        subprocess.run(["rm", "-rf", str(busybox_root / "var" / name)], check=True)


def _tmpfs_sizes_k(mountinfo: str) -> dict[str, list[int]]:
    """Mount point → the size= (in KiB) of each tmpfs mounted there."""
    sizes: dict[str, list[int]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if fields[sep + 1] == "tmpfs":
            opts = dict(o.partition("=")[::2] for o in fields[sep + 3].split(","))
            sizes.setdefault(fields[4], []).append(int(opts.get("size", "0k").rstrip("k")))
    return sizes


def test_api_tmpfs_mounts_are_bounded(busybox_root: Path) -> None:
    r = sh(busybox_root, "cat /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    with open("/proc/meminfo") as f:
        ram_k = int(f.readline().split()[1])  # MemTotal
    sizes = _tmpfs_sizes_k(r.stdout)
    # The kernel's default would be half the RAM each (and 0 in mountinfo: unlimited).
    for path, share in (("/run", 0.20), ("/tmp", 0.10), ("/dev/shm", 0.10)):
        assert len(sizes[path]) == 1, sizes
        assert abs(sizes[path][0] - ram_k * share) <= ram_k * 0.01, (path, sizes[path], ram_k)


def test_tmpfs_option_bounds_and_replaces(busybox_root: Path) -> None:
    fill = "dd if=/dev/zero of={} bs=1024 count=2048 2>&1; echo rc=$?"
    r = sh(busybox_root, "cat /proc/self/mountinfo; echo ==; " + fill.format("/tmp/f")
           + "; echo ==; " + fill.format("/scratch/f"),
           "--tmpfs=/tmp:size=1m", "--tmpfs", "/scratch:size=4m")
    assert r.returncode == 0, r.stderr
    mountinfo, tmp, scratch = r.stdout.split("==\n")
    assert _tmpfs_sizes_k(mountinfo)["/tmp"] == [1024]  # ours replaced, not stacked
    assert "No space left on device" in tmp and tmp.endswith("rc=1\n"), tmp
    assert scratch.endswith("rc=0\n"), scratch  # 2 MiB fit in /scratch's 4


def test_ephemeral_layer_is_bounded(busybox_root: Path) -> None:
    r = sh(busybox_root, "dd if=/dev/zero of=/big bs=1024 count=2048 2>&1; echo rc=$?",
           "-w", "--ephemeral-size=1m")
    assert r.returncode == 0, r.stderr
    assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout
    assert not (busybox_root / "big").exists()


def test_ephemeral_discards_writes(busybox_root: Path) -> None:
    r = sh(busybox_root, "echo x > /etc/ephemeral-marker && rm /bin/ls && "
           "cat /etc/ephemeral-marker", "-w")
    assert r.stdout == "x\n", r.stderr
    assert not (busybox_root / "etc/ephemeral-marker").exists()
    assert (busybox_root / "bin/ls").is_symlink()


def test_capabilities_bounding_set(busybox_root: Path) -> None:
    def capbnd(*opts: str) -> int:
        r = sh(busybox_root, "grep CapBnd /proc/1/status", *opts)
        return int(r.stdout.split()[1], 16)

    cap_sys_module, cap_chown = 16, 0
    default = capbnd()
    assert not default & (1 << cap_sys_module)
    assert default & (1 << cap_chown)
    assert capbnd("--caps=+all") & (1 << cap_sys_module)
    assert not capbnd("--caps=-chown") & (1 << cap_chown)


# -- bad input: one line, exit 2, nothing created -----------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["-r", "/nonexistent-root", "--", "true"], "does not exist"),
    (["-m", "nfs:/a:/b", "--", "true"], "unknown mount type"),
    (["-m", "bind:rel:/b", "--", "true"], "not absolute"),
    (["-w", "--", "true"], "--ephemeral needs --chroot"),
    (["-s", "1BAD", "--", "true"], "not NAME=VALUE"),
    (["-u", "no-such-user-xyz", "--", "true"], "does not exist"),
    (["--machine", "bad name", "--", "true"], "invalid machine name"),
    (["--bogus-option"], "unrecognized arguments"),
    (["-e", "0:0", "--", "true"], "--user-map"),
    (["--caps=+nosuchcap", "--", "true"], "unknown capability"),
])
def test_bad_input(args: list[str], fragment: str, tmp_path: Path) -> None:
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert lines[0].startswith("machinepy: ")
    assert list(tmp_path.iterdir()) == []


def test_runtime_failure_is_one_line(busybox_root: Path) -> None:
    r = run("-r", str(busybox_root), "--", "/no/such/program")
    assert r.returncode == 127
    assert r.stderr.strip() == "machinepy: exec /no/such/program: No such file or directory"


# -- signals and exit paths -----------------------------------------------------------

def _leader_of(proc: subprocess.Popen[str], marker: str, timeout: float = 10) -> int:
    """The host pid of the container's PID 1 (a shell whose cmdline contains MARKER)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == proc.pid:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and b"machinepy" not in cmdline:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError("container leader not found")


def _popen(root: Path | None, script: str) -> subprocess.Popen[str]:
    chroot = ("-r", str(root)) if root is not None else ()
    return subprocess.Popen([*MACHINEPY, "run", "--register=no", *chroot, "--", "/bin/sh", "-c",
                             script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_is_forwarded(root: Path | None) -> None:
    marker = "trap-term-marker"
    p = _popen(root, f"trap 'exit 42' TERM; echo {marker} >/dev/null; "
                     "while :; do sleep 0.05; done")
    leader = _leader_of(p, marker)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 42
    assert not Path(f"/proc/{leader}").exists()


def test_second_sigterm_kills_a_deaf_pid1(root: Path | None) -> None:
    # PID 1 without a handler ignores SIGTERM, as the kernel wants.
    p = _popen(root, "exec sleep 1234.5")
    leader = _leader_of(p, "1234.5")
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 128 + signal.SIGKILL
    assert not Path(f"/proc/{leader}").exists()


def test_sigkill_of_leader(root: Path | None) -> None:
    marker = "victim-marker"
    p = _popen(root, f"sleep 1000; echo {marker}")
    leader = _leader_of(p, marker)
    os.kill(leader, signal.SIGKILL)
    assert p.wait(10) == 128 + signal.SIGKILL


# -- the console ------------------------------------------------------------------------

def test_tty_gets_its_own_pty(busybox_root: Path) -> None:
    pid, master = pty.fork()
    if pid == 0:
        os.execvp(sys.executable, [*MACHINEPY, "run", "--register=no", "-r", str(busybox_root),
                                   "--", "/bin/sh", "-c",
                                   "tty; stty size; read line; echo got:$line; exit 5"])
    fcntl_winsize = struct.pack("HHHH", 33, 111, 0, 0)
    import fcntl

    fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl_winsize)
    out = b""
    deadline = time.monotonic() + 15
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and b"33 111" in out:
            os.write(master, b"typed\r")
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(master)
    text = out.decode(errors="replace")
    assert "/dev/console" in text
    assert "33 111" in text
    assert "got:typed" in text
    assert os.waitstatus_to_exitcode(status) == 5


def test_sigkill_of_machinepy_takes_the_container_along(root: Path | None) -> None:
    p = _popen(root, "exec sleep 1234.7")
    leader = _leader_of(p, "1234.7")
    p.kill()
    p.wait(10)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{leader}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{leader}").exists()


# -- detach and attach ------------------------------------------------------------------

def _supervisor_of(name: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-d" in argv and name.encode() in argv and b"machinepy" in argv:
                return int(entry.name)
    raise AssertionError(f"no detached supervisor for {name}")


def test_detach_then_attach(busybox_root: Path) -> None:
    name = f"detached-{os.getpid()}"
    r = run("-d", "-r", str(busybox_root), "--machine", name, "--", "/bin/sh", "-c",
            "while :; do echo tick; sleep 0.2; done")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name
    sup = _supervisor_of(name)
    try:
        pid, master = pty.fork()
        if pid == 0:
            os.execvp(sys.executable, [*MACHINEPY, "run", "-a", name])
        out = b""
        deadline = time.monotonic() + 10
        while b"tick" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 4096)
        os.write(master, b"\x1d\x1d\x1d")  # ^] ^] ^]: detach, the container stays
        _, status = os.waitpid(pid, 0)
        os.close(master)
        assert b"tick" in out
        assert os.waitstatus_to_exitcode(status) == 0
        assert Path(f"/proc/{sup}").exists()
        again = run("-a", "no-such-container")
        assert again.returncode == 1 and "cannot attach" in again.stderr
    finally:
        os.kill(sup, signal.SIGTERM)  # forwarded; sh ignores it as PID 1
        time.sleep(0.2)
        os.kill(sup, signal.SIGTERM)  # the second one kills
    deadline = time.monotonic() + 10
    while Path(f"/proc/{sup}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{sup}").exists()


def test_detach_reports_setup_errors(busybox_root: Path) -> None:
    r = run("-d", "-r", str(busybox_root), "--", "/no/such/binary")
    assert r.returncode == 1
    assert r.stderr.strip() == "machinepy: exec /no/such/binary: No such file or directory"


def test_mount_failure_before_the_cgroup_is_one_line(busybox_root: Path) -> None:
    # An overlay on / is the first mount PID 1 makes, while the supervisor still
    # moves it into its cgroup: its own error is the one reported.
    upper = Path(tempfile.mkdtemp(prefix="mpytest-up-", dir="/dev/shm"))
    work = Path(tempfile.mkdtemp(prefix="mpytest-wk-", dir="/var/tmp"))
    try:
        r = run("-r", str(busybox_root), "-m", f"overlay:{upper}:/:{work}", "--", "true")
        assert r.returncode == 127  # PID 1's setup failures, as an exec failure
        assert r.stderr.startswith("machinepy: overlay: /: mount overlay: "), r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
    finally:
        upper.rmdir()
        work.rmdir()
