# SPDX-License-Identifier: BSD-2-Clause
"""Mount plans (pure) and in-root resolution (needs no root: plain directories)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from machinepy.core.spec import ContainerSpec, MountSpec
from machinepy.runtime.mounts import (
    BOOT_ID,
    INACCESSIBLE,
    PROC_READ_ONLY,
    BindMount,
    FsMount,
    Masks,
    Overlay,
    ReadOnly,
    Sysfs,
    build_plan,
    open_in_root,
    own_runtime_dirs,
    staging_data,
)


def spec(**kw: object) -> ContainerSpec:
    return ContainerSpec(command=("/bin/true",)).replace(**kw)


def targets(plan: Sequence[object]) -> list[str]:
    return [getattr(op, "target", getattr(op, "link", "")) for op in plan]


def test_chroot_plan_has_api_filesystems_before_user_mounts() -> None:
    plan = build_plan(spec(root="/r", mounts=(MountSpec("tmp", "/dev/shm/x"),)),
                      console="/dev/pts/7")
    t = targets(plan)
    for api in ("/proc", "/proc/sys", "/sys", "/dev", "/dev/pts", "/dev/null", "/dev/console",
                "/run", "/tmp", "/sys/fs/cgroup"):
        assert api in t
    assert t.index("/dev") < t.index("/dev/null") < t.index("/dev/shm/x")
    assert ReadOnly("/proc/sys") in plan
    assert BindMount("/dev/pts/7", "/dev/console", recursive=False) in plan
    assert Sysfs("/sys") in plan  # read-only (test_run checks it for real)


def test_host_root_plan_only_remounts_proc() -> None:
    plan = build_plan(spec(mounts=(MountSpec("bind-ro", "/b", "/a"),)))
    assert plan[0] == BindMount("/a", "/b", read_only=True)
    assert FsMount("proc", "/proc", plan[1].flags) == plan[1]  # type: ignore[attr-defined]
    assert "/dev" not in targets(plan)


@pytest.mark.parametrize("root", ["/r", None])
def test_proc_and_firmware_masked_once_proc_and_sys_are_there(root: str | None) -> None:
    plan = build_plan(spec(root=root, namespaces=frozenset({"mount", "pid", "net"})))
    for d in PROC_READ_ONLY:
        assert ReadOnly(d, optional=True) in plan
    assert "/proc/kcore" in INACCESSIBLE and "/sys/firmware" in INACCESSIBLE
    masks = plan.index(Masks(INACCESSIBLE, BOOT_ID))
    assert masks > plan.index(Sysfs()) > targets(plan).index("/proc")


def test_host_root_without_pid_namespace_keeps_the_hosts_proc() -> None:
    plan = build_plan(spec(namespaces=frozenset({"mount", "uts"})))
    assert not any(isinstance(op, (FsMount, ReadOnly)) for op in plan)
    assert [op for op in plan if isinstance(op, Masks)] == [Masks(own_runtime_dirs())]


@pytest.mark.parametrize("namespaces", [{"mount"}, {"mount", "pid", "net"}])
def test_host_root_hides_machinepys_own_sockets(namespaces: set[str]) -> None:
    plan = build_plan(spec(namespaces=frozenset(namespaces)))
    assert any(isinstance(op, Masks) and "/run/machinepy" in op.inaccessible for op in plan)
    assert not any(isinstance(op, Masks) and "/run/machinepy" in op.inaccessible
                   for op in build_plan(spec(root="/r")))  # a chroot never sees it


def test_no_cgroup_mount_without_cgroupns() -> None:
    plan = build_plan(spec(root="/r", namespaces=frozenset({"mount", "pid"})))
    assert "/sys/fs/cgroup" not in targets(plan)
    assert "/dev/mqueue" not in targets(plan)


def test_overlay_spec_becomes_overlay_op() -> None:
    plan = build_plan(spec(root="/r", mounts=(MountSpec("overlay", "/usr", "/up", "/wk"),)))
    assert plan[-1] == Overlay("/up", "/usr", "/wk")


def _data(plan: list[object], target: str) -> list[str]:
    return [op.data for op in plan if isinstance(op, FsMount) and op.target == target]


def test_api_tmpfs_mounts_are_bounded_as_nspawn_bounds_them() -> None:
    plan = build_plan(spec(root="/r"))
    assert _data(plan, "/run") == ["mode=755,size=20%,nr_inodes=800k"]
    assert _data(plan, "/tmp") == ["mode=1777,size=10%,nr_inodes=400k"]
    assert _data(plan, "/dev/shm") == ["mode=1777,size=10%,nr_inodes=400k"]
    assert _data(plan, "/dev") == ["mode=755,size=4m"]
    for op in plan:  # no tmpfs at the kernel's default (half the RAM)
        if isinstance(op, FsMount) and op.fstype == "tmpfs":
            assert "size=" in (op.data or ""), op


def test_user_tmpfs_replaces_the_api_one_from_its_defaults() -> None:
    plan = build_plan(spec(root="/r", mounts=(
        MountSpec("tmp", "/tmp", options="size=1m"),
        MountSpec("tmp", "/run", options="mode=700,nr_inodes=5k"),
        MountSpec("tmp", "/scratch"),
        MountSpec("tmp", "/big", options="size=50%"))))
    assert _data(plan, "/tmp") == ["mode=1777,size=1m,nr_inodes=400k"]
    assert _data(plan, "/run") == ["mode=700,size=20%,nr_inodes=5k"]
    assert _data(plan, "/dev/shm") == ["mode=1777,size=10%,nr_inodes=400k"]
    assert _data(plan, "/scratch") == ["mode=1777,size=10%,nr_inodes=400k"]
    assert _data(plan, "/big") == ["mode=1777,size=50%,nr_inodes=400k"]
    # On the host's root there is no API /run to replace: a plain user tmpfs.
    host = build_plan(spec(mounts=(MountSpec("tmp", "/run", options="size=1m"),)))
    assert _data(host, "/run") == ["mode=1777,size=1m,nr_inodes=400k"]


def test_staging_tmpfs_is_bounded() -> None:
    assert staging_data(spec(root="/r")) == "mode=755,size=4m,nr_inodes=1k"
    assert staging_data(spec(root="/r", ephemeral=True)) == "mode=755,size=25%,nr_inodes=1m"
    assert staging_data(spec(root="/r", ephemeral=True, ephemeral_size="2G")) == (
        "mode=755,size=2G,nr_inodes=1m")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "abs").symlink_to("/../../etc")
    (tmp_path / "rel").symlink_to("../../../../etc")
    (tmp_path / "dangling").symlink_to("/var/lib/new")
    return tmp_path


def _real(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", ["/abs/x", "/rel/x", "/etc/x", "/abs/../../etc/x"])
def test_open_in_root_never_leaves_the_root(root: Path, path: str) -> None:
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert _real(open_in_root(rfd, path, "dir")) == f"{root}/etc/x"
    finally:
        os.close(rfd)


def test_open_in_root_follows_dangling_links_inside(root: Path) -> None:
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert _real(open_in_root(rfd, "/dangling/f", "file")) == f"{root}/var/lib/new/f"
        assert (root / "var/lib/new/f").is_file()
        with pytest.raises(FileNotFoundError):
            open_in_root(rfd, "/missing")
    finally:
        os.close(rfd)
