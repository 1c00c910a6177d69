"""The best cache hit ratio a workload allows, counted in the model's tokens.

Why: a raw hit ratio says little on its own (a workload of unrelated prompts
caps it at 0). The bound is what one perfect, unbounded prefix cache would
reuse, fed with the same prompts in the order they were sent: for each prompt,
the longest token prefix it shares with any earlier prompt. That is what a
router sending every request to the one server that holds its prefix could
get at best, so ``hit ratio / bound`` measures the routing alone.

Two rules mirror SGLang's RadixAttention on a PD prefill server:

- a prompt never reuses all of its tokens: at least one is computed to get
  logits, so the reuse is capped at ``len - 1`` (SGLang reports 249 of 250);
- only prompts are cached: a prefill server never computes the reply tokens,
  so in a chat the previous reply is not in any cache. (A colocated server also
  caches generated tokens and can therefore exceed this bound in multi-turn.)

Concurrency is ignored: two requests of a group in flight together may both
miss on a real server, which the bound does not charge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class CacheBound:
    """Token totals of the prompts and the tokens a perfect cache reuses."""

    prompt_tokens: int
    best_cached_tokens: int

    @property
    def ratio(self) -> float:
        return self.best_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _TokenTrie:
    """Prefix tree over token ids; nodes are plain dicts keyed by token id."""

    def __init__(self) -> None:
        self._root: dict[int, dict] = {}

    def longest_prefix(self, tokens: list[int]) -> int:
        node, depth = self._root, 0
        for token in tokens:
            node = node.get(token)
            if node is None:
                break
            depth += 1
        return depth

    def insert(self, tokens: list[int]) -> None:
        node = self._root
        for token in tokens:
            node = node.setdefault(token, {})


def token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids as the server computes them (the tokenizer's default special tokens)."""
    return [list(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []


def best_achievable(prompt_ids: Iterable[list[int]]) -> CacheBound:
    """Reuse a perfect single prompt cache would get, for prompts in send order."""
    trie = _TokenTrie()
    total = best = 0
    for ids in prompt_ids:
        total += len(ids)
        best += min(trie.longest_prefix(ids), max(len(ids) - 1, 0))
        trie.insert(ids)
    return CacheBound(total, best)
