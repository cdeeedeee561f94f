# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy debuild`: build the Debian source package in the current directory
in a throw-away container, as pflask-debuild did.

`--create` makes a build root per distribution, suite and architecture (our
bootstrap, mmdebstrap's buildd variant) under /var/cache/machinepy/debuild.  A
build runs `machinepy run --ephemeral` over that root, so whatever the build
installs or writes vanishes with the container and the cached root never
changes.  Inside, as root: apt-get update and `apt-get build-dep ./` on a copy
of the source tree; then dpkg-buildpackage as an unprivileged build user (the
source tree's owner's uid, 1000 for a root-owned tree).  The results (.deb,
.changes, .buildinfo, .dsc, source tarballs) and the build log (.build) land
in the source tree's parent directory, owned as that directory is; the source
tree itself is left as it was.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from machinepy.cli import bootstrap as bs
from machinepy.cli.args import Parser, UsageError
from machinepy.core.spec import SpecError, quote

CACHE_DIR = Path("/var/cache/machinepy/debuild")
BUILD_USER = "builder"
PHASE = "@@machinepy-debuild@@ "
# pflask-debuild's suite aliases: DIST=sid and DIST=unstable mean the same.
ALIASES = {"unstable": "sid"}

# Runs as the container's root: $1 source directory name, $2 build uid, $3 gid,
# $4 result owner uid, $5 gid; the rest goes to dpkg-buildpackage.
SCRIPT = r"""
set -eu
src=$1 uid=$2 gid=$3 ouid=$4 ogid=$5
shift 5
phase() { echo "@@machinepy-debuild@@ $*"; }
export DEBIAN_FRONTEND=noninteractive
phase updating package lists
apt-get -q update
phase copying the source tree
getent group "$gid" >/dev/null || groupadd -g "$gid" builder
useradd -u "$uid" -g "$gid" -o -m -d /home/builder -s /bin/sh builder
mkdir /build
cp -a "/results/$src" "/build/$src"
chown -R "$uid:$gid" /build
cd "/build/$src"
phase installing build dependencies
apt-get -q -y --no-install-recommends build-dep ./
phase building
runuser -u builder -- env HOME=/home/builder dpkg-buildpackage -us -uc "$@"
phase copying results
for f in /build/*; do
    [ -f "$f" ] || continue
    cp "$f" /results/
    chown "$ouid:$ogid" "/results/${f##*/}"
    echo "result: ${f##*/}"
done
"""


class BuildProgress(bs.Progress):
    """The phase the build script announces, on one line; silent off a terminal."""

    def __init__(self, log: TextIO, stream: TextIO | None = None) -> None:
        super().__init__("debuild", stream)
        self.log = log  # every line, for the .build file
        self.results: list[str] = []
        self.lines = 0

    def feed(self, line: str) -> None:
        self.log.write(line)
        line = line.rstrip()
        if not line.strip():
            return
        self.lines += 1
        if line.startswith(PHASE):
            self.phase = line[len(PHASE):]
        elif line.startswith("result: "):
            self.results.append(line[8:])
        else:
            self.last = line
            if re.match(r"(E:|dpkg-\w+: error:|make: \*\*\*)", line):
                self.errors.append(line)
        self.draw()

    def text(self) -> str:
        return f"debuild: {self.phase} ({self.lines} lines of output)"

    def failure(self) -> str:
        return self.errors[-1] if self.errors else self.last or "no output"


def _host_arch() -> str:
    r = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else os.uname().machine


def _host_codename() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return ""


def parser() -> Parser:
    p = Parser(prog="machinepy debuild",
               description="Build the Debian source package in the current directory in an "
               "ephemeral container; results go to the parent directory.")
    p.add_argument("--create", action="store_true",
                   help="make (or remake) the build root for the distribution and suite")
    p.add_argument("--distribution", choices=sorted(bs.DISTRIBUTIONS), default="debian")
    p.add_argument("--suite", metavar="SUITE",
                   help="default: $DIST (as pflask-debuild), else the host's release")
    p.add_argument("--mirror", metavar="URL", help="as for bootstrap")
    p.add_argument("--cache-dir", metavar="DIR", default=str(CACHE_DIR),
                   help=f"where build roots are kept (default {CACHE_DIR})")
    p.add_argument("-C", "--directory", metavar="DIR", default=".",
                   help="the source package (default: the current directory)")
    p.add_argument("buildpackage_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="more dpkg-buildpackage options")
    return p


def build_root(args: argparse.Namespace) -> tuple[Path, str]:
    dist = bs.DISTRIBUTIONS[args.distribution]
    suite = args.suite or os.environ.get("DIST") or (
        _host_codename() if bs._host_id() == args.distribution else "") or dist.suite
    suite = ALIASES.get(suite, suite)
    if not re.fullmatch(bs.SUITE_RE, suite):
        raise UsageError(f"invalid suite {quote(suite)}")
    return Path(args.cache_dir) / f"{args.distribution}-{suite}-{_host_arch()}", suite


def create(args: argparse.Namespace, root: Path, suite: str) -> int:
    mirror = (args.mirror or bs.host_mirror(args.distribution)).rstrip("/")
    if not re.match(r"(https?|file)://\S+$", mirror):
        raise UsageError(f"invalid mirror {quote(mirror)}")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Remade beside the old one, which stays usable until the new one is complete.
    new = root.with_name(f"{root.name}.new-{os.getpid()}")
    req = bs.Request(new, "debuild", args.distribution, suite, mirror, ("fakeroot",),
                     bs.RootPassword("locked"), "auto", variant="buildd")
    seconds = bs.bootstrap(req)
    old = root.with_name(f"{root.name}.old-{os.getpid()}")
    if root.exists():
        os.rename(root, old)
    os.rename(new, root)
    shutil.rmtree(old, ignore_errors=True)
    if sys.stderr.isatty():
        print(f"{root}: build root for {args.distribution} {suite} in {seconds:.0f} s",
              file=sys.stderr)
    return 0


def _changelog(src: Path) -> tuple[str, str]:
    try:
        first = (src / "debian/changelog").read_text().split("\n", 1)[0]
    except OSError as e:
        raise UsageError(f"{quote(str(src))}: not a Debian source package (debian/changelog: "
                         f"{e.strerror})") from None
    m = re.match(r"([a-z0-9][a-z0-9+.-]+) \(([^)\s]+)\)", first)
    if not m:
        raise UsageError(f"{quote(str(src / 'debian/changelog'))}: first line is not "
                         "'PACKAGE (VERSION) ...'")
    if not (src / "debian/control").is_file():
        raise UsageError(f"{quote(str(src))}: not a Debian source package (no debian/control)")
    return m.group(1), m.group(2)


def build(args: argparse.Namespace, root: Path, suite: str) -> int:
    src = Path(args.directory).resolve()
    package, version = _changelog(src)
    if src.parent == src:
        raise UsageError("the source tree may not be /")
    # bootstrap renames a root into place only once it is complete.
    if not (root / "usr/bin/dpkg-buildpackage").exists():
        raise bs.BootstrapError(f"no build root for {args.distribution} {suite} at {root}; "
                                f"make one with: machinepy debuild --create --suite {suite}")
    st, parent_st = src.stat(), src.parent.stat()
    uid, gid = (st.st_uid, st.st_gid) if st.st_uid != 0 else (1000, 1000)
    from machinepy.core.sd import can_register

    extra = list(args.buildpackage_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    argv = [sys.executable, "-m", "machinepy", "run", "--ephemeral", "-r", str(root),
            "-t", "debuild", f"--register={'yes' if can_register() else 'no'}",
            "-m", f"bind:{_escape(str(src.parent))}:/results",
            "-m", "bind-ro:/etc/resolv.conf:/etc/resolv.conf",
            "--", "/bin/sh", "-c", SCRIPT, "debuild", src.name, str(uid), str(gid),
            str(parent_st.st_uid), str(parent_st.st_gid), *extra]
    version = version.split(":", 1)[-1]  # no epoch in file names
    log_path = src.parent / f"{package}_{version}_{_host_arch()}.build"
    with open(log_path, "w") as log, bs.signals_raise():
        os.fchown(log.fileno(), parent_st.st_uid, parent_st.st_gid)
        progress = BuildProgress(log)
        status = bs.run_tool(argv, progress)
    if status != 0:
        raise bs.BootstrapError(f"{package} {version}: build failed (exit {status}): "
                                f"{progress.failure()} (log: {log_path})")
    for name in progress.results:
        print(src.parent / name)
    return 0


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def main(argv: Sequence[str]) -> int:
    try:
        args = parser().parse_args(list(argv))
        root, suite = build_root(args)
        if not args.create:
            _changelog(Path(args.directory).resolve())
        if os.geteuid() != 0:
            raise UsageError("debuild must be run as root")
        if args.create:
            if args.buildpackage_args:
                raise UsageError("--create takes no dpkg-buildpackage arguments")
            return create(args, root, suite)
        return build(args, root, suite)
    except (UsageError, SpecError) as e:
        print(f"machinepy: {e}", file=sys.stderr)
        return 2
    except bs.BootstrapError as e:
        print(f"machinepy: debuild: {e}", file=sys.stderr)
        return e.status
    except bs.Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
