# SPDX-License-Identifier: BSD-2-Clause
"""The option table: complete, and every value the same through every front-end
(command line, CreateContainer, the daemon's state file)."""

from __future__ import annotations

import ipaddress
import json
import string
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinepy.cli.args import Parser, add_options
from machinepy.core.options import (
    DEFAULTS,
    NO_NAMESPACES,
    SETTINGS,
    VERBS,
    ContainerOptions,
    build_spec,
    options_from_bus,
    options_from_cli,
    options_to_argv,
    options_to_bus,
    settings,
)
from machinepy.core.spec import (
    LANDLOCK_SCOPES,
    OWNERSHIPS,
    ContainerSpec,
    IdMap,
    MountSpec,
    NetifAddress,
    NetifRoute,
    NetifSpec,
    SpecError,
)

# Spec fields a front-end gives as positionals (CreateContainer's name,
# root_directory and command; the command line's NAME or --machine, ROOTFS or
# --chroot, COMMAND), and the one the supervisor's side fills in.
POSITIONALS = {"machine", "root", "command"}
RUNTIME = {"group_maps"}  # with_caller_maps: a user's own ids
# pflask's sugar: --tmpfs is a tmp --mount, -g CONTROLLER a property
SHARED = {"mounts": ["mounts", "tmpfs"], "properties": ["cgroups", "properties"]}


def test_one_setting_per_option() -> None:
    fields = [s.field for s in SETTINGS]
    assert sorted(fields) == sorted(ContainerOptions._fields)
    assert len(set(fields)) == len(fields)


def test_every_option_has_a_home_and_no_two_share_a_name() -> None:
    for s in SETTINGS:
        assert s.flags or s.key, s.field
        assert not s.flags or s.verbs, s.field
    keys = [s.key for s in SETTINGS if s.key]
    assert len(set(keys)) == len(keys)
    for verb in VERBS:
        flags = [f for s in settings(verb) for f in s.flags]
        assert len(set(flags)) == len(flags), verb


def test_every_spec_field_comes_from_exactly_one_option_or_positional() -> None:
    owners: dict[str, list[str]] = {}
    for s in SETTINGS:
        owners.setdefault(s.spec or s.field, []).append(s.field)
    for field in POSITIONALS | RUNTIME:
        owners.setdefault(field, []).append(f"<{field}>")
    assert set(owners) == set(ContainerSpec._fields)
    assert {f: o for f, o in owners.items() if len(o) > 1} == SHARED


VETH = (NetifSpec("veth", "ve-x", "host0"),)
# A value for each option, and what it needs of the others.
SAMPLES: dict[str, tuple[object, dict[str, Any]]] = {
    "boot": (True, {}), "chdir": ("/x", {}), "user": ("nobody", {}), "keepenv": (True, {}),
    "hostname": ("h", {}), "mounts": ((MountSpec("tmp", "/m"),), {}),
    "setenv": ((("A", "1"),), {}), "ephemeral": (True, {}), "ephemeral_size": ("1G", {}),
    "tmpfs": ((MountSpec("tmp", "/t"),), {}), "netifs": (VETH, {}),
    "addresses": ((NetifAddress("host0", ipaddress.ip_interface("10.0.0.2/24")),),
                  {"netifs": VETH}),
    "routes": ((NetifRoute("host0", None, ipaddress.ip_address("10.0.0.1")),),
               {"netifs": VETH}),
    "user_maps": ((IdMap(0, 100000, 65536),), {}), "private_users": ("pick", {}),
    "ownership": ("chown", {}), "caps": (("+all",), {}), "system_call_filter": (("bpf",), {}),
    "no_new_privileges": (True, {}), "cgroups": (("memory",), {}),
    "properties": (("TasksMax=10",), {}), "landlock_scope": (("signal",), {}),
    "register": (False, {}), "no_namespaces": (("ipc",), {}),
    "uuid": (uuid.UUID(int=1), {}), "base_env": ((("A", "1"),), {}),
}
DERIVED = {"namespaces"}  # a network or user namespace follows from netifs, user maps, pick


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
def test_each_option_reaches_its_spec_field(setting: Any) -> None:
    value, needs = SAMPLES[setting.field]
    base = DEFAULTS.replace(**needs)

    def spec(o: ContainerOptions) -> dict[str, object]:
        return build_spec(o, name="m", root=None, command=("true",))._asdict()

    before, after = spec(base), spec(base.replace(**{setting.field: value}))
    changed = {k for k in before if before[k] != after[k]}
    target = setting.spec or setting.field
    assert target in changed and changed - {target} <= DERIVED, changed


