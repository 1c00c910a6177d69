"""A simulated SGLang radix cache over token ids that publishes SGLang's own KV events.

Why: to run the adapter's real routing (its :class:`~backends.adapter._token_index.TokenIndex`
fed by events) against many prefill servers without starting any, the simulated server must
announce what it caches exactly the way SGLang does, or the index would be tested against a
friendlier stream than the real one. The rules followed, from SGLang 0.5.23:

- ``sglang/srt/mem_cache/radix_cache.py``: children keyed by their first page; a match or an
  insert that ends inside a node splits it (no event); only page-aligned tokens are cached; an
  insert creates one new leaf for the uncached rest; eviction removes whole unlocked leaves,
  least recently used first (a parent becomes a candidate once its last child is gone); a
  request locks its matched path until it is released;
- ``sglang/srt/mem_cache/events.py`` (``KVCacheEventRecorder``): one ``BlockStored`` per new node
  (its pages' chained hashes coalesced, ``parent_block_hash`` = the parent node's last block
  hash, ``None`` under the root), one ``BlockRemoved`` per evicted node, nothing on a split;
- ``sglang/srt/disaggregation/prefill.py``: a PD prefill server inserts a prompt into its tree
  when it processes the forward's results (``checkpoint_disagg_prefill``), before the KV
  transfer, and unlocks it when the transfer succeeded (``release_kv_cache``).

Events are the adapter's own wire structs (:mod:`backends.adapter._kv_wire`), applied to a
``TokenIndex`` as its ZMQ subscriber applies them (:func:`apply_kv_events`).
"""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Sequence

from backends.adapter._kv_wire import AllBlocksCleared, BlockRemoved, BlockStored
from backends.adapter._token_index import TokenIndex

__all__ = ["SimRadixCache", "apply_kv_events", "union_tokens", "best_cached"]


class _Node:
    __slots__ = ("tokens", "hashes", "children", "parent", "last", "lock")

    def __init__(self, tokens: tuple, hashes: list, parent, last: float) -> None:
        self.tokens, self.hashes, self.parent, self.last = tokens, hashes, parent, last
        self.children: dict[tuple, _Node] = {}
        self.lock = 0


def _common(a: tuple, b: tuple, pos: int, page: int) -> int:
    """Leading tokens ``a`` shares with ``b[pos:]``, rounded down to whole pages."""
    n = min(len(a), len(b) - pos)
    k = n if a[:n] == b[pos:pos + n] else next(i for i, (x, y) in enumerate(zip(a, b[pos:pos + n])) if x != y)
    return k - k % page


