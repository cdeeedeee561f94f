# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy bootstrap DIR|NAME`: a bootable Debian or Ubuntu tree in one command.

mmdebstrap (or debootstrap when it is missing) builds the tree in a private
mount namespace, so the proc, sys and dev mounts it makes inside the target
never show in the host's mount table; then the tree is made ready to boot:
an empty machine-id (the container manager's id, or a new one on first boot),
its hostname, and root's password as asked.  A tree we created is removed
again on any failure, Ctrl-C and SIGTERM included.

Imported only for this verb (and `debuild`): `machinepy run` never pays for it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from machinepy.cli import run as cli
from machinepy.cli.args import Parser, UsageError
from machinepy.cli.run import machine_path
from machinepy.core.spec import SpecError, check_hostname, quote

MACHINES_DIR = Path(cli.MACHINES_DIR)
# What a tree needs to boot under machinepy and answer `machinectl login`.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "login", "passwd", "util-linux")
PACKAGE_RE = r"[a-z0-9][a-z0-9+.-]+"
SUITE_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*"
TOOLS = ("mmdebstrap", "debootstrap")


@dataclass(frozen=True)
class Distribution:
    suite: str  # the default
    mirror: str  # the default, unless the host runs this distribution (host_mirror)
    components: tuple[str, ...]


DISTRIBUTIONS = {
    "debian": Distribution("bookworm", "http://deb.debian.org/debian", ("main",)),
    "ubuntu": Distribution("noble", "http://archive.ubuntu.com/ubuntu", ("main", "universe")),
}


class BootstrapError(Exception):
    """One line for the user; status 1 (a failure) or 2 (bad input)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------------
# Where packages come from


def _host_id(os_release: Path = Path("/etc/os-release")) -> str:
    with contextlib.suppress(OSError):
        for line in os_release.read_text().splitlines():
            if line.startswith("ID="):
                return line[3:].strip().strip('"')
    return ""


def _apt_uris(etc_apt: Path = Path("/etc/apt")) -> Iterator[str]:
    """The archive URIs the host's apt uses, deb822 files first, then one-line ones."""
    for name in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for line in name.read_text().splitlines():
                m = re.match(r"\s*URIs:\s*(.+)", line)
                if m:
                    yield from m.group(1).split()
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for name in lists:
        with contextlib.suppress(OSError):
            for line in name.read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
                if m:
                    yield m.group(1)


def host_mirror(distribution: str, etc: Path = Path("/etc")) -> str:
    """The mirror the host's apt already uses when it runs `distribution` (often the
    only one a build machine may reach), else the distribution's public archive."""
    if _host_id(etc / "os-release") == distribution:
        for uri in _apt_uris(etc / "apt"):
            if "security" not in uri and uri.startswith(("http://", "https://", "file:")):
                return uri.rstrip("/")
    return DISTRIBUTIONS[distribution].mirror


def check_mirror(mirror: str, suite: str, timeout: float = 20) -> None:
    """Fail early, in one line, when the mirror is unreachable or lacks the suite."""
    import urllib.error
    import urllib.request

    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            reply.read(1)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise BootstrapError(f"no suite {quote(suite)} at {mirror} ({url}: not found)",
                                 2) from None
        raise BootstrapError(f"mirror {mirror}: {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, FileNotFoundError):
            raise BootstrapError(f"no suite {quote(suite)} at {mirror} ({url}: not found)",
                                 2) from None
        raise BootstrapError(f"cannot reach mirror {mirror}: {reason}") from None


# ---------------------------------------------------------------------------
# Running the tool, with a progress line on a terminal


class Progress:
    """Counts what mmdebstrap --verbose (apt, dpkg) or debootstrap print, and keeps
    one line up to date on a terminal; silent otherwise."""

    def __init__(self, tool: str, stream: TextIO | None = None) -> None:
        self.tool = tool
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.phase = "starting"
        self.fetched = self.unpacked = self.configured = 0
        self.errors: list[str] = []
        self.last = ""
        self._drawn = 0.0

    def feed(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        self.last = line
        if line.startswith("E:"):
            self.errors.append(line[2:].strip())
        if re.match(r"Get:\d+ ", line) or line.startswith("I: Retrieving "):  # apt, debootstrap
            self.fetched += 1
        elif line.startswith(("Unpacking ", "I: Extracting ", "I: Unpacking ")):
            self.unpacked += 1
        elif line.startswith(("Setting up ", "I: Configuring ")):
            self.configured += 1
        elif line.startswith("I: "):
            self.phase = line[3:].rstrip(". ")
        self.draw()

    def text(self) -> str:
        return (f"{self.tool}: {self.phase} ({self.fetched} fetched, {self.unpacked} unpacked, "
                f"{self.configured} set up)")

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 80
        except (ValueError, OSError):
            width = 80
        self.stream.write("\r\x1b[K" + self.text()[: max(width - 1, 10)])
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def failure(self) -> str:
        return self.errors[0] if self.errors else self.last or "no output"


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt as Ctrl-C does, so the clean-up runs for them too."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_tool(argv: Sequence[str], progress: Progress, cwd: str | None = None) -> int:
    """Run argv in its own process group, its output through `progress`.

    On Ctrl-C or SIGTERM the whole group is ended (SIGTERM, then SIGKILL) before
    the interruption goes on, so nothing still writes into a tree being removed.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            progress.feed(raw.decode(errors="replace"))
        return proc.wait()
    except BaseException:
        _end_group(proc)
        raise
    finally:
        proc.stdout.close()
        progress.clear()


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        # The group may outlive its leader for a moment.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def private_mounts(argv: Sequence[str]) -> list[str]:
    """argv in a mount namespace of its own whose mounts never propagate to the host's."""
    return ["unshare", "--mount", "--propagation", "private", "--", *argv]


def find_tool(wanted: str) -> str:
    names = TOOLS if wanted == "auto" else (wanted,)
    for name in names:
        if shutil.which(name):
            return name
    if wanted == "auto":
        raise BootstrapError("neither mmdebstrap nor debootstrap is installed "
                             "(apt-get install mmdebstrap)")
    raise BootstrapError(f"{wanted} is not installed (apt-get install {wanted})")


def tool_argv(tool: str, suite: str, target: str, mirror: str, packages: Sequence[str],
              components: Sequence[str], variant: str = "minbase") -> list[str]:
    include = ",".join(packages)
    if tool == "mmdebstrap":
        # --verbose: apt's and dpkg's lines, which the progress line counts.
        argv = ["mmdebstrap", "--mode=root", f"--variant={variant}", "--verbose",
                f"--include={include}", f"--components={','.join(components)}",
                suite, target, mirror]
    else:
        argv = ["debootstrap", f"--variant={variant}", f"--include={include}",
                f"--components={','.join(components)}", suite, target, mirror]
    return private_mounts(argv)


# ---------------------------------------------------------------------------
# Making the tree ready to boot


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file in the new tree, never through a symlink planted there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass(frozen=True)
class RootPassword:
    kind: str  # "locked" (as the tool leaves it), "plain", "hashed" or "empty"
    value: str = ""


def configure(root: Path, hostname: str, password: RootPassword) -> None:
    etc = root / "etc"
    # Empty, not absent: systemd takes the container manager's id (container_uuid),
    # or makes one on first boot, and never thinks the tree is a template.
    _write(etc / "machine-id", "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    _write(etc / "hostname", f"{hostname}\n")
    _write(etc / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
           "::1\tlocalhost ip6-localhost ip6-loopback\n")
    # (A console getty needs nothing here: in a container systemd's getty-generator
    # starts console-getty.service, and machinectl login a container-getty@.)
    if password.kind == "locked":
        return
    if password.kind == "empty":
        argv, stdin = ["passwd", "--quiet", "--delete", "root"], ""
    elif password.kind == "hashed":
        argv, stdin = ["chpasswd", "--encrypted"], f"root:{password.value}\n"
    else:
        argv, stdin = ["chpasswd"], f"root:{password.value}\n"
    r = subprocess.run(["chroot", str(root), *argv], input=stdin, text=True,
                       capture_output=True)
    if r.returncode != 0:
        raise BootstrapError(f"setting root's password: {argv[0]}: "
                             f"{(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")


# ---------------------------------------------------------------------------
# The verb


def parser() -> Parser:
    p = Parser(prog="machinepy bootstrap",
               description="Make a bootable Debian or Ubuntu tree (mmdebstrap, else "
               "debootstrap). NAME means /var/lib/machines/NAME.")
    p.add_argument("target", metavar="DIR|NAME",
                   help="directory to create (must not exist, or be empty)")
    p.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="debian")
    p.add_argument("--suite", metavar="SUITE",
                   help="release (default: bookworm for debian, noble for ubuntu)")
    p.add_argument("--mirror", metavar="URL",
                   help="archive (default: the host's apt mirror for its own distribution)")
    p.add_argument("--include", action="append", default=[], metavar="PKG[,...]",
                   help=f"more packages (always: {', '.join(BASE_PACKAGES)})")
    p.add_argument("--hostname", metavar="NAME", help="hostname (default: the directory's name)")
    p.add_argument("--tool", choices=("auto", *TOOLS), default="auto",
                   help="auto: mmdebstrap when installed, else debootstrap")
    pw = p.add_mutually_exclusive_group()
    pw.add_argument("--root-password-file", metavar="FILE",
                    help="root's password: the first line of FILE")
    pw.add_argument("--root-password-hashed", metavar="HASH",
                    help="root's password as a crypt(3) hash ($y$…, $6$…)")
    pw.add_argument("--no-root-password", action="store_true",
                    help="root logs in without a password")
    return p


@dataclass(frozen=True)
class Request:
    target: Path
    hostname: str
    distribution: str
    suite: str
    mirror: str
    packages: tuple[str, ...]
    password: RootPassword
    tool: str
    variant: str = "minbase"  # "buildd" for debuild's build roots


def request_from_args(args: argparse.Namespace) -> Request:
    """Everything checked that can be checked without touching the host."""
    if not args.target:
        raise UsageError("empty target")
    target, name = machine_path(args.target)
    hostname = args.hostname or name or Path(target).name
    try:
        check_hostname(hostname)
    except SpecError:
        if args.hostname or name:
            raise
        raise UsageError(f"{quote(Path(target).name)} is no valid hostname; "
                         "give one with --hostname") from None
    dist = DISTRIBUTIONS[args.distribution]
    suite = args.suite or dist.suite
    if not re.fullmatch(SUITE_RE, suite):
        raise UsageError(f"invalid suite {quote(suite)}")
    mirror = (args.mirror or host_mirror(args.distribution)).rstrip("/")
    if not re.match(r"(https?|file)://\S+$", mirror):
        raise UsageError(f"invalid mirror {quote(mirror)}: expected an http://, https:// or "
                         "file:// URL")
    extra = [p for item in args.include for p in item.split(",") if p]
    for pkg in extra:
        if not re.fullmatch(PACKAGE_RE, pkg):
            raise UsageError(f"invalid package name {quote(pkg)}")
    packages = tuple(dict.fromkeys((*BASE_PACKAGES, *extra)))
    password = RootPassword("locked")
    if args.root_password_file is not None:
        try:
            with open(args.root_password_file) as f:
                first = f.readline().rstrip("\n")
        except OSError as e:
            raise UsageError(f"--root-password-file: {quote(args.root_password_file)}: "
                             f"{e.strerror}") from None
        if not first:
            raise UsageError(f"--root-password-file: {quote(args.root_password_file)}: first line "
                             "is empty (use --no-root-password for no password)")
        if ":" in first:  # chpasswd's separator
            raise UsageError("--root-password-file: the password may not contain ':'")
        password = RootPassword("plain", first)
    elif args.root_password_hashed is not None:
        h = args.root_password_hashed
        if not re.fullmatch(r"\$[A-Za-z0-9]+\$[./A-Za-z0-9$=,+-]+", h):
            raise UsageError(f"--root-password-hashed: {quote(h)} is no crypt(3) hash "
                             "(expected $ID$…, e.g. from `mkpasswd` or `openssl passwd -6`)")
        password = RootPassword("hashed", h)
    elif args.no_root_password:
        password = RootPassword("empty")
    return Request(Path(target), hostname, args.distribution, suite, mirror, packages,
                   password, args.tool)


def _check_target(target: Path) -> bool:
    """True when the target exists already (empty); fails when it cannot be made."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BootstrapError(f"{quote(str(target))}: exists and is not a directory", 2)
    if target.is_dir():
        if any(target.iterdir()):
            raise BootstrapError(f"{quote(str(target))}: exists and is not empty", 2)
        return True
    if target.parent != MACHINES_DIR and not target.parent.is_dir():
        raise BootstrapError(f"{quote(str(target.parent))}: no such directory", 2)
    return False


def bootstrap(req: Request, progress_stream: TextIO | None = None,
              on_step: Callable[[str], None] | None = None) -> float:
    """Build req.target; returns the seconds it took. Nothing is left on failure."""
    t0 = time.monotonic()
    existed = _check_target(req.target)
    tool = find_tool(req.tool)
    check_mirror(req.mirror, req.suite)
    if not existed and req.target.parent == MACHINES_DIR:
        MACHINES_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)  # as machined makes it
    # Build beside the target (same filesystem) and rename: a half-made tree never
    # has the final name.  An empty directory given to us is built in place.
    work = req.target if existed else Path(
        tempfile.mkdtemp(prefix=f".{req.target.name}.bootstrap-", dir=req.target.parent))
    progress = Progress(tool, progress_stream)
    try:
        argv = tool_argv(tool, req.suite, str(work), req.mirror, req.packages,
                         DISTRIBUTIONS[req.distribution].components, req.variant)
        with signals_raise():
            status = run_tool(argv, progress)
            if status != 0:
                raise BootstrapError(f"{tool} failed (exit {status}): {progress.failure()}")
            configure(work, req.hostname, req.password)
            os.chmod(work, 0o755)
            if not existed:
                try:
                    os.mkdir(req.target)  # fails if someone made it meanwhile
                except FileExistsError:
                    raise BootstrapError(f"{req.target}: appeared while bootstrapping",
                                         1) from None
                os.rename(work, req.target)  # replaces the empty directory just made
    except BaseException:
        _remove(work, keep_top=existed)
        raise
    return time.monotonic() - t0


def _remove(path: Path, keep_top: bool) -> None:
    if not keep_top:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def main(argv: Sequence[str]) -> int:
    try:
        req = request_from_args(parser().parse_args(list(argv)))
        if os.geteuid() != 0:
            raise UsageError("bootstrap must be run as root")
        seconds = bootstrap(req)
    except (UsageError, SpecError) as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2
    except BootstrapError as e:
        print(f"machinepy: bootstrap: {e}", file=sys.stderr)
        return e.status
    except Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    if sys.stderr.isatty():
        shown = req.target.name if req.target.parent == MACHINES_DIR else str(req.target)
        print(f"{req.target}: {req.distribution} {req.suite} in {seconds:.0f} s; "
              f"boot it with: machinepy boot {shown}", file=sys.stderr)
        if req.password.kind == "locked":
            print("root has no password: give one with --root-password-file, or set it "
                  f"with: machinepy run -r {req.target} -- passwd", file=sys.stderr)
    return 0