# ---------------------------------------------------------------------------
# Round trips: option → D-Bus → option, option → argv → option

component = st.text(alphabet=string.ascii_letters + string.digits + ":,\\ _-", min_size=1,
                    max_size=6).filter(lambda c: c not in (".", ".."))
path = st.lists(component, min_size=1, max_size=3).map(lambda cs: "/" + "/".join(cs))
text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
               max_size=8)
ifname = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=15)
tmpfs_options = st.none() | st.sampled_from(["size=1m", "mode=700,nr_inodes=10k", "size=5%"])
ip = st.ip_addresses()


def tuples(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(strategy, max_size=3).map(tuple)


mount = st.one_of(
    st.builds(lambda k, d, s: MountSpec(k, d, s), st.sampled_from(["bind", "bind-ro"]), path,
              path),
    st.builds(lambda d, o: MountSpec("tmp", d, options=o), path, tmpfs_options),
    st.builds(lambda d, u, w: MountSpec("overlay", d, u, w), path, path, path))
route = st.builds(
    lambda n, d, p, g: NetifRoute(n, d and ipaddress.ip_network(f"{d}/{p % (d.max_prefixlen + 1)}",
                                                                strict=False), g),
    ifname, st.none() | ip, st.integers(0, 128), ip | st.none()).filter(
        lambda r: r.dest is not None or r.gateway is not None)
OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "boot": st.booleans(), "chdir": st.none() | text, "user": st.none() | text,
    "keepenv": st.booleans(), "hostname": st.none() | text, "mounts": tuples(mount),
    "setenv": tuples(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True),
                               text)),
    "ephemeral": st.booleans(),
    "ephemeral_size": st.none() | st.sampled_from(["1G", "512m", "25%", "100%", "7"]),
    "tmpfs": tuples(st.builds(lambda d, o: MountSpec("tmp", d, options=o), path,
                              tmpfs_options)),
    "netifs": st.none() | tuples(st.builds(
        lambda k, h, i: NetifSpec(k, h, i),
        st.sampled_from(["move", "macvlan", "ipvlan", "veth", "bridge"]), ifname,
        ifname)),
    "addresses": tuples(st.builds(
        lambda n, a, p: NetifAddress(n, ipaddress.ip_interface(f"{a}/{p % (a.max_prefixlen + 1)}")),
        ifname, ip, st.integers(0, 128))),
    "routes": tuples(route),
    "user_maps": tuples(st.builds(lambda i, o, c: IdMap(i, o, c), st.integers(0, 2**31),
                                  st.integers(0, 2**31), st.integers(1, 2**31 - 1))),
    "private_users": st.sampled_from(["no", "pick"]), "ownership": st.sampled_from(OWNERSHIPS),
    "caps": tuples(st.sampled_from(["+all", "-all", "+chown", "-net_admin", "+bpf"])),
    "system_call_filter": tuples(st.sampled_from(["bpf", "~bpf", "@mount", "~@clock"])),
    "no_new_privileges": st.booleans(),
    "cgroups": tuples(st.sampled_from(["cpu", "memory", "pids", "io", "blkio"])),
    "properties": tuples(st.sampled_from(["MemoryMax=64M", "CPUQuota=20%",
                                          "Description=a, b\\c", "KillSignal=SIGINT"])),
    "landlock_scope": st.lists(st.sampled_from(LANDLOCK_SCOPES), unique=True).map(tuple),
    "register": st.booleans(),
    "no_namespaces": st.lists(st.sampled_from(NO_NAMESPACES), unique=True).map(
        lambda ns: tuple(n for n in NO_NAMESPACES if n in ns)),
    "uuid": st.none() | st.uuids().filter(lambda u: u.int != 0),
    "base_env": st.none() | tuples(st.tuples(
        text.filter(lambda t: t and "=" not in t), text)),
}


def options(fields: list[str]) -> st.SearchStrategy[ContainerOptions]:
    return st.fixed_dictionaries({f: OPTION_VALUES[f] for f in fields}).map(
        lambda d: DEFAULTS.replace(**d))


def test_every_option_has_a_strategy() -> None:
    assert set(OPTION_VALUES) == set(ContainerOptions._fields) == set(SAMPLES)


@given(options([s.field for s in SETTINGS if s.key]))
def test_option_to_dbus_to_option(o: ContainerOptions) -> None:
    assert options_from_bus(options_to_bus(o)) == o


