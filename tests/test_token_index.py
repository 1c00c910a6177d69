"""TokenIndex: matching, events, eviction bound, claims (no servers)."""

from __future__ import annotations

import random
import threading

import pytest

from backends.adapter._token_index import TokenIndex, chunk_keys

H = "http://p0:30000"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Radix:
    """A small radix cache that emits events the way SGLang's RadixCache + KVCacheEventRecorder do:
    one BlockStored per new node (parent = the parent node's last block hash, None under the root),
    no event on a node split, one BlockRemoved per evicted leaf, leaves evicted least recently used first."""

    def __init__(self, page=1):
        self.page, self.nodes, self.events, self.tick = page, {}, [], 0  # nodes: path tuple -> node dict
        self.root = {"key": (), "children": {}, "hashes": [], "parent": None, "used": 0}

    def insert(self, tokens):
        tokens = tuple(tokens[: len(tokens) - len(tokens) % self.page])
        node, pos = self.root, 0
        while pos < len(tokens):
            self.tick += 1
            child = node["children"].get(tokens[pos:pos + self.page])  # keyed by the first page, as SGLang
            if child is None:
                new = {"key": tokens[pos:], "children": {}, "parent": node, "used": self.tick}
                new["hashes"] = [random.getrandbits(63) for _ in range(len(new["key"]) // self.page)]
                node["children"][tokens[pos:pos + self.page]] = new
                self.events.append(("stored", new["hashes"], node["hashes"][-1] if node["hashes"] else None,
                                    list(new["key"]), self.page))
                return
            k = child["key"]
            n = 0
            while n < len(k) and pos + n < len(tokens) and k[n] == tokens[pos + n]:
                n += 1
            n -= n % self.page
            if n < len(k):  # split: hashes split with the key, no event
                top = {"key": k[:n], "children": {k[n:n + self.page]: child}, "parent": node,
                       "used": child["used"], "hashes": child["hashes"][: n // self.page]}
                node["children"][k[:self.page]] = top
                child.update(key=k[n:], parent=top, hashes=child["hashes"][n // self.page:])
                child = top
            child["used"] = self.tick
            node, pos = child, pos + n

    def evict(self, n_leaves):
        for _ in range(n_leaves):
            leaves = [x for x in self._all() if not x["children"]]
            if not leaves:
                return
            leaf = min(leaves, key=lambda x: x["used"])
            del leaf["parent"]["children"][leaf["key"][:self.page]]
            self.events.append(("removed", leaf["hashes"]))

    def _all(self):
        stack, out = list(self.root["children"].values()), []
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x["children"].values())
        return out

    def longest(self, tokens):
        node, pos, tokens = self.root, 0, tuple(tokens)
        while pos < len(tokens) and tokens[pos:pos + self.page] in node["children"]:
            child = node["children"][tokens[pos:pos + self.page]]
            k = child["key"]
            n = 0
            while n < len(k) and pos + n < len(tokens) and k[n] == tokens[pos + n]:
                n += 1
            n -= n % self.page  # a radix cache with pages matches whole pages
            pos += n
            if n < len(k):
                break
            node = child
        return pos

    def feed(self, index, holder=H):
        for ev in self.events:
            index.stored(holder, *ev[1:]) if ev[0] == "stored" else index.removed(holder, ev[1])
        self.events.clear()


def test_chunk_keys_are_chained_over_the_whole_prefix():
    a, b = list(range(100)), [7] + list(range(1, 100))
    assert len(chunk_keys(a, 32)) == 3 and chunk_keys(a, 32) == chunk_keys(a + [1, 2], 32)
    assert all(x != y for x, y in zip(chunk_keys(a, 32), chunk_keys(b, 32)))  # one token changes every key after it


@pytest.mark.parametrize("chunk,page", [(4, 1), (16, 1), (32, 1), (8, 2), (32, 16)])
def test_match_equals_the_radix_cache_rounded_down_to_chunks(chunk, page):
    random.seed(chunk * 100 + page)
    index, radix = TokenIndex(chunk=chunk), Radix(page)
    stems = [[random.randrange(50) for _ in range(random.randrange(1, 60))] for _ in range(6)]
    prompts = []
    for step in range(300):
        tail = [random.randrange(50) for _ in range(random.randrange(0, 40))]
        prompt = random.choice(stems)[: random.randrange(1, 60)] + tail
        prompts.append(prompt)
        radix.insert(prompt)
        if step % 7 == 0:
            radix.evict(random.randrange(1, 4))
        radix.feed(index)
        for probe in random.sample(prompts, min(5, len(prompts))):
            assert index.match(probe, [H])[H] == radix.longest(probe) // chunk * chunk
    assert index.stats(H)["orphans"] == 0


def test_a_branch_from_the_middle_of_a_chunk_keys_like_the_prompt():
    index = TokenIndex(chunk=4)
    index.stored(H, list(range(10)), None, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1)
    index.stored(H, [100, 101, 102, 103], 5, [60, 70, 80, 90], 1)  # after token 6, mid-chunk
    assert index.match([1, 2, 3, 4, 5, 6, 60, 70, 80, 90], [H]) == {H: 8}
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8, 60], [H]) == {H: 8}
    assert index.match([1, 2, 3, 4, 5, 6, 60, 71], [H]) == {H: 4}


def test_removed_cleared_orphans_duplicates_and_forget():
    index = TokenIndex(chunk=2)
    index.stored(H, [1, 2, 3, 4], None, [5, 6, 7, 8], 1)
    assert index.stored(H, [1, 2, 3, 4], None, [5, 6, 7, 8], 1) is False  # a replayed duplicate
    assert index.stored(H, [9], 12345, [1], 1) is False  # parent never seen
    index.removed(H, [3, 4])
    assert index.match([5, 6, 7, 8], [H, "other"]) == {H: 2, "other": 0}
    assert index.stats(H) | {"claims": 0} == {"blocks": 2, "tokens": 2, "runs": 1, "orphans": 1, "duplicates": 1,
                                               "evicted": 0, "claims": 0}
    index.removed(H, [999])  # unknown hashes are ignored
    index.clear(H)
    assert index.match([5, 6, 7, 8], [H]) == {H: 0} and index.stats(H)["blocks"] == 0
    index.stored(H, [1, 2], None, [5, 6], 1)
    index.forget(H)
    assert index.holders() == []


def test_memory_is_bounded_and_evicts_lru_leaves_first():
    index = TokenIndex(chunk=4, max_tokens=100)
    index.stored(H, list(range(40)), None, list(range(40)), 1)  # the shared prefix: a parent run
    for i in range(1, 20):
        index.stored(H, [1000 * i + j for j in range(20)], 39, [i] * 20, 1)
        index.match(list(range(40)) + [1] * 20, [H])  # keep branch 1 in use
        assert index.stats(H)["tokens"] <= 100
    assert index.match(list(range(40)) + [1] * 20, [H]) == {H: 60}  # used, kept
    assert index.match(list(range(40)) + [19] * 20, [H]) == {H: 60}  # newest, kept
    assert index.match(list(range(40)) + [5] * 20, [H]) == {H: 40}  # old leaf: gone, its parent stays
    assert index.stats(H)["evicted"] >= 15


def test_claims_count_until_they_expire_or_events_confirm_them():
    clock = Clock()
    index = TokenIndex(chunk=4, clock=clock)
    prompt = list(range(20))
    index.claim(H, prompt, ttl_s=2.0)
    assert index.match(prompt, [H, "b"]) == {H: 20, "b": 0}
    clock.now += 2.5
    assert index.match(prompt, [H]) == {H: 0}
    index.claim(H, prompt, ttl_s=2.0)
    index.stored(H, list(range(12)), None, prompt[:12], 1)  # confirmed events replace the claim
    clock.now += 3
    assert index.match(prompt, [H]) == {H: 12} and index.stats(H)["claims"] == 0
    index.claim(H, prompt, ttl_s=9)  # the claim covers the whole prompt, confirmed part included
    index.removed(H, list(range(12)))
    assert index.match(prompt, [H]) == {H: 20}  # evicted, but a request was just sent there
    index.stored(H, list(range(20)), None, prompt, 1)
    assert index.stats(H)["claims"] == 0  # the events confirmed its last key: replaced
    index.claim(H, prompt + [1] * 8, ttl_s=9)
    index.forget(H)
    assert index.match(prompt, [H]) == {H: 0}


def test_claimed_keys_are_bounded():
    index = TokenIndex(chunk=4, max_claim_keys=10)
    for i in range(10):
        index.claim(f"h{i}", [i] * 20, ttl_s=60 + i)  # 5 keys each: only the last two claims fit
    assert [index.match([i] * 20, [f"h{i}"])[f"h{i}"] for i in range(10)] == [0] * 8 + [20, 20]


def test_concurrent_use_is_safe():
    index, errors = TokenIndex(chunk=8, max_tokens=5000), []

    def writer(seed):
        rnd = random.Random(seed)
        try:
            for i in range(300):
                hashes = [rnd.getrandbits(62) for _ in range(64)]
                index.stored(H, hashes, None, [rnd.randrange(9) for _ in range(64)], 1)
                if i % 3 == 0:
                    index.removed(H, hashes[32:])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(2000):
                index.match([1] * 64, [H, "x"])
                index.claim("x", [2] * 64, ttl_s=0.01)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and index.stats(H)["tokens"] <= 5000


def test_a_pending_claim_leads_the_requests_that_share_its_prefix():
    index = TokenIndex(chunk=4)
    shared = list(range(16))
    first = index.claim(H, shared + [1] * 8)
    assert index.leader(H, shared + [2] * 8) is first  # would reuse 16 tokens that are still being computed
    second = index.claim(H, shared + [2] * 8)
    assert index.leader(H, shared + [3] * 8) is first  # the shared keys stay with the claim computing them
    assert not first.done.is_set()
    index.ready(first)
    assert first.done.is_set() and index.leader(H, shared + [3] * 8) is None  # prefilled: reusable, no wait
    index.abandon(second)  # its attempt failed: waiters are released and its own keys forgotten
    assert second.done.is_set() and index.match(shared + [2] * 8, [H]) == {H: 16}


def test_prefixes_confirmed_by_events_lead_nowhere_and_expired_claims_release_their_waiters():
    clock = Clock()
    index = TokenIndex(chunk=4, clock=clock)
    prompt = list(range(20))
    index.stored(H, list(range(16)), None, prompt[:16], 1)
    index.claim(H, prompt + [7] * 4)
    assert index.leader(H, prompt[:16] + [9] * 4) is None  # the server already holds the 16 tokens
    claim = index.claim(H, [5] * 12, ttl_s=1.0)
    clock.now += 2
    index.match([5] * 12, [H])
    assert claim.done.is_set() and index.leader(H, [5] * 12) is None
