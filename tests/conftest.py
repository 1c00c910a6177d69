"""Real SGLang servers for the end-to-end and recipe tests, started once per session.

Top level so that ``tests/e2e`` and ``tests/recipes`` share ONE session
cluster (fixtures are lazy: unit tests never start it).

One cluster serves every e2e test: 2 prefill + 1 decode + 1 colocated server
on the tiny model (about 14 GB and 100 s to start on 2 cores). The PD backend
and the colocated backend run the same programs against it, so every e2e test
compares PD with the colocated reference on the same weights.

``SGLPD_TEST_BASE_PORT`` moves the cluster's ports (default 30000).
``SGLPD_TEST_REUSE=1`` reuses servers already healthy on those ports (for
development: start them with ``python -m recipes.launch_pd --pd-ratio 2:1
--colocated 1``); fault-injection tests are skipped then.
"""

from __future__ import annotations

import gc
import os
import types

import httpx
import pytest

from backends import PDBackend, PDCluster, SGLangPDConfig, Timeouts, plan_servers
from sgl_programs._threads import collector_paused


def _config() -> SGLangPDConfig:
    return SGLangPDConfig(pd_ratio=(2, 1), colocated=1, base_port=int(os.environ.get("SGLPD_TEST_BASE_PORT", 30000)))


def _unhealthy(urls: list[str]) -> list[str]:
    down = []
    for url in urls:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code != 200:
                down.append(url)
        except httpx.HTTPError:
            down.append(url)
    return down


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config = _config()
    if os.environ.get("SGLPD_TEST_REUSE") == "1":
        specs = plan_servers(config)
        down = _unhealthy([s.url for s in specs])
        if down and len(down) < len(specs):
            pytest.fail(f"SGLPD_TEST_REUSE=1 but these servers are not healthy: {down}; restart them or unset it")
        if not down:
            urls = {role: [s.url for s in specs if s.role == role] for role in ("prefill", "decode", "colocated")}
            yield types.SimpleNamespace(
                reused=True, prefill_urls=urls["prefill"], decode_urls=urls["decode"],
                colocated_urls=urls["colocated"], is_tiny_model=True,
            )
            return
    with PDCluster(config, log_dir=tmp_path_factory.mktemp("server-logs")) as running:
        running.reused = False
        yield running


def _backend(**pools) -> PDBackend:
    return PDBackend(**pools, timeouts=Timeouts(connect=2.0, first_byte=60.0, total=120.0), probe_interval=0.5)


@pytest.fixture(scope="session")
def pd_backend(cluster):
    """PD only: both prefill servers and the decode server."""
    backend = _backend(prefill=cluster.prefill_urls, decode=cluster.decode_urls)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="session")
def colocated_backend(cluster):
    """The colocated reference server through the same adapter class."""
    backend = _backend(colocated=cluster.colocated_urls)
    yield backend
    backend.shutdown()


@pytest.fixture(params=["pd", "colocated"])
def any_backend(request, pd_backend, colocated_backend):
    """Each program test runs on both deployments."""
    return pd_backend if request.param == "pd" else colocated_backend


#: SGLang 0.5.23's mooncake transfer thread can die on a race (KeyError on a room that
#: completed meanwhile); the prefill server then hangs every PD request while /health passes.
_TRANSFER_THREAD_DEAD = "Transfer thread failed because of"


@pytest.fixture(autouse=True)
def _restart_servers_sglang_declared_dead(request):
    """After a test on the session cluster: restart any server whose log says its transfer thread died.

    Without this, one upstream race turns every later test into a timeout.
    The restart is logged in the test output; the adapter's own handling of
    such a server is its timeouts and retries.
    """
    yield
    if "cluster" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("cluster")
    if getattr(cluster, "reused", True) or getattr(cluster, "supervise", False):
        return  # a supervising cluster restarts such a server itself
    seen = cluster.__dict__.setdefault("_log_offsets", {})
    for spec in cluster.servers:
        path = cluster.log_path(spec)
        try:
            with open(path, "rb") as log:
                log.seek(seen.get(spec.name, 0))
                fresh = log.read()
                seen[spec.name] = log.tell()
        except OSError:
            continue
        if _TRANSFER_THREAD_DEAD.encode() in fresh:
            print(f"\n{spec.name}: SGLang's transfer thread died (see {path}); restarting it")
            cluster.restart(spec.role, spec.index)
            seen[spec.name] = path.stat().st_size


@pytest.fixture(autouse=True)
def _collector_paused_during_tests():
    """No automatic cyclic GC while a test runs; one collection after it, from this thread.

    CPython 3.11's collector can run inside ``Thread.start`` and free an SGLang
    ``StreamExecutor`` whose ``__del__`` needs the lock ``Thread.start`` holds:
    the process hangs (see ``sgl_programs/_threads.py``). Collecting here, outside
    any thread start, is safe.
    """
    with collector_paused():
        yield
    gc.collect()
