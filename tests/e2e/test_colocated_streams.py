"""backends.adapter on a real colocated server: a stream closed early is aborted, and the server frees it.

Before the restructure, streams to a colocated server bypassed the dispatcher:
untracked, and their abort was a no-op, so a consumer that stopped reading
left the server generating all ``max_new_tokens``.

How "freed" is observed: SGLang 0.5.23 refuses ``POST /flush_cache`` (without
``?timeout``) with HTTP 400 while any request runs or waits, and answers 200
once none does. ``GET /v1/loads`` (``{"loads": [{"num_running_reqs": ...,
"num_waiting_reqs": ...}, ...]}``) is read only to explain a failure: its
numbers come from a throttled snapshot.
"""

from __future__ import annotations

import time

import httpx

FREED_WITHIN = 5.0  # seconds; generating 2000 tokens on CPU takes far longer


def _flush(url: str) -> int:
    return httpx.post(f"{url}/flush_cache", timeout=10).status_code


def _loads(url: str) -> object:
    try:
        return httpx.get(f"{url}/v1/loads", params={"include": "core"}, timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        return f"unreadable: {exc!r}"


def _wait_for_flush(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _flush(url) == 200:
            return True
        time.sleep(0.2)
    return _flush(url) == 200


def test_a_colocated_stream_closed_early_frees_the_server(colocated_backend):
    client = colocated_backend.client
    url = client.pools["colocated"][0].url
    assert _wait_for_flush(url, 60), f"{url} is still busy from an earlier test: {_loads(url)}"

    stream = client.request_stream({
        "text": "The lighthouse keeper wrote in the log that night:",
        "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0},
    })
    events = [next(stream), next(stream)]
    assert all("text" in event for event in events)
    assert client.loads() == {url: 1}
    # The request really runs: the server refuses to flush under it.
    assert _flush(url) == 400, f"the 2000-token request is not running on {url}: {_loads(url)}"

    stream.close()
    assert client.loads() == {}
    assert _wait_for_flush(url, FREED_WITHIN), (
        f"{url} still runs the closed stream's request {FREED_WITHIN}s after close(): {_loads(url)}")
    assert client.loads() == {}