@given(options([s.field for s in SETTINGS if s.key]))
def test_state_file_round_trip(o: ContainerOptions) -> None:
    # The daemon's state files hold the D-Bus form as JSON: lists for structs, bytes as ints.
    stored = json.loads(json.dumps(options_to_bus(o), default=list))
    assert options_from_bus({k: (sig, v) for k, (sig, v) in stored.items()}) == o


def cli_options(verb: str, argv: list[str]) -> ContainerOptions:
    p = Parser(prog="test")
    add_options(p, verb)
    return options_from_cli(vars(p.parse_args(argv)), verb)


@pytest.mark.parametrize("verb", VERBS)
@given(data=st.data())
def test_option_to_argv_to_option(verb: str, data: st.DataObject) -> None:
    o = data.draw(options([s.field for s in settings(verb)]))
    assert cli_options(verb, options_to_argv(o, verb)) == o


def test_only_non_defaults_are_sent() -> None:
    assert options_to_bus(DEFAULTS) == {}
    assert options_to_argv(DEFAULTS) == []
    o = DEFAULTS.replace(register=False, hostname="h", netifs=())
    assert options_to_bus(o) == {"Hostname": ("s", "h"), "Netifs": ("a(sss)", []),
                                 "Register": ("b", False)}
    assert options_to_argv(o) == ["--hostname=h", "--netif=", "--register=no"]


def test_structured_values_on_the_bus() -> None:
    o = cli_options("run", ["-m", "bind:/a\\:b:/c", "--netif-address=host0=10.1.2.3/8",
                            "--netif-route=host0=default,via=10.0.0.1", "-e", "0:1000:10",
                            "-s", "A=x\\,y", "-n", "veth:a:host0"])
    assert options_to_bus(o) == {
        "Mounts": ("a(sssss)", [("bind", "/c", "/a:b", "", "")]),
        "Environment": ("as", ["A=x,y"]),
        "Netifs": ("a(sss)", [("veth", "a", "host0")]),
        "NetifAddresses": ("a(ss)", [("host0", "10.1.2.3/8")]),
        "NetifRoutes": ("a(sss)", [("host0", "default", "10.0.0.1")]),
        "UserMap": ("a(uuu)", [(0, 1000, 10)]),
    }


@pytest.mark.parametrize(("options", "message"), [
    ({"Mounts": ("a(sssss)", [("bind", "/x", "/y", "/w", "")])},
     "invalid Mounts entry 'bind:/y:/x': a bind mount takes no work"),
    ({"Mounts": ("a(sssss)", [("tmp", "/x", "", "", "size=0")])}, "size '0'"),
    ({"NetifRoutes": ("a(sss)", [("eth0", "10.0.0.0/8,via=10.0.0.1", "")])},
     "one address per field"),
    ({"LandlockScope": ("as", ["signal,abstract-unix-socket"])}, "one scope per entry"),
    ({"Caps": ("as", ["+chown,-kill"])}, "one item per entry"),
    ({"SystemCallFilter": ("as", ["bpf reboot"])}, "one item per entry"),
    ({"Uuid": ("ay", b"\x01" * 15)}, "expected 16 bytes, got 15"),
    ({"Uuid": ("ay", b"\x00" * 16)}, "may not be all zeros"),
    ({"Uuid": ("s", "nope")}, "invalid --uuid 'nope'"),
    ({"Uuid": ("u", 1)}, "must be of type 'ay' or 's', not 'u'"),
    ({"Hostname": ("s", "a\0b")}, "NUL"),
])
def test_bad_bus_values(options: dict[str, tuple[str, object]], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options_from_bus(options)


def test_uuid_from_every_front_end() -> None:
    u = uuid.UUID("0123456789abcdef0123456789abcdef")
    for o in (cli_options("run", ["--uuid=0123456789abcdef0123456789abcdef"]),
              cli_options("boot", ["--uuid", str(u)]),
              cli_options("start", ["--uuid", str(u).upper()]),
              options_from_bus({"Uuid": ("ay", u.bytes)}),
              options_from_bus({"Uuid": ("s", str(u))})):
        assert o.uuid == u
        assert build_spec(o, name=None, root=None, command=()).machine_id == u
    for bad in ("{0123456789abcdef0123456789abcdef}", "urn:uuid:" + str(u), "0123", str(u)[:-1]):
        with pytest.raises(SpecError, match="invalid --uuid"):
            cli_options("run", [f"--uuid={bad}"])


def test_readme_documents_the_table() -> None:
    from machinepy.docgen import options_reference

    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    assert options_reference() in readme
