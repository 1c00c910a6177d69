"""What each server's radix cache holds, in tokens, rebuilt from its own KV events.

A *holder* is one radix cache: a server URL, or ``"URL#dpR"`` for one DP rank.
SGLang announces every radix node it inserts as ``BlockStored`` (block hashes,
the parent block's hash, the node's token ids), every evicted node as
``BlockRemoved`` (its block hashes) and a flush as ``AllBlocksCleared``
(``sglang/srt/mem_cache/events.py``, ``KVCacheEventRecorder``). Like llm-d and
Dynamo we never compare SGLang's hashes with ours: its hashes only locate a
parent; our keys are recomputed from token ids.

Keys cover fixed chunks of ``chunk`` tokens aligned at absolute positions from
the sequence start, each chained over all chunks before it, so one key names a
whole prefix. On CPU servers a block is one token: keying per block would cost
thousands of dict operations per prompt, per chunk it is ``n / chunk``. The
price: a match is rounded down to whole chunks (at most ``chunk - 1`` tokens
under; a prompt shorter than one chunk never matches).

A stored node becomes a *run*: its tokens plus the chunk keys it completes. A
run that starts mid-chunk (its parent ended mid-chunk) carries the parent's
tokens back to the chunk start (``head``), so its first key is the same one a
prompt computes. Radix caches evict leaves first, so what a holder keeps is
prefix-closed and ``match`` binary-searches the prompt's keys per holder.

Claims (:mod:`._claims`) are a speculative overlay kept apart from the
confirmed keys: a prompt just routed to a holder matches as cached there until
events confirm it. Memory is bounded: at most
``max_tokens`` per holder (least recently used leaf runs go first) and
``max_claim_keys`` claimed keys overall.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import Counter, OrderedDict
from itertools import accumulate, repeat
from typing import Iterable, Sequence

from backends.adapter._claims import Claim, ClaimOverlay

__all__ = ["TokenIndex", "chunk_keys"]

_ROOT_KEY, _EMPTY = 0, {}  # _EMPTY is never written


def _chain(previous: int, chunk: tuple) -> int:
    return hash((previous, chunk))  # the tuple hash: C speed, 64 bits, not salted for ints


def chunk_keys(token_ids: Sequence[int], chunk: int = 32, start_key: int = _ROOT_KEY) -> list[int]:
    """Chained keys of the complete ``chunk``-token pieces of ``token_ids``.

    Key ``i`` identifies ``token_ids[: (i + 1) * chunk]`` (after whatever
    ``start_key`` stands for). ``zip(*[iter(x)] * chunk)`` cuts the chunks in C.
    """
    return list(accumulate(zip(*[iter(token_ids)] * chunk), _chain, initial=start_key))[1:]


class _Run:
    """One stored radix node (or the part of it not yet evicted)."""

    __slots__ = ("start", "base", "base_key", "head", "tokens", "hashes", "block_size", "keys", "parent", "children")

    def __init__(self, start, base, base_key, head, tokens, hashes, block_size, keys, parent):
        self.start, self.base, self.base_key, self.head, self.tokens = start, base, base_key, head, tokens
        self.hashes, self.block_size, self.keys, self.parent, self.children = hashes, block_size, keys, parent, 0


class _Holder:
    __slots__ = ("where", "runs", "tokens", "orphans", "duplicates", "evicted")

    def __init__(self) -> None:
        self.where: dict[int, _Run] = {}  # SGLang block hash -> run holding that block
        self.runs: OrderedDict[_Run, None] = OrderedDict()  # LRU order, oldest first
        self.tokens = self.orphans = self.duplicates = self.evicted = 0


class TokenIndex:
    """Per-holder token index of radix-cache contents, fed by KV events. Thread-safe.

    Parameters
    ----------
    chunk
        Tokens per key: the matching granularity (see the module docstring).
    max_tokens
        Tokens indexed per holder before least recently used leaf runs are
        dropped. Set it to at least the server's KV pool (``LoadStat``'s
        ``max_total_num_tokens``): events whose parent we dropped cannot be
        placed and are counted as ``orphans``.
    max_claim_keys
        Claimed keys kept overall; the claims closest to expiry go first.
    clock
        Monotonic time source (tests replace it).
    """

    def __init__(self, chunk: int = 32, max_tokens: int = 1 << 19, max_claim_keys: int = 1 << 18, clock=time.monotonic):
        if chunk < 1 or max_tokens < 1 or max_claim_keys < 0:
            raise ValueError("TokenIndex needs chunk >= 1, max_tokens >= 1 and max_claim_keys >= 0")
        self.chunk, self.max_tokens, self.max_claim_keys, self._clock = chunk, max_tokens, max_claim_keys, clock
        self._lock = threading.Lock()
        self._holders: dict[str, _Holder] = {}
        self._table: dict[int, dict[str, _Run]] = {}  # key -> {holder: run completing it}: confirmed
        self._claims = ClaimOverlay(max_claim_keys)

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        """The prompt's chunk keys; pass them to :meth:`match` and :meth:`claim` to hash once."""
        return chunk_keys(token_ids, self.chunk)

    # ---- events ----------------------------------------------------------------------------
    def stored(self, holder: str, block_hashes: Sequence[int], parent_hash: int | None,
               token_ids: Sequence[int], block_size: int) -> bool:
        """Index a ``BlockStored``; False when it cannot be placed (unknown parent, duplicate)."""
        if not block_hashes or not token_ids:
            return False
        c = self.chunk
        with self._lock:
            h = self._holders.get(holder) or self._holders.setdefault(holder, _Holder())
            if block_hashes[0] in h.where:  # a replay overlapping what we already applied
                h.duplicates += 1
                return False
            parent = None if parent_hash is None else h.where.get(parent_hash)
            if parent is None:
                if parent_hash is not None:  # its parent was evicted here, or arrived before we subscribed
                    h.orphans += 1
                    return False
                start = base = 0
                base_key, head = _ROOT_KEY, array("q")
            else:
                hashes = parent.hashes
                idx = len(hashes) - 1 if hashes[-1] == parent_hash else hashes.index(parent_hash)
                end = min((idx + 1) * parent.block_size, len(parent.tokens))  # tokens of parent kept
                start = parent.start + end
                base = start - start % c
                if base >= parent.base + c:  # the chunk boundary lies inside the parent run
                    base_key = parent.keys[(base - parent.base) // c - 1]
                    head = parent.tokens[base - parent.start : end]
                else:
                    base_key, head = parent.base_key, parent.head + parent.tokens[:end]
                parent.children += 1
            tokens = array("q", token_ids)
            keys = chunk_keys(head + tokens, c, base_key)
            run = _Run(start, base, base_key, head, tokens, list(block_hashes), block_size, keys, parent)
            h.where.update(zip(block_hashes, repeat(run)))
            table, claims = self._table, self._claims
            for key in keys:
                d = table.get(key)
                if d is None:
                    table[key] = {holder: run}
                else:
                    d[holder] = run
                claims.confirmed(holder, key)
            h.runs[run], h.tokens = None, h.tokens + len(tokens)
            self._bound(holder, h)
            return True

    def removed(self, holder: str, block_hashes: Sequence[int]) -> None:
        """Apply a ``BlockRemoved``: radix eviction removes a node, so a suffix of some run."""
        with self._lock:
            h = self._holders.get(holder)
            if h is None:
                return
            popped = list(map(h.where.pop, block_hashes, repeat(None)))  # pops in C
            owners = set(popped) - {None}
            counts = {owners.pop(): len(popped) - popped.count(None)} if len(owners) == 1 else Counter(popped)
            counts.pop(None, None)
            for run, n in counts.items():
                cut, hashes = len(run.hashes) - n, run.hashes
                if n and hashes[cut] not in h.where and hashes[-1] not in h.where:
                    self._truncate(holder, h, run, cut, popped=True)
                else:  # not a suffix (events lost or reordered): cut at the shallowest removed block
                    removed = set(block_hashes)
                    self._truncate(holder, h, run, next(i for i, x in enumerate(hashes) if x in removed))

    def clear(self, holder: str) -> None:
        """Drop what events said ``holder`` holds (``AllBlocksCleared``, lost events); keep its claims."""
        with self._lock:
            h = self._holders.pop(holder, None)
            if h is not None:
                for run in list(h.runs):
                    self._drop_keys(holder, run, 0)

    def forget(self, holder: str) -> None:
        """Drop everything about ``holder``, claims included (restarted or removed server)."""
        self.clear(holder)
        with self._lock:
            self._claims.forget(holder)

    # ---- routing ---------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int], holders: Iterable[str], keys: list[int] | None = None) -> dict[str, int]:
        """Longest cached prefix of the prompt per holder, in tokens (whole chunks), claims included."""
        keys = self.keys(token_ids) if keys is None else keys
        table, overlay, c, out, empty = self._table, self._claims.by_key, self.chunk, {}, _EMPTY
        with self._lock:
            self._claims.expire(self._clock())
            for holder in holders:
                lo, hi = 0, len(keys)
                while lo < hi:  # prefix-closed: the largest j whose key the holder has
                    mid = (lo + hi + 1) >> 1
                    key = keys[mid - 1]
                    if holder in table.get(key, empty) or holder in overlay.get(key, empty):
                        lo = mid
                    else:
                        hi = mid - 1
                out[holder] = lo * c
                run = table.get(keys[lo - 1], empty).get(holder) if lo else None
                if run is not None:
                    h = self._holders[holder]
                    if run in h.runs:
                        h.runs.move_to_end(run)  # used: evict it last
        return out

    def claim(self, holder: str, token_ids: Sequence[int], ttl_s: float = 5.0,
              keys: list[int] | None = None) -> Claim | None:
        """Count the prompt as cached on ``holder`` for ``ttl_s`` or until events confirm it.

        Returns the claim, for :meth:`ready` or :meth:`abandon` (``None`` when nothing was claimed).
        """
        keys = self.keys(token_ids) if keys is None else keys
        if not keys or self.max_claim_keys == 0:
            return None
        with self._lock:
            now = self._clock()
            self._claims.expire(now)
            return self._claims.add(holder, keys, now + ttl_s)

    def leader(self, holder: str, token_ids: Sequence[int], keys: list[int] | None = None) -> Claim | None:
        """The pending claim whose prefill would give this prompt its longest match on ``holder``.

        ``None`` when the match is already reusable (confirmed by events, or its
        claim prefilled) or there is none.
        """
        keys = self.keys(token_ids) if keys is None else keys
        depth = self.match([], [holder], keys=keys)[holder] // self.chunk
        if not depth:
            return None
        with self._lock:
            key = keys[depth - 1]
            if holder in self._table.get(key, _EMPTY):
                return None
            claim = self._claims.by_key.get(key, _EMPTY).get(holder)
            return None if claim is None or claim.ready else claim

    def ready(self, claim: Claim) -> None:
        """The claimed prompt is prefilled: its prefix is reusable on its holder; release who waits."""
        claim.ready = True
        claim.done.set()

    def abandon(self, claim: Claim) -> None:
        """The claimed prompt was never prefilled (its attempt failed): drop the claim, release who waits."""
        with self._lock:
            self._claims.drop(claim)

    # ---- introspection -----------------------------------------------------------------------
    def holders(self) -> list[str]:
        """Holders with confirmed (event) state."""
        with self._lock:
            return list(self._holders)

    def size(self, holder: str) -> int:
        """Tokens indexed for ``holder`` (confirmed by events)."""
        h = self._holders.get(holder)
        return 0 if h is None else h.tokens

    def stats(self, holder: str) -> dict[str, int]:
        """``blocks`` and ``tokens`` indexed, ``runs``, ``orphans``, ``duplicates``, ``evicted`` runs, ``claims``."""
        with self._lock:
            h = self._holders.get(holder) or _Holder()
            claims = self._claims.live(holder)
            return {"blocks": len(h.where), "tokens": h.tokens, "runs": len(h.runs), "orphans": h.orphans,
                    "duplicates": h.duplicates, "evicted": h.evicted, "claims": claims}

    # ---- internals (lock held) ---------------------------------------------------------------
    def _truncate(self, holder: str, h: _Holder, run: _Run, cut: int, popped: bool = False) -> None:
        """Keep the first ``cut`` blocks of ``run``; the rest leaves the index (``popped``: from ``where``)."""
        for x in () if popped else run.hashes[cut:]:
            if h.where.get(x) is run:
                del h.where[x]
        keep_tokens = min(cut * run.block_size, len(run.tokens))
        h.tokens -= len(run.tokens) - keep_tokens
        del run.hashes[cut:], run.tokens[keep_tokens:]
        self._drop_keys(holder, run, (run.start + keep_tokens - run.base) // self.chunk)
        if cut == 0:
            h.runs.pop(run, None)
            if run.parent is not None:
                run.parent.children -= 1

    def _drop_keys(self, holder: str, run: _Run, keep: int) -> None:
        table = self._table
        for key in run.keys[keep:]:
            d = table.get(key)
            if d is not None and d.get(holder) is run:
                del d[holder]
                if not d:
                    del table[key]
        del run.keys[keep:]

    def _bound(self, holder: str, h: _Holder) -> None:
        budget = 2 * len(h.runs)  # a forest always has a leaf; the budget only guards bad counts
        while h.tokens > self.max_tokens and h.runs and budget:
            budget -= 1
            run = next(iter(h.runs))
            if run.children > 0:  # leaf-first, as the radix cache evicts
                h.runs.move_to_end(run)
                continue
            self._truncate(holder, h, run, 0)
            h.evicted += 1
