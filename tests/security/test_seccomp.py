# SPDX-License-Identifier: BSD-2-Clause
"""The default seccomp filter (issue 8): what it resolves to, and the attacks it stops."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from machinepy.cli.run import main as cli_main
from machinepy.core import syscall_groups
from machinepy.core.caps import DEFAULT_RETAIN, retained
from machinepy.core.spec import SpecError
from machinepy.runtime import seccomp
from tests.security.conftest import assert_blocked, run_in, run_probe
from tests.test_userns import as_user, unprivileged_user  # noqa: F401 - a fixture

# ---------------------------------------------------------------------------
# The filter's contents (no root needed)


def _resolve(items: tuple[str, ...] = (), caps: tuple[str, ...] = ()) -> seccomp.Filter:
    return seccomp.resolve(items, retained(caps, private_network=False))


def test_default_allows_ordinary_calls_and_denies_the_attacks() -> None:
    flt = _resolve()
    for name in ("read", "openat", "execve", "clone3", "mount", "pivot_root", "ioctl", "socket",
                 "name_to_handle_at", "seccomp", "setresuid", "sethostname"):
        assert name in flt.allow, name
    for name in ("open_by_handle_at", "keyctl", "add_key", "request_key", "bpf",
                 "perf_event_open", "swapoff", "swapon", "userfaultfd", "kexec_load",
                 "init_module", "settimeofday", "iopl", "mlock", "acct", "syslog", "quotactl"):
        assert name in flt.deny, name
    assert not flt.allow & flt.deny
    # Every call systemd knows is decided (the rest is ENOSYS).
    assert flt.allow | flt.deny >= syscall_groups.expand(("@known",), syscall_groups.GROUPS)


def test_capability_conditional_calls_follow_the_bounding_set() -> None:
    assert {"sys_ptrace", "sys_boot", "sys_tty_config"} <= DEFAULT_RETAIN
    assert {"ptrace", "process_vm_readv", "reboot", "vhangup"} <= _resolve().allow
    dropped = _resolve(caps=("-sys_ptrace", "-sys_boot"))
    # (process_vm_readv/writev stay: systemd's @ipc holds them.)
    assert {"ptrace", "reboot"} <= dropped.deny
    added = _resolve(caps=("+sys_time", "+sys_module", "+ipc_lock", "+sys_rawio", "+syslog"))
    assert {"settimeofday", "clock_settime", "init_module", "mlock", "iopl",
            "syslog"} <= added.allow


def test_allow_and_deny_items_denial_wins_whatever_the_order() -> None:
    items = syscall_groups.parse_filter(["bpf @swap", "~@mount", "mount"])
    assert items == ("bpf", "@swap", "~@mount", "mount")
    flt = _resolve(items)
    assert {"bpf", "swapon", "swapoff"} <= flt.allow
    assert {"mount", "umount2", "pivot_root", "fsopen"} <= flt.deny
    assert "userfaultfd" in _resolve(syscall_groups.parse_filter(["userfaultfd"])).allow
    # A name only a group lists (systemd 252 has set_tls in @default, not @known):
    # accepted, and once denied not allowed (ENOSYS, as for every name outside @known).
    assert "set_tls" in _resolve().allow
    assert "set_tls" not in _resolve(syscall_groups.parse_filter(["~set_tls"])).allow


@pytest.mark.parametrize("value, word", [
    ("nosuchcall", "unknown system call 'nosuchcall'"),
    ("~@nosuchgroup", "unknown group '@nosuchgroup'"),
    ("~", "no system call named"),
    ("", "no system call named"),
])
def test_bad_filter_is_one_line_exit_2(value: str, word: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SpecError, match="--system-call-filter"):
        syscall_groups.parse_filter([value])
    assert cli_main(["run", f"--system-call-filter={value}", "--", "/bin/true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err


def test_no_new_privileges_option_values(capsys: pytest.CaptureFixture[str]) -> None:
    from machinepy.cli.run import build_parser, spec_from_args

    def spec(*opts: str) -> bool:
        args = build_parser("run").parse_args(["run", *opts, "--", "/bin/true"])
        args.init_args = []
        return spec_from_args(args).no_new_privileges

    assert not spec()
    assert spec("--no-new-privileges")
    assert spec("--no-new-privileges=yes")
    assert not spec("--no-new-privileges=no")
    assert cli_main(["run", "--no-new-privileges=maybe", "--", "/bin/true"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_dbus_options_round_trip() -> None:
    from machinepy.cli.run import build_parser, options_from_args
    from machinepy.core.options import options_to_bus
    from machinepy.service.manager import spec_from_options

    args = build_parser("run").parse_args(
        ["run", "--system-call-filter=~@mount", "--system-call-filter=bpf",
         "--no-new-privileges", "--", "/bin/true"])
    opts = options_to_bus(options_from_args(args))
    assert opts["SystemCallFilter"][1] == ["~@mount", "bpf"]
    assert opts["NoNewPrivileges"][1] is True
    spec = spec_from_options("", "", ["/bin/true"], opts)
    assert spec.system_call_filter == ("~@mount", "bpf")
    assert spec.no_new_privileges
    with pytest.raises(SpecError, match="unknown system call"):
        spec_from_options("", "", ["/bin/true"],
                          {"SystemCallFilter": ("as", ["nope"])})


# ---------------------------------------------------------------------------
# Building and caching the programs


def test_programs_per_abi_plus_argument_rules() -> None:
    programs = seccomp.build(_resolve(), "x86_64")
    assert len(programs) == 4  # x86_64, x86, x32, then the argument rules
    for p in programs:
        assert p and len(p) % 8 == 0 and len(p) // 8 <= 4096


def test_cache_hit_skips_the_build_and_a_bad_cache_never_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(seccomp, "cache_dir", lambda: str(cache))
    first = seccomp.programs_for((), DEFAULT_RETAIN)
    (entry,) = cache.iterdir()
    real_build = seccomp.build

    def no_build(*a: object) -> tuple[bytes, ...]:
        raise AssertionError("built despite the cache")

    monkeypatch.setattr(seccomp, "build", no_build)
    assert seccomp.programs_for((), DEFAULT_RETAIN) == first
    # Other inputs: another entry.
    monkeypatch.setattr(seccomp, "build", real_build)
    other = seccomp.programs_for(("bpf",), DEFAULT_RETAIN)
    assert other != first and len(list(cache.iterdir())) == 2
    # A truncated entry, or one in a directory others may write, is rebuilt, not used.
    entry.write_bytes(entry.read_bytes()[:-3])
    assert seccomp.programs_for((), DEFAULT_RETAIN) == first
    planted = seccomp.CACHE_MAGIC + b"junk"
    entry.write_bytes(planted)
    cache.chmod(0o777)
    monkeypatch.setattr(seccomp, "build", lambda *a: (b"\0" * 8,))
    assert seccomp.programs_for((), DEFAULT_RETAIN) == (b"\0" * 8,)
    assert entry.read_bytes() == planted  # nor written into
    # An unwritable cache place: still a filter.
    monkeypatch.setattr(seccomp, "cache_dir", lambda: "/proc/no-such-dir")
    assert seccomp.programs_for((), DEFAULT_RETAIN) == (b"\0" * 8,)


def test_cache_hit_loads_no_libseccomp(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from machinepy.runtime import seccomp\n"
        f"seccomp.cache_dir = lambda: {str(tmp_path)!r}\n"
        "seccomp.programs_for((), ('sys_admin',))\n"
        "with open('/proc/self/maps') as f: print('libseccomp' in f.read(),"
        " 'machinepy.core.syscall_groups' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, check=True).stdout.split() for _ in range(2)]
    assert runs == [["True", "True"], ["False", "False"]]


# ---------------------------------------------------------------------------
# The attacks, from inside a container (root without userns, and pick)

PROBES = ["shocker", "keyctl", "bpf", "perf", "userfaultfd", "tiocsti", "audit", "unknown"]


@pytest.mark.root
@pytest.mark.parametrize("name", PROBES)
def test_attack_is_blocked(name: str, mode: tuple[str, ...], busybox_root: Path,
                           probe: Callable[[str], Path]) -> None:
    assert_blocked(run_probe(busybox_root, probe(name), opts=mode))


@pytest.mark.root
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the ia32 ABI of x86-64")
def test_attacks_through_the_compat_abi_are_blocked(mode: tuple[str, ...], busybox_root: Path,
                                                    probe: Callable[[str], Path]) -> None:
    assert_blocked(run_probe(busybox_root, probe("compat"), opts=mode))


@pytest.mark.root
def test_swapoff_is_blocked(mode: tuple[str, ...], busybox_root: Path,
                            probe: Callable[[str], Path]) -> None:
    r = run_probe(busybox_root, probe("swapoff"), "/scratch/swapfile",
                  opts=("-m", "tmp:/scratch", *mode))
    assert_blocked(r)


@pytest.mark.root
def test_attacks_blocked_on_the_host_root(probe: Callable[[str], Path]) -> None:
    for name in ("shocker", "audit", "unknown", "userfaultfd"):
        r = run_in(None, str(probe(name)))
        assert_blocked(r)


@pytest.mark.root
def test_filter_options_change_what_the_container_may_call(
        busybox_root: Path, probe: Callable[[str], Path]) -> None:
    # Allowed back in: the probes see the call go through (so they can fail).
    r = run_probe(busybox_root, probe("userfaultfd"), opts=("--system-call-filter=userfaultfd",))
    assert r.returncode == 1, r.stdout + r.stderr
    r = run_probe(busybox_root, probe("swapoff"), "/scratch/swapfile",
                  opts=("-m", "tmp:/scratch", "--system-call-filter=@swap"))
    assert r.returncode == 1 and "Invalid argument" in r.stdout, r.stdout + r.stderr
    # Denied: a call busybox needs fails with EPERM; a denial beats an allowance.
    mkdir = ("/bin/mkdir", "/scratch/d")
    scratch = ("-m", "tmp:/scratch")
    r = run_in(busybox_root, *mkdir, opts=(*scratch, "--system-call-filter=~mkdir mkdirat"))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    r = run_in(busybox_root, *mkdir, opts=(*scratch, "--system-call-filter=~mkdir mkdirat",
                                           "--system-call-filter=mkdir mkdirat"))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    r = run_in(busybox_root, *mkdir, opts=scratch)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.root
@pytest.mark.parametrize("user", [(), ("--user=nobody",)])
def test_no_new_privileges(user: tuple[str, ...], mode: tuple[str, ...],
                           busybox_root: Path) -> None:
    # The filter is loaded either way: before the uid switch, or thanks to NNP.
    status = ("/bin/grep", "-e", "NoNewPrivs", "-e", "Seccomp:", "/proc/self/status")
    r = run_in(busybox_root, *status, opts=(*user, *mode))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["NoNewPrivs:", "0", "Seccomp:", "2"]
    r = run_in(busybox_root, *status, opts=(*user, *mode, "--no-new-privileges"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["NoNewPrivs:", "1", "Seccomp:", "2"]


@pytest.mark.root
def test_ordinary_programs_still_work(mode: tuple[str, ...], busybox_root: Path) -> None:
    script = ("set -e; mkdir /scratch/d; echo hi > /scratch/d/f; cat /scratch/d/f; "
              "ls / >/dev/null; ps >/dev/null; sleep 0.01 & wait; id -u; hostname >/dev/null")
    r = run_in(busybox_root, "/bin/sh", "-c", script, opts=("-m", "tmp:/scratch", *mode))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hi", "0"]


@pytest.mark.root
def test_unprivileged_user_gets_the_filter(unprivileged_user: pwd.struct_passwd,  # noqa: F811
                                           busybox_root: Path,
                                           probe: Callable[[str], Path]) -> None:
    uid = unprivileged_user.pw_uid
    base = ("-e", f"0:{uid}:1", "-r", str(busybox_root))
    r = as_user(unprivileged_user, *base, "--", "/bin/grep", "Seccomp:", "/proc/self/status")
    assert r.returncode == 0 and r.stdout.split() == ["Seccomp:", "2"], r.stdout + r.stderr
    # Without the filter keyctl reaches the user's own keyrings: this can fail.
    for name in ("keyctl", "audit", "unknown"):
        r = as_user(unprivileged_user, *base, "-m", f"bind-ro:{probe(name)}:/probe", "--",
                    "/probe")
        assert_blocked(r)