class SimRadixCache:
    """One prefill server's radix cache, in tokens, bounded, emitting KV events.

    Parameters
    ----------
    capacity_tokens
        Tokens the tree may hold (the KV pool, SGLang's ``max_total_num_tokens``); beyond it
        unlocked leaves are evicted after each insert.
    page_size
        SGLang's ``--page-size``: matching and caching in whole pages, one block hash per page.

    Attributes
    ----------
    tokens, evicted_tokens
        Tokens held now, and evicted so far.
    """

    def __init__(self, capacity_tokens: int = 1 << 62, page_size: int = 1) -> None:
        if capacity_tokens < 1 or page_size < 1:
            raise ValueError("SimRadixCache needs capacity_tokens >= 1 and page_size >= 1")
        self.capacity, self.page = capacity_tokens, page_size
        self.root = _Node((), [], None, 0.0)
        self.tokens = self.evicted_tokens = 0

    def match(self, ids: Sequence[int]) -> int:
        """Leading tokens of ``ids`` cached (whole pages); looks only (no split, touch or lock)."""
        ids, node, pos, page = tuple(ids), self.root, 0, self.page
        while pos + page <= len(ids):
            child = node.children.get(ids[pos:pos + page])
            if child is None:
                break
            k = _common(child.tokens, ids, pos, page)
            pos += k
            if k < len(child.tokens):
                break
            node = child
        return pos

    def acquire(self, ids: Sequence[int], now: float) -> tuple[int, _Node]:
        """Match as the scheduler does when it takes a request: split, touch, lock the path.

        Returns the cached length and the node to :meth:`release` when the request is done.
        """
        matched, node = self._descend(tuple(ids), now)
        self._lock(node, 1)
        return matched, node

    def release(self, node: _Node) -> None:
        """Unlock a path taken by :meth:`acquire`."""
        self._lock(node, -1)

    def insert(self, ids: Sequence[int], now: float) -> list:
        """Cache ``ids`` (whole pages); return the events: ``BlockStored`` for the new leaf, ``BlockRemoved``s."""
        page = self.page
        ids = tuple(ids[: len(ids) - len(ids) % page])
        matched, node = self._descend(ids, now)
        events: list = []
        if matched < len(ids):
            rest, hashes = ids[matched:], []
            parent_hash = node.hashes[-1] if node is not self.root else None
            prev = 0 if parent_hash is None else parent_hash
            for s in range(0, len(rest), page):
                prev = hash((prev, rest[s:s + page]))
                hashes.append(prev)
            node.children[rest[:page]] = _Node(rest, hashes, node, now)
            self.tokens += len(rest)
            events.append(BlockStored(block_hashes=list(hashes), parent_block_hash=parent_hash,
                                      token_ids=list(rest), block_size=page))
        if self.tokens > self.capacity:
            events += self._evict()
        return events

    def sequences(self) -> Iterator[tuple]:
        """Every root-to-leaf token sequence held (what the tree stores, as prompts)."""
        stack = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            seq = prefix + node.tokens
            if not node.children and seq:
                yield seq
            stack.extend((child, seq) for child in node.children.values())

    # ---- internals -------------------------------------------------------------------------
    def _descend(self, ids: tuple, now: float) -> tuple[int, _Node]:
        node, pos, page = self.root, 0, self.page
        while pos + page <= len(ids):
            child = node.children.get(ids[pos:pos + page])
            if child is None:
                break
            child.last = now
            k = _common(child.tokens, ids, pos, page)
            if k < len(child.tokens):
                child = self._split(child, k)
            node, pos = child, pos + k
        return pos, node

    def _split(self, child: _Node, k: int) -> _Node:
        """Cut ``child`` after ``k`` tokens; the new upper node takes its place (SGLang's ``_split_node``)."""
        page = self.page
        upper = _Node(child.tokens[:k], child.hashes[: k // page], child.parent, child.last)
        upper.lock = child.lock
        child.parent.children[child.tokens[:page]] = upper
        child.tokens, child.hashes, child.parent = child.tokens[k:], child.hashes[k // page:], upper
        upper.children[child.tokens[:page]] = child
        return upper

    def _lock(self, node: _Node, delta: int) -> None:
        while node is not self.root:
            node.lock += delta
            node = node.parent

    def _evict(self) -> list:
        """Remove unlocked leaves, least recently used first, until the tree fits (SGLang's ``evict``)."""
        stack, leaves = [self.root], []
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root and node.lock == 0:
                leaves.append((node.last, id(node), node))
        heapq.heapify(leaves)
        events = []
        while self.tokens > self.capacity and leaves:
            node = heapq.heappop(leaves)[2]
            parent = node.parent
            del parent.children[node.tokens[: self.page]]
            self.tokens -= len(node.tokens)
            self.evicted_tokens += len(node.tokens)
            events.append(BlockRemoved(block_hashes=list(node.hashes)))
            if parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(leaves, (parent.last, id(parent), parent))
        return events


def apply_kv_events(index: TokenIndex, holder: str, events: Iterable) -> None:
    """Feed ``events`` of one cache to ``index`` as the adapter's subscriber does (``KVEventSubscriber._apply``)."""
    for ev in events:
        if isinstance(ev, BlockStored):
            index.stored(holder, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size)
        elif isinstance(ev, BlockRemoved):
            index.removed(holder, ev.block_hashes)
        elif isinstance(ev, AllBlocksCleared):
            index.clear(holder)


def union_tokens(caches: Sequence[SimRadixCache]) -> int:
    """Distinct tokens held over all ``caches`` (one page size): the size of the union of their trees."""
    if not caches:
        return 0
    union = SimRadixCache(page_size=caches[0].page)
    for cache in caches:
        for seq in cache.sequences():
            union.insert(seq, 0.0)
    return union.tokens


def best_cached(prompts: Sequence[Sequence[int]], page_size: int = 1) -> list[int]:
    """Per prompt, in order: tokens cached when every distinct prefix is computed once (one infinite cache).

    The best any routing can do; like SGLang, at least one token of each prompt is computed
    (the one whose logits start decoding), and caching is in whole pages.
    """
    cache, out = SimRadixCache(page_size=page_size), []
    for ids in prompts:
        out.append(min(cache.match(ids), len(ids) - 1))
        cache.insert(ids, 0.0)
    return out
