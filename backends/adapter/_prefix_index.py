"""An approximate, bounded record of which prompt prefixes each server holds.

SGLang's RadixAttention keeps the KV of recent prompts and reuses it for any
request that starts with the same tokens. The adapter cannot see a server's
radix tree, so it keeps its own estimate, fed by the requests it sent there.

Prompts are cut into fixed-size character blocks; block ``i`` is keyed by a
hash chained over blocks ``0..i``, so a key stands for the whole prefix up to
it (as in vLLM's prefix caching). A server's match for a prompt is the number
of leading blocks whose keys it holds. Each server keeps at most ``capacity``
keys in LRU order; blocks are touched deepest-first so that, as in a radix
tree, a prefix's tail is evicted before its head.

Unlike sglang-router 0.3.2 in PD chat mode (which keys on the first message
only), the key covers the whole prompt: every turn of a conversation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["block_keys", "PrefixIndex"]


def block_keys(text: str, block_chars: int) -> list[int]:
    """Chained hashes of the complete ``block_chars``-sized blocks of ``text``."""
    keys = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        keys.append(previous)
    return keys


class PrefixIndex:
    """Per-server LRU sets of prefix-block keys.

    Parameters
    ----------
    block_chars
        Granularity of matching. Smaller blocks match more precisely and cost
        more hashing; 32 characters is about 8 tokens.
    capacity
        Keys kept per server (about ``capacity * block_chars`` characters of
        prompt). 65,536 keys of 32 characters cover a 500k-token KV pool and
        use a few MB.
    """

    def __init__(self, block_chars: int = 32, capacity: int = 65536) -> None:
        if block_chars < 1 or capacity < 1:
            raise ValueError("PrefixIndex needs block_chars >= 1 and capacity >= 1")
        self.block_chars = block_chars
        self.capacity = capacity
        self._servers: dict[str, OrderedDict[int, None]] = {}
        self._lock = threading.Lock()

    def keys(self, text: str) -> list[int]:
        return block_keys(text, self.block_chars)

    def match_chars(self, keys: list[int], servers: list[str]) -> dict[str, int]:
        """Characters of the prompt (whole blocks) each server is believed to hold."""
        result = {}
        with self._lock:
            for server in servers:
                held = self._servers.get(server)
                matched = 0
                if held:
                    for key in keys:
                        if key not in held:
                            break
                        matched += 1
                result[server] = matched * self.block_chars
        return result

    def insert(self, server: str, keys: list[int]) -> None:
        """Record that ``server`` now holds the prefix these keys describe."""
        with self._lock:
            held = self._servers.setdefault(server, OrderedDict())
            for key in reversed(keys):
                held[key] = None
                held.move_to_end(key)
            while len(held) > self.capacity:
                held.popitem(last=False)

    def size(self, server: str) -> int:
        with self._lock:
            return len(self._servers.get(server, ()))

    def forget(self, server: str | None = None) -> None:
        """Drop one server's record (it restarted) or everyone's (caches flushed)."""
        with self._lock:
            if server is None:
                self._servers.clear()
            else:
                self._servers.pop(server, None)
