"""KVEventSubscriber against SGLang's wire format on real local ZMQ sockets (no servers).

``FakeServer`` publishes what SGLang 0.5.23 publishes: multipart ``[topic, 8-byte big-endian seq,
msgpack [ts, [events], dp_rank]]`` (payloads byte-identical to ``msgspec`` encoding SGLang's
``KVEventBatch``; checked against ``sglang.srt.disaggregation.kv_events``), a replay ROUTER answering
as ``ZmqEventPublisher._service_replay`` does, and ``["LoadStat", ...]`` on the load socket.
"""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from backends.adapter._kv_events import KVEventSubscriber
from backends.adapter._kv_wire import event_sources
from backends.adapter._token_index import TokenIndex
from backends.errors import ConfigurationError

URL = "http://127.0.0.1:30000"
END = (-1).to_bytes(8, "big", signed=True)


def stored(hashes, parent, tokens):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": 1, "lora_id": None, "medium": "GPU"}


def removed(hashes):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


CLEARED = {"type": "AllBlocksCleared"}


class FakeServer:
    """One SGLang server's publishers for ``dp`` ranks; XPUB so a test can wait for subscribers."""

    def __init__(self, dp=1, replay=True, load=True):
        self.ctx, self.dp, self.seq, self.buffer = zmq.Context(), dp, [0] * dp, [[] for _ in range(dp)]
        self.pubs, self.base = self._bind_range(zmq.XPUB, dp)
        self.routers, self.replay_base = self._bind_range(zmq.ROUTER, dp) if replay else ([], None)
        self.loads, self.load_base = self._bind_range(zmq.XPUB, dp) if load else ([], None)
        self.load_seq = [0] * dp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._thread.start()

    def _bind_range(self, kind, n):
        for _ in range(50):
            socks = [self.ctx.socket(kind) for _ in range(n)]
            for s in socks:
                s.setsockopt(zmq.LINGER, 0)
            base = socks[0].bind_to_random_port("tcp://127.0.0.1", 40000, 60000)
            try:
                for r, s in enumerate(socks[1:], 1):
                    s.bind(f"tcp://127.0.0.1:{base + r}")
                return socks, base
            except zmq.ZMQError:
                for s in socks:
                    s.close()
        raise RuntimeError("no free port range")

    def server_info(self):
        kv = {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": self.base, "topic": "kv",
              "block_size": 1, "dp_size": self.dp}
        if self.replay_base:
            kv["replay_endpoint_port_base"] = self.replay_base
        if self.load_base:
            kv |= {"load_endpoint_port_base": self.load_base, "load_topic": "load"}
        return {"kv_events": kv, "dp_size": self.dp}

    def wait_subscribed(self, timeout=5.0):
        for sock in self.pubs + self.loads:
            assert sock.poll(int(timeout * 1000)), "subscriber never connected"
            sock.recv()

    def publish(self, events, rank=0, send=True):
        seq, payload = self.seq[rank], msgspec.msgpack.encode([time.time(), events, rank])
        self.seq[rank] += 1
        self.buffer[rank].append((seq, payload))
        if send:
            self.pubs[rank].send_multipart((b"kv", seq.to_bytes(8, "big"), payload))

    def restart(self, rank=0):
        self.seq[rank], self.buffer[rank], self.load_seq[rank] = 0, [], 0

    def publish_load(self, running, rank=0):
        stat = ["LoadStat", running, 0, 10, 65536, rank, 7, 10, 4096, 0, 0]
        self.loads[rank].send_multipart((b"load", self.load_seq[rank].to_bytes(8, "big"), msgspec.msgpack.encode(stat)))
        self.load_seq[rank] += 1

    def _serve_replay(self):
        while not self._stop.is_set():
            for rank, router in enumerate(self.routers):
                if router.poll(10):
                    client, _, start = router.recv_multipart()
                    for seq, payload in list(self.buffer[rank]):
                        if seq >= int.from_bytes(start, "big"):
                            router.send_multipart((client, b"", b"kv", seq.to_bytes(8, "big"), payload))
                    router.send_multipart((client, b"", b"", END, b""))
            if not self.routers:
                time.sleep(0.01)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.ctx.destroy(linger=0)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def setup():
    made = []

    def make(**kwargs):
        server, index = FakeServer(**kwargs), TokenIndex(chunk=2)
        sub = KVEventSubscriber(index, replay_timeout_s=0.5)
        made.append((server, sub))
        return server, index, sub

    yield make
    for server, sub in made:
        sub.close()
        server.close()


def subscribe(server, sub, url=URL):
    holders = sub.add_server(url, server.server_info())
    server.wait_subscribed()
    wait_for(lambda: all(sub.stats()[h]["replays"] + sub.stats()[h]["replay_failures"] >= 1 or
                         server.replay_base is None for h in holders))
    return holders


