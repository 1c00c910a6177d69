"""The servers' own view of their radix caches and load, for routing in tokens.

What the router asks of the KV-event machinery, in one place: which servers
publish events (:mod:`._kv_wire`), the ids a prompt tokenizes to on them
(:mod:`._tokenizer`), how many leading tokens each cache holds
(:mod:`._token_index`, fed by :mod:`._kv_events`), and each server's load as
it publishes it (``LoadStat``: every client's requests, not only ours).

Servers that publish nothing (started without ``--kv-events-config``, older
SGLang) are simply not *covered*: the router then uses its approximate
per-process record for the decision and says so in the route's reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from backends.adapter._kv_events import KVEventSubscriber
from backends.adapter._kv_wire import event_sources
from backends.adapter._servers import ServerInfo
from backends.adapter._token_index import TokenIndex
from backends.adapter._tokenizer import ServerTokenizer, load_server_tokenizer

__all__ = ["EventIndex", "PublishedLoad"]

logger = logging.getLogger(__name__)

#: A ``LoadStat`` older than this no longer describes the server (SGLang publishes at least once a second).
_FRESH_LOAD_S = 3.0


@dataclass(frozen=True)
class PublishedLoad:
    """One cache holder's load as its server last published it (``LoadStat``).

    Attributes
    ----------
    requests
        Running plus waiting requests, from every client.
    waiting_uncached_tokens
        Prompt tokens queued that the radix cache does not hold (SGLang's
        ``num_waiting_uncached_tokens``; a PD prefill server counts only its
        waiting queue, not requests still bootstrapping).
    """

    requests: int
    waiting_uncached_tokens: int


class EventIndex:
    """Token-level cache contents and load of every server that publishes KV events.

    Parameters
    ----------
    servers
        Prefill and colocated servers as discovered (their ``server_args`` hold
        ``/server_info``); those without a ``kv_events`` block are skipped.
    chunk
        Matching granularity in tokens (:class:`TokenIndex`).
    claim_ttl_s
        How long a routed prompt counts as cached on its server before events
        confirm it (a PD prefill server announces blocks after the KV transfer).

    Raises
    ------
    ConfigurationError
        A server advertises a ``kv_events`` block this adapter cannot read.
    """

    def __init__(self, servers: Iterable[ServerInfo], *, chunk: int = 16, claim_ttl_s: float = 10.0) -> None:
        self.claim_ttl_s = claim_ttl_s
        servers = [s for s in servers if event_sources(s.url, dict(s.server_args))]
        self._holders: dict[str, list[str]] = {}
        self.tokenizer: ServerTokenizer | None = None
        self.index = TokenIndex(chunk=chunk)
        self._subscriber = KVEventSubscriber(self.index) if servers else None
        try:
            for info in servers:
                self._holders[info.url] = self._subscriber.add_server(info.url, dict(info.server_args))
            if servers:
                first = dict(servers[0].server_args)
                self.tokenizer = load_server_tokenizer({"model_path": servers[0].model_path}, first)
        except BaseException:
            self.close()
            raise

    @property
    def active(self) -> bool:
        """Whether any server publishes events (and so anything can be routed in tokens)."""
        return bool(self._holders)

    def covers(self, names: Sequence[str]) -> bool:
        """Whether every name (a URL, or ``URL#dpR``) is a cache we receive events for."""
        return bool(names) and all(self._holders_of(n) for n in names)

    def token_ids(self, text: str | None, ids: Sequence[int] | None) -> list[int] | None:
        """The prompt's ids as the server computes them; ``None`` when they cannot be known exactly."""
        if ids is not None:
            return list(ids)
        if text is None or self.tokenizer is None:
            return None
        return self.tokenizer.encode(text)

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        return self.index.keys(token_ids)

    def matched(self, keys: list[int], names: Sequence[str]) -> dict[str, int]:
        """Tokens of the prompt held per name; a multi-rank server's best rank stands for it."""
        holders = {n: self._holders_of(n) for n in names}
        found = self.index.match([], [h for hs in holders.values() for h in hs], keys=keys)
        return {n: max((found.get(h, 0) for h in hs), default=0) for n, hs in holders.items()}

    def held_tokens(self, name: str) -> int:
        return sum(self.index.size(h) for h in self._holders_of(name))

    def claim(self, name: str, keys: list[int]) -> object | None:
        """Count the prompt as cached on ``name`` until events confirm it or ``claim_ttl_s`` passes.

        Returns the claim (``None``: nothing claimed), for :meth:`ready` when
        the prompt is prefilled or :meth:`abandon` when it never will be.
        """
        holders = self._holders_of(name)
        return self.index.claim(holders[0], [], ttl_s=self.claim_ttl_s, keys=keys) if holders else None

    def leader(self, name: str, keys: list[int]) -> object | None:
        """The claim of a request still prefilling the prefix this prompt would reuse on ``name``, if any."""
        holders = self._holders_of(name)
        return self.index.leader(holders[0], [], keys=keys) if holders else None

    def ready(self, claim: object) -> None:
        self.index.ready(claim)

    def abandon(self, claim: object) -> None:
        self.index.abandon(claim)

    def load(self, name: str) -> PublishedLoad | None:
        """``name``'s freshest published load (summed over its ranks), or ``None`` if none is recent."""
        stats = [self._subscriber.load(h) for h in self._holders_of(name)] if self._subscriber else []
        fresh = [stat for stat, age in filter(None, stats) if age <= _FRESH_LOAD_S]
        if not fresh:
            return None
        return PublishedLoad(requests=sum(s.num_running_reqs + s.num_waiting_reqs for s in fresh),
                             waiting_uncached_tokens=sum(s.num_waiting_uncached_tokens for s in fresh))

    def resync(self, url: str) -> None:
        """Forget ``url``'s index and rebuild it from its replay buffer (it restarted, or was out of rotation)."""
        info_holders = self._holders.get(url)
        if info_holders is None or self._subscriber is None:
            return
        for holder in info_holders:
            self.index.forget(holder)
        self._subscriber.resync(url)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per cache holder: indexed ``blocks``, ``event_lag_s``, ``last_event_age_s``, replays, resets..."""
        return self._subscriber.stats() if self._subscriber else {}

    def close(self) -> None:
        """Stop the subscriber thread and close its sockets. Idempotent."""
        if self._subscriber is not None:
            self._subscriber.close()

    def _holders_of(self, name: str) -> list[str]:
        url, _, rank = name.partition("#")
        holders = self._holders.get(url, [])
        if not rank or len(holders) <= 1:
            return holders
        return [h for h in holders if h == name]

