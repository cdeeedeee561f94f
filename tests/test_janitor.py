# SPDX-License-Identifier: BSD-2-Clause
"""The janitor: does its jobs when the supervisor is gone without cleaning up,
and nothing when the supervisor says DONE."""

from __future__ import annotations

import os
import time
from pathlib import Path

from machinepy.runtime.janitor import RMDIR, UNLINK, Janitor


def _gone(path: Path, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not path.exists()


def _reap(j: Janitor) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(j.pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)
    raise AssertionError("the janitor did not exit")


def test_jobs_done_when_the_supervisor_did_not(tmp_path: Path) -> None:
    d, f = tmp_path / "made dir", tmp_path / "made 'file'"  # names go through whole
    d.mkdir()
    f.write_text("x")
    j = Janitor()
    j.add(RMDIR, str(d))
    j.add(UNLINK, str(f))
    j.close()  # as after a SIGKILL: EOF without DONE
    assert _gone(d) and _gone(f)
    _reap(j)


def test_nothing_done_after_done(tmp_path: Path) -> None:
    d = tmp_path / "kept"
    d.mkdir()
    j = Janitor()
    j.add(RMDIR, str(d))
    j.close(clean=True)
    _reap(j)
    assert d.exists()


def test_a_newline_is_refused(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="newline"):
        Janitor().add(UNLINK, str(tmp_path / "a\nb"))