def test_event_sources_from_server_info():
    info = {"kv_events": {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": 5557, "topic": "kv",
                          "block_size": 1, "dp_size": 2, "replay_endpoint_port_base": 5560,
                          "load_endpoint_port_base": 5570, "load_topic": "load"}}
    a, b = event_sources("http://10.1.2.3:30000", info)
    assert (a.holder, a.endpoint, a.replay_endpoint, a.load_endpoint) == (
        "http://10.1.2.3:30000#dp0", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5560", "tcp://10.1.2.3:5570")
    assert (b.endpoint, b.replay_endpoint, b.load_endpoint) == ("tcp://10.1.2.3:5558", "tcp://10.1.2.3:5561",
                                                                "tcp://10.1.2.3:5571")
    assert event_sources("http://[::1]:30000", {"kv_events": {"endpoint_port_base": 1}})[0].endpoint == "tcp://[::1]:1"
    assert event_sources(URL, {"dp_size": 1}) == [] and event_sources(URL, {"kv_events": None}) == []
    with pytest.raises(ConfigurationError):
        event_sources(URL, {"kv_events": {"topic": "kv"}})


def test_stored_removed_cleared_and_load(setup):
    server, index, sub = setup()
    assert subscribe(server, sub) == [URL]
    server.publish([stored([11, 12, 13, 14], None, [1, 2, 3, 4]), {"type": "SomethingNew", "x": 1}])
    wait_for(lambda: index.match([1, 2, 3, 4], [URL]) == {URL: 4})
    server.publish([removed([13, 14])])
    wait_for(lambda: index.match([1, 2, 3, 4], [URL]) == {URL: 2})
    server.publish([CLEARED])
    wait_for(lambda: index.stats(URL)["blocks"] == 0)
    server.publish_load(running=3)
    wait_for(lambda: sub.load(URL) is not None)
    stat, age = sub.load(URL)
    assert (stat.num_running_reqs, stat.num_waiting_uncached_tokens, stat.max_total_num_tokens) == (3, 7, 65536)
    s = sub.stats()[URL]
    assert (s["batches"], s["events"], s["skipped"], s["cleared"], s["gaps"], s["resets"]) == (3, 4, 1, 1, 0, 0)
    assert 0 <= s["event_lag_s"] < 1 and s["last_event_age_s"] < 5 and age < 5


def test_a_new_subscriber_replays_the_history(setup):
    server, index, sub = setup()
    server.publish([CLEARED])
    server.publish([stored([1, 2], None, [7, 8])])
    server.publish([stored([3, 4], 2, [9, 10])])
    subscribe(server, sub)
    assert index.match([7, 8, 9, 10], [URL]) == {URL: 4}
    assert sub.stats()[URL]["last_seq"] == 2


def test_a_gap_is_filled_by_replay(setup):
    server, index, sub = setup()
    subscribe(server, sub)
    server.publish([stored([1, 2], None, [7, 8])])
    server.publish([stored([3, 4], 2, [9, 10])], send=False)  # lost on the way
    server.publish([stored([5, 6], 4, [11, 12])])
    wait_for(lambda: index.match([7, 8, 9, 10, 11, 12], [URL]) == {URL: 6})
    s = sub.stats()[URL]
    assert (s["gaps"], s["replays"], s["replay_failures"], s["last_seq"]) == (1, 2, 0, 2)


def test_a_gap_without_replay_clears_the_rank(setup):
    server, index, sub = setup(replay=False)
    subscribe(server, sub)
    server.publish([stored([1, 2], None, [7, 8])])
    wait_for(lambda: index.stats(URL)["blocks"] == 2)
    server.publish([stored([3, 4], 2, [9, 10])], send=False)
    server.publish([stored([5, 6], None, [1, 1])])
    wait_for(lambda: sub.stats()[URL]["replay_failures"] == 1)
    assert index.match([7, 8], [URL]) == {URL: 0} and index.match([1, 1], [URL]) == {URL: 2}


def test_a_restarted_server_resets_the_index(setup):
    server, index, sub = setup()
    subscribe(server, sub)
    for i in range(3):
        server.publish([stored([10 * i], None, [i, i])])
    wait_for(lambda: sub.stats()[URL]["last_seq"] == 2)
    server.restart()  # a new process: its counter starts at 0 with AllBlocksCleared
    server.publish([CLEARED])
    server.publish([stored([99, 98], None, [5, 5])])
    wait_for(lambda: sub.stats()[URL]["resets"] == 1 and index.match([5, 5], [URL]) == {URL: 2})
    assert index.match([0, 0], [URL]) == {URL: 0}
    server.publish_load(1)
    server.publish_load(1)
    wait_for(lambda: sub.load(URL) is not None)
    server.restart()  # an idle restart shows only on the load stream
    server.publish([CLEARED], send=False)
    server.publish_load(0)
    wait_for(lambda: sub.stats()[URL]["resets"] == 2)


def test_dp_ranks_are_separate_holders(setup):
    server, index, sub = setup(dp=2)
    a, b = subscribe(server, sub)
    server.publish([stored([1, 2], None, [3, 4])], rank=1)
    wait_for(lambda: index.match([3, 4], [a, b]) == {a: 0, b: 2})
    sub.remove_server(URL)
    assert index.match([3, 4], [a, b]) == {a: 0, b: 0} and sub.stats() == {}


def test_close_stops_the_thread_and_every_socket(setup):
    server, index, sub = setup()
    subscribe(server, sub)
    started = time.monotonic()
    sub.close()
    assert time.monotonic() - started < 1.0
    assert not sub._thread.is_alive() and sub._ctx.closed
    with pytest.raises(RuntimeError):
        sub.add_server(URL, server.server_info())
