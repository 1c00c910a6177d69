"""Test doubles shipped with the library, as ``httpx.MockTransport`` is.

:class:`InMemoryTransport` replaces the network with Python callables;
:class:`FakeServer` is such a callable that answers like an SGLang 0.5.23
server (prefill, decode or colocated). Together they run the whole adapter
(routing, pairing, retries, aborts, metrics) in-process, in milliseconds::

    servers = {"http://p:1": FakeServer("prefill"), "http://d:1": FakeServer("decode")}
    client = PDClient(prefill=["http://p:1"], decode=["http://d:1"], transport=InMemoryTransport(servers))
"""

from backends.testing._fake_server import FakeServer
from backends.testing._transport import Handler, InMemoryTransport

__all__ = ["InMemoryTransport", "Handler", "FakeServer"]
