"""Many concurrent requests through one adapter: all answered, no thread or connection leak."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil


def _open_connections(ports: set[int]) -> int:
    connections = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED)


def _round(backend, count: int, concurrency: int, offset: int) -> list[dict]:
    def one(i: int) -> dict:
        body = {"text": f"Request {offset + i}: summarise entry {i % 17}.", "sampling_params": {"max_new_tokens": 2}}
        return backend.client.request(body)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def test_1000_requests_at_concurrency_128(pd_backend, cluster):
    ports = {int(u.rsplit(":", 1)[1]) for u in cluster.prefill_urls + cluster.decode_urls}
    errors_before = pd_backend.metrics.summary().get("errors", 0)
    # A first round fills the connection pool and the prefill-leg threads up to their steady state.
    first = _round(pd_backend, 500, 128, offset=0)
    time.sleep(1)
    threads_after_first, connections_after_first = threading.active_count(), _open_connections(ports)
    second = _round(pd_backend, 500, 128, offset=500)
    time.sleep(1)

    answers = first + second
    assert len(answers) == 1000
    assert all(a["meta_info"]["completion_tokens"] >= 1 for a in answers)
    assert pd_backend.metrics.summary()["errors"] == errors_before
    assert not pd_backend.client.loads(), "requests still counted in flight after all answered"
    # Steady state: the second round grew nothing per request (a leak would add ~500). Some
    # slack: the health prober starts on a first failure, and the leg pool starts threads
    # lazily up to its bound when a retry raises concurrency for a moment (+4 seen in CI).
    assert threading.active_count() <= threads_after_first + 16
    assert _open_connections(ports) <= max(connections_after_first, 2 * 128)
