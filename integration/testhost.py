# SPDX-License-Identifier: BSD-2-Clause
"""A throwaway systemd host for integration tests (recipe: shared/TESTHOST.md).

The machine running the tests has no systemd as PID 1, so no machined. TestHost
boots the host's own systemd on an overlay of `/` inside fresh pid, mount, uts,
ipc and cgroup namespaces. Every mount is made inside the private mount
namespace, so when the namespace's last process dies the mounts go with it and
nothing is left on the host but the temp dir, which stop() removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONTAINER_ENV = "machinepy-testhost"
SYSTEMD = "/lib/systemd/systemd"
# Commands from the outside live here, in a leaf of the test host's cgroup tree
# beside systemd's own; no unit suffix, so systemd never mistakes it for its unit.
COMMANDS_CGROUP = "testhost-commands"

# Units the host image may have enabled that would slow basic.target down, touch
# the real hardware (udev writes to the shared /sys) or reach for the network.
MASK = (
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-timesyncd.service", "systemd-pstore.service", "systemd-networkd.service",
    "systemd-resolved.service", "systemd-logind.service", "getty.target",
    "postgresql.service", "timers.target", "systemd-journald-audit.socket",
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_reap.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "dev-mqueue.mount",
    "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-sysctl.service", "systemd-random-seed.service", "systemd-remount-fs.service",
    "systemd-fsck-root.service", "systemd-hwdb-update.service", "ldconfig.service",
)

# Runs as PID 1 of the new pid namespace, in its own mount namespace.
BOOT_SCRIPT = r"""
set -eu
T=$1 R=$1/root; shift
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount --rbind /dev "$R/dev"
# systemd as PID 1 writes to /dev/console: that must be our log, not the VM's console.
: > "$T/console.log"
mount --bind "$T/console.log" "$R/dev/console"
while [ "$1" != -- ]; do
    mkdir -p "$R$1"
    mount --rbind "$1" "$R$1"
    shift
done
shift
# No kernel log import (it would pull in the host's and other test hosts' messages)
# and no journal on disk.
mkdir -p "$R/etc/systemd/system" "$R/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nReadKMsg=no\n' \
    > "$R/etc/systemd/journald.conf.d/machinepy-testhost.conf"
for unit in "$@"; do
    rm -rf "$R/etc/systemd/system/$unit"
    ln -s /dev/null "$R/etc/systemd/system/$unit"
done
# pivot_root, not chroot: with a chroot the mount namespace's root stays the real
# host's /, and whatever enters a container's mount namespace with setns()
# (machined's copy-to and bind) would land on the real host.
cd "$R"
pivot_root . .
umount -l .
# What systemd does on a real host (it skips it in a container): mounts shared,
# so machined's `machinectl bind` propagates into containers.
mount --make-rshared /
exec chroot . env -i container=%(container)s PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    %(systemd)s --system --unit=basic.target --log-target=journal --log-level=info
"""


class TestHostError(RuntimeError):
    pass


def cgroup2_mount() -> Path | None:
    """Where the host has the unified hierarchy (/sys/fs/cgroup/unified on hybrid hosts)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return Path(fields[4])
    return None


def _own_cgroup2() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def _remove_cgroup(path: Path) -> None:
    """Kill what is left in a cgroup subtree and remove it, leaves first."""
    if not path.is_dir():
        return
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    for top, _dirs, _files in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        while True:
            try:
                os.rmdir(top)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # killed processes take a moment to leave


def _bound_paths() -> list[str]:
    from tests.rootfs import cache_dir  # late: integration/ may run without tests/ on the path

    paths = [str(REPO), str(cache_dir())]
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]


def _enabled_host_units() -> set[str]:
    """What the host image enabled for early targets: none of it is wanted in the test host."""
    found: set[str] = set()
    base = Path("/etc/systemd/system")
    for wants in base.glob("*.target.wants"):
        if wants.name.startswith(("dbus", "machines")):
            continue
        found.update(p.name for p in wants.iterdir() if not p.name.startswith("dbus"))
    return found


