# SPDX-License-Identifier: BSD-2-Clause
"""Shared helpers for the benchmarks: timing commands and printing ratio tables.

Benchmarks compare machinepy with its peers in the same run, on the same
machine, so only ratios are meaningful; absolute numbers vary between hosts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)  # seconds
    skipped: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# Where benchmarks get machinepy from: a virtualenv with a regular (wheel)
# install of this checkout, as a user has it.  A development install pays for
# the editable finder in every start-up (~10 ms here), and a host's own .pth
# hooks (this VM injects a CA bundle through certifi: ~10 ms more) are not
# machinepy's; `--installed=dev` measures the interpreter that runs the bench.
VENV = Path("/var/cache/machinepy-bench/venv")
_installed = "venv"


def add_install_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--installed", choices=("venv", "dev"), default="venv",
                        help=f"venv: this checkout installed into {VENV} (default); "
                             "dev: the current (editable) install")


def busybox_run_args(doc: str | None) -> tuple[int, str]:
    """(runs, busybox root) of a start-up script's command line (--runs, --root,
    --installed), the chosen install already in use."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--root", help="busybox rootfs (default: the cached test rootfs)")
    add_install_option(parser)
    args = parser.parse_args()
    use_install(args.installed)
    if args.root:
        return max(args.runs, 10), args.root
    from tests.rootfs import cached_busybox_rootfs

    return max(args.runs, 10), str(cached_busybox_rootfs())


def use_install(mode: str) -> None:
    """Select (and for "venv", refresh) the machinepy the benchmark runs."""
    global _installed
    _installed = mode
    if mode != "venv":
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([_dev_interpreter(), "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)], check=True,
                       stdin=subprocess.DEVNULL)
    else:  # the checkout as it is now, dependencies as they are
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                        "--force-reinstall", str(REPO)], check=True, stdin=subprocess.DEVNULL)


def interpreter() -> str:
    """The interpreter `machinepy` runs with (not a pyenv shim)."""
    if _installed == "venv":
        return str(VENV / "bin" / "python")
    return _dev_interpreter()


def machinepy_script() -> str:
    if _installed == "venv":
        return str(VENV / "bin" / "machinepy")
    return _dev_script()


def _dev_interpreter() -> str:
    script = _dev_script()
    with open(script) as f:
        first = f.readline()
    return first[2:].strip() if first.startswith("#!") else sys.executable


def _dev_script() -> str:
    """The console script next to the real interpreter, else PATH's."""
    beside = Path(sys.executable).with_name("machinepy")
    if beside.exists():
        return str(beside)
    found = shutil.which("machinepy")
    if found is None:
        raise SystemExit("machinepy is not installed (pip install -e .)")
    return found


def time_command(name: str, argv: Sequence[str], runs: int, warmup: int = 2,
                 env: dict[str, str] | None = None) -> Result:
    """Median-able wall-clock times of ARGV; a failing command becomes a skipped row."""
    result = Result(name)
    full_env = {**os.environ, **(env or {})}
    for i in range(warmup + runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=full_env)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            result.skipped = f"exit {proc.returncode}: {err[-1] if err else 'no message'}"
            return result
        if i >= warmup:
            result.times.append(elapsed)
    return result


def print_table(results: Sequence[Result], baseline: str, title: str) -> None:
    base = next((r for r in results if r.name == baseline and r.times), None)
    print(f"\n{title}")
    print(f"{'command':<44} {'median ms':>9} {'min':>7} {'max':>7} {'ratio':>7}")
    for r in results:
        if r.skipped or not r.times:
            print(f"{r.name:<44} skipped: {r.skipped}")
            continue
        ratio = f"{r.median / base.median:.2f}" if base else "-"
        print(f"{r.name:<44} {r.median * 1e3:>9.1f} {min(r.times) * 1e3:>7.1f} "
              f"{max(r.times) * 1e3:>7.1f} {ratio:>7}")
    if base:
        print(f"(ratio: median / median of '{baseline}')")
