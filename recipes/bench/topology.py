"""Which servers the bench runs on: running ones given by URL, or a cluster it launches.

Why: the comparison is only fair when every route runs on the same servers,
so the servers are fixed once per invocation and each topology (``2P1D``,
``1P1D``, ...) is a subset of them: the first ``P`` prefill and first ``D``
decode servers. Bootstrap ports are asked from each prefill server (``GET
/server_info``), never typed.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from backends import HttpxTransport, PDCluster, SGLangPDConfig, Timeouts, describe_server


@dataclass(frozen=True)
class Servers:
    """Every server of this invocation, by role; ``bootstrap_ports`` follows ``prefill``."""

    prefill: tuple[str, ...]
    bootstrap_ports: tuple[int, ...]
    decode: tuple[str, ...]
    colocated: tuple[str, ...]

    @property
    def all_urls(self) -> list[str]:
        return [*self.prefill, *self.decode, *self.colocated]


@dataclass(frozen=True)
class Topology:
    """A PD subset of the servers, named like ``2P1D``."""

    name: str
    prefill: tuple[str, ...]
    bootstrap_ports: tuple[int, ...]
    decode: tuple[str, ...]


def bootstrap_port(url: str) -> int:
    """A prefill server's bootstrap port, as the adapter discovers it; ``ValueError`` for another role."""
    transport = HttpxTransport(max_connections=2)
    try:
        info = describe_server(transport, url, Timeouts(connect=5.0, first_byte=30.0, total=30.0))
    finally:
        transport.close()
    if info.role != "prefill":
        raise ValueError(f"{url} is not a prefill server (it is a {info.role} server)")
    return info.bootstrap_port


def from_urls(prefill: list[str], decode: list[str], colocated: list[str]) -> Servers:
    """Servers already running; raises ``ValueError`` when a role is missing or a prefill is not one."""
    if not prefill or not decode:
        raise ValueError("give both --prefill and --decode URLs (or none, to launch servers)")
    prefill = [u.rstrip("/") for u in prefill]
    return Servers(tuple(prefill), tuple(bootstrap_port(u) for u in prefill),
                   tuple(u.rstrip("/") for u in decode), tuple(u.rstrip("/") for u in colocated))


@contextmanager
def launched(pd_ratio: tuple[int, int], colocated: int, base_port: int,
             model_path: str | None = None) -> Iterator[Servers]:
    """Launch servers for the bench; stopped on exit, errors and Ctrl-C.

    ``model_path`` as :class:`SGLangPDConfig` takes it: ``None`` is the tiny
    model, ``PREFILL_BOUND_MODEL`` the prefill-bound one (both random, built here).
    """
    config = SGLangPDConfig(pd_ratio=pd_ratio, colocated=colocated, base_port=base_port, model_path=model_path)
    with PDCluster(config) as cluster:
        yield Servers(tuple(cluster.prefill_urls), tuple(cluster.prefill_bootstrap_ports),
                      tuple(cluster.decode_urls), tuple(cluster.colocated_urls))


def topologies(servers: Servers, names: list[str] | None) -> list[Topology]:
    """Parse names like ``2P1D``; by default the full pools, then ``1P1D`` when that is smaller."""
    if not names:
        names = [f"{len(servers.prefill)}P{len(servers.decode)}D"]
        if (len(servers.prefill), len(servers.decode)) != (1, 1):
            names.append("1P1D")
    result = []
    for name in names:
        match = re.fullmatch(r"(\d+)P(\d+)D", name.strip().upper())
        if not match:
            raise ValueError(f"topology {name!r} must look like 2P1D (prefill count, decode count)")
        p, d = int(match[1]), int(match[2])
        if not (1 <= p <= len(servers.prefill) and 1 <= d <= len(servers.decode)):
            raise ValueError(f"topology {name} needs {p} prefill and {d} decode servers; "
                             f"have {len(servers.prefill)} and {len(servers.decode)}")
        result.append(Topology(f"{p}P{d}D", servers.prefill[:p], servers.bootstrap_ports[:p], servers.decode[:d]))
    return result
