# SPDX-License-Identifier: BSD-2-Clause
"""Fixtures for tests that need a real systemd, dbus-daemon and machined."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.testhost import TestHost
from tests.rootfs import cached_busybox_rootfs, cached_debian_rootfs

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.testhost)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("testhost") is not None and os.geteuid() != 0:
        pytest.skip("needs root: boots systemd as PID 1 of new namespaces (a test host)")


@pytest.fixture(scope="session")
def testhost() -> Iterator[TestHost]:
    # A boot failure raises: an error in every test using it, never a silent skip.
    with TestHost() as host:
        yield host


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    return cached_debian_rootfs()


@pytest.fixture(scope="session")
def busybox_root() -> Path:
    return cached_busybox_rootfs()
