# SPDX-License-Identifier: BSD-2-Clause
"""The container's network interfaces, set up from the host side (`--netif`).

`setup` runs in the supervisor once the child has unshared its namespaces and
before the container runs anything.  It speaks rtnetlink through pyroute2,
which only this module imports.  Everything it does is recorded, so that
`Links.teardown` (and a failing `setup`, before it raises) undoes exactly that:

* veth and bridge: the pair is created with its inside end directly in the
  container's namespace (as nspawn does), so no half-made pair ever sits on
  the host; the host end is deleted at teardown, which takes the peer along.
* macvlan and ipvlan: created directly in the container's namespace under
  their final name; nothing of them is ever on the host.
* moved devices: moved and renamed in one request, and given back under their
  original name at teardown.

From setup to teardown we hold the container's network namespace open, so it
outlives the container's PID 1: when a namespace dies the kernel destroys its
virtual devices (a veth end lent to the container would be lost) and sends
physical ones to the initial namespace under their container name.  If the
supervisor itself is killed, that is what happens, and since nothing was ever
half-made on the host, nothing is left there but such a returned device.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import sys
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from machinepy.core import linux
from machinepy.core.spec import ContainerSpec, NetifSpec

IFNAMSIZ = 16  # with the trailing NUL
NETLINK_ROUTE = 0
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
MACVLAN_MODE_BRIDGE = 4
IPVLAN_MODE_L2 = 0
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253


class NetworkError(Exception):
    """The container's network could not be set up; the message is one line."""


