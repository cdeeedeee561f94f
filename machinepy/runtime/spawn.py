# SPDX-License-Identifier: BSD-2-Clause
"""From a validated spec to a waiting container PID 1 (host side of the fork)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from machinepy.core import linux
from machinepy.core.caps import bounding_drop, retained
from machinepy.core.spec import ContainerSpec, IdMap, Passwd, lookup_user, supplementary_groups
from machinepy.runtime import mounts
from machinepy.runtime.child import NOTIFY_SOCKET, ChildConfig, setup_child

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def container_env(
    spec: ContainerSpec, pw: Passwd | None, host_env: Mapping[str, str]
) -> dict[str, str]:
    if spec.root is None or spec.keepenv:
        env = dict(host_env)
    else:
        env = {"PATH": DEFAULT_PATH, "TERM": host_env.get("TERM", "vt220")}
    if pw is not None and (spec.root is not None or spec.user is not None) and not spec.keepenv:
        env.update(HOME=pw.home, USER=pw.name, LOGNAME=pw.name)
    env["container"] = "machinepy"
    if spec.machine_id is not None:  # booted (a random one), or --uuid
        env["container_uuid"] = str(spec.machine_id)
    env.update(spec.setenv)
    return env


def default_command(spec: ContainerSpec, pw: Passwd | None) -> tuple[str, ...]:
    if spec.command:
        return spec.command
    shell = pw.shell if pw is not None else "/bin/sh"
    if not os.path.exists(os.path.join(spec.root or "/", shell.lstrip("/"))):
        shell = "/bin/sh"
    return (shell,)


def unshare_flags(spec: ContainerSpec) -> int:
    # The cgroup namespace is entered by PID 1 itself, once it sits in its scope.
    return sum(linux.NAMESPACE_FLAGS[ns] for ns in spec.namespaces if ns != "cgroup")


def child_config(spec: ContainerSpec, *, console: int | None = None,
                 console_path: str | None = None, notify: int | None = None,
                 die_with_supervisor: bool = True,
                 root_tree: int | None = None) -> ChildConfig:
    pw: Passwd | None
    try:
        pw = lookup_user(spec.user or "0", spec.root)
    except ValueError:
        pw = None
    argv = default_command(spec, pw)
    env = container_env(spec, pw, os.environ if spec.base_env is None else dict(spec.base_env))
    if notify is not None:
        env["NOTIFY_SOCKET"] = NOTIFY_SOCKET
    user = spec.user is not None and pw is not None
    private_network = "net" in spec.namespaces
    from machinepy.runtime import seccomp  # the compiled filter comes from its cache

    try:
        programs = seccomp.programs_for(spec.system_call_filter,
                                        retained(spec.caps, private_network=private_network))
    except seccomp.BuildError as e:
        raise SpawnError(str(e)) from None
    return ChildConfig(
        unshare_flags=unshare_flags(spec),
        argv=argv,
        env=env,
        notify=notify,
        root=spec.root,
        root_tree=root_tree,
        ephemeral=spec.ephemeral,
        staging=mounts.staging_data(spec),
        plan=mounts.build_plan(spec, console_path),
        hostname=spec.hostname,
        chdir=spec.chdir,
        uid=pw.uid if user and pw else None,
        gid=pw.gid if user and pw else None,
        groups=supplementary_groups(pw, spec.root) if user and pw else (),
        cgroupns="cgroup" in spec.namespaces,
        cgroup_late=spec.root is not None,
        root_mapped=_maps_root(spec.user_maps) and _maps_root(
            spec.group_maps if spec.group_maps is not None else spec.user_maps),
        console=console,
        supervisor=os.getpid() if die_with_supervisor else 0,
        caps_drop=bounding_drop(spec.caps, private_network=private_network),
        landlock_scope=landlock_bits(spec.landlock_scope),
        seccomp=programs,
        no_new_privs=spec.no_new_privileges,
    )


def landlock_bits(scopes: tuple[str, ...]) -> int:
    bits = {"abstract-unix-socket": linux.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
            "signal": linux.LANDLOCK_SCOPE_SIGNAL}
    return sum(bits[s] for s in scopes)


def _maps_root(maps: Sequence[IdMap]) -> bool:
    return any(m.inside == 0 for m in maps)


class SpawnError(Exception):
    """The container could not be started; the message is one line."""


class Spawned:
    """The container's PID 1, waiting for go (see child.py)."""

    __slots__ = ("go_w", "leader", "pidfd", "status_r")

    def __init__(self, leader: int, pidfd: int, status_r: int, go_w: int) -> None:
        self.leader = leader
        self.pidfd = pidfd
        self.status_r = status_r  # ERR lines from PID 1 until exec; EOF on exec
        self.go_w = go_w

    def go(self, propagate: str | None = None, *, more: bool = False) -> None:
        """Let PID 1 start; MORE: it waits for cgroup_ready() before it unshares
        its cgroup namespace (child.ChildConfig.cgroup_late)."""
        msg = b"go" + (b" " + os.fsencode(propagate) if propagate else b"")
        os.write(self.go_w, msg + b"\n")
        if not more:
            os.close(self.go_w)
            self.go_w = -1

    def cancel_go(self) -> None:
        """No second line after all: a waiting PID 1 reads EOF and exits."""
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1

    def cgroup_ready(self) -> None:
        """PID 1 sits in its final cgroup: it may root its cgroup namespace there."""
        if self.go_w >= 0:
            with contextlib.suppress(BrokenPipeError):  # PID 1 failed: its error follows
                os.write(self.go_w, b"cg\n")
            os.close(self.go_w)
            self.go_w = -1

    def abort(self) -> None:
        """Kill PID 1 (waiting for go or running) and reap it; idempotent."""
        if self.pidfd < 0:
            return
        if self.go_w >= 0:
            os.close(self.go_w)  # EOF makes a waiting PID 1 exit by itself
            self.go_w = -1
        # Through the pidfd: a recycled pid number can never be hit.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        self.close()

    def close(self) -> None:
        for fd in (self.pidfd, self.status_r, self.go_w):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.status_r = self.go_w = -1


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\n")


