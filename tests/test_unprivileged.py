# SPDX-License-Identifier: BSD-2-Clause
# ruff: noqa: F811  (the fixtures imported from test_userns are parameters here)
"""Without root, as pflask promises: a real unprivileged user (with the
/etc/subuid range useradd gives it) runs containers with no --user-map."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.test_userns import (  # noqa: F401  (fixtures)
    _subuid_range,
    as_user,
    shared_dir,
    unprivileged_user,
)

pytestmark = pytest.mark.root  # root creates the user; the containers run as it


def test_maps_the_caller_and_its_subordinate_range(unprivileged_user: pwd.struct_passwd,
                                                   busybox_root: Path) -> None:
    sub = _subuid_range(unprivileged_user.pw_name)
    r = as_user(unprivileged_user, "-r", str(busybox_root), "--", "/bin/sh", "-c",
                "id -u; cat /proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    uid, *maps = r.stdout.splitlines()
    assert uid == "0"
    assert maps[0].split() == ["0", str(unprivileged_user.pw_uid), "1"]
    if sub is not None:  # ids 1… for apt and chown inside
        assert maps[1].split() == ["1", str(sub[0]), str(sub[1])]


def test_user_runs_as_itself_inside(unprivileged_user: pwd.struct_passwd) -> None:
    # pflask's `--user=$USER`: the command runs as the user's own id inside.
    r = as_user(unprivileged_user, f"--user={unprivileged_user.pw_name}", "--", "/bin/sh", "-c",
                "id -u; grep -E '^(Cap(Eff|Prm)):' /proc/self/status")
    assert r.returncode == 0, r.stderr
    uid, eff, prm = r.stdout.splitlines()
    assert uid == str(unprivileged_user.pw_uid)
    assert eff.split()[1] == prm.split()[1] == "0" * 16  # no root inside either


def test_mounts_ephemeral_and_a_private_network(unprivileged_user: pwd.struct_passwd,
                                                busybox_root: Path, shared_dir: Path) -> None:
    (shared_dir / "in").write_text("from the host\n")
    # The user's own tree (root-owned files are nobody's inside: not writable).
    root = shared_dir / "root"
    subprocess.run(["cp", "-a", str(busybox_root), str(root)], check=True)
    subprocess.run(["chown", "-R", f"{unprivileged_user.pw_uid}:{unprivileged_user.pw_gid}",
                    str(root)], check=True)
    r = as_user(unprivileged_user, "-r", str(root), "-w", "-n",
                "-m", f"bind:{shared_dir}:/mnt", "-m", "tmp:/scratch", "--", "/bin/sh", "-c",
                "cat /mnt/in; echo x > /scratch/f && cat /scratch/f; "
                "echo changed > /etc/hostname-test && cat /etc/hostname-test; "
                "ls /sys/class/net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from the host", "x", "changed", "lo"]
    assert not (root / "etc/hostname-test").exists()  # ephemeral: gone


def test_no_userns_without_root_is_one_line(unprivileged_user: pwd.struct_passwd) -> None:
    r = as_user(unprivileged_user, "-U", "--", "true")
    assert (r.returncode, r.stderr) == (
        2, "machinepy: without root a container needs a user namespace: drop --no-userns\n")


def test_a_user_map_without_root_inside(unprivileged_user: pwd.struct_passwd) -> None:
    # -e UID:UID:1 maps no root: PID 1 stays that id (was "become root in the
    # user namespace: Invalid argument").
    uid = unprivileged_user.pw_uid
    r = as_user(unprivileged_user, "-e", f"{uid}:{uid}:1", "--", "id", "-u")
    assert (r.returncode, r.stdout) == (0, f"{uid}\n"), r.stderr


def test_what_needs_root_is_one_line(unprivileged_user: pwd.struct_passwd,
                                     busybox_root: Path) -> None:
    # (Host links as a user are not tried here: the system python that runs as
    # the user has no pyroute2.)
    r = as_user(unprivileged_user, "--private-users=pick", "-r", str(busybox_root), "--", "true")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "must be run as root" in r.stderr


async def test_registration_refused_to_a_user_is_a_warning(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # README's `run -r ~/rootfs -e 0:$(id -u):1 ...` on a systemd host: systemd
    # answers "Interactive authentication required" without polkit; the
    # container runs unregistered (was: exit 1).
    import contextlib

    from machinepy.core import sd
    from machinepy.core.spec import ContainerSpec
    from machinepy.core.unitprops import UnitProperty
    from machinepy.integrate import machined
    from machinepy.supervise.supervisor import Supervisor

    class Refusing:
        async def register(self, **_: object) -> str:
            raise machined.RegistrationError("creating machine-x.scope: Interactive "
                                             "authentication required.")

    class Child:  # a PID 1 that has said nothing (its status pipe at EOF)
        def __init__(self) -> None:
            self.status_r, w = os.pipe()
            os.close(w)

        def cancel_go(self) -> None:
            pass

    monkeypatch.setattr(sd, "can_register", lambda: True)
    spec = ContainerSpec(command=("true",),
                         properties=(UnitProperty("MemoryMax", "t", 1 << 20),))
    sup = Supervisor(spec, handle_signals=False)
    sup.container.name = "x"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    async with contextlib.AsyncExitStack() as stack:
        assert await sup._register(stack, Refusing(), Child()) is False  # type: ignore[arg-type]
    assert not sup.container.registered
    assert capsys.readouterr().err == (
        "machinepy: warning: not registering machine 'x' with systemd-machined: creating "
        "machine-x.scope: Interactive authentication required. (its --property settings "
        "are not applied)\n")
    monkeypatch.setattr("os.geteuid", lambda: 0)  # root: an error, as before
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(Exception, match="registering machine 'x'"):
            await sup._register(stack, Refusing(), Child())  # type: ignore[arg-type]
