"""How much CPU other people's processes used while a run was measured (Linux ``/proc``).

Why: on a small shared machine (2 cores, dev servers other people also use)
latencies move by 2-3x with whatever else runs. Hit ratios barely care, but
any latency or throughput comparison between two runs is only meaningful
when both ran under similar outside load, so every run reports the CPU used
meanwhile by processes that are neither this benchmark (and its routers)
nor the benchmarked servers, in cores (1.0 = one core busy all the time).

The benchmarked servers are found by the port they listen on: the owning
process's session (SGLang servers started by ``PDCluster`` or
``recipes.launch_pd`` each run in their own session, with their scheduler and
detokenizer) counts as "ours". Elsewhere than Linux it reports ``None``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

_PROC = Path("/proc")
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = (_PROC / pid / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # state ppid pgrp session ... utime(11) stime(12)


def _cpu_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (session id, utime + stime in clock ticks) for every process."""
    ticks = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and len(fields) > 12:
                ticks[int(entry.name)] = (int(fields[3]), int(fields[11]) + int(fields[12]))
    return ticks


def _listening_inodes(ports: set[int]) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(parts[9])
    return inodes


def server_sessions(urls: list[str]) -> set[int]:
    """Session ids of the processes listening on the servers' ports (this machine only)."""
    ports = {urlsplit(u).port for u in urls if urlsplit(u).hostname in ("127.0.0.1", "localhost")}
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes({p for p in ports if p})}
    sessions = set()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or not wanted:
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if links & wanted:
            fields = _stat_fields(entry.name)
            if fields:
                sessions.add(int(fields[3]))
    return sessions


class OutsideLoad:
    """Measures the CPU of everything except this process tree and the servers, between start and stop."""

    def __init__(self, server_urls: list[str]) -> None:
        self.enabled = (_PROC / "stat").exists()
        self._ours = server_sessions(server_urls) | {os.getsid(0)} if self.enabled else set()
        self._run_sessions: set[int] = set()
        self._before: dict[int, tuple[int, int]] = {}
        self._started = 0.0

    def start(self, extra_sessions: set[int] = frozenset()) -> None:
        """Start measuring; ``extra_sessions`` are ours too (a router started in its own session)."""
        if self.enabled:
            self._run_sessions = self._ours | set(extra_sessions)
            self._before, self._started = _cpu_ticks(), time.monotonic()

    def stop(self) -> float | None:
        """Average cores used by outside processes since :meth:`start`."""
        if not self.enabled or not self._started:
            return None
        elapsed = time.monotonic() - self._started
        after = _cpu_ticks()
        mine = {os.getpid()}
        self._started = 0.0
        outside = 0
        for pid, (session, ticks) in after.items():
            if session in self._run_sessions or pid in mine:
                continue
            outside += ticks - self._before.get(pid, (session, 0))[1]
        return outside / _HZ / elapsed if elapsed > 0 else None
