"""SGLang's KV-event and load wire formats, and where a server publishes them.

A server started with ``--kv-events-config '{"publisher": "zmq", ...}'`` and
``--load-publish-endpoint`` describes its streams in ``/server_info["kv_events"]``
(``describe_kv_events_publisher``, ``sglang/srt/runtime_context.py``): port bases
for events, replay and load (DP rank r binds base + r), topics, ``block_size``,
``dp_size`` and ``endpoint_host``, a wildcard we replace with the URL's host.
Payloads are msgpack (``ZmqEventPublisher``, ``sglang/srt/disaggregation/kv_events.py``;
event types from ``sglang/srt/mem_cache/events.py``; ``LoadStat`` from
``sglang/srt/managers/scheduler_components/load_publisher.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union
from urllib.parse import urlsplit

import msgspec

from backends.adapter._servers import rank_key
from backends.errors import ConfigurationError

__all__ = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "LoadStat", "EventSource", "decode_batch",
           "decode_load", "event_sources", "holder_name", "END_SEQ"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ZmqEventPublisher.END_SEQ: the end of a replay
_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}


class BlockStored(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[int]
    parent_block_hash: Optional[int]
    token_ids: list[int]  # bigram (EAGLE) pages are pairs: those events fail to decode and are skipped
    block_size: int
    lora_id: Optional[int] = None
    medium: Optional[str] = None
    cache_salt: Optional[str] = None
    lora_name: Optional[str] = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[int]
    medium: Optional[str] = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    pass


class _Batch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]  # decoded one by one: an event of an unknown type skips only itself
    attn_dp_rank: Optional[int] = None


class LoadStat(msgspec.Struct, array_like=True, tag=True, gc=False):
    """One rank's load, fields in SGLang's wire order (fields it appends later are ignored)."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_tokens: int
    max_total_num_tokens: int
    attn_dp_rank: Optional[int] = None
    num_waiting_uncached_tokens: int = 0
    num_total_tokens: int = 0
    max_running_requests: int = 0
    total_prefill_uncached_tokens: int = 0
    total_prefill_busy_us: int = 0


_batch, _load = msgspec.msgpack.Decoder(_Batch), msgspec.msgpack.Decoder(LoadStat)
_event = msgspec.msgpack.Decoder(Union[BlockStored, BlockRemoved, AllBlocksCleared])


def decode_batch(payload: bytes) -> tuple[float, list]:
    """``(ts, events)`` of one event payload; an event of an unknown type comes out as ``None``."""
    batch, events = _batch.decode(payload), []
    for raw in batch.events:
        try:
            events.append(_event.decode(raw))
        except msgspec.ValidationError:
            events.append(None)
    return batch.ts, events


def holder_name(url: str, rank: int, dp_size: int) -> str:
    """The index key of one radix cache: the URL, or ``URL#dpR`` when the server has DP ranks."""
    return url if dp_size <= 1 else rank_key(url, rank)


@dataclass(frozen=True)
class EventSource:
    """Where one DP rank of one server publishes."""

    url: str
    rank: int
    holder: str
    endpoint: str
    replay_endpoint: Optional[str]
    load_endpoint: Optional[str]
    topic: str
    load_topic: str
    block_size: int


def event_sources(url: str, server_info: dict) -> list[EventSource]:
    """The streams ``server_info["kv_events"]`` advertises; ``[]`` when the server publishes none.

    Raises
    ------
    ConfigurationError
        The block is there but not in the shape SGLang 0.5.23 writes.
    """
    kv = server_info.get("kv_events")
    if not kv or kv.get("publisher", "zmq") != "zmq":
        return []
    try:
        dp, base = int(kv.get("dp_size", 1)), int(kv["endpoint_port_base"])
        replay, load = kv.get("replay_endpoint_port_base"), kv.get("load_endpoint_port_base")
        host = kv.get("endpoint_host") or "*"
        if host in _WILDCARDS:  # a bind address: the server is reachable where its URL points
            host = urlsplit(url).hostname or ""
            host = f"[{host}]" if ":" in host else host
        if not host or dp < 1:
            raise ValueError("no host, or dp_size < 1")
        return [EventSource(url, r, holder_name(url, r, dp), f"tcp://{host}:{base + r}",
                            None if replay is None else f"tcp://{host}:{int(replay) + r}",
                            None if load is None else f"tcp://{host}:{int(load) + r}",
                            str(kv.get("topic") or ""), str(kv.get("load_topic") or "load"),
                            int(kv.get("block_size", 1))) for r in range(dp)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{url}/server_info has a kv_events block this adapter cannot read ({exc}): "
                                 f"{kv!r}; is the server SGLang 0.5.23 or newer?", server=url) from exc


def decode_load(payload: bytes) -> LoadStat:
    """One ``LoadStat`` message."""
    return _load.decode(payload)