class TestHost:
    """systemd + dbus-daemon (+ machined on demand) booted in namespaces."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, binds: Iterable[str | os.PathLike[str]] = (),
                 join_cgroup: bool = True) -> None:
        self.binds = [*_bound_paths(), *(os.fspath(b) for b in binds)]
        # False only to demonstrate why it is needed (see command()).
        self.join_cgroup = join_cgroup
        self.cgroup: Path | None = None  # the test host's cgroup2 root, host-side path
        self.pid: int = 0  # systemd, as the host sees it
        self.tmp: Path | None = None
        self.boot_seconds: float = 0.0
        self._unshare: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> TestHost:
        if self._unshare is not None:
            raise TestHostError("already started")
        if os.geteuid() != 0:
            raise TestHostError("a test host needs root")
        t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="machinepy-testhost-", dir="/var/tmp"))
        for d in ("upper", "work", "root"):
            (self.tmp / d).mkdir()
        masks = sorted(set(MASK) | _enabled_host_units())
        script = BOOT_SCRIPT % {"container": CONTAINER_ENV, "systemd": SYSTEMD}
        self._log = open(self.tmp / "systemd.log", "wb")  # noqa: SIM115 (closed in stop)
        try:
            self._unshare = subprocess.Popen(
                [*self._join_cgroup_argv(boot=True),
                 "unshare", "--pid", "--mount", "--uts", "--ipc", "--cgroup", "--fork",
                 "--kill-child", "sh", "-c", script, "testhost-boot", str(self.tmp),
                 *self.binds, "--", *masks],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.pid = self._child_pid(timeout)
            self._wait_ready(t0 + timeout)
        except BaseException:
            log = self.log()
            self.stop()
            raise TestHostError(f"test host did not boot:\n{log[-4000:]}") from None
        self.boot_seconds = time.monotonic() - t0
        return self

    def _join_cgroup_argv(self, boot: bool) -> list[str]:
        """A prefix that moves the command into the test host's cgroup tree, then execs it.

        The cgroup namespace makes the caller's cgroup the test host's root. Without a
        cgroup of its own, every test host on a hybrid host would share (and litter)
        the real cgroup2 root with the host and with each other. Commands go into a
        leaf of that tree: systemd inside can only move processes between cgroups of
        its own namespace (see command()).
        """
        if not self.join_cgroup:
            return []
        if boot:
            mount = cgroup2_mount()
            if mount is None:
                self.join_cgroup = False
                return []
            assert self.tmp is not None
            self.cgroup = mount / _own_cgroup2().lstrip("/") / self.tmp.name
            (self.cgroup / COMMANDS_CGROUP).mkdir(parents=True)
            procs = self.cgroup / "cgroup.procs"
        else:
            assert self.cgroup is not None
            procs = self.cgroup / COMMANDS_CGROUP / "cgroup.procs"
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs)]

    def _child_pid(self, timeout: float) -> int:
        assert self._unshare is not None
        deadline = time.monotonic() + timeout
        path = f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children"
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise TestHostError(f"unshare exited {self._unshare.returncode}")
            with contextlib.suppress(OSError):
                children = Path(path).read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.01)
        raise TestHostError("unshare did not fork")

    def _wait_ready(self, deadline: float) -> None:
        assert self._unshare is not None
        while True:
            if self._unshare.poll() is not None:
                raise TestHostError(f"systemd exited ({self._unshare.returncode})")
            if self._is_systemd():
                r = subprocess.run(self._nsenter(["machinectl", "list"]),
                                   capture_output=True, timeout=10)
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TestHostError("timed out waiting for `machinectl list`")
            time.sleep(0.05)

    def _is_systemd(self) -> bool:
        try:
            return os.readlink(f"/proc/{self.pid}/exe").endswith("/systemd")
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        proc, self._unshare = self._unshare, None
        if proc is not None:
            if proc.poll() is None and self.pid:
                self._end_commands()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd's "poweroff"
            try:
                self._wait_poweroff(proc, timeout)
            except subprocess.TimeoutExpired:
                # Killing the namespace's PID 1 takes every process in it along.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmp is not None:
            root = str(self.tmp / "root")
            # Mounted in the private namespace, so normally gone already; be sure anyway.
            with open("/proc/self/mountinfo") as f:
                if any(line.split()[4] == root for line in f):
                    subprocess.run(["umount", "-l", root], check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)
            self.cgroup = None
        self.pid = 0

    def _commands(self) -> list[int]:
        if self.cgroup is None:
            return []
        try:
            text = (self.cgroup / COMMANDS_CGROUP / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def _end_commands(self, grace: float = 5) -> None:
        """End what run()/popen() started and is still running, before the poweroff.

        A command's parent is its nsenter, outside the pid namespace. Were it alive
        at poweroff, systemd-shutdown (which can only wait for its own children) would
        see it end only at its next 10 s poll; and a command whose nsenter died first
        is reparented to the host's init, not to the test host's. So end the commands
        inside (SIGTERM, then SIGKILL) while their nsenters live to reap them, and only
        then kill what is left of the cgroup (the nsenters).
        """
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        except OSError:
            return

        def inside() -> list[int]:
            found = []
            for pid in self._commands():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                        found.append(pid)
            return found

        # Repeat the signal: an nsenter caught between setns() and fork() gets its
        # command into the namespace only later. Done when the nsenters are gone.
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            signalled: set[int] = set()
            deadline = time.monotonic() + wait
            while self._commands() and time.monotonic() < deadline:
                for pid in set(inside()) - signalled:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                        os.kill(pid, signal.SIGCONT)
                    signalled.add(pid)
                time.sleep(0.02)
        if self.cgroup is not None and self._commands():
            with contextlib.suppress(OSError):
                (self.cgroup / COMMANDS_CGROUP / "cgroup.kill").write_text("1")

    def _wait_poweroff(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for systemd to exit, keeping nsenter from stalling the shutdown.

        systemd-shutdown SIGSTOPs every process of its pid namespace before it sends
        SIGTERM and SIGCONT. nsenter, waiting outside the namespace for a command it
        started, mirrors the stop onto itself and, being out of systemd's reach, is
        never continued: the command becomes a zombie nobody reaps and the shutdown
        waits for it for 90 s. So keep continuing the nsenters in our cgroup.
        """
        deadline = time.monotonic() + timeout
        while True:
            for pid in self._commands():  # started after _end_commands(): rare, but
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            try:
                proc.wait(0.1)
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise

    def log(self) -> str:
        """What the boot script and systemd printed (until stop() removes it)."""
        if self.tmp is None:
            return ""
        text = ""
        for name in ("systemd.log", "console.log"):  # boot script, then systemd's console
            with contextlib.suppress(OSError):
                text += (self.tmp / name).read_text(errors="replace")
        return text

    def __enter__(self) -> TestHost:
        return self if self._unshare is not None else self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- running commands inside -----------------------------------------------------------

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        # -r and -w: without the test host's root, machinectl and friends say
        # "System has not been booted with systemd".
        return ["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", *argv]

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host-side argv that runs `argv` inside, in the test host's cgroup tree."""
        if not self.pid:
            raise TestHostError("test host is not running")
        # nsenter leaves the process in the caller's cgroup, outside the test host's
        # tree; its systemd then cannot move it (or a child, e.g. a container leader)
        # into a scope. So join the tree first, from the host side, then nsenter.
        return [*self._join_cgroup_argv(boot=False), *self._nsenter(argv)]

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60,
            check: bool = False, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=check, env=env)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside; returns once it runs in the test host's pid namespace.

        Waiting for nsenter's fork makes stop() right after popen() see the command.
        Note that Popen.kill() signals the nsenter, not the command inside.
        """
        proc = subprocess.Popen(self.command(argv), **kw)
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if Path(children).read_text().strip():
                    break
            time.sleep(0.001)
        return proc

    def shell(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script], **kw)
