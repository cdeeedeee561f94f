# SPDX-License-Identifier: BSD-2-Clause
"""One-shot start-up: `machinepy run -- /bin/true` against unshare, bwrap, nspawn.

    python3 bench/startup.py [--runs 20] [--root BUSYBOX_ROOT]

Goal (issue #2): without a bus, machinepy stays within Python's own start-up
floor (`python3 -c pass`) + 40 ms.
"""

from __future__ import annotations

import shutil

from common import (
    Result,
    busybox_run_args,
    interpreter,
    machinepy_script,
    print_table,
    time_command,
)

GOAL_MS = 40.0


def main() -> None:
    runs, root = busybox_run_args(__doc__)
    py, mp = interpreter(), machinepy_script()
    rows: list[tuple[str, list[str]]] = [
        ("python3 -c pass (floor)", [py, "-c", "pass"]),
        ("machinepy run (host root)", [mp, "run", "--register=no", "--", "/bin/true"]),
        ("machinepy run -r busybox", [mp, "run", "--register=no", "-r", root, "--",
                                      "/bin/true"]),
        ("unshare -mipuf --mount-proc", ["unshare", "-mipuf", "--mount-proc", "/bin/true"]),
    ]
    if shutil.which("bwrap"):
        rows += [
            ("bwrap (host root)", ["bwrap", "--unshare-all", "--share-net", "--die-with-parent",
                                   "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                                   "/bin/true"]),
            ("bwrap (busybox root)", ["bwrap", "--unshare-all", "--share-net",
                                      "--die-with-parent", "--bind", root, "/", "--proc",
                                      "/proc", "--dev", "/dev", "/bin/true"]),
        ]
    if shutil.which("systemd-nspawn"):
        rows.append(("systemd-nspawn --register=no (busybox)",
                     ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root,
                      "/bin/true"]))
    results: list[Result] = [time_command(name, argv, runs) for name, argv in rows]
    print_table(results, "machinepy run (host root)",
                f"start-up, median of {runs} runs (same machine, same run)")
    floor = results[0]
    if floor.times:
        limit = floor.median * 1e3 + GOAL_MS
        for r in results[1:3]:
            if r.times:
                verdict = "MET" if r.median * 1e3 <= limit else "NOT MET"
                print(f"goal: floor + {GOAL_MS:.0f} ms = {limit:.1f} ms; {r.name} = "
                      f"{r.median * 1e3:.1f} ms: {verdict}")


if __name__ == "__main__":
    main()
