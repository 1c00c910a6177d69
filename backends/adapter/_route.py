"""Where one attempt goes: the route the router chose, and the pair the dispatcher sends.

A module of its own so that the one that decides (:mod:`._router`) and the one
that sends (:mod:`._dispatch`) both depend on it, and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from backends.adapter._policies import Choice
from backends.adapter._servers import ServerInfo, rank_key

__all__ = ["PairTarget", "Route"]


@dataclass(frozen=True)
class PairTarget:
    """A prefill and a decode server, and how decode finds prefill's bootstrap server.

    ``room_stride`` is the prefill server's DP rank count: a batch's rooms step
    by it so every item lands on the rank its first room chose.
    """

    prefill: str
    decode: str
    bootstrap_host: str
    bootstrap_port: int | None
    room_stride: int = 1


@dataclass(frozen=True)
class Route:
    """The servers chosen for one attempt, and why.

    Attributes
    ----------
    mode
        ``"pd"`` (a prefill and a decode server) or ``"colocated"``.
    choices
        The policy decision per role (``"prefill"``, ``"decode"``,
        ``"colocated"``, and ``"prefill_rank"`` for a DP prefill server):
        the structured form of :attr:`reason`.
    keys
        The prompt's approximate prefix-record keys, for recording what the server now caches.
    token_keys
        The prompt's token-index keys, when its ids are known and servers publish KV events.
    index
        Which record the placement used: ``"events"`` or ``"approximate"``.
    uncached_tokens
        Prompt tokens the chosen cache was not known to hold: the prefill work this route queues.
    prefill_rank
        The DP rank of a multi-rank prefill server chosen for the prompt (its room must match).
    claims
        The router's token-index claims of this prompt, marked ready when it is prefilled.
    leaders
        Claims of requests still prefilling the prefix this route reuses: sent
        before they end, it would compute the prefix again (``Router.await_prefix``).
    """

    mode: Literal["pd", "colocated"]
    choices: dict[str, Choice]
    prefill: ServerInfo | None = None
    decode: ServerInfo | None = None
    colocated: ServerInfo | None = None
    keys: list[int] = field(default_factory=list, repr=False)
    token_keys: list[int] | None = field(default=None, repr=False)
    index: str = "approximate"
    uncached_tokens: int = 0
    prefill_rank: int | None = None
    claims: list = field(default_factory=list, repr=False, compare=False)
    leaders: list = field(default_factory=list, repr=False, compare=False)

    @property
    def reason(self) -> str:
        """Human-readable: ``prefill:prefix_match(0.94) decode:least_loaded(load=3)``."""
        if self.mode == "colocated":
            return self.choices["colocated"].reason
        rank = self.choices.get("prefill_rank")
        at = f"@dp{self.prefill_rank}:{rank.reason}" if rank is not None else ""
        return f"prefill:{self.choices['prefill'].reason}{at} decode:{self.choices['decode'].reason}"

    @property
    def rule(self) -> str:
        """The rule that placed the prompt (prefill's, or the colocated server's): ``prefix_match``, ..."""
        return self.choices["colocated" if self.mode == "colocated" else "prefill"].rule

    @property
    def servers(self) -> list[str]:
        return [s.url for s in (self.prefill, self.decode, self.colocated) if s is not None]

    @property
    def counted(self) -> list[str]:
        """What the route loads: its servers, and the prefill DP rank as ``URL#dpN``."""
        return self.servers + ([rank_key(self.prefill.url, self.prefill_rank)] if self.prefill_rank is not None else [])

    @property
    def cache_holder(self) -> str:
        """Where the prompt's KV will be cached: the prefill DP rank, else the prefill or colocated server."""
        if self.prefill_rank is not None:
            return rank_key(self.prefill.url, self.prefill_rank)
        return (self.prefill or self.colocated).url

    @property
    def target(self) -> PairTarget:
        return PairTarget(self.prefill.url, self.decode.url, self.prefill.bootstrap_host, self.prefill.bootstrap_port,
                          room_stride=self.prefill.dp_ranks)
