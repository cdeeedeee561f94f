# SPDX-License-Identifier: BSD-2-Clause
"""Root filesystems for tests and benchmarks, cached outside the repository.

A busybox rootfs (seconds to build, a few hundred symlinks) for chroot tests,
and a minimal Debian (debootstrap, minutes) for booting systemd in a container.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
STAMP = ".machinepy-rootfs-ok"
DEFAULT_CACHE = Path("/var/cache/machinepy-tests")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = "systemd,dbus,systemd-sysv,iproute2,login,passwd,util-linux"

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
user:x:1000:
nogroup:x:65534:
"""
OS_RELEASE = """\
NAME="machinepy busybox"
ID=busybox
PRETTY_NAME="machinepy busybox test rootfs"
"""


def cache_dir() -> Path:
    return Path(os.environ.get("MACHINEPY_TEST_CACHE") or DEFAULT_CACHE)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builders across processes (parallel pytest sessions, CI + bench)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _symlink(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


def build_busybox_rootfs(dest: Path) -> Path:
    """Populate `dest` with a static-busybox rootfs; safe to call again on the same dir."""
    dest = Path(dest)
    bindir = dest / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    binary = bindir / "busybox"
    # copy2 through a temp name: a symlink left at bin/busybox must not be followed.
    tmp = bindir / ".busybox.new"
    shutil.copy2(BUSYBOX, tmp)
    os.replace(tmp, binary)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            _symlink(bindir / applet, "busybox")
    _symlink(dest / "sbin", "bin")
    (dest / "usr").mkdir(exist_ok=True)
    _symlink(dest / "usr/bin", "../bin")
    _symlink(dest / "usr/sbin", "../bin")
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "home/user", "mnt", "var", "etc"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    os.chown(dest / "home/user", 1000, 1000)
    etc = dest / "etc"
    _write(etc / "passwd", PASSWD)
    _write(etc / "group", GROUP)
    _write(etc / "hostname", "busybox\n")
    _write(etc / "os-release", OS_RELEASE)
    return dest


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_busybox_rootfs() -> Path:
    """Build the busybox rootfs once per cache dir; rebuilt when /bin/busybox changes."""
    root = cache_dir() / "busybox"
    stamp = root / STAMP
    want = _fingerprint(BUSYBOX)
    if stamp.exists() and stamp.read_text() == want:
        return root
    with _locked(cache_dir() / ".busybox.lock"):
        if stamp.exists() and stamp.read_text() == want:
            return root
        if stamp.exists():
            stamp.unlink()
        build_busybox_rootfs(root)
        stamp.write_text(want)
    return root


def debian_mirror() -> str:
    """The mirror apt already uses here (the only one reachable on the test machines)."""
    for name in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines():
                m = re.match(r"\s*URIs:\s*(\S+)", line)
                if m and "security" not in m.group(1):
                    return m.group(1)
    return DEFAULT_MIRROR


def cached_debian_rootfs() -> Path:
    """A debootstrapped Debian with systemd, built once (about 2 minutes) and reused."""
    root = cache_dir() / "debian"
    stamp = root / STAMP
    if stamp.exists():
        return root
    with _locked(cache_dir() / ".debian.lock"):
        if stamp.exists():
            return root
        if root.exists():  # an unfinished or pre-stamp build: start over
            shutil.rmtree(root)
        # Build beside the final path (same filesystem) so the rename is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=".debian-build-", dir=cache_dir()))
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}",
                 DEBIAN_SUITE, str(tmp), debian_mirror()],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
            subprocess.run(["chroot", str(tmp), "chpasswd"], input="root:root\n", text=True,
                           check=True)
            # Empty, not absent: systemd then takes the id the container manager passes.
            (tmp / "etc/machine-id").write_text("")
            (tmp / STAMP).write_text(f"{DEBIAN_SUITE} {DEBIAN_PACKAGES}\n")
            os.chmod(tmp, 0o755)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


BOOTSTRAP_HOSTNAME = "bootstrapped"
BOOTSTRAP_PASSWORD = "root"


def cached_bootstrap_rootfs() -> Path:
    """A tree made by our own `machinepy bootstrap` (about 30 s), root's password
    BOOTSTRAP_PASSWORD; rebuilt when machinepy/cli/bootstrap.py changes."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    root = cache_dir() / "bootstrap"
    stamp = root / STAMP
    want = _fingerprint(repo / "machinepy/cli/bootstrap.py")
    if stamp.exists() and stamp.read_text() == want:
        return root
    with _locked(cache_dir() / ".bootstrap.lock"):
        if stamp.exists() and stamp.read_text() == want:
            return root
        if root.exists():
            shutil.rmtree(root)
        fd, password_file = tempfile.mkstemp(prefix=".bootstrap-password-", dir=cache_dir())
        try:
            os.write(fd, f"{BOOTSTRAP_PASSWORD}\n".encode())
            os.close(fd)
            # The bootstrap builds beside the target and leaves nothing on failure.
            r = subprocess.run(
                [sys.executable, "-m", "machinepy", "bootstrap", str(root),
                 f"--mirror={debian_mirror()}", f"--suite={DEBIAN_SUITE}",
                 f"--hostname={BOOTSTRAP_HOSTNAME}", f"--root-password-file={password_file}"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(repo)},
            )
            if r.returncode != 0:
                raise RuntimeError(f"machinepy bootstrap failed: {r.stderr.strip()}")
        finally:
            os.unlink(password_file)
        stamp.write_text(want)
    return root


def cached_debuild_root() -> Path:
    """`machinepy debuild --create`'s build root for DEBIAN_SUITE, made once (about 30 s)."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    root = cache_dir() / "debuild" / f"debian-{DEBIAN_SUITE}-{arch}"
    if root.exists():  # put in place only once complete
        return root
    with _locked(cache_dir() / ".debuild.lock"):
        if not root.exists():
            r = subprocess.run(
                [sys.executable, "-m", "machinepy", "debuild", "--create",
                 f"--cache-dir={root.parent}", f"--suite={DEBIAN_SUITE}",
                 f"--mirror={debian_mirror()}"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(repo)},
            )
            if r.returncode != 0:
                raise RuntimeError(f"machinepy debuild --create failed: {r.stderr.strip()}")
    return root
