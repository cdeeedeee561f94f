# SPDX-License-Identifier: BSD-2-Clause
"""--property NAME=VALUE and --cgroup CONTROLLER → typed scope-unit properties."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinepy.cli.run import main
from machinepy.core.unitprops import (
    PROPERTIES,
    RESERVED,
    UINT32_MAX,
    UINT64_MAX,
    PropertyError,
    UnitProperty,
    accounting_property,
    parse_property,
    timespan_usec,
)

REPO = Path(__file__).resolve().parent.parent
SIZES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
TIMES = {"us": 1, "ms": 1000, "s": 10**6, "sec": 10**6, "min": 60 * 10**6, "h": 3600 * 10**6,
         "d": 86400 * 10**6}


def parsed(text: str) -> tuple[str, str, object]:
    return tuple(parse_property(text))  # type: ignore[return-value]


@pytest.mark.parametrize("text, expected", [
    ("MemoryMax=64M", ("MemoryMax", "t", 64 * 2**20)),
    ("MemoryMax=1.5G", ("MemoryMax", "t", 3 * 2**29)),
    ("MemoryHigh=4096", ("MemoryHigh", "t", 4096)),
    ("MemoryLow=2KiB", ("MemoryLow", "t", 2048)),
    ("MemoryMax=infinity", ("MemoryMax", "t", 2**64 - 1)),
    ("MemoryMax=50%", ("MemoryMaxScale", "u", 2**31)),
    ("MemorySwapMax=0", ("MemorySwapMax", "t", 0)),
    ("MemoryMax=15E", ("MemoryMax", "t", 15 * 2**60)),
    ("CPUQuota=50%", ("CPUQuotaPerSecUSec", "t", 500_000)),
    ("CPUQuota=200%", ("CPUQuotaPerSecUSec", "t", 2_000_000)),
    ("TasksMax=512", ("TasksMax", "t", 512)),
    ("TasksMax=infinity", ("TasksMax", "t", UINT64_MAX)),
    ("TasksMax=10%", ("TasksMaxScale", "u", round(UINT32_MAX / 10))),
    ("CPUWeight=1", ("CPUWeight", "t", 1)),
    ("CPUWeight=10000", ("CPUWeight", "t", 10000)),
    ("CPUWeight=idle", ("CPUWeight", "t", 0)),
    ("IOWeight=500", ("IOWeight", "t", 500)),
    ("CPUAccounting=yes", ("CPUAccounting", "b", True)),
    ("MemoryAccounting=off", ("MemoryAccounting", "b", False)),
    ("SendSIGKILL=False", ("SendSIGKILL", "b", False)),
    ("IOAccounting=1", ("IOAccounting", "b", True)),
    ("TimeoutStopSec=1min 30s", ("TimeoutStopUSec", "t", 90_000_000)),
    ("TimeoutStopSec=90", ("TimeoutStopUSec", "t", 90_000_000)),
    ("RuntimeMaxSec=infinity", ("RuntimeMaxUSec", "t", UINT64_MAX)),
    ("CPUQuotaPeriodSec=10ms", ("CPUQuotaPeriodUSec", "t", 10_000)),
    ("DeviceAllow=/dev/null rw", ("DeviceAllow", "a(ss)", (("/dev/null", "rw"),))),
    ("DeviceAllow=char-pts", ("DeviceAllow", "a(ss)", (("char-pts", "rwm"),))),
    ("DevicePolicy=strict", ("DevicePolicy", "s", "strict")),
    ("IOReadBandwidthMax=/dev/sda 1M", ("IOReadBandwidthMax", "a(st)", (("/dev/sda", 2**20),))),
    ("KillSignal=SIGRTMIN+3", ("KillSignal", "i", int(signal.SIGRTMIN) + 3)),
    ("KillSignal=TERM", ("KillSignal", "i", int(signal.SIGTERM))),
    ("FinalKillSignal=9", ("FinalKillSignal", "i", 9)),
    ("KillMode=mixed", ("KillMode", "s", "mixed")),
    ("Slice=machine-box.slice", ("Slice", "s", "machine-box.slice")),
    ("Description=my box = fine", ("Description", "s", "my box = fine")),
    ("OOMPolicy=kill", ("OOMPolicy", "s", "kill")),
    (" MemoryMax = 1K ", ("MemoryMax", "t", 1024)),
])
def test_parse_property(text: str, expected: tuple[str, str, object]) -> None:
    assert parsed(text) == expected


def test_unit_property_str() -> None:
    assert str(parse_property("MemoryMax=1K")) == "MemoryMax=1024"
    assert parse_property("TasksMax=5") == UnitProperty("TasksMax", "t", 5)


def one_line_error(text: str) -> str:
    with pytest.raises(PropertyError) as caught:
        parse_property(text)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("text", [
    "MemoryMax=lots", "MemoryMax=101%", "MemoryMax=-1", "MemoryMax=16E", "MemoryMax=1m",
    pytest.param("MemoryMax=" + "9" * 400, id="MemoryMax=9x400"), "MemoryMax=٣M",
    "CPUQuota=50", "CPUQuota=0%", "CPUQuota=-5%", "CPUQuota=inf%", "CPUQuota=nan%",
    "CPUQuota=1e400%", "CPUQuota=1e30%",
    "TasksMax=0", "TasksMax=-1", "TasksMax=many", "TasksMax=²", "TasksMax=18446744073709551616",
    "CPUWeight=0", "CPUWeight=10001", "CPUWeight=²", "IOWeight=idle",
    "CPUAccounting=maybe", "CPUAccounting=",
    "TimeoutStopSec=soon", "TimeoutStopSec=1x", "TimeoutStopSec=1.5.5s", "TimeoutStopSec=",
    pytest.param("TimeoutStopSec=" + "9" * 400, id="TimeoutStopSec=9x400"),
    "TimeoutStopSec=300000000000d",
    "DeviceAllow=/dev/null rwx", "DeviceAllow=",
    "IOReadBandwidthMax=sda 1M", "IOReadBandwidthMax=/dev/sda lots",
    "KillSignal=SIGFOO", "KillSignal=0", "KillSignal=65", "KillSignal=99999999999",
    "KillSignal=SIGRTMIN+99", "KillSignal=²",
    "KillMode=gently", "DevicePolicy=open", "Slice=machine", "Slice=a/b.slice",
])
def test_malformed_values(text: str) -> None:
    name = text.partition("=")[0]
    assert f"invalid {name}=" in one_line_error(text)


@pytest.mark.parametrize("text", ["Bogus=1", "memorymax=1G", "CPUShares=100"])
def test_unknown_property(text: str) -> None:
    name = text.partition("=")[0]
    message = one_line_error(text)
    assert f"unknown or unsupported scope property '{name}'" in message
    assert "MemoryMax" in message  # and what would have been accepted


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_properties(name: str) -> None:
    assert f"{name} is set by machinepy" in one_line_error(f"{name}=yes")


@pytest.mark.parametrize("text", ["MemoryMax", "=1G", "", " = "])
def test_not_name_equals_value(text: str) -> None:
    assert "expected NAME=VALUE" in one_line_error(text)


@pytest.mark.parametrize("controller, name", [
    ("cpu", "CPUAccounting"), ("cpuacct", "CPUAccounting"), ("memory", "MemoryAccounting"),
    ("pids", "TasksAccounting"), ("io", "IOAccounting"), ("blkio", "IOAccounting"),
])
def test_cgroup_controller(controller: str, name: str) -> None:
    assert accounting_property(controller) == UnitProperty(name, "b", True)


@pytest.mark.parametrize("controller", ["net_cls", "CPU", "", "freezer"])
def test_unknown_cgroup_controller(controller: str) -> None:
    with pytest.raises(PropertyError) as caught:
        accounting_property(controller)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"invalid --cgroup '{controller}': unknown controller" in message


def test_timespan_usec() -> None:
    assert timespan_usec("1min 30s") == timespan_usec("1min30s") == 90 * 10**6
    assert timespan_usec("1h 2m 3s 4ms 5us") == 3723 * 10**6 + 4005
    assert timespan_usec("0.5s") == 500_000
    with pytest.raises(ValueError):
        timespan_usec("1 fortnight")


# -- properties of the parser -------------------------------------------------


@st.composite
def size_text(draw: st.DrawFn) -> tuple[str, int]:
    suffix = draw(st.sampled_from(sorted(SIZES)))
    count = draw(st.integers(0, UINT64_MAX // SIZES[suffix]))
    return f"{count}{suffix}", count * SIZES[suffix]


@given(size_text(), st.sampled_from(["MemoryMax", "MemoryHigh", "MemorySwapMax"]))
def test_sizes_are_exact(size: tuple[str, int], name: str) -> None:
    text, expected = size
    assert parsed(f"{name}={text}") == (name, "t", expected)


@st.composite
def fractional_size(draw: st.DrawFn) -> tuple[str, int]:
    suffix = draw(st.sampled_from(sorted(SIZES)))
    whole = draw(st.integers(0, min(2**20, UINT64_MAX // SIZES[suffix] - 1)))
    thousandths = draw(st.integers(0, 999))
    exact = (whole + Fraction(thousandths, 1000)) * SIZES[suffix]
    return f"{whole}.{thousandths:03d}{suffix}", int(exact)


@given(fractional_size())
def test_fractional_sizes_round_down(size: tuple[str, int]) -> None:
    text, expected = size
    assert parsed(f"MemoryMax={text}") == ("MemoryMax", "t", expected)


@given(st.sampled_from(sorted(SIZES)), st.integers(1, 2**70))
def test_sizes_beyond_uint64_are_refused(suffix: str, excess: int) -> None:
    count = UINT64_MAX // SIZES[suffix] + excess
    one_line_error(f"MemoryMax={count}{suffix}")


@given(st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(sorted(TIMES))),
                min_size=1, max_size=5),
       st.sampled_from(["", " "]))
def test_timespans_add_up(parts: list[tuple[int, str]], sep: str) -> None:
    text = sep.join(f"{n}{unit}" for n, unit in parts)
    assert parsed(f"TimeoutStopSec={text}") == (
        "TimeoutStopUSec", "t", sum(n * TIMES[unit] for n, unit in parts))


FITS = {"t": (0, UINT64_MAX), "u": (0, UINT32_MAX), "i": (1, signal.NSIG - 1)}


def assert_fits(signature: str, value: object) -> None:
    """The value is what its D-Bus signature can carry: no surprise when marshalled."""
    if signature in FITS:
        low, high = FITS[signature]
        assert isinstance(value, int) and not isinstance(value, bool)
        assert low <= value <= high
    elif signature == "b":
        assert isinstance(value, bool)
    elif signature == "s":
        assert isinstance(value, str)
    else:
        assert signature in ("a(ss)", "a(st)")
        assert isinstance(value, tuple)
        for path, item in value:
            assert isinstance(path, str) and path
            if signature == "a(st)":
                assert_fits("t", item)
            else:
                assert isinstance(item, str)


numberish = st.from_regex(r"[-+ 0-9.eE%²٣]{0,8}(infinity|[KMGTPE]|i?B|s|min|ms|h|d|%)?",
                          fullmatch=True)


@given(st.one_of(st.sampled_from(sorted(PROPERTIES)), st.text(max_size=12)),
       st.one_of(numberish, st.text(), st.sampled_from(["yes", "idle", "SIGRTMIN+3", "50%"])))
def test_anything_is_a_property_or_a_one_line_property_error(name: str, value: str) -> None:
    text = f"{name}={value}"
    try:
        prop = parse_property(text)
    except PropertyError as e:
        if text.splitlines() == [text]:
            assert len(str(e).splitlines()) == 1
        return
    assert prop.name.startswith(name.strip().removesuffix("Sec"))
    assert_fits(prop.signature, prop.value)


@given(st.text())
def test_arbitrary_text(text: str) -> None:
    with contextlib.suppress(PropertyError):
        assert_fits(*parse_property(text)[1:])


# -- on the command line ------------------------------------------------------


def test_cli_rejects_an_unknown_property() -> None:
    # Validation comes before the root check: the same answer for anyone.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "machinepy", "run", "--property=Bogus=1", "--",
                        "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("machinepy: invalid --property 'Bogus=1'")


@pytest.mark.parametrize("argv, fragment", [
    (["--property=CPUQuota=inf%"], "invalid CPUQuota=inf%"),
    (["-p", "TasksMax=²"], "invalid TasksMax=²"),
    (["--property", "Delegate=no"], "Delegate is set by machinepy"),
    (["--cgroup=net_cls"], "invalid --cgroup 'net_cls'"),
    (["-g", "memory", "-p", "MemoryMax=lots"], "invalid MemoryMax=lots"),
])
def test_cli_property_errors(argv: list[str], fragment: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and fragment in err
