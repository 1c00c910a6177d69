"""Kill SGLang server process groups once the process that launched them is gone.

Why: :class:`backends.launcher._cluster.PDCluster` stops its servers on normal exit,
exceptions, ``atexit`` and SIGINT/SIGTERM, but none of those run when the
launching Python process is killed with SIGKILL (a CI timeout, the OOM
killer). SGLang's scheduler and detokenizer already die with their server's
main process (``PR_SET_PDEATHSIG``); this reaper covers that main process.

How: ``PDCluster`` starts this file as a script in its own session (so a
terminal's Ctrl-C does not reach it) with a pipe on stdin, and writes
``+<pgid>`` for each server group it starts and ``-<pgid>`` for each it has
stopped itself. When stdin reaches end of file -- the launcher closed it or
died -- every group still listed gets SIGTERM, then SIGKILL after a grace
period. Standard library only: it must not import the project.

Usage: ``python _reaper.py [GRACE_SECONDS]``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

__all__ = ["reap", "main"]


def _signal_groups(pgids: set[int], sig: int) -> set[int]:
    """Send ``sig`` to each group; return the groups that still exist."""
    alive = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
            alive.add(pgid)
        except ProcessLookupError:
            pass
        except PermissionError:
            alive.add(pgid)
    return alive


def reap(pgids: set[int], grace: float) -> None:
    """SIGTERM every group, wait up to ``grace`` seconds, then SIGKILL the rest."""
    alive = _signal_groups(pgids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = _signal_groups(alive, 0)
    _signal_groups(alive, signal.SIGKILL)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    grace = float(argv[1]) if len(argv) > 1 else 10.0
    pgids: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+" and line[1:].isdigit():
            pgids.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            pgids.discard(int(line[1:]))
    if pgids:
        reap(pgids, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
