# SPDX-License-Identifier: BSD-2-Clause
"""Capability bounding set: systemd-nspawn's default, adjusted with pflask's syntax."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from machinepy.core.spec import SpecError

CAP_NAMES: tuple[str, ...] = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin",
    "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace",
    "sys_pacct", "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
    "perfmon", "bpf", "checkpoint_restore",
)
CAP_NUMBERS = {name: number for number, name in enumerate(CAP_NAMES)}

# What systemd-nspawn keeps by default (src/nspawn/nspawn.c, arg_caps_retain);
# net_admin is added when the container has its own network namespace.
DEFAULT_RETAIN = frozenset({
    "audit_control", "audit_write", "chown", "dac_override", "dac_read_search", "fowner",
    "fsetid", "ipc_owner", "kill", "lease", "linux_immutable", "mknod", "net_bind_service",
    "net_broadcast", "net_raw", "setfcap", "setgid", "setpcap", "setuid", "sys_admin",
    "sys_boot", "sys_chroot", "sys_nice", "sys_ptrace", "sys_resource", "sys_tty_config",
})


def _name(token: str, spec: str) -> str:
    name = token.lower().removeprefix("cap_")
    if name != "all" and name not in CAP_NUMBERS:
        raise SpecError(f"invalid --caps '{spec}': unknown capability '{token}'")
    return name


def parse_caps(specs: Iterable[str]) -> tuple[str, ...]:
    """Validate pflask-style adjustments (`+all`, `-chown,+net_admin`); keep them in order."""
    out: list[str] = []
    for spec in specs:
        for token in spec.split(","):
            token = token.strip()
            if not token:
                raise SpecError(f"invalid --caps '{spec}': empty item")
            sign = token[0] if token[0] in "+-" else "+"
            out.append(sign + _name(token.lstrip("+-"), spec))
    return tuple(out)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def retained(adjustments: Sequence[str], *, private_network: bool) -> frozenset[str]:
    keep = set(DEFAULT_RETAIN)
    if private_network:
        keep.add("net_admin")
    for adj in adjustments:
        sign, name = adj[0], adj[1:]
        names = set(CAP_NAMES) if name == "all" else {name}
        keep = keep | names if sign == "+" else keep - names
    return frozenset(keep)


def bounding_drop(adjustments: Sequence[str], *, private_network: bool) -> tuple[int, ...]:
    """Capability numbers to drop from the bounding set."""
    keep = {CAP_NUMBERS[n] for n in retained(adjustments, private_network=private_network)}
    return tuple(c for c in range(last_cap() + 1) if c not in keep)
