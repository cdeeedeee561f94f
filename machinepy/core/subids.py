# SPDX-License-Identifier: BSD-2-Clause
"""Without root: a user namespace of the caller's own ids, as `unshare -r` and
pflask make one, widened by its /etc/subuid and /etc/subgid ranges where the
setuid helpers (newuidmap, newgidmap) can write them."""

from __future__ import annotations

import os

from machinepy.core.spec import IdMap


def subordinate_range(db: str, name: str, ident: int) -> tuple[int, int] | None:
    """The first range of /etc/subuid or /etc/subgid for NAME (or its id)."""
    try:
        with open(db) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (name, str(ident)) and \
                        fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) > 0:
                    return int(fields[1]), int(fields[2])
    except OSError:
        pass
    return None


def _around(inside: int, outside: int, sub: tuple[int, int] | None) -> tuple[IdMap, ...]:
    """INSIDE → OUTSIDE (the caller), the rest of 0… from the subordinate range."""
    maps = [IdMap(inside, outside, 1)]
    if sub is not None:
        start, count = sub
        below = min(inside, count)
        if below:
            maps.append(IdMap(0, start, below))
        if count - below:
            maps.append(IdMap(inside + 1, start + below, count - below))
    return tuple(sorted(maps))


def caller_maps(as_uid: int = 0, as_gid: int = 0) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...]]:
    """uid and gid maps for an unprivileged caller: its own ids become AS_UID/AS_GID
    inside (root by default), and its /etc/subuid and /etc/subgid ranges the
    other ids from 0, where newuidmap/newgidmap exist to write them."""
    import pwd
    import shutil

    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    helpers = shutil.which("newuidmap") and shutil.which("newgidmap")
    subuid = subordinate_range("/etc/subuid", name, uid) if helpers else None
    subgid = subordinate_range("/etc/subgid", name, uid) if helpers else None
    if subuid is None or subgid is None:
        subuid = subgid = None  # both or neither: newgidmap alone would still be refused
    return _around(as_uid, uid, subuid), _around(as_gid, gid, subgid)
