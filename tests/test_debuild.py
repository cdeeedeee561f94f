# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy debuild`: a tiny native package, written here, built in an ephemeral
container over a cached build root (tests/rootfs.py cached_debuild_root)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rootfs import cached_debuild_root

REPO = Path(__file__).resolve().parent.parent
MACHINEPY = [sys.executable, "-m", "machinepy"]
OWNER = 4321  # a non-root owner of the source tree and its parent

CONTROL = """\
Source: hello-mpy
Section: misc
Priority: optional
Maintainer: machinepy tests <tests@example.org>
Build-Depends: bc
Rules-Requires-Root: no
Standards-Version: 4.6.2

Package: hello-mpy
Architecture: all
Description: machinepy debuild test package
 Written and built by tests/test_debuild.py.
"""
CHANGELOG = """\
hello-mpy (1.0) unstable; urgency=medium

  * Test build.

 -- machinepy tests <tests@example.org>  Tue, 01 Dec 2026 12:00:00 +0000
"""
# No debhelper: the package's only build dependency is bc (not in the build root),
# and the build fails when it runs as root.
RULES = """\
#!/usr/bin/make -f
build build-arch build-indep:
\techo "2+3" | bc > answer
\ttest "$$(id -u)" != 0
\tid -u > builder-uid
binary binary-arch binary-indep: build
\tmkdir -p debian/tmp/DEBIAN debian/tmp/usr/share/hello-mpy
\tcp answer builder-uid debian/tmp/usr/share/hello-mpy/
\tdpkg-gencontrol -phello-mpy -Pdebian/tmp
\tdpkg-deb --root-owner-group --build debian/tmp ..
clean:
\trm -rf debian/tmp debian/files answer builder-uid
"""
RESULTS = ["hello-mpy_1.0.dsc", "hello-mpy_1.0.tar.xz", "hello-mpy_1.0_all.deb",
           "hello-mpy_1.0_{arch}.buildinfo", "hello-mpy_1.0_{arch}.changes"]


def write_package(parent: Path, rules: str = RULES) -> Path:
    src = parent / "hello-mpy"
    (src / "debian/source").mkdir(parents=True)
    (src / "debian/control").write_text(CONTROL)
    (src / "debian/changelog").write_text(CHANGELOG)
    (src / "debian/source/format").write_text("3.0 (native)\n")
    (src / "debian/rules").write_text(rules)
    (src / "debian/rules").chmod(0o755)
    for path in (parent, *parent.rglob("*")):
        os.lchown(path, OWNER, OWNER)
    return src


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() and not p.is_symlink() else "" for p in path.rglob("*")}


def assert_one_line(r: subprocess.CompletedProcess[str], status: int, fragment: str) -> None:
    assert r.returncode == status, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("machinepy: "), r.stderr
    assert fragment in lines[0], r.stderr


def test_not_a_source_package_is_one_line(tmp_path: Path) -> None:
    r = run(["debuild", "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path)
    assert_one_line(r, 2, "not a Debian source package (debian/changelog: No such file")
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian/changelog").write_text("garbage\n")
    r = run(["debuild", "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path)
    assert_one_line(r, 2, "first line is not 'PACKAGE (VERSION) ...'")
    r = run(["debuild", "--suite", "no suite"], cwd=tmp_path)
    assert_one_line(r, 2, "invalid suite 'no suite'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debian"]


@pytest.mark.root
def test_missing_build_root_says_how_to_make_one(tmp_path: Path) -> None:
    src = write_package(tmp_path / "work")
    r = run(["debuild", "--cache-dir", str(tmp_path / "cache"), "--suite", "sid"], cwd=src)
    assert_one_line(r, 1, "no build root for debian sid at ")
    assert "machinepy debuild --create --suite sid" in r.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["hello-mpy"]
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def build_root() -> Path:
    return cached_debuild_root()


@pytest.mark.root
def test_builds_the_package_as_its_owner_and_leaves_the_root_alone(
    tmp_path: Path, build_root: Path
) -> None:
    work = tmp_path / "work"
    src = write_package(work)
    source_before, root_before = tree(src), tree(build_root / "var/lib/dpkg")
    arch = build_root.name.rsplit("-", 1)[1]
    r = run(["debuild", "--cache-dir", str(build_root.parent), "--suite",
             build_root.name.split("-")[1]], cwd=src)
    assert r.returncode == 0, r.stderr + (work / f"hello-mpy_1.0_{arch}.build").read_text()
    results = [name.format(arch=arch) for name in RESULTS]
    assert r.stdout.split() == [str(work / name) for name in results]
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["hello-mpy", f"hello-mpy_1.0_{arch}.build", *results])
    for p in work.iterdir():
        assert (p.stat().st_uid, p.stat().st_gid) == (OWNER, OWNER), p
    # What the build made is in the package: bc ran, as the tree's owner, not root.
    out = tmp_path / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(work / "hello-mpy_1.0_all.deb"), str(out)], check=True)
    assert (out / "usr/share/hello-mpy/answer").read_text() == "5\n"
    assert (out / "usr/share/hello-mpy/builder-uid").read_text() == f"{OWNER}\n"
    # Neither the source tree nor the cached root changed (bc was installed inside only).
    assert tree(src) == source_before
    assert tree(build_root / "var/lib/dpkg") == root_before
    assert not (build_root / "usr/bin/bc").exists()


@pytest.mark.root
def test_failed_build_is_one_line_with_the_log(tmp_path: Path, build_root: Path) -> None:
    work = tmp_path / "work"
    src = write_package(work, RULES.replace('\techo "2+3" | bc > answer\n',
                                            "\techo compiler says no >&2; false\n"))
    r = run(["debuild", "--cache-dir", str(build_root.parent), "--suite",
             build_root.name.split("-")[1]], cwd=src)
    arch = build_root.name.rsplit("-", 1)[1]
    log = work / f"hello-mpy_1.0_{arch}.build"
    assert_one_line(r, 1, "hello-mpy 1.0: build failed (exit ")
    assert f"(log: {log})" in r.stderr
    assert "compiler says no" in log.read_text()
    assert sorted(p.name for p in work.iterdir()) == ["hello-mpy", log.name]


@pytest.mark.parametrize("env, argv, suite", [
    ({"DIST": "sid"}, [], "sid"),
    ({"DIST": "unstable"}, [], "sid"),  # pflask-debuild's alias
    ({"DIST": "sid"}, ["--suite", "trixie"], "trixie"),  # the option wins
    ({}, ["--distribution", "ubuntu", "--suite", "noble"], "noble"),
])
def test_build_root_per_distribution_and_suite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               env: dict[str, str], argv: list[str],
                                               suite: str) -> None:
    from machinepy.cli import debuild

    monkeypatch.delenv("DIST", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = debuild.parser().parse_args(["--cache-dir", str(tmp_path), *argv])
    root, got = debuild.build_root(args)
    assert got == suite
    assert root.parent == tmp_path
    assert root.name.startswith(f"{args.distribution}-{suite}-")
