# SPDX-License-Identifier: BSD-2-Clause
"""`machinepy install-units` from a wheel in a fresh virtualenv, as README says
to install it: the units come from the package, not from a source checkout.

Slow-ish (a venv and a wheel build, ~10 s): pip resolves from this machine's
configured index, as a user's would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = ("etc/systemd/system/machinepy.service", "etc/systemd/system/machinepy@.service",
         "etc/dbus-1/system.d/io.machinepy1.conf",
         "usr/share/dbus-1/system-services/io.machinepy1.service")


def test_install_units_from_a_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    venv, root = tmp_path / "v", tmp_path / "x"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"no venv here: {r.stderr.strip()}")
    r = subprocess.run([str(venv / "bin/pip"), "install", "-q", "."], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    # Run from elsewhere: nothing of the checkout may be on the path.
    r = subprocess.run([str(venv / "bin/machinepy"), "install-units", "--root", str(root)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(root / f) for f in FILES]
    service = (root / FILES[0]).read_text()
    assert f"ExecStart={venv}/bin/python" in service and " -m machinepy daemon\n" in service
    assert "PYTHONPATH" not in service  # the venv's own machinepy, not a checkout
    for f in FILES:
        assert (root / f).stat().st_mode & 0o777 == 0o644
    assert "SystemdService=machinepy.service" in (root / FILES[3]).read_text()
    r = subprocess.run([str(venv / "bin/machinepy"), "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("machinepy ") and r.returncode == 0
