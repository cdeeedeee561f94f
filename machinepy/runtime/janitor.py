# SPDX-License-Identifier: BSD-2-Clause
"""What the supervisor made on the host, removed even when it is SIGKILLed.

The supervisor's exit stack undoes everything on every path it lives through.
A few things outlive a SIGKILLed supervisor, though: the container dies with
it (PDEATHSIG), but a cgroup directory or a socket file does not vanish by
itself.  For those, a janitor: a small process of its own holding the read
end of a pipe.  The supervisor writes each path to clean as it makes it; when
the pipe reaches EOF, the janitor does them all (idempotently).  A supervisor
that cleaned up itself ends with a DONE line, and the janitor then just exits.

While it waits, the janitor is a shell reading the pipe (~1 ms to start, on
the start-up path of every container with a cgroup of its own); only after a
supervisor died without DONE does it exec an interpreter for the jobs (this
module, machinepy.runtime.cgroup and, for a console socket, machinepy.runtime.attachsock).  It is
spawned (posix_spawn: no fork of our heap, no copy of our command line for
`pidof` to find) in a session of its own, out of reach of the terminal's ^C,
and nothing waits for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from machinepy.runtime import cgroup

# Kinds of job, one line each on the pipe: "KIND PATH\n"
UNLINK = "unlink"
RMDIR = "rmdir"
CGROUP = "cgroup"  # cgroup.kill, then rmdir (see machinepy.runtime.cgroup.remove)
ATTACH = "attach"  # a console socket and its keys (see machinepy.runtime.attachsock.forget)
DONE = "DONE"  # the last line of a supervisor that cleaned up itself

# The waiting shell: all the jobs, then — unless they end with DONE — the
# interpreter ($0) running serve() ($1) on them.
_WAIT = ('jobs=$(cat); case "$jobs" in ""|*DONE) exit 0;; esac; '
         'printf "%s\\n" "$jobs" | exec "$0" -I -S -c "$1"')


class Janitor:
    def __init__(self) -> None:
        self._w = -1
        self.pid = 0

    def start(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {top!r}); "
                "import machinepy.runtime.janitor as j; j.serve()")
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                self.pid = os.posix_spawn(
                    "/bin/sh", ["sh", "-c", _WAIT, sys.executable, code], {},
                    file_actions=[(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                                  (os.POSIX_SPAWN_DUP2, null, 2)],
                    setsid=True)
            finally:
                os.close(null)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._w = w

    def add(self, kind: str, path: str) -> None:
        """Clean PATH when we are gone.  Writes one short line: never blocks."""
        if "\n" in path:  # one job a line; our own paths never hold one
            raise ValueError(f"janitor: a path with a newline: {path!r}")
        if self._w < 0:
            self.start()
        os.write(self._w, f"{kind} {path}\n".encode(errors="surrogateescape"))

    def close(self, clean: bool = False) -> None:
        """Let the janitor go: CLEAN, we undid everything ourselves (it just
        exits); else it does its round now.

        Not waited for: it is reaped when it is done (WNOHANG here) or adopted
        by init once we exit.
        """
        if self._w < 0:
            return
        if clean:
            with contextlib.suppress(OSError):
                os.write(self._w, DONE.encode() + b"\n")
        os.close(self._w)
        self._w = -1
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)


def serve() -> None:
    """The janitor's main: jobs from stdin until EOF, then do them."""
    # Ours to end: a signal to the supervisor's process group must not stop the
    # clean-up of a supervisor that was killed.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    data = b""
    while chunk := os.read(0, 65536):
        data += chunk
    for line in data.decode(errors="surrogateescape").splitlines():
        kind, _, path = line.partition(" ")
        with contextlib.suppress(OSError):
            if kind == UNLINK:
                os.unlink(path)
            elif kind == RMDIR:
                os.rmdir(path)
            elif kind == CGROUP:
                cgroup.remove(path)
            elif kind == ATTACH:
                from machinepy.runtime import attachsock

                attachsock.forget(path)
