# SPDX-License-Identifier: BSD-2-Clause
"""Ephemeral roots: `machinepy run -w` against `systemd-nspawn --ephemeral`, same rootfs.

    python3 bench/ephemeral.py [--runs 10] [--root DEBIAN_ROOT]

machinepy puts an overlay of the root on a tmpfs private to the container's
mount namespace: O(1) in the size of the tree.  nspawn --ephemeral snapshots
the tree (a btrfs subvolume snapshot, else a reflink or plain copy).  Both run
`/bin/true` without registration on the cached ~250 MB Debian rootfs; the
plain (non-ephemeral) runs show what the ephemeral set-up itself costs.
Goal (issue #5): machinepy's ephemeral run <= 0.1x nspawn's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess

from common import (
    Result,
    add_install_option,
    machinepy_script,
    print_table,
    time_command,
    use_install,
)

GOAL = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--root", help="rootfs (default: the cached Debian test rootfs)")
    add_install_option(parser)
    args = parser.parse_args()
    runs = max(args.runs, 10)
    use_install(args.installed)
    if args.root:
        root = args.root
    else:
        from tests.rootfs import cached_debian_rootfs

        root = str(cached_debian_rootfs())
    size = subprocess.run(["du", "-sh", root], capture_output=True, text=True).stdout.split()[0]
    mp = machinepy_script()
    rows = [
        ("machinepy run -w", [mp, "run", "--register=no", "-w", "-r", root, "--", "/bin/true"]),
        ("machinepy run (not ephemeral)", [mp, "run", "--register=no", "-r", root, "--",
                                           "/bin/true"]),
    ]
    if shutil.which("systemd-nspawn"):
        nspawn = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root]
        rows += [
            ("systemd-nspawn --ephemeral", [*nspawn, "--ephemeral", "/bin/true"]),
            ("systemd-nspawn --volatile=overlay", [*nspawn, "--volatile=overlay", "/bin/true"]),
            ("systemd-nspawn (not ephemeral)", [*nspawn, "/bin/true"]),
        ]
    results: list[Result] = [time_command(name, argv, runs, warmup=1) for name, argv in rows]
    print_table(results, "systemd-nspawn --ephemeral",
                f"ephemeral one-shot on a {size} rootfs, median of {runs} (same run)")
    ours = results[0]
    theirs = next((r for r in results if r.name == "systemd-nspawn --ephemeral"), None)
    if ours.times and theirs is not None and theirs.times:
        ratio = ours.median / theirs.median
        print(f"goal: <= {GOAL}x nspawn --ephemeral; machinepy = {ratio:.3f}x: "
              f"{'MET' if ratio <= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
