"""Small pure helpers shared by the fast unit tests: a PDBackend or PDClient over fake servers.

Not a conftest: importing it starts nothing (tests/conftest.py holds the
session fixtures that start real servers).
"""

from __future__ import annotations

import time
import types

from sglang.lang.chat_template import get_chat_template
from sglang.lang.ir import SglSamplingParams

from backends import PDBackend, PDClient
from backends.adapter._retry import RetryPolicy
from backends.testing import InMemoryTransport

P1, P2, D1, C1 = "http://p1:1", "http://p2:1", "http://d1:1", "http://c1:1"


def _pools(servers) -> dict[str, list[str]]:
    roles = {"prefill": [], "decode": [], "colocated": []}
    for url, server in servers.items():
        roles[server.role].append(url)
    return roles


def _fast_options(kwargs: dict) -> dict:
    kwargs.setdefault("retry", RetryPolicy(max_attempts=3, backoff=0.0, max_backoff=0.0))
    kwargs.setdefault("probe_interval", 0.05)
    return kwargs


def make(servers, **kwargs):
    """A PDBackend over ``{url: FakeServer}`` (roles from each server) and its InMemoryTransport."""
    transport = InMemoryTransport(servers)
    backend = PDBackend(**_pools(servers), transport=transport, chat_template=get_chat_template("chatml"),
                        **_fast_options(kwargs))
    return backend, transport


def make_client(servers, **kwargs):
    """As :func:`make`, a bare PDClient."""
    transport = InMemoryTransport(servers)
    return PDClient(**_pools(servers), transport=transport, **_fast_options(kwargs)), transport


def state(text="hello " * 40):
    """What PDBackend reads of a frontend program's executor."""
    return types.SimpleNamespace(text_=text, sid="sid-1")


def params(**kw):
    return SglSamplingParams(max_new_tokens=kw.pop("max_new_tokens", 4), temperature=0, **kw)


def wait_until(condition, timeout):
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()