def spawn(cfg: ChildConfig) -> Spawned:
    """Fork the setup child; return once PID 1 exists and waits for go."""
    # Threads made through threading are the ones to fear here; when nothing
    # imported it, there are none (and `run` need not import it to know).
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        # A fork copies one thread; locks held by the others would stay locked.
        raise SpawnError("internal error: refusing to fork from a multi-threaded process")
    # PID 1's parent (the setup child) exits at once: we adopt and reap it.
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        os.close(go_w)
        setup_child(cfg, status_w, go_r)
    os.close(status_w)
    os.close(go_r)
    line = _read_line(status_r)
    os.waitpid(pid, 0)
    if not line.startswith(b"PID "):
        os.close(status_r)
        os.close(go_w)
        msg = line.removeprefix(b"ERR ").decode(errors="replace") or "setup child died"
        raise SpawnError(msg)
    leader = int(line[4:])
    return Spawned(leader, os.pidfd_open(leader), status_r, go_w)


def write_id_maps(leader: int, spec: ContainerSpec) -> None:
    """uid/gid maps of the container's user namespace.

    Root writes /proc/PID/{u,g}id_map itself (newuidmap would refuse ranges not
    in /etc/subuid — pflask's bug).  Another user writes a map of its own id
    alone itself too (the kernel allows that, gid_map after setgroups "deny"),
    and anything wider through the setuid helpers, which check /etc/subuid
    and /etc/subgid.
    """
    if "user" not in spec.namespaces:
        return
    gid_maps = spec.group_maps if spec.group_maps is not None else spec.user_maps
    root = os.geteuid() == 0
    for name, maps, own, tool in (("uid_map", spec.user_maps, os.geteuid(), "newuidmap"),
                                  ("gid_map", gid_maps, os.getegid(), "newgidmap")):
        if root or (len(maps) == 1 and maps[0].outside == own and maps[0].count == 1):
            if not root and name == "gid_map":
                _write_proc(leader, "setgroups", "deny")
            _write_proc(leader, name, "".join(f"{m.inside} {m.outside} {m.count}\n"
                                              for m in maps))
        else:
            _map_with_helper(tool, leader, maps)


def _write_proc(leader: int, name: str, text: str) -> None:
    try:
        with open(f"/proc/{leader}/{name}", "w") as f:
            f.write(text)
    except OSError as e:
        raise SpawnError(f"write /proc/{leader}/{name}: {e.strerror}") from None


def _map_with_helper(tool: str, leader: int, maps: Sequence[IdMap]) -> None:
    import subprocess

    args = [str(n) for m in maps for n in (m.inside, m.outside, m.count)]
    try:
        r = subprocess.run([tool, str(leader), *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise SpawnError(f"{tool} not found (install the uidmap package)") from None
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
        raise SpawnError(f"{tool}: {msg}")
