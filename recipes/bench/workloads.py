"""Seeded workloads whose prompts share prefixes the way real traffic does.

Why these three: cache-aware routing only pays when prompts share prefixes,
and the three common shapes share them differently.

- *shared-prefix*: ``G`` groups of ``R`` requests; each group has its own long
  prefix (a system prompt or document) and every request a unique suffix (the
  shape of SGLang's ``generated-shared-prefix`` benchmark dataset).
- *multi-turn*: chat sessions; every turn resends the whole history, including
  the previous replies exactly as the server returned them, so turn ``k+1``
  extends turn ``k``'s prompt.
- *few-shot*: one long block of examples shared by every request, then a
  unique question.

Requests go out interleaved (groups shuffled together, sessions taking turns
in a shuffled order each round), so a router has to tell them apart.

Text is made of words that the tiny model's tokenizer encodes as exactly one
token each, so "``L`` tokens" of prefix is ``L`` words (give or take the
separators); the exact counts come from the tokenizer in
:mod:`recipes.bench.cache_bound`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sglang.lang.ir import SglSamplingParams

#: Renders chat messages into the prompt text (the model's chat template).
Render = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class Turn:
    """One request of a workload.

    Attributes
    ----------
    conversation
        Group (shared-prefix), session (multi-turn) or request number (few-shot).
    index
        Turn number within a session; 0 for single-shot workloads.
    user
        The whole prompt (single-shot) or this turn's user message (chat).
    """

    conversation: int
    index: int
    user: str


@dataclass(frozen=True)
class Workload:
    """A named list of turns in send order, and how to turn them into prompts.

    Attributes
    ----------
    chat
        Turns are chat messages: the prompt is the rendered history (system
        prompt, earlier user messages and replies) plus this turn's message.
    shape
        The generator's parameters, written into the report.
    """

    name: str
    turns: tuple[Turn, ...]
    output_len: int
    chat: bool = False
    system: str = ""
    shape: dict[str, Any] = field(default_factory=dict)

    def sampling_params(self) -> SglSamplingParams:
        """Greedy, exactly ``output_len`` tokens: every route does the same work."""
        return SglSamplingParams(max_new_tokens=self.output_len, temperature=0.0, ignore_eos=True)

    def prompt(self, turn: Turn, history: list[tuple[str, str]], render: Render) -> str:
        """The prompt of ``turn`` given the session's earlier (user, reply) pairs."""
        if not self.chat:
            return turn.user
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": turn.user})
        return render(messages)


def single_token_words(tokenizer: Any) -> list[str]:
    """Lower-case words the tokenizer holds as one token (with their leading space).

    Sorted, so a seed gives the same text on every machine with the same model.
    """
    vocab = tokenizer.get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("\u0120") and re.fullmatch(r"[a-z]{3,}", t[1:]))
    if len(words) < 100:
        raise ValueError(f"the tokenizer has only {len(words)} plain single-token words; cannot build workloads")
    return words


def _text(rng: random.Random, words: list[str], count: int) -> str:
    return " ".join(rng.choice(words) for _ in range(max(count, 1)))


def shared_prefix(words: list[str], *, groups: int, per_group: int, prefix_len: int,
                  suffix_len: int, output_len: int, seed: int) -> Workload:
    """``groups`` x ``per_group`` requests: a long prefix per group, a unique suffix each, shuffled."""
    rng = random.Random(f"shared-prefix/{seed}")
    prefixes = [_text(rng, words, prefix_len) for _ in range(groups)]
    turns = [Turn(g, 0, f"{prefixes[g]}\nQuestion: {_text(rng, words, suffix_len)}\nAnswer:")
             for g in range(groups) for _ in range(per_group)]
    rng.shuffle(turns)
    shape = dict(groups=groups, per_group=per_group, prefix_len=prefix_len, suffix_len=suffix_len,
                 output_len=output_len)
    return Workload("shared-prefix", tuple(turns), output_len, shape=shape)


def multi_turn(words: list[str], *, sessions: int, turns: int, turn_len: int, system_len: int,
               output_len: int, seed: int) -> Workload:
    """``sessions`` chats of ``turns`` turns; each round, sessions take their turn in a shuffled order."""
    rng = random.Random(f"multi-turn/{seed}")
    system = _text(rng, words, system_len) if system_len else ""
    messages = [[_text(rng, words, turn_len) for _ in range(turns)] for _ in range(sessions)]
    order: list[Turn] = []
    for t in range(turns):
        round_order = list(range(sessions))
        rng.shuffle(round_order)
        order += [Turn(s, t, messages[s][t]) for s in round_order]
    shape = dict(sessions=sessions, turns=turns, turn_len=turn_len, system_len=system_len, output_len=output_len)
    return Workload("multi-turn", tuple(order), output_len, chat=True, system=system, shape=shape)


def few_shot(words: list[str], *, requests: int, block_len: int, question_len: int, output_len: int,
             seed: int) -> Workload:
    """``requests`` questions after one shared ``block_len``-token block of worked examples."""
    rng = random.Random(f"few-shot/{seed}")
    examples, length = [], 0
    while length < block_len:
        q, a = rng.randint(8, 24), rng.randint(8, 24)
        examples.append(f"Q: {_text(rng, words, q)}\nA: {_text(rng, words, a)}\n")
        length += q + a + 4
    block = "Examples:\n" + "".join(examples)
    turns = [Turn(i, 0, f"{block}Q: {_text(rng, words, question_len)}\nA:") for i in range(requests)]
    shape = dict(requests=requests, block_len=block_len, question_len=question_len, output_len=output_len)
    return Workload("few-shot", tuple(turns), output_len, shape=shape)
