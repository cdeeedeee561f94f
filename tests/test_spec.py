# SPDX-License-Identifier: BSD-2-Clause
"""Spec parsing and validation: pure, no root needed."""

from __future__ import annotations

import contextlib
import ipaddress
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinepy.core.spec import (
    ContainerSpec,
    IdMap,
    MountSpec,
    NetifSpec,
    SpecError,
    check_machine_name,
    lookup_user,
    parse_mount,
    parse_netif,
    parse_netif_address,
    parse_netif_route,
    parse_setenv,
    parse_size,
    parse_tmpfs,
    parse_user_map,
    quote,
    split_escaped,
    validate,
)

# Path components without the separators the spec syntax uses.
component = st.text(alphabet=string.ascii_letters + string.digits + "._- ", min_size=1,
                    max_size=12).filter(lambda c: c not in (".", ".."))
abs_path = st.lists(component, min_size=1, max_size=4).map(lambda cs: "/" + "/".join(cs))


def escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


@given(st.lists(st.text(max_size=10), min_size=1, max_size=5))
def test_split_escaped_round_trips(parts: list[str]) -> None:
    joined = ":".join(escape(p) for p in parts)
    assert split_escaped(joined, ":") == parts


@given(abs_path, abs_path)
def test_bind_specs_round_trip(src: str, dst: str) -> None:
    assert parse_mount(f"bind:{src}:{dst}") == MountSpec("bind", dest=dst, source=src)
    m = parse_mount(f"bind-ro:{src}:{dst}")
    assert m.read_only and m.source == src and m.dest == dst


@given(st.lists(component, min_size=1, max_size=3))
def test_escaped_colons_and_commas_in_paths(parts: list[str]) -> None:
    odd = "/" + "/".join(p + ":x,y" for p in parts)
    m = parse_mount(f"bind:{escape(odd)}:/dst")
    assert m.source == odd


def test_tmpfs_specs() -> None:
    assert parse_tmpfs("/scratch") == MountSpec("tmp", dest="/scratch")
    assert parse_tmpfs("/x:size=64M,mode=700") == MountSpec("tmp", "/x",
                                                           options="size=64M,mode=700")
    assert parse_tmpfs("/x:nr_inodes=10k,size=5%").options == "nr_inodes=10k,size=5%"
    assert parse_tmpfs("/a\\:b:size=1m") == MountSpec("tmp", "/a:b", options="size=1m")
    assert parse_mount("tmp:/x:size=1g") == MountSpec("tmp", "/x", options="size=1g")
    assert parse_size("100%", "--ephemeral-size") == "100%"


