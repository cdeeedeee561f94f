# SPDX-License-Identifier: BSD-2-Clause
"""The io.machinepy1 daemon: start latency vs systemd-nspawn, and 100 containers in one daemon.

    python3 bench/daemon.py [--runs 20] [--containers 100|1000] [--root BUSYBOX_ROOT]

Runs `machinepy daemon` on a private dbus-daemon (no machined registration on
either side: `Register=false` and `systemd-nspawn --register=no`), then, in
the same run on the same busybox root:

- start: CreateContainer sent → reply (the reply comes once the container's
  command has been exec'd) vs a whole `systemd-nspawn /bin/true` one-shot;
  goal <= 0.5x;
- N containers in one daemon: time to start them all (one CreateContainer
  after the other), the daemon's RSS, ListContainers latency (median of 50)
  and the daemon's CPU time over 5 idle seconds;
- `machinepy list` and `machinepy status NAME` with them running, against the
  interpreter's floor (`python3 -c pass`): goal floor + 30 ms.
  Goals (issue 11): 100: < 5 s, < 40 MiB, < 5 ms, ~0; 1000: < 60 s, < 150 MiB, < 20 ms.

The client is machinepy's own D-Bus connection (jeepney), blocking: what
`machinepy list` pays, its parse of the reply included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    Result,
    add_install_option,
    interpreter,
    machinepy_script,
    print_table,
    time_command,
    use_install,
)

BUS_CONFIG = """<busconfig>
  <type>system</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""
GOAL_RATIO = 0.5
GOALS = {100: {"start all": 5.0, "rss MiB": 40.0, "ListContainers ms": 5.0},
         1000: {"start all": 60.0, "rss MiB": 150.0, "ListContainers ms": 20.0}}
IDLE_SECONDS = 5.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(address: str, root: str, runs: int, count: int,
            daemon_pid: int) -> tuple[list[float], dict[str, float], list[Result]]:
    from machinepy.integrate.dbus import BusError, Connection, method_call

    bus = Connection.open(address)
    opts = {"Register": ("b", False)}

    def call(member: str, sig: str = "", *body: object) -> list[object]:
        try:
            return list(bus.call_blocking(method_call(
                "io.machinepy1", "/io/machinepy1", "io.machinepy1.Manager", member, sig, body),
                timeout=120).body)
        except BusError as e:
            raise RuntimeError(f"{member}: {e.with_name()}") from None

    def listed() -> list[tuple[str, str, int, str]]:
        return call("ListContainers")[0]  # type: ignore[return-value]

    starts = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        call("CreateContainer", "ssasa{sv}", f"lat-{i}", root, ["/bin/sleep", "1000"], opts)
        if i >= 2:  # warm-up
            starts.append(time.perf_counter() - t0)
        call("TerminateContainer", "s", f"lat-{i}")
        while any(row[0] == f"lat-{i}" for row in listed()):
            time.sleep(0.01)

    t0 = time.perf_counter()
    for i in range(count):
        call("CreateContainer", "ssasa{sv}", f"many-{i}", root, ["/bin/sleep", "100000"], opts)
    stats = {"start all": time.perf_counter() - t0}
    assert len(listed()) == count
    stats["rss MiB"] = rss_mib(daemon_pid)
    latencies = []
    for _ in range(50):
        t0 = time.perf_counter()
        listed()
        latencies.append(time.perf_counter() - t0)
    stats["ListContainers ms"] = statistics.median(latencies) * 1e3
    cpu0 = cpu_seconds(daemon_pid)
    time.sleep(IDLE_SECONDS)
    stats["idle CPU %"] = (cpu_seconds(daemon_pid) - cpu0) / IDLE_SECONDS * 100
    env = {"DBUS_SYSTEM_BUS_ADDRESS": address}
    verbs = [time_command("python3 -c pass (floor)", [interpreter(), "-c", "pass"], runs),
             time_command("machinepy list", [machinepy_script(), "list"], runs, env=env),
             time_command("machinepy status NAME", [machinepy_script(), "status", "many-0"],
                          runs, env=env)]
    for i in range(count):
        call("TerminateContainer", "s", f"many-{i}")
    while listed():
        time.sleep(0.05)
    bus.close()
    return starts, stats, verbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--root", help="busybox rootfs (default: the cached test rootfs)")
    add_install_option(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/daemon.py needs root")
    use_install(args.installed)
    if args.root:
        root = args.root
    else:
        sys.path.insert(0, str(REPO))
        from tests.rootfs import cached_busybox_rootfs

        root = str(cached_busybox_rootfs())
    tmp = Path(tempfile.mkdtemp(prefix="mpy-bench-daemon-"))
    conf = tmp / "bus.conf"
    conf.write_text(BUS_CONFIG.format(path=tmp / "bus"))
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                            "--print-address=1"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    daemon = None
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()
        daemon = subprocess.Popen([interpreter(), "-m", "machinepy", "daemon",
                                   f"--bus-address={address}", f"--state-dir={tmp / 'state'}"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run(["busctl", f"--address={address}", "status", "io.machinepy1"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        starts, stats, verbs = measure(address, root, args.runs, args.containers, daemon.pid)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        bus.terminate()
        bus.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    results = [Result("machinepy daemon: CreateContainer → running", starts)]
    if shutil.which("systemd-nspawn"):
        results.append(time_command("systemd-nspawn --register=no /bin/true",
                                    ["systemd-nspawn", "--register=no", "--keep-unit", "-q",
                                     "-D", root, "/bin/true"], args.runs))
    print_table(results, "systemd-nspawn --register=no /bin/true",
                f"start, median of {args.runs} runs (same machine, same run)")
    if len(results) > 1 and results[1].times:
        ratio = results[0].median / results[1].median
        print(f"goal: <= {GOAL_RATIO}x nspawn; {ratio:.2f}x: "
              f"{'MET' if ratio <= GOAL_RATIO else 'NOT MET'}")
    print(f"\n{args.containers} containers in one daemon")
    goals = GOALS[1000 if args.containers >= 1000 else 100]
    for key, value in stats.items():
        goal = goals.get(key)
        met = "MET" if goal is not None and value < goal else "NOT MET"
        verdict = "" if goal is None else f" (goal < {goal:g}: {met})"
        print(f"  {key:<20} {value:>9.2f}{verdict}")
    report_verbs(verbs, args.containers)


def report_verbs(verbs: list[Result], count: int) -> None:
    print_table(verbs, "python3 -c pass (floor)",
                f"client verbs with {count} containers, median (same run)")
    floor = verbs[0].median if verbs[0].times else None
    for r in verbs[1:]:
        if floor is not None and r.times:
            extra = (r.median - floor) * 1e3
            print(f"goal: <= floor + 30 ms; {r.name} = floor + {extra:.1f} ms: "
                  f"{'MET' if extra <= 30 else 'NOT MET'}")


if __name__ == "__main__":
    main()
