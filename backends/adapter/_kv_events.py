"""Subscribe to SGLang's KV-cache event and load streams, in one background thread.

A server started with ``--kv-events-config '{"publisher": "zmq", ...}'`` and
``--load-publish-endpoint`` describes its streams in ``/server_info["kv_events"]``
(``describe_kv_events_publisher``, ``sglang/srt/runtime_context.py``): port bases
for events, replay and load (DP rank r binds base + r), topics, ``block_size``,
``dp_size`` and ``endpoint_host``, a wildcard we replace with the URL's host.
Every stream is ZMQ multipart ``[topic, seq, payload]``, ``seq`` an 8-byte
big-endian counter that restarts with the server process:

* events (``ZmqEventPublisher``, ``sglang/srt/disaggregation/kv_events.py``):
  msgpack ``[ts, [event, ...], attn_dp_rank]``, events being maps tagged by
  ``type`` (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``, recorded by
  ``sglang/srt/mem_cache/events.py``); a new process starts with ``AllBlocksCleared``;
* replay (same class): a ROUTER; a DEALER sends ``[b"", start_seq]`` and gets
  ``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start`` (the
  last 10,000 by default), then ``[b"", b"", END_SEQ, b""]``;
* load (``SchedulerLoadPublisher``, ``.../scheduler_components/load_publisher.py``):
  the tagged array ``["LoadStat", num_running_reqs, ...]``, at least once a second.

Per (server, rank) a new subscription replays from 0 to learn what the cache
holds; a gap in ``seq`` is replayed, and if the buffer no longer has it the
rank's index is rebuilt from what it has (cleared if there is no replay); a
``seq`` going back on either stream is a restarted server: clear, replay from 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Optional

import zmq

from backends.adapter._kv_wire import (
    END_SEQ, AllBlocksCleared, BlockRemoved, BlockStored, EventSource, LoadStat, decode_batch, decode_load,
    event_sources,
)
from backends.adapter._token_index import TokenIndex

__all__ = ["KVEventSubscriber"]

logger = logging.getLogger(__name__)
_GPU = (None, "GPU")  # StorageMedium.GPU: a block only in a host or disk tier is not a free prefix hit


class _Stream:
    """One (server, rank): sockets, sequence numbers, counters. Written by the thread only."""

    def __init__(self, source: EventSource):
        self.source, self.sub, self.load_sub, self.dealer = source, None, None, None
        self.last_seq = self.load_seq = self.replay_from = None  # replay_from: set while replaying
        self.replay_deadline = self.load_at = self.last_event_at = 0.0
        self.pending: list[tuple[int, bytes]] = []  # live batches held back during a replay
        self.load: Optional[LoadStat] = None
        self.lag_s: Optional[float] = None
        self.counts = dict.fromkeys(("batches", "events", "replays", "replay_failures", "gaps", "resets",
                                     "cleared", "skipped", "errors"), 0)


class KVEventSubscriber:
    """Feeds a :class:`TokenIndex` from every subscribed server and keeps each rank's latest ``LoadStat``.

    Parameters
    ----------
    index
        Receives each rank's events under its holder name (:func:`holder_name`).
    replay_timeout_s
        A replay silent for this long has failed.
    poll_interval_s
        Longest time the thread waits before looking at its commands and stop flag.
    """

    def __init__(self, index: TokenIndex, *, replay_timeout_s: float = 2.0, poll_interval_s: float = 0.05):
        self.index, self._replay_timeout, self._poll_ms = index, replay_timeout_s, max(1, int(poll_interval_s * 1e3))
        self._ctx, self._commands, self._stop = zmq.Context(), queue.Queue(), threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._sources: dict[str, list[EventSource]] = {}
        self._lock = threading.Lock()  # _streams is read by other threads
        self._poller, self._handlers = zmq.Poller(), {}  # thread-owned, like every socket
        self._thread = threading.Thread(target=self._run, name="sgl-pd-kv-events", daemon=True)
        self._thread.start()

    def add_server(self, url: str, server_info: dict, timeout_s: float = 2.0) -> list[str]:
        """Subscribe to every rank of ``url``; returns its holders (``[]``: no events, route approximately)."""
        sources = event_sources(url, server_info)
        if sources:
            self._sources[url] = sources
            self._command(self._do_add, sources, timeout_s)
        return [s.holder for s in sources]

    def resync(self, url: str, timeout_s: float = 2.0) -> None:
        """Resubscribe to ``url`` from scratch: its index is rebuilt by a replay from sequence 0."""
        if url in self._sources:
            self._command(self._do_add, self._sources[url], timeout_s)

    def remove_server(self, url: str, timeout_s: float = 2.0) -> None:
        """Unsubscribe from ``url`` and forget its index."""
        self._sources.pop(url, None)
        self._command(self._do_remove, url, timeout_s)

    def load(self, holder: str) -> Optional[tuple[LoadStat, float]]:
        """The latest ``LoadStat`` of ``holder`` and its age in seconds, if one arrived."""
        with self._lock:
            s = self._streams.get(holder)
            return None if s is None or s.load is None else (s.load, time.monotonic() - s.load_at)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per holder: indexed ``blocks``, ``events``, ``last_event_age_s``, ``event_lag_s`` (publish to
        receive, the wall clocks of two hosts), ``replays``, ``resets``, gaps, errors, ``load_age_s``..."""
        now = time.monotonic()
        with self._lock:
            streams = list(self._streams.values())
        return {s.source.holder: {"url": s.source.url, "rank": s.source.rank, **s.counts, "last_seq": s.last_seq,
                                  "blocks": self.index.stats(s.source.holder)["blocks"], "event_lag_s": s.lag_s,
                                  "last_event_age_s": now - s.last_event_at if s.last_event_at else None,
                                  "load_age_s": now - s.load_at if s.load_at else None} for s in streams}

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread, close every socket (linger 0) and the ZMQ context."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # it polls every poll_interval_s, so this is a bug: do not hang
            logger.warning("KV event thread still running after %.1f s; destroying its sockets", timeout_s)
            self._ctx.destroy(linger=0)
        elif not self._ctx.closed:
            self._ctx.term()

    def _command(self, fn, arg, timeout_s: float) -> None:
        if self._stop.is_set():
            raise RuntimeError("KVEventSubscriber is closed")
        done = threading.Event()
        self._commands.put((fn, arg, done))
        done.wait(timeout_s)

    # ---- the thread: every socket is made, used and closed here (ZMQ sockets are not thread-safe)
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while not self._commands.empty():
                    fn, arg, done = self._commands.get()
                    fn(arg)
                    done.set()
                now = time.monotonic()
                for s in [s for s in self._streams.values() if s.replay_from is not None and now > s.replay_deadline]:
                    self._end_replay(s, ok=False)
                for sock, _ in self._poller.poll(self._poll_ms):
                    for _ in range(1000):  # then give the other sockets and the stop flag a turn
                        handler, s = self._handlers.get(sock, (None, None))
                        try:
                            frames = handler and sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not frames:  # closed while draining
                            break
                        try:
                            handler(s, frames)
                        except Exception:  # one bad message must not end the stream
                            s.counts["errors"] += 1
                            logger.exception("bad KV event message from %s", s.source.holder)
        finally:
            for s in list(self._streams.values()):
                self._close(s)

    def _do_add(self, sources: list[EventSource]) -> None:
        self._do_remove(sources[0].url)
        for source in sources:
            s = _Stream(source)
            s.sub = self._socket(zmq.SUB, source.endpoint, self._on_kv, s, 100_000, source.topic)
            if source.load_endpoint:
                s.load_sub = self._socket(zmq.SUB, source.load_endpoint, self._on_load, s, 64, source.load_topic)
            with self._lock:
                self._streams[source.holder] = s
            self._start_replay(s, 0)  # learn what the cache already holds

    def _do_remove(self, url: str) -> None:
        for s in [s for s in self._streams.values() if s.source.url == url]:
            self._close(s)
            self.index.forget(s.source.holder)

    def _socket(self, kind: int, endpoint: str, handler, s: _Stream, hwm: int, topic: Optional[str] = None):
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if topic is not None:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(endpoint)
        self._poller.register(sock, zmq.POLLIN)
        self._handlers[sock] = (handler, s)
        return sock

    def _drop(self, sock) -> None:
        if sock is not None:
            self._poller.unregister(sock)
            self._handlers.pop(sock, None)
            sock.close(linger=0)

    def _close(self, s: _Stream) -> None:
        for sock in (s.sub, s.load_sub, s.dealer):
            self._drop(sock)
        s.sub = s.load_sub = s.dealer = None
        with self._lock:
            if self._streams.get(s.source.holder) is s:
                del self._streams[s.source.holder]

    def _on_kv(self, s: _Stream, frames: list[bytes]) -> None:
        seq = int.from_bytes(frames[1], "big")
        if s.replay_from is None:
            self._sequence(s, seq, frames[2])
            return
        s.pending.append((seq, frames[2]))
        if len(s.pending) > 100_000:  # a replay this far behind is hopeless; do not hoard memory
            self._end_replay(s, ok=False)

    def _sequence(self, s: _Stream, seq: int, payload: bytes) -> None:
        if s.last_seq is None or seq == s.last_seq + 1:
            self._apply(s, seq, payload)
        elif seq <= s.last_seq:  # the counter restarted: a new server process, an empty cache
            self._reset(s, f"event sequence went back from {s.last_seq} to {seq}", first=(seq, payload))
        else:
            s.counts["gaps"] += 1
            logger.info("%s: events %d..%d missed; replaying", s.source.holder, s.last_seq + 1, seq - 1)
            self._start_replay(s, s.last_seq + 1, first=(seq, payload))

    def _reset(self, s: _Stream, why: str, first: Optional[tuple[int, bytes]] = None) -> None:
        logger.info("%s restarted (%s): index cleared, replaying from 0", s.source.holder, why)
        s.counts["resets"] += 1
        self.index.clear(s.source.holder)
        self._drop(s.dealer)
        # Both counters restart with the process: the other stream must not report this restart again.
        s.dealer, s.replay_from, s.last_seq, s.load_seq = None, None, None, None
        self._start_replay(s, 0, first)

    def _start_replay(self, s: _Stream, start: int, first: Optional[tuple[int, bytes]] = None) -> None:
        s.pending = [first] if first else []
        if s.source.replay_endpoint is None:
            self._end_replay(s, ok=False, start=start)
            return
        s.dealer = self._socket(zmq.DEALER, s.source.replay_endpoint, self._on_replay, s, 0)
        s.dealer.send_multipart((b"", start.to_bytes(8, "big")))
        s.replay_from, s.replay_deadline = start, time.monotonic() + self._replay_timeout

    def _on_replay(self, s: _Stream, frames: list[bytes]) -> None:
        if frames[2] == END_SEQ:
            self._end_replay(s, ok=True)
            return
        s.replay_deadline = time.monotonic() + self._replay_timeout
        seq = int.from_bytes(frames[2], "big")
        if s.last_seq is not None and seq > s.last_seq + 1:  # the buffer no longer has what we missed
            logger.warning("%s: events %d..%d are gone from the replay buffer; index rebuilt from what is left",
                           s.source.holder, s.last_seq + 1, seq - 1)
            s.counts["replay_failures"] += 1
            self.index.clear(s.source.holder)
            s.last_seq = None
        if s.last_seq is None or seq == s.last_seq + 1:
            self._apply(s, seq, frames[3], live=False)

    def _end_replay(self, s: _Stream, ok: bool, start: Optional[int] = None) -> None:
        start = s.replay_from if start is None else start
        self._drop(s.dealer)
        s.dealer, s.replay_from = None, None
        if ok:
            s.counts["replays"] += 1
        elif start:  # events are lost for good: this rank's index may be wrong, start it afresh
            logger.warning("%s: cannot replay events from %d; index cleared", s.source.holder, start)
            s.counts["replay_failures"] += 1
            self.index.clear(s.source.holder)
            s.last_seq = None
        pending, s.pending = sorted(s.pending, key=lambda item: item[0]), []
        for i, (seq, payload) in enumerate(pending):
            if s.replay_from is not None:  # a new gap started another replay
                s.pending.extend(pending[i:])
                return
            if s.last_seq is None or seq > s.last_seq:
                self._sequence(s, seq, payload)

    def _apply(self, s: _Stream, seq: int, payload: bytes, live: bool = True) -> None:
        s.last_seq = seq
        ts, events = decode_batch(payload)
        if live:  # a replayed batch's age is not a lag
            s.lag_s, s.last_event_at = time.time() - ts, time.monotonic()
        s.counts["batches"] += 1
        s.counts["events"] += len(events)
        holder, index = s.source.holder, self.index
        for ev in events:
            kind = ev.__class__
            if kind is BlockStored and ev.medium in _GPU and ev.lora_id is None and ev.lora_name is None \
                    and ev.cache_salt is None:  # namespaced (LoRA, salted) blocks serve no plain prompt
                index.stored(holder, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size)
            elif kind is BlockRemoved and ev.medium in _GPU:
                index.removed(holder, ev.block_hashes)
            elif kind is AllBlocksCleared:
                s.counts["cleared"] += 1
                index.clear(holder)
            else:
                s.counts["skipped"] += 1

    def _on_load(self, s: _Stream, frames: list[bytes]) -> None:
        seq = int.from_bytes(frames[1], "big")
        if s.load_seq is not None and seq < s.load_seq:  # an idle restarted server sends no event to say so
            self._reset(s, f"load sequence went back from {s.load_seq} to {seq}")
        s.load_seq, s.load, s.load_at = seq, decode_load(frames[2]), time.monotonic()