@pytest.mark.parametrize("text, fragment", [
    ("/x:size=0", "size '0' is not a number"),  # 0: no limit at all
    ("/x:size=0%", "size '0%'"),
    ("/x:size=101%", "size '101%'"),
    ("/x:size=lots", "size 'lots'"),
    ("/x:size=-1", "size '-1'"),
    ("/x:size=1m\n", "size '1m\\n'"),
    ("/x:nr_inodes=0", "nr_inodes '0'"),
    ("/x:mode=999", "mode '999' is not an octal mode"),
    ("/x:size=1m,size=2m", "'size' given twice"),
    ("/x:uid=0", "unknown tmpfs option 'uid=0'"),
    ("/x:size", "unknown tmpfs option 'size'"),
    ("/x:", "unknown tmpfs option ''"),
    ("rel:size=1m", "'rel' is not absolute"),
    ("/x:size=1m:mode=700", "expected PATH[:OPTIONS]"),
])
def test_bad_tmpfs(text: str, fragment: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_tmpfs(text)
    assert str(exc.value).startswith(f"invalid --tmpfs {quote(text)}: ")
    assert fragment in str(exc.value) and str(exc.value).isprintable(), str(exc.value)


def test_ephemeral_size() -> None:
    for bad in ("0", "", "1.5G", "200%", "1 G"):
        with pytest.raises(SpecError, match="invalid --ephemeral-size: size"):
            parse_size(bad, "--ephemeral-size")
    with pytest.raises(SpecError, match="--ephemeral-size needs --ephemeral"):
        validate(ContainerSpec(command=("true",), root="/", ephemeral_size="1G"))


def test_tmp_and_overlay() -> None:
    assert parse_mount("tmp:/scratch") == MountSpec("tmp", dest="/scratch")
    assert parse_mount("overlay:/up:/usr:/work") == MountSpec(
        "overlay", dest="/usr", source="/up", work="/work")


@pytest.mark.parametrize("spec, fragment", [
    ("nfs:/a:/b", "unknown mount type 'nfs'"),
    ("bind:relative:/b", "'relative' is not absolute"),
    ("bind:/a", "bind takes 2 path(s), got 1"),
    ("tmp:/a:/b", "unknown tmpfs option '/b'"),
    ("tmp:/a:/b:/c", "tmp takes 1 path(s), got 3"),
    ("tmp:/a:size=0", "size '0' is not a number"),
    ("overlay:/a:/b", "overlay takes 3 path(s)"),
    ("bind:/a:/b\\", "trailing backslash"),
])
def test_bad_mounts(spec: str, fragment: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_mount(spec)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


@given(st.text(max_size=40))
def test_mount_parser_fails_only_with_spec_error(text: str) -> None:
    with contextlib.suppress(SpecError):
        parse_mount(text)


@given(st.text(max_size=40))
def test_other_parsers_fail_only_with_spec_error(text: str) -> None:
    for parser in (parse_netif, parse_netif_address, parse_netif_route, parse_setenv,
                   parse_user_map, parse_tmpfs):
        with contextlib.suppress(SpecError):
            parser(text)


def test_netifs() -> None:
    assert parse_netif("eth1:eth0") == NetifSpec("move", "eth1", "eth0")
    assert parse_netif("veth:ve-a:host0") == NetifSpec("veth", "ve-a", "host0")
    assert parse_netif("bridge:br0:eth0") == NetifSpec("bridge", "br0", "eth0")
    assert parse_netif("macvlan:eth0:mv0").kind == "macvlan"
    for bad in ("a:b:c:d", "x", "wifi:a:b", "veth:a:" + "x" * 16, "a/b:c", "veth:a:b\n"):
        with pytest.raises(SpecError):
            parse_netif(bad)


def test_addresses_and_routes() -> None:
    a = parse_netif_address("eth0=10.0.0.2/24")
    assert a.ifname == "eth0" and a.address == ipaddress.ip_interface("10.0.0.2/24")
    r = parse_netif_route("eth0=default,via=10.0.0.1")
    assert r.dest is None and str(r.gateway) == "10.0.0.1"
    assert str(parse_netif_route("eth0=192.168.5.0/24").dest) == "192.168.5.0/24"
    for bad in ("eth0", "eth0=10.0.0.2", "eth0=bogus/8"):
        with pytest.raises(SpecError):
            parse_netif_address(bad)
    with pytest.raises(SpecError, match="needs via"):
        parse_netif_route("eth0=default")


@given(st.integers(0, 2**31), st.integers(0, 2**31), st.integers(1, 2**31 - 1))
def test_user_map_round_trip(inside: int, outside: int, count: int) -> None:
    assert parse_user_map(f"{inside}:{outside}:{count}") == IdMap(inside, outside, count)


def test_user_map_errors() -> None:
    for bad in ("0:100000", "a:b:c", "0:0:0", "-1:0:1"):
        with pytest.raises(SpecError):
            parse_user_map(bad)


def test_setenv() -> None:
    assert parse_setenv("A=1,B=x\\,y,C=") == [("A", "1"), ("B", "x,y"), ("C", "")]
    for bad in ("A", "1A=2", "=x", "A=1,,B=2", "A\n=1"):
        with pytest.raises(SpecError):
            parse_setenv(bad)


def test_machine_names() -> None:
    for good in ("pflask-123", "a", "a--b", "web.example.org", "A1", "0", "x" * 64):
        assert check_machine_name(good) == good
    for bad in ("", "a b", "x" * 65, "../x", "a..b", ".x", "box\n"):
        with pytest.raises(SpecError):
            check_machine_name(bad)


# What machined (hostname_is_valid(name, 0)) refuses, and so registration would.
MACHINED_REFUSES = ("-rel", "rel-", "rel_x", "a.-b", "a-.b", "x.", "x.y.", ".host", "é",
                    "a\nb", "a\tb")


@pytest.mark.parametrize("name", MACHINED_REFUSES)
def test_names_machined_refuses_are_refused_for_machine_and_hostname(name: str) -> None:
    for kw, what in (({"machine": name}, "invalid machine name"),
                     ({"hostname": name}, "invalid hostname")):
        with pytest.raises(SpecError, match=what) as exc:
            validate(spec(**kw))
        assert "\n" not in str(exc.value) and "\t" not in str(exc.value)


def test_echoed_values_are_quoted_and_one_line() -> None:
    assert quote("plain") == "'plain'"
    assert quote("a\nb") == "'a\\nb'"
    assert quote("it's") == "'it\\'s'"
    assert quote("\x1b[2J") == "'\\x1b[2J'"
    with pytest.raises(SpecError) as exc:
        check_machine_name("evil\nmachinepy: all fine")
    assert str(exc.value).startswith("invalid machine name 'evil\\nmachinepy: all fine'")
    for parser, text in ((parse_mount, "tmp:rel\nx"), (parse_netif, "a\x00:b"),
                         (parse_setenv, "A\n=1"), (parse_user_map, "1:2:3\n"),
                         (parse_netif_address, "e\n=1.2.3.4/8"),
                         (parse_netif_route, "eth0=default,via=1.2.3.4\n")):
        with pytest.raises(SpecError) as exc:
            parser(text)
        assert str(exc.value).isprintable(), str(exc.value)


@given(st.text(max_size=20))
def test_quote_is_always_printable_and_reversible(text: str) -> None:
    q = quote(text)
    assert q.isprintable()
    assert q[0] == q[-1] == "'"
    assert q[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape") == text


def test_netif_route_errors_name_the_option_once() -> None:
    for bad, why in (("eth0=default,via=bogus", "bad gateway 'bogus'"),
                     ("eth0=10.0.0.0/8,metric=3", "unknown option 'metric'"),
                     ("eth0=nowhere", "bad destination 'nowhere'"),
                     ("eth0=default", "a default route needs via=GATEWAY"),
                     ("e/th0=10.0.0.0/8", "'e/th0' is not a valid interface name")):
        with pytest.raises(SpecError) as exc:
            parse_netif_route(bad)
        assert str(exc.value) == f"invalid --netif-route {quote(bad)}: {why}" or (
            str(exc.value).count("invalid --netif-route") == 1 and why in str(exc.value))
        assert str(exc.value).count("invalid --netif-route") == 1, str(exc.value)


def spec(**kw: object) -> ContainerSpec:
    return ContainerSpec(command=("/bin/true",)).replace(**kw)


@pytest.mark.parametrize("kw, fragment", [
    ({"root": "/nonexistent/root"}, "does not exist"),
    ({"root": "relative"}, "not absolute"),
    ({"ephemeral": True}, "--ephemeral needs --chroot"),
    ({"user": "no-such-user-xyz"}, "user 'no-such-user-xyz' does not exist"),
    ({"chdir": "rel"}, "not absolute"),
    ({"mounts": (MountSpec("bind", "/x", "/nonexistent/src"),)}, "does not exist"),
    ({"machine": "bad name"}, "invalid machine name"),
    ({"namespaces": frozenset({"pid"}), "mounts": (MountSpec("tmp", "/x"),)}, "--no-mountns"),
    ({"netifs": (NetifSpec("veth", "a", "b"),)}, "needs a network namespace"),
    ({"namespaces": frozenset({"user", "mount"})}, "needs at least one --user-map"),
    ({"namespaces": frozenset({"user", "mount"}),
      "user_maps": (IdMap(0, 1000, 10), IdMap(5, 5000, 1))}, "overlaps"),
])
def test_validate_rejects(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError) as exc:
        validate(spec(**kw))
    assert fragment in str(exc.value)


def test_validate_normalises_slash_root() -> None:
    assert validate(spec(root="/")).root is None


def test_lookup_user_in_container_passwd(tmp_path: object) -> None:
    import pathlib

    root = pathlib.Path(str(tmp_path))
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1234:99::/h:/bin/zsh\n")
    pw = lookup_user("alice", str(root))
    assert (pw.uid, pw.gid, pw.home, pw.shell) == (1234, 99, "/h", "/bin/zsh")
    assert lookup_user("1234", str(root)).name == "alice"
    with pytest.raises(SpecError, match="does not exist"):
        lookup_user("bob", str(root))
