# SPDX-License-Identifier: BSD-2-Clause
"""machinepy vs systemd-nspawn with machined registration, inside a real systemd test host.

    python3 bench/machined.py [--runs 10]

Boots a test host (systemd + dbus + machined as PID 1 of new namespaces, see
integration/testhost.py), then, in the same run and on the same Debian rootfs:

- one-shot `/bin/true`, registered (scope + RegisterMachine) and cleaned up;
- boot to READY: both under `systemd-run -p Type=notify`, which returns when
  the container's systemd has sent READY=1 (`--notify-ready` on both);
- `machinectl poweroff` until the supervising unit is gone;
- the daemon: CreateContainer of a registered container until its command runs
  (the call answers once it has), against nspawn's registered one-shot.

Both boot with a tmpfs overlay over a read-only tree (machinepy --ephemeral,
nspawn --volatile=overlay): the same mechanism, and the cached rootfs stays clean.
Goals (issue 11): one-shot <= 1.25x nspawn, boot <= 1.05x, poweroff <= 1.0x,
daemon CreateContainer <= 0.5x nspawn's one-shot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import REPO, Result, add_install_option, interpreter, print_table, use_install

GOALS = {"one-shot /bin/true, registered": 1.25, "boot to READY=1": 1.05,
         "machinectl poweroff -> unit gone": 1.0,
         "daemon: CreateContainer, registered -> running": 0.5}


def _run(argv: Sequence[str], timeout: float = 120) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}…: exit {r.returncode}: {r.stderr.strip()}")


def _wait_inactive(unit: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["systemctl", "is-active", "--quiet", unit])
        if r.returncode != 0:
            return
        time.sleep(0.01)
    raise RuntimeError(f"{unit} still active after {timeout}s")


class Daemon:
    """io.machinepy1 in the test host (its units installed, D-Bus-activated), called
    over the system bus from here: no client start-up in the times."""

    def __init__(self, mp: list[str]) -> None:
        _run([*mp, "install-units"])
        from machinepy.integrate.dbus import Connection

        self.bus = Connection.open("unix:path=/run/dbus/system_bus_socket")

    def call(self, member: str, sig: str = "", *body: object) -> list[object]:
        from machinepy.integrate.dbus import method_call

        return list(self.bus.call_blocking(method_call(
            "io.machinepy1", "/io/machinepy1", "io.machinepy1.Manager", member, sig, body),
            timeout=120).body)

    def create(self, name: str, root: str) -> float:
        """Seconds until CreateContainer answered (the command runs); then stopped, untimed."""
        t0 = time.perf_counter()
        self.call("CreateContainer", "ssasa{sv}", name, root, ["/bin/sleep", "1000"], {})
        elapsed = time.perf_counter() - t0
        # Registered indeed (an unavailable machined would only warn): machined knows it.
        _run(["machinectl", "show", name, "-p", "Name"])
        self.call("TerminateContainer", "s", name)
        deadline = time.monotonic() + 60
        while any(row[0] == name for row in self.call("ListContainers")[0]):  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} still listed after 60 s")
            time.sleep(0.01)
        from machinepy.core.sd import scope_name

        _wait_inactive(scope_name(name))
        return elapsed


def inside(root: str, runs: int, py: str) -> dict[str, dict[str, list[float]]]:
    """Runs in the test host: times for each tool, by measurement."""
    mp = [str(Path(py).with_name("machinepy"))]  # the console script, as users run it
    daemon = Daemon(mp)
    daemon.call("ListContainers")  # activated and warm before the first timed call
    tools = {
        "machinepy": {
            "oneshot": [*mp, "run", "-r", root, "--machine", "bench-1", "--", "/bin/true"],
            "boot": [*mp, "boot", root, "--machine", "bench-b", "--ephemeral", "--notify-ready"],
        },
        "systemd-nspawn": {
            "oneshot": ["systemd-nspawn", "-q", "-D", root, "--machine", "bench-1",
                        "/bin/true"],
            "boot": ["systemd-nspawn", "-q", "-D", root, "--machine", "bench-b", "--boot",
                     "--volatile=overlay", "--notify-ready=yes", "--console=passive"],
        },
    }
    out: dict[str, dict[str, list[float]]] = {
        tool: {"oneshot": [], "boot": [], "poweroff": []} for tool in tools}
    out["machinepy"]["daemon"] = []
    # Interleaved, so that a slow spell of the machine hits both tools alike.
    for i in range(runs + 1):  # the first is a warm-up
        for tool, argv in tools.items():
            times = out[tool]
            t0 = time.perf_counter()
            _run(argv["oneshot"])
            t1 = time.perf_counter()
            unit = f"bench-{tool}-{i}.service"
            _run(["systemd-run", "-q", f"--unit={unit}", "-p", "Type=notify",
                  "-p", "NotifyAccess=all", "-p", "TimeoutStartSec=120", "--", *argv["boot"]])
            t2 = time.perf_counter()
            _run(["machinectl", "poweroff", "bench-b"])
            _wait_inactive(unit)
            t3 = time.perf_counter()
            subprocess.run(["systemctl", "reset-failed", unit], capture_output=True)
            if i:
                times["oneshot"].append(t1 - t0)
                times["boot"].append(t2 - t1)
                times["poweroff"].append(t3 - t2)
        created = daemon.create(f"bench-d{i}", root)
        if i:
            out["machinepy"]["daemon"].append(created)
    _run(["systemctl", "stop", "machinepy.service"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--inside", metavar="ROOT", help=argparse.SUPPRESS)
    add_install_option(parser)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.inside, args.runs, sys.executable)))
        return
    use_install(args.installed)
    sys.path.insert(0, str(REPO))
    from integration.testhost import TestHost
    from tests.rootfs import cached_debian_rootfs

    root = str(cached_debian_rootfs())
    with TestHost() as host:
        r = host.run([interpreter(), __file__, "--inside", root, "--runs", str(args.runs)],
                     timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"benchmark failed inside the test host:\n{r.stderr}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    labels = {"oneshot": "one-shot /bin/true, registered", "boot": "boot to READY=1",
              "poweroff": "machinectl poweroff -> unit gone"}
    labels["daemon"] = "daemon: CreateContainer, registered -> running"
    for key, label in labels.items():
        # The daemon's peer is nspawn's registered one-shot.
        peer = "oneshot" if key == "daemon" else key
        results = [Result(f"machinepy: {label}", data["machinepy"][key]),
                   Result(f"systemd-nspawn: {labels[peer]}", data["systemd-nspawn"][peer])]
        print_table(results, f"systemd-nspawn: {labels[peer]}",
                    f"{label}, median of {args.runs} (same test host, same run)")
        mp, ns = results[0].median, results[1].median
        verdict = "MET" if mp / ns <= GOALS[label] else "NOT MET"
        print(f"goal: <= {GOALS[label]:.2f}x nspawn; machinepy = {mp / ns:.2f}x: {verdict}")


if __name__ == "__main__":
    main()
