# SPDX-License-Identifier: BSD-2-Clause
"""The busybox test rootfs: shape, idempotence and that it actually runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.rootfs import build_busybox_rootfs, cached_busybox_rootfs


@pytest.mark.root
def test_busybox_rootfs_runs_a_shell(tmp_path: Path) -> None:
    root = build_busybox_rootfs(tmp_path / "root")
    r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo ok"],
                       capture_output=True, text=True, timeout=10)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


@pytest.mark.root
def test_busybox_rootfs_is_idempotent_and_keeps_the_binary(tmp_path: Path) -> None:
    root = build_busybox_rootfs(tmp_path / "root")
    build_busybox_rootfs(root)
    binary = root / "bin/busybox"
    assert binary.is_file() and not binary.is_symlink()
    assert os.readlink(root / "bin/ls") == "busybox"
    assert (root / "sbin").resolve() == (root / "bin").resolve()
    assert os.stat(root / "home/user").st_uid == 1000
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc/passwd").read_text().splitlines()}
    assert users["user"][2:4] == ["1000", "1000"] and users["user"][5] == "/home/user"
    assert users["nobody"][2] == "65534"


@pytest.mark.root
def test_cached_busybox_rootfs_is_reused() -> None:
    root = cached_busybox_rootfs()
    assert cached_busybox_rootfs() == root
    assert (root / "bin/busybox").stat().st_size == Path("/bin/busybox").stat().st_size
