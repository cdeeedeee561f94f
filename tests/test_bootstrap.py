# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy bootstrap`: bad input, missing tools and mirrors, clean failures,
and the tree it makes (cached: tests/rootfs.py cached_bootstrap_rootfs)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machinepy.cli import bootstrap
from machinepy.cli import run as cli
from tests.rootfs import BOOTSTRAP_HOSTNAME, cached_bootstrap_rootfs, debian_mirror
from tests.test_userns import unprivileged_user  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
MACHINEPY = [sys.executable, "-m", "machinepy"]


def run(argv: list[str], cwd: Path, timeout: float = 120,
        **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MACHINEPY, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def assert_one_line(r: subprocess.CompletedProcess[str], status: int, fragment: str) -> None:
    assert r.returncode == status, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("machinepy: "), r.stderr
    assert fragment in lines[0], r.stderr


@pytest.mark.parametrize("argv, fragment", [
    ([], "the following arguments are required: DIR|NAME"),
    (["deb", "--distribution", "fedora"], "invalid choice: 'fedora'"),
    (["bad name!"], "invalid machine name 'bad name!'"),
    (["./tree", "--suite", "book worm"], "invalid suite 'book worm'"),
    (["./tree", "--include", "vim,Not_A_Package"], "invalid package name 'Not_A_Package'"),
    (["./tree", "--mirror", "ftp://ftp.debian.org/debian"], "invalid mirror"),
    (["./tree", "--hostname", "no spaces"], "invalid hostname 'no spaces'"),
    (["./my tree"], "'my tree' is no valid hostname; give one with --hostname"),
    (["./tree", "--root-password-file", "missing"], "'missing': No such file or directory"),
    (["./tree", "--root-password-hashed", "secret"], "is no crypt(3) hash"),
    (["./tree", "--no-root-password", "--root-password-hashed", "$6$a$b"], "not allowed with"),
    (["./tree", "--tool", "cdebootstrap"], "invalid choice: 'cdebootstrap'"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path: Path, argv: list[str],
                                                    fragment: str) -> None:
    r = run(["bootstrap", *argv], cwd=tmp_path)
    assert_one_line(r, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\nsecond line\n")
    r = run(["bootstrap", "./tree", "--root-password-file", "pw"], cwd=tmp_path)
    assert_one_line(r, 2, "first line is empty (use --no-root-password")
    assert [p.name for p in tmp_path.iterdir()] == ["pw"]


def test_name_or_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare NAME means /var/lib/machines/NAME unless it names something here, as
    with nspawn's -M; `bootstrap` and `boot` read it the same way."""
    monkeypatch.chdir(tmp_path)
    assert cli.machine_path("deb") == ("/var/lib/machines/deb", "deb")
    assert cli.machine_path("./deb") == (f"{tmp_path}/deb", None)
    assert cli.machine_path("srv/deb") == (f"{tmp_path}/srv/deb", None)
    (tmp_path / "deb").mkdir()
    assert cli.machine_path("deb") == (f"{tmp_path}/deb", None)


def test_boot_name_means_var_lib_machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "MACHINES_DIR", str(tmp_path / "machines"))
    (tmp_path / "machines/deb/sbin").mkdir(parents=True)
    (tmp_path / "machines/deb/sbin/init").symlink_to("/nonexistent")
    seen = {}

    def supervise(spec: object, **kw: object) -> int:
        seen["spec"] = spec
        return 0

    monkeypatch.setattr(cli, "_supervise", supervise)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["boot", "deb", "--register=no"]) == 0
    spec = seen["spec"]
    assert spec.root == f"{tmp_path}/machines/deb"  # type: ignore[attr-defined]
    assert spec.machine == "deb"  # type: ignore[attr-defined]
    assert spec.command == ("/sbin/init",)  # type: ignore[attr-defined]
    # --machine still wins; a bad NAME is one line.
    assert cli.main(["boot", "deb", "--machine", "other", "--register=no"]) == 0
    assert seen["spec"].machine == "other"  # type: ignore[attr-defined]
    assert cli.main(["boot", "no such"]) == 2
    assert "invalid machine name 'no such'" in capsys.readouterr().err


def test_host_mirror_is_what_apt_uses(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "apt/sources.list.d").mkdir(parents=True)
    (etc / "os-release").write_text('NAME="Debian"\nID=debian\n')
    (etc / "apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert bootstrap.host_mirror("debian", etc) == "http://mirror.example/debian"
    # Another distribution than the host's: that distribution's archive.
    assert bootstrap.host_mirror("ubuntu", etc) == "http://archive.ubuntu.com/ubuntu"
    (etc / "apt/sources.list.d/debian.sources").unlink()
    (etc / "apt/sources.list").write_text(
        "deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert bootstrap.host_mirror("debian", etc) == "http://old.example/debian"


def test_progress_counts_packages() -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            raise OSError

    out = Tty()
    p = bootstrap.Progress("mmdebstrap", out)
    for line in ["I: downloading packages with apt...", "Get:1 http://m/debian bookworm/main "
                 "amd64 mawk amd64 1.3.4 [119 kB]", "Get:2 http://m x", "Unpacking mawk ...",
                 "Setting up mawk ...", "E: Unable to locate package nope"]:
        p.feed(line + "\n")
        p.draw(force=True)
    assert p.text() == "mmdebstrap: downloading packages with apt (2 fetched, 1 unpacked, 1 set up)"
    assert out.getvalue().endswith("\r\x1b[K" + p.text())
    assert p.failure() == "Unable to locate package nope"
    quiet = io.StringIO()
    q = bootstrap.Progress("debootstrap", quiet)
    q.feed("I: Retrieving libc6 2.36\n")
    q.draw(force=True)
    assert q.fetched == 1 and quiet.getvalue() == ""  # not a terminal: silent


@pytest.mark.root
def test_unprivileged_user_is_refused(unprivileged_user: pwd.struct_passwd,  # noqa: F811
                                      tmp_path: Path) -> None:
    r = subprocess.run(["runuser", "-u", unprivileged_user.pw_name, "--", "env",
                        f"PYTHONPATH={REPO}", "/usr/bin/python3", "-m", "machinepy", "bootstrap",
                        "/var/tmp/mpytest-nonroot-tree"], capture_output=True, text=True,
                       cwd="/", timeout=30)
    assert_one_line(r, 2, "bootstrap must be run as root")
    assert not os.path.exists("/var/tmp/mpytest-nonroot-tree")


root = pytest.mark.root


@root
def test_nonempty_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/keep").write_text("mine")
    r = run(["bootstrap", "./tree"], cwd=tmp_path)
    assert_one_line(r, 2, "/tree': exists and is not empty")
    assert [p.name for p in (tmp_path / "tree").iterdir()] == ["keep"]


@root
def test_missing_tool_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    r = run(["bootstrap", "./tree"], cwd=tmp_path, PATH=str(empty))
    assert_one_line(r, 1, "neither mmdebstrap nor debootstrap is installed")
    r = run(["bootstrap", "./tree", "--tool=debootstrap"], cwd=tmp_path, PATH=str(empty))
    assert_one_line(r, 1, "debootstrap is not installed (apt-get install debootstrap)")
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]


@root
def test_unreachable_mirror_is_one_line(tmp_path: Path) -> None:
    r = run(["bootstrap", "./tree", "--mirror", "http://127.0.0.1:9/debian"], cwd=tmp_path)
    assert_one_line(r, 1, "cannot reach mirror http://127.0.0.1:9/debian")
    assert list(tmp_path.iterdir()) == []


@root
def test_unknown_suite_is_bad_input(tmp_path: Path) -> None:
    r = run(["bootstrap", "./tree", "--mirror", debian_mirror(), "--suite", "nosuchsuite"],
            cwd=tmp_path)
    assert_one_line(r, 2, f"no suite 'nosuchsuite' at {debian_mirror()}")
    assert list(tmp_path.iterdir()) == []


@root
def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    r = run(["bootstrap", "./tree", "--mirror", debian_mirror(),
             "--include", "no-such-package-here"], cwd=tmp_path, timeout=300)
    assert_one_line(r, 1, "bootstrap: mmdebstrap failed (exit ")
    assert "no-such-package-here" in r.stderr
    assert list(tmp_path.iterdir()) == []


@root
def test_failed_build_in_an_empty_directory_empties_it_again(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    r = run(["bootstrap", "./tree", "--mirror", debian_mirror(),
             "--include", "no-such-package-here"], cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]
    assert list((tmp_path / "tree").iterdir()) == []


@root
def test_sigterm_mid_build_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen([*MACHINEPY, "bootstrap", "./tree", "--mirror", debian_mirror()],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # Wait until packages land in the half-made tree beside the target.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(tmp_path.glob(".tree.bootstrap-*/var/cache/apt/archives/*.deb")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(tmp_path.iterdir()) == []
    # The tool's process group went with it.
    r = subprocess.run(["pgrep", "-f", f"mmdebstrap.*{tmp_path}"], capture_output=True)
    assert r.stdout == b""


@pytest.fixture(scope="module")
def bootstrapped() -> Path:
    return cached_bootstrap_rootfs()


@root
def test_tree_is_ready_to_boot(bootstrapped: Path) -> None:
    etc = bootstrapped / "etc"
    assert (etc / "machine-id").read_text() == ""  # first boot makes one
    assert (etc / "hostname").read_text() == f"{BOOTSTRAP_HOSTNAME}\n"
    assert f"127.0.1.1\t{BOOTSTRAP_HOSTNAME}" in (etc / "hosts").read_text()
    shadow = {line.split(":")[0]: line.split(":")[1]
              for line in (etc / "shadow").read_text().splitlines()}
    assert shadow["root"].startswith("$")  # hashed, from --root-password-file
    for path in ("lib/systemd/systemd", "usr/bin/dbus-daemon", "usr/bin/ip", "sbin/agetty",
                 "lib/systemd/system/console-getty.service",
                 "lib/systemd/system/container-getty@.service"):
        assert (bootstrapped / path).exists(), path
    assert not list(bootstrapped.parent.glob(".bootstrap.bootstrap-*"))
    assert oct(bootstrapped.stat().st_mode & 0o777) == "0o755"
