# SPDX-License-Identifier: BSD-2-Clause
"""The escape suite: attacks run from inside a container, each a probe that
fails its test when it gets through.

Probes are small static C programs (tests/security/probes/NAME.c) or shell
lines, run in three conditions: root without a user namespace on a busybox
chroot ("root"), the same with --private-users=pick ("pick"), and, in
integration/, registered in the systemd test host.  A probe prints what it
reached and exits 0 when the attack was blocked, 1 when it got through, 2 when
it could not even try (a bug in the probe, never a pass).  Probes touch only
scratch targets the test creates.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rootfs import cache_dir

PROBES = Path(__file__).resolve().parent / "probes"
MACHINEPY = [sys.executable, "-m", "machinepy"]
MODES = {"root": (), "pick": ("--private-users=pick",)}


def build_probe(name: str) -> Path:
    """PROBES/NAME.c compiled statically (it runs in a busybox chroot), cached by content."""
    src = PROBES / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "probes" / f"{name}-{digest}"
    if not out.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler: the escape probes need cc (gcc) and libc.a")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run([cc, "-static", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def probe() -> Callable[[str], Path]:
    return build_probe


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """Extra options of one attack condition: root without userns, or pick."""
    return MODES[request.param]


def run_in(root: Path | None, *args: str, opts: tuple[str, ...] = (), timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`machinepy run --register=no [-r ROOT] OPTS -- ARGS`, output captured."""
    chroot = ("-r", str(root)) if root is not None else ()
    return subprocess.run([*MACHINEPY, "run", "--register=no", *chroot, *opts, "--", *args],
                          capture_output=True, text=True, timeout=timeout, input=input)


def run_probe(root: Path, probe_path: Path, *args: str, opts: tuple[str, ...] = (),
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a compiled probe inside ROOT (bound read-only at /probe)."""
    return run_in(root, "/probe", *args, timeout=timeout,
                  opts=("-m", f"bind-ro:{probe_path}:/probe", *opts))


def assert_blocked(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 2, f"probe could not run the attack:\n{r.stdout}{r.stderr}"
    assert r.returncode == 0, f"escape got through:\n{r.stdout}{r.stderr}"