def _warn(msg: str) -> None:
    print(f"machinepy: warning: {msg}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """The kernel's words: its extended ack message when it gave one, else strerror."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    args: tuple[object, ...] = e.args  # pyroute2: (code, message)
    if len(args) >= 2 and isinstance(args[1], str) and args[1]:
        return args[1]
    code = getattr(e, "code", None)
    return os.strerror(code) if isinstance(code, int) else str(e)


def _code(e: BaseException) -> int | None:
    return e.errno if isinstance(e, OSError) else getattr(e, "code", None)


def _is_netlink_error(e: BaseException) -> bool:
    """A refusal from the kernel (pyroute2 raises its own type for those)."""
    if isinstance(e, OSError):
        return True
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    return isinstance(e, NetlinkError)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn a kernel refusal into a one-line NetworkError naming the step."""
    try:
        yield
    except NetworkError:
        raise
    except Exception as e:
        if not _is_netlink_error(e):
            raise
        raise NetworkError(f"{what}: {_reason(e)}") from None


def _arg(n: NetifSpec) -> str:
    """The --netif argument as the user wrote it, for messages."""
    return f"{n.host}:{n.inside}" if n.kind == "move" else f"{n.kind}:{n.host}:{n.inside}"


# ---------------------------------------------------------------------------
# Namespaces and sockets


def _open_netns(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"cannot open {what} ({path}): {e.strerror}") from None


def _socket_in(netns: int) -> int:
    """An rtnetlink socket bound to the namespace NETNS; returns its fd.

    A socket stays in the namespace it was created in, and network namespaces
    are per thread: a short-lived thread enters the namespace, makes the socket
    and ends, so our own namespace never changes and no thread outlives this
    call (spawn refuses to fork with several threads; pyroute2's own netns
    support forks a helper process instead, which we avoid for the same reason).
    """
    import threading

    result: list[int | BaseException] = []

    def run() -> None:
        try:
            linux.setns(netns, linux.CLONE_NEWNET)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE)
            result.append(sock.detach())
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    thread = threading.Thread(target=run, name="machinepy-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise NetworkError(
            f"cannot open a netlink socket in the container: {_reason(result[0])}")
    return result[0]


async def _rtnl(fileno: int | None = None) -> Any:
    """An AsyncIPRoute, on socket FILENO (which it then owns) or a new one.

    AsyncIPRoute works well on our loop: requests are plain awaits, and close()
    is synchronous.  groups=0: no event subscriptions to buffer.
    """
    try:
        from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]

        rtnl = AsyncIPRoute(ext_ack=True, groups=0, fileno=fileno)
    except BaseException:
        if fileno is not None:
            os.close(fileno)
        raise
    try:
        # pyroute2 adopts FILENO (to close it with itself) only when it sets its
        # socket up, at the first request: one closed before that left FILENO
        # open, and with it the container's network namespace.  bind() sets it up.
        await rtnl.bind()
    except BaseException:
        rtnl.close()
        raise
    return rtnl


async def _links(rtnl: Any) -> dict[str, Any]:
    return {msg.get("ifname"): msg async for msg in await rtnl.link("dump")}


async def _ifindex(rtnl: Any, name: str) -> int:
    msg = (await rtnl.link("get", ifname=name))[0]
    return int(msg["index"])


# ---------------------------------------------------------------------------
# Host-side names


def _short_ifname(name: str, salt: int = 0) -> str:
    """NAME if it fits in IFNAMSIZ, else (or when salted) its first 11
    characters and 4 characters of a hash of the whole: stable and unique."""
    if not salt and len(name.encode()) < IFNAMSIZ:
        return name
    digest = zlib.crc32(f"{name}\0{salt}".encode())
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    tail = "".join(alphabet[(digest >> (6 * i)) % 36] for i in range(4))
    return name.encode()[:IFNAMSIZ - 5].decode(errors="ignore") + tail


def bridge_end_names(spec: ContainerSpec, leader: int, taken: set[str]) -> dict[str, str]:
    """Host-end names of bridge:BRIDGE:INSIDE pairs, by INSIDE: nspawn's
    `vb-MACHINE`, with `-INSIDE` when there are several, shortened to fit and
    salted until unused on the host."""
    machine = spec.machine or f"pflask-{leader}"
    inside = [n.inside for n in spec.netifs if n.kind == "bridge"]
    names: dict[str, str] = {}
    used = set(taken)
    for name in inside:
        base = f"vb-{machine}" if len(inside) == 1 else f"vb-{machine}-{name}"
        salt = 0
        while (candidate := _short_ifname(base, salt)) in used:
            salt += 1
        names[name] = candidate
        used.add(candidate)
    return names


# ---------------------------------------------------------------------------
# Up-front checks: nothing is created when the request cannot be met


def _check(spec: ContainerSpec, host: dict[str, Any]) -> None:
    moved: set[str] = set()
    outside: set[str] = set()
    for n in spec.netifs:
        arg = _arg(n)
        if n.inside == "lo":
            raise NetworkError(f"--netif {arg}: the container already has 'lo'")
        if n.kind == "veth":
            if n.host in host or n.host in outside:
                raise NetworkError(f"--netif {arg}: an interface '{n.host}' already exists "
                                   "on the host")
            outside.add(n.host)
            continue
        if n.host not in host:
            raise NetworkError(f"--netif {arg}: no interface '{n.host}' on the host")
        if n.host in moved:
            raise NetworkError(f"--netif {arg}: '{n.host}' is moved into the container")
        if n.kind == "move":
            if host[n.host]["flags"] & IFF_LOOPBACK:  # the kernel keeps it in place
                raise NetworkError(f"--netif {arg}: the loopback interface cannot be moved")
            moved.add(n.host)
        elif n.kind == "bridge" and host[n.host].get(("linkinfo", "kind")) != "bridge":
            raise NetworkError(f"--netif {arg}: '{n.host}' is not a bridge")
    inside = {"lo", *(n.inside for n in spec.netifs)}
    for a in spec.addresses:
        if a.ifname not in inside:
            raise NetworkError(f"--netif-address {a.ifname}={a.address}: "
                               f"the container has no interface '{a.ifname}'")
    for r in spec.routes:
        if r.ifname not in inside:
            raise NetworkError(f"--netif-route {r.ifname}: "
                               f"the container has no interface '{r.ifname}'")
        if r.dest is not None and r.gateway is not None and r.dest.version != r.gateway.version:
            raise NetworkError(f"--netif-route {r.ifname}={r.dest},via={r.gateway}: "
                               "destination and gateway are of different IP versions")


# ---------------------------------------------------------------------------
# What was done, to be undone


class _HostVeth(NamedTuple):
    """A veth pair, deleted through its host end (the peer goes with it)."""

    ifindex: int
    name: str


class _InsideLink(NamedTuple):
    """A macvlan/ipvlan made in the container; deleted there."""

    ifindex: int
    name: str


class _Moved(NamedTuple):
    """A host device lent to the container, to be given back under its name."""

    name: str  # on the host
    host_index: int
    inside_name: str
    inside_index: int | None  # None until looked up after the move
    was_up: bool


DEV_NAME_RE = re.compile(r"^dev\d+$")  # what the kernel names a returning device on a clash


class Links:
    """The interfaces given to a container; `teardown` gives back and deletes."""

    def __init__(self) -> None:
        # Host ifindices for machined: a veth's host end, or for bridge:
        # the bridge itself — what nspawn registers.  Moved devices and
        # macvlans are the container's own, as in nspawn.
        self.host_ifindices: list[int] = []
        self._netns = -1  # the container's network namespace, alive until teardown
        self._host_netns = -1  # ours, where moved devices go back to
        self._host: Any = None  # AsyncIPRoute in our namespace
        self._inside: Any = None  # AsyncIPRoute in the container's
        self._undo: list[_HostVeth | _InsideLink | _Moved] = []
        self._closed = False

    # -- setup --------------------------------------------------------------

    async def _setup(self, spec: ContainerSpec, leader: int) -> None:
        self._netns = _open_netns(f"/proc/{leader}/ns/net", "the container's network namespace")
        self._host_netns = _open_netns("/proc/self/ns/net", "our network namespace")
        ours, theirs = os.fstat(self._host_netns), os.fstat(self._netns)
        if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
            raise NetworkError("the container has no network namespace of its own")
        with _step("cannot open a netlink socket"):
            self._host = await _rtnl()
            host = await _links(self._host)
        _check(spec, host)  # before the socket in the container: a refusal makes none
        with _step("cannot open a netlink socket in the container"):
            self._inside = await _rtnl(_socket_in(self._netns))
        taken = set(host) | {n.host for n in spec.netifs if n.kind == "veth"}
        bridge_ends = bridge_end_names(spec, leader, taken)
        for n in spec.netifs:
            if n.kind == "move":
                await self._move(n, host[n.host])
            elif n.kind in ("macvlan", "ipvlan"):
                await self._vlan(n, int(host[n.host]["index"]))
            elif n.kind == "veth":
                await self._veth(n, n.host)
            else:
                await self._veth(n, bridge_ends[n.inside], bridge=int(host[n.host]["index"]))
        await self._configure_inside(spec)

    async def _move(self, n: NetifSpec, dev: Any) -> None:
        index = int(dev["index"])
        # Recorded first: the kernel moves, then renames, and a failed rename
        # fails the request with the device already in the container.
        moved = _Moved(n.host, index, n.inside, None, bool(dev["flags"] & IFF_UP))
        self._undo.append(moved)
        with _step(f"cannot move interface '{n.host}' into the container"):
            await self._host.link("set", index=index, net_ns_fd=self._netns, ifname=n.inside)
        with _step(f"cannot find '{n.inside}' in the container"):
            inside = await _ifindex(self._inside, n.inside)
        self._undo[-1] = moved._replace(inside_index=inside)

    async def _vlan(self, n: NetifSpec, master: int) -> None:
        mode: dict[str, Any] = ({"macvlan_mode": MACVLAN_MODE_BRIDGE} if n.kind == "macvlan"
                                else {"ipvlan_mode": IPVLAN_MODE_L2})
        try:
            await self._host.link("add", ifname=n.inside, kind=n.kind, link=master,
                                  net_ns_fd=self._netns, **mode)
        except Exception as e:
            if not _is_netlink_error(e):
                raise
            why = (f"the kernel has no {n.kind} support" if _code(e) == errno.EOPNOTSUPP
                   else _reason(e))
            raise NetworkError(
                f"cannot create {n.kind} interface '{n.inside}' on '{n.host}': {why}") from None
        with _step(f"cannot find '{n.inside}' in the container"):
            self._undo.append(_InsideLink(await _ifindex(self._inside, n.inside), n.inside))

    async def _veth(self, n: NetifSpec, outside: str, bridge: int | None = None) -> None:
        try:
            await self._host.link("add", ifname=outside, kind="veth",
                                  peer={"ifname": n.inside, "net_ns_fd": self._netns})
        except Exception as e:
            if not _is_netlink_error(e):
                raise
            why = ("the kernel has no veth support" if _code(e) == errno.EOPNOTSUPP
                   else _reason(e))
            raise NetworkError(
                f"cannot create veth pair '{outside}' / '{n.inside}': {why}") from None
        with _step(f"cannot find '{outside}' on the host"):
            index = await _ifindex(self._host, outside)
        self._undo.append(_HostVeth(index, outside))
        if bridge is None:
            with _step(f"cannot bring up '{outside}'"):
                await self._host.link("set", index=index, state="up")
            self.host_ifindices.append(index)
        else:
            with _step(f"cannot add '{outside}' to bridge '{n.host}'"):
                await self._host.link("set", index=index, master=bridge, state="up")
            if bridge not in self.host_ifindices:
                self.host_ifindices.append(bridge)

    async def _configure_inside(self, spec: ContainerSpec) -> None:
        inside = {name: int(msg["index"]) for name, msg in (await _links(self._inside)).items()}
        # lo too: the container's PID 1 brings it up only after "go", and a
        # route on it needs it up now.
        for name in ("lo", *(n.inside for n in spec.netifs)):
            with _step(f"cannot bring up '{name}' in the container"):
                await self._inside.link("set", index=inside[name], state="up")
        for a in spec.addresses:
            # No duplicate address detection for IPv6: the address is the
            # user's to choose, and a tentative one cannot be bound to yet.
            flags = IFA_F_NODAD if a.address.version == 6 else 0
            with _step(f"cannot add address {a.address} to '{a.ifname}'"):
                await self._inside.addr("add", index=inside[a.ifname],
                                        address=str(a.address.ip),
                                        prefixlen=a.address.network.prefixlen, flags=flags)
        for r in spec.routes:
            via = f",via={r.gateway}" if r.gateway is not None else ""
            dest = r.dest or ipaddress.ip_network("::/0" if r.gateway and r.gateway.version == 6
                                                  else "0.0.0.0/0")
            route: dict[str, Any] = {
                "family": socket.AF_INET6 if dest.version == 6 else socket.AF_INET,
                "dst_len": dest.prefixlen, "oif": inside[r.ifname]}
            if dest.prefixlen:
                route["dst"] = str(dest.network_address)
            if r.gateway is not None:
                route["gateway"] = str(r.gateway)
            elif dest.version == 4:
                route["scope"] = RT_SCOPE_LINK  # as `ip route add DEST dev NAME`
            with _step(f"cannot add route {r.ifname}={r.dest or 'default'}{via}"):
                await self._inside.route("add", **route)

    # -- teardown -------------------------------------------------------------

    async def teardown(self) -> None:
        """Give moved devices back, delete what we created; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            while self._undo:
                rec = self._undo.pop()
                try:
                    if isinstance(rec, _Moved):
                        await self._give_back(rec)
                    elif isinstance(rec, _HostVeth):
                        await self._delete(self._host, rec.ifindex, rec.name)
                    else:
                        await self._delete(self._inside, rec.ifindex, rec.name)
                except Exception as e:
                    if not _is_netlink_error(e):
                        _warn(f"network teardown: {e!r}")
                    else:
                        _warn(f"cannot clean up interface '{rec.name}': {_reason(e)}")
        finally:
            for rtnl in (self._host, self._inside):
                if rtnl is not None:
                    with contextlib.suppress(Exception):
                        rtnl.close()
            self._host = self._inside = None
            for fd in (self._netns, self._host_netns):
                if fd >= 0:
                    os.close(fd)  # the last reference lets the namespace go
            self._netns = self._host_netns = -1

    @staticmethod
    async def _delete(rtnl: Any, index: int, name: str) -> None:
        """Delete link INDEX if it still is ours (same name): gone is fine."""
        try:
            msg = (await rtnl.link("get", index=index))[0]
        except Exception as e:
            if _is_netlink_error(e) and _code(e) == errno.ENODEV:
                return
            raise
        if msg.get("ifname") == name:
            with contextlib.suppress(Exception):
                await rtnl.link("del", index=index)

    async def _give_back(self, m: _Moved) -> None:
        inside = {int(msg["index"]): msg.get("ifname")
                  async for msg in await self._inside.link("dump")}
        if m.inside_index is None:  # the move itself may have failed half-way
            index = next((i for i, name in inside.items() if name in (m.inside_name, m.name)),
                         None)
        else:
            index = m.inside_index if m.inside_index in inside else None
        if index is None:
            await self._rename_returned(m)
            return
        try:
            await self._inside.link("set", index=index, net_ns_fd=self._host_netns, ifname=m.name)
        except Exception as e:
            if not (_is_netlink_error(e) and _code(e) == errno.EEXIST):
                raise
            await self._give_back_renamed(m, index, inside[index])
            return
        if m.was_up:
            await self._host.link("set", index=await _ifindex(self._host, m.name), state="up")

    async def _give_back_renamed(self, m: _Moved, index: int, current: str) -> None:
        """Its name was taken on the host meanwhile.  The kernel moves first
        and renames after, so the device may be back already, under its
        container name; if that name is taken too, let the kernel pick devN,
        as it does for a device whose namespace dies."""
        inside = await _links(self._inside)
        if any(int(msg["index"]) == index for msg in inside.values()):
            await self._inside.link("set", index=index, net_ns_fd=self._host_netns,
                                    ifname="dev%d")
            current = "devN"
        _warn(f"interface '{m.name}' is back on the host as '{current}': "
              f"the name '{m.name}' is taken")

    async def _rename_returned(self, m: _Moved) -> None:
        """The device left the container before us (its namespace, or a nested
        one, died and the kernel sent it to the initial namespace, under its
        container name or devN).  Find it on the host and rename it back."""
        host = await _links(self._host)
        candidates = {m.host_index, m.inside_index}
        if m.name in host and int(host[m.name]["index"]) in candidates:
            return  # already back under its name
        for name, msg in host.items():
            index = int(msg["index"])
            if index in candidates and (name == m.inside_name or DEV_NAME_RE.match(name)):
                if msg["flags"] & IFF_UP:
                    await self._host.link("set", index=index, state="down")  # to rename it
                try:
                    await self._host.link("set", index=index, ifname=m.name)
                finally:
                    if m.was_up:
                        await self._host.link("set", index=index, state="up")
                return
        _warn(f"interface '{m.name}' did not come back from the container")


async def setup(spec: ContainerSpec, leader: int) -> Links:
    """Give the container (PID LEADER, in its own network namespace) its
    interfaces, addresses and routes; on error undo everything, then raise
    NetworkError."""
    links = Links()
    try:
        await links._setup(spec, leader)
    except BaseException:
        await links.teardown()
        raise
    return links
