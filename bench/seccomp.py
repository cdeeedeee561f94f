# SPDX-License-Identifier: BSD-2-Clause
"""The seccomp filter's cost: `run -- /bin/true` with the compiled filter cached
and rebuilt, against bwrap and systemd-nspawn; and its parts, timed in-process.

    python3 bench/seccomp.py [--runs 20] [--root BUSYBOX_ROOT]

Goal (issue 8): a cached filter costs a start ~1 ms (the brief's 2 ms budget
for building is what the cache is for: building costs ~12 ms).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from common import (
    Result,
    busybox_run_args,
    interpreter,
    machinepy_script,
    print_table,
    time_command,
)


def _clear_cache() -> None:
    from machinepy.runtime.seccomp import cache_dir

    d = cache_dir()
    if d and os.path.isdir(d):
        shutil.rmtree(d)


def time_cold(name: str, argv: list[str], runs: int) -> Result:
    """ARGV with the filter cache emptied before each run: the filter is compiled."""
    result = Result(name)
    for _ in range(runs):
        _clear_cache()
        start = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            result.skipped = f"exit {proc.returncode}: {proc.stderr.decode().strip()[-200:]}"
            return result
        result.times.append(elapsed)
    return result


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def parts(runs: int) -> None:
    """Import, cache hit, build and load, in this process (the load in a forked child)."""
    py = interpreter()
    # On top of what every run imports anyway (the spec, the syscall wrappers).
    code = ("import time, machinepy.core.spec, machinepy.core.linux; t = time.perf_counter(); "
            "import machinepy.runtime.seccomp; print((time.perf_counter() - t) * 1e3)")
    # cwd "/": `python -c` puts its cwd first on sys.path, and a checkout there
    # would be imported (and compiled, with no bytecode) instead of the install.
    imports = [float(subprocess.run([py, "-c", code], capture_output=True, text=True,
                                    check=True, cwd="/").stdout) for _ in range(runs)]
    from machinepy.core import linux
    from machinepy.core.caps import DEFAULT_RETAIN
    from machinepy.runtime import seccomp

    seccomp.programs_for((), DEFAULT_RETAIN)  # warm the cache
    hit = _median_ms(lambda: seccomp.programs_for((), DEFAULT_RETAIN), runs)
    build = _median_ms(lambda: seccomp.programs_for((), DEFAULT_RETAIN, use_cache=False), runs)
    programs = seccomp.programs_for((), DEFAULT_RETAIN)
    loads = []
    for _ in range(runs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            start = time.perf_counter()
            for p in programs:
                linux.seccomp_load(p)
            os.write(w, f"{(time.perf_counter() - start) * 1e3}\n".encode())
            os._exit(0)
        os.close(w)
        loads.append(float(os.read(r, 64)))
        os.close(r)
        os.waitpid(pid, 0)
    sizes = "+".join(str(len(p) // 8) for p in programs)
    print(f"\nparts, median of {runs} (in-process)")
    print(f"  import runtime.seccomp (after spec, linux)   {statistics.median(imports):6.2f} ms")
    print(f"  programs_for, cache hit                      {hit:6.2f} ms")
    print(f"  programs_for, no cache (libseccomp build)    {build:6.2f} ms")
    print(f"  seccomp(2) of the {len(programs)} programs ({sizes} insns)"
          f"{'':>3}{statistics.median(loads):6.2f} ms")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root")
    runs, root = busybox_run_args(__doc__)
    py, mp = interpreter(), machinepy_script()
    run = [mp, "run", "--register=no", "-r", root, "--", "/bin/true"]
    results = [
        time_command("python3 -c pass (floor)", [py, "-c", "pass"], runs),
        time_command("machinepy run -r busybox (cached filter)", run, runs),
        time_cold("machinepy run -r busybox (filter built)", run, runs),
        time_command("machinepy run, 3 --system-call-filter", [
            mp, "run", "--register=no", "-r", root, "--system-call-filter=~@mount",
            "--system-call-filter=bpf @swap", "--system-call-filter=~kcmp", "--", "/bin/true"],
            runs),
    ]
    if shutil.which("bwrap"):
        results.append(time_command("bwrap (busybox root, no filter)", [
            "bwrap", "--unshare-all", "--share-net", "--die-with-parent", "--bind", root, "/",
            "--proc", "/proc", "--dev", "/dev", "/bin/true"], runs))
    if shutil.which("systemd-nspawn"):
        nspawn = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root,
                  "/bin/true"]
        results.append(time_command("systemd-nspawn --register=no (busybox)", nspawn, runs))
        results.append(time_command("systemd-nspawn, SYSTEMD_SECCOMP=0", nspawn, runs,
                                    env={"SYSTEMD_SECCOMP": "0"}))
    print_table(results, "machinepy run -r busybox (cached filter)",
                f"run -- /bin/true, median of {runs} runs (same machine, same run)")
    parts(runs)


if __name__ == "__main__":
    main()
