# SPDX-License-Identifier: BSD-2-Clause
"""`--property NAME=VALUE` and `--cgroup CONTROLLER`, as typed scope-unit properties.

systemd's StartTransientUnit takes typed (name, variant) pairs, and its
command-line tools translate the familiar unit-file syntax ("MemoryMax=1G",
"CPUQuota=50%") into them.  We do the same for the resource-control and kill
settings that make sense on a container's scope, so a typo or an unknown
property is a one-line usage error instead of a D-Bus failure after the
container was half set up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

from machinepy.core.values import parse_bool, parse_signal

USEC_PER_SEC = 1_000_000
UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF


class PropertyError(ValueError):
    """A property that systemd would reject; one line."""


class UnitProperty(NamedTuple):
    name: str
    signature: str  # D-Bus signature of the value
    value: object

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


# ---------------------------------------------------------------------------
# Value parsers: each takes the text after '=' and returns (name, sig, value),
# because some settings change name with their unit (CPUQuota → ...PerSecUSec).

Parsed = tuple[str, str, object]

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
                "E": 1 << 60}
_TIME_SUFFIX = {
    "us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": USEC_PER_SEC, "sec": USEC_PER_SEC,
    "": USEC_PER_SEC, "m": 60 * USEC_PER_SEC, "min": 60 * USEC_PER_SEC,
    "h": 3600 * USEC_PER_SEC, "hr": 3600 * USEC_PER_SEC, "d": 86400 * USEC_PER_SEC,
}


def _percent(text: str) -> float | None:
    if not text.endswith("%"):
        return None
    try:
        value = float(text[:-1])
    except ValueError:
        return None
    return value if 0 <= value < math.inf else None  # also rejects nan and inf


def _digits(text: str) -> bool:
    # str.isdigit() also accepts '²' and other digits int() refuses.
    return text.isascii() and text.isdigit()


def _size(name: str, text: str) -> Parsed:
    """Bytes with K/M/G/T suffixes (base 1024), a percentage of RAM, or infinity."""
    if text == "infinity":
        return name, "t", UINT64_MAX
    pct = _percent(text)
    if pct is not None:
        if pct > 100:
            raise PropertyError(f"invalid {name}={text}: percentage above 100%")
        return f"{name}Scale", "u", round(pct / 100 * UINT32_MAX)
    value = _bytes(text)
    if value is None:
        raise PropertyError(f"invalid {name}={text}: expected bytes (e.g. 512M), N% or infinity")
    return name, "t", value


def _bytes(text: str) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?", text, re.ASCII)
    if not m:
        return None
    # Exact: a float loses bytes above 2**53, and must fit the D-Bus 't'.
    value = int(Fraction(m.group(1)) * _SIZE_SUFFIX[m.group(2)])
    return value if value <= UINT64_MAX else None


def _tasks(name: str, text: str) -> Parsed:
    if text == "infinity":
        return name, "t", UINT64_MAX
    pct = _percent(text)
    if pct is not None:
        return f"{name}Scale", "u", round(min(pct, 100) / 100 * UINT32_MAX)
    if not _digits(text) or not 0 < int(text) <= UINT64_MAX:
        raise PropertyError(f"invalid {name}={text}: expected a positive count, N% or infinity")
    return name, "t", int(text)


def _cpu_quota(name: str, text: str) -> Parsed:
    pct = _percent(text)
    usec = round(pct / 100 * USEC_PER_SEC) if pct is not None else 0
    if usec == 0 or usec > UINT64_MAX:
        raise PropertyError(f"invalid {name}={text}: expected a percentage such as 50% or 200%")
    return "CPUQuotaPerSecUSec", "t", usec


def _weight(name: str, text: str) -> Parsed:
    if _digits(text) and 1 <= int(text) <= 10000:
        return name, "t", int(text)
    if name in ("CPUWeight", "StartupCPUWeight") and text == "idle":
        return name, "t", 0
    raise PropertyError(f"invalid {name}={text}: expected a weight between 1 and 10000")


def _bool(name: str, text: str) -> Parsed:
    try:
        return name, "b", parse_bool(text)
    except ValueError:
        raise PropertyError(f"invalid {name}={text}: expected yes or no") from None


def timespan_usec(text: str) -> int:
    """'90', '1min 30s', '500ms', 'infinity' → microseconds (systemd.time(7))."""
    if text == "infinity":
        return UINT64_MAX
    parts = re.findall(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", text, re.ASCII)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(text)
    total = 0.0
    for number, unit in parts:
        if unit not in _TIME_SUFFIX:
            raise ValueError(text)
        total += float(number) * _TIME_SUFFIX[unit]
    if not total <= UINT64_MAX:  # 't' on the bus; also catches inf
        raise ValueError(text)
    return round(total)


def _timespan(name: str, text: str) -> Parsed:
    try:
        usec = timespan_usec(text)
    except ValueError:
        raise PropertyError(f"invalid {name}={text}: expected a time span such as 30s") from None
    return name.removesuffix("Sec") + "USec", "t", usec


def _string(choices: tuple[str, ...]) -> Callable[[str, str], Parsed]:
    def parse(name: str, text: str) -> Parsed:
        if choices and text not in choices:
            raise PropertyError(f"invalid {name}={text}: expected one of {', '.join(choices)}")
        return name, "s", text

    return parse


def _signal(name: str, text: str) -> Parsed:
    try:
        return name, "i", parse_signal(text)
    except ValueError:
        raise PropertyError(f"invalid {name}={text}: unknown signal") from None


def _device_allow(name: str, text: str) -> Parsed:
    path, _, access = text.partition(" ")
    access = access.strip() or "rwm"
    if not path or set(access) - set("rwm"):
        raise PropertyError(f"invalid {name}={text}: expected 'DEVICE [r][w][m]'")
    return name, "a(ss)", ((path, access),)


def _slice(name: str, text: str) -> Parsed:
    if not re.fullmatch(r"[A-Za-z0-9:_.\\-]+\.slice", text):
        raise PropertyError(f"invalid {name}={text}: expected a slice unit name (NAME.slice)")
    return name, "s", text


def _io_limit(name: str, text: str) -> Parsed:
    path, _, limit = text.partition(" ")
    limit = limit.strip()
    value = UINT64_MAX if limit == "infinity" else _bytes(limit)
    if not path.startswith("/") or value is None:
        raise PropertyError(f"invalid {name}={text}: expected 'DEVICE BYTES'")
    return name, "a(st)", ((path, value),)


PROPERTIES: dict[str, Callable[[str, str], Parsed]] = {
    **{n: _size for n in ("MemoryMax", "MemoryHigh", "MemoryLow", "MemoryMin",
                          "MemorySwapMax", "MemoryZSwapMax", "MemoryLimit")},
    **{n: _tasks for n in ("TasksMax",)},
    "CPUQuota": _cpu_quota,
    **{n: _weight for n in ("CPUWeight", "StartupCPUWeight", "IOWeight", "StartupIOWeight")},
    **{n: _bool for n in ("CPUAccounting", "MemoryAccounting", "IOAccounting",
                          "TasksAccounting", "IPAccounting", "BlockIOAccounting",
                          "SendSIGKILL", "SendSIGHUP")},
    **{n: _timespan for n in ("TimeoutStopSec", "RuntimeMaxSec", "CPUQuotaPeriodSec")},
    **{n: _io_limit for n in ("IOReadBandwidthMax", "IOWriteBandwidthMax")},
    "DevicePolicy": _string(("auto", "closed", "strict")),
    "DeviceAllow": _device_allow,
    "KillMode": _string(("control-group", "mixed", "process", "none")),
    "KillSignal": _signal,
    "FinalKillSignal": _signal,
    "Slice": _slice,
    "Description": _string(()),
    "CollectMode": _string(("inactive", "inactive-or-failed")),
    "OOMPolicy": _string(("continue", "stop", "kill")),
    "ManagedOOMMemoryPressure": _string(("auto", "kill")),
    "ManagedOOMSwap": _string(("auto", "kill")),
}

# Set by machinepy itself; a user value would break registration or cleanup.
RESERVED = frozenset({"PIDs", "Delegate", "AddRef", "Controller"})


def parse_property(text: str) -> UnitProperty:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise PropertyError(f"invalid --property '{text}': expected NAME=VALUE")
    if name in RESERVED:
        raise PropertyError(f"invalid --property '{text}': {name} is set by machinepy")
    parse = PROPERTIES.get(name)
    if parse is None:
        raise PropertyError(
            f"invalid --property '{text}': unknown or unsupported scope property '{name}' "
            f"(supported: {', '.join(sorted(PROPERTIES))})"
        )
    return UnitProperty(*parse(name, value.strip()))


# pflask's -g/--cgroup CONTROLLER made a cgroup-v1 hierarchy for the container.
# Under cgroup v2 and systemd, the equivalent is turning that controller's
# accounting on for the machine's scope; systemd then enables the controller
# on the delegated subtree.
CONTROLLER_ACCOUNTING = {
    "cpu": "CPUAccounting", "cpuacct": "CPUAccounting",
    "memory": "MemoryAccounting",
    "pids": "TasksAccounting",
    "io": "IOAccounting", "blkio": "IOAccounting",
}


def accounting_property(controller: str) -> UnitProperty:
    name = CONTROLLER_ACCOUNTING.get(controller)
    if name is None:
        raise PropertyError(
            f"invalid --cgroup '{controller}': unknown controller "
            f"(expected {', '.join(sorted(CONTROLLER_ACCOUNTING))})"
        )
    return UnitProperty(name, "b", True)
