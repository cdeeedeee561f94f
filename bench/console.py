# SPDX-License-Identifier: BSD-2-Clause
"""Console relay: bulk output through a container's pty to a pipe, and keystroke
echo latency, machinepy against systemd-nspawn in the same run.

    python3 bench/console.py [--runs 5] [--mb 200] [--keys 200]

Both tools boot the same busybox tree whose /sbin/init is a script of ours, so
PID 1's stdio is the console pty the tool relays:

- throughput: init writes MB MiB of zeros (`dd bs=64k`) to the console; the
  tool's stdout is a pipe (nspawn's --console=read-only, machinepy's passive
  console), read here; MiB/s from the first byte to the last, so start-up is
  not in it.  Every byte must arrive.
- latency: the tool runs on a pty of ours (interactive console, raw mode);
  init puts the console in raw mode and echoes KEYS bytes one at a time (`dd
  bs=1`, as a shell's line editor would); one key is written, and the time
  until its echo comes back is taken.  Two relay hops of the tool per key.

The tools' runs are interleaved.  Goals (issue 11): throughput >= 1.0x
nspawn, latency <= 1.0x.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import add_install_option, machinepy_script, use_install

ROOT = Path("/var/cache/machinepy-bench/console-root")
INIT = """\
#!/bin/sh
# bench/console.py's init: $1 is what to do, $2 how much.
case "$1" in
flood) exec dd if=/dev/zero bs=65536 count="$2" 2>/dev/null ;;
echo) stty raw -echo; echo READY; exec dd bs=1 count="$2" 2>/dev/null ;;
esac
exit 1
"""
BLOCK = 65536
TIMEOUT = 120.0


def console_root() -> str:
    """The busybox test tree, with our init."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.rootfs import build_busybox_rootfs

    build_busybox_rootfs(ROOT)  # idempotent; puts back bin/init -> busybox
    init = ROOT / "bin" / "init"
    init.unlink()
    init.write_text(INIT)
    init.chmod(0o755)
    return str(ROOT)


def commands(root: str) -> dict[str, Callable[[Sequence[str]], list[str]]]:
    mp = machinepy_script()
    return {
        "machinepy": lambda args: [mp, "boot", root, "--register=no", "--", *args],
        "systemd-nspawn": lambda args: ["systemd-nspawn", "-q", "--register=no", "--keep-unit",
                                        "-D", root, "-b", *args],
    }


def _fail(proc: subprocess.Popen[bytes], what: str) -> RuntimeError:
    proc.kill()
    proc.wait()
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return RuntimeError(f"{what}: {err.splitlines()[-1] if err else 'no message'}")


def throughput(argv: list[str], total: int) -> float:
    """MiB/s of TOTAL bytes arriving on the tool's stdout pipe."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray(1 << 20)
    got = 0
    first = last = 0.0
    deadline = time.monotonic() + TIMEOUT
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        last = time.perf_counter()
        if not got:
            first = last
        got += n
        if last > deadline:
            raise _fail(proc, f"{argv[0]}: timed out")
    status = proc.wait()
    if got != total:
        raise _fail(proc, f"{argv[0]}: {got} of {total} bytes arrived (exit {status})")
    return (total - BLOCK) / (last - first) / 2**20  # the first block started the clock


def _read_until(fd: int, want: bytes, deadline: float) -> bytes:
    data = b""
    while want not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no {want!r} (got {data[-80:]!r})")
        try:
            data += os.read(fd, 4096)
        except OSError:  # EIO: the tool closed its end
            raise TimeoutError(f"no {want!r} (got {data[-80:]!r})") from None
    return data


def latency(argv: list[str], keys: int, warmup: int) -> list[float]:
    """Seconds from a key written to the tool's terminal to its echo, per key."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    times: list[float] = []
    try:
        _read_until(master, b"READY", time.monotonic() + TIMEOUT)
        for i in range(warmup + keys):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
            start = time.perf_counter()
            os.write(master, key)
            _read_until(master, key, time.monotonic() + 10)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            time.sleep(0.002)  # a key at a time, not a paste
        status = proc.wait(timeout=30)
        if status != 0:
            raise RuntimeError(f"{argv[0]}: exit {status}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(master)
    return times


def _row(name: str, values: Sequence[float], unit: str, base: float | None) -> str:
    med = statistics.median(values)
    ratio = f"{med / base:.2f}" if base else "-"
    return (f"{name:<24} {med:>10.1f} {min(values):>10.1f} {max(values):>10.1f} {ratio:>7}"
            f"  {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="throughput runs per tool")
    parser.add_argument("--mb", type=int, default=200, help="MiB per throughput run")
    parser.add_argument("--keys", type=int, default=200, help="timed keys per latency run")
    parser.add_argument("--latency-runs", type=int, default=3, help="latency runs per tool")
    add_install_option(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/console.py: run as root")
    use_install(args.installed)
    root = console_root()
    tools = commands(root)
    if shutil.which("systemd-nspawn") is None:
        del tools["systemd-nspawn"]
    count = args.mb * 2**20 // BLOCK
    rates: dict[str, list[float]] = {t: [] for t in tools}
    delays: dict[str, list[float]] = {t: [] for t in tools}
    for _ in range(args.runs):  # interleaved
        for tool, make in tools.items():
            rates[tool].append(throughput(make(["flood", str(count)]), count * BLOCK))
    for _ in range(args.latency_runs):
        for tool, make in tools.items():
            delays[tool] += latency(make(["echo", str(args.keys + 10)]), args.keys, 10)
    peer = "systemd-nspawn" if "systemd-nspawn" in tools else None
    print(f"\n{args.mb} MiB through the console pty to a pipe, MiB/s, {args.runs} runs each "
          "(interleaved)")
    print(f"{'tool':<24} {'median':>10} {'min':>10} {'max':>10} {'ratio':>7}")
    base = statistics.median(rates[peer]) if peer else None
    for tool in tools:
        print(_row(tool, rates[tool], "MiB/s", base))
    print(f"\nkeystroke echo latency, µs, {args.latency_runs} x {args.keys} keys each "
          "(interleaved)")
    print(f"{'tool':<24} {'median':>10} {'min':>10} {'max':>10} {'ratio':>7}")
    lat_us = {t: [d * 1e6 for d in v] for t, v in delays.items()}
    lbase = statistics.median(lat_us[peer]) if peer else None
    for tool in tools:
        print(_row(tool, lat_us[tool], "µs", lbase))
        p90 = statistics.quantiles(lat_us[tool], n=10)[-1]
        print(f"{'':<24} p90 {p90:.1f} µs")
    if peer:
        t = statistics.median(rates["machinepy"]) / statistics.median(rates[peer])
        la = statistics.median(lat_us["machinepy"]) / statistics.median(lat_us[peer])
        print(f"\ngoal: throughput >= 1.0x nspawn; machinepy = {t:.2f}x: "
              f"{'MET' if t >= 1.0 else 'NOT MET'}")
        print(f"goal: latency <= 1.0x nspawn; machinepy = {la:.2f}x: "
              f"{'MET' if la <= 1.0 else 'NOT MET'}")
    print("(ratio: median / median of systemd-nspawn's)")


if __name__ == "__main__":
    main()
