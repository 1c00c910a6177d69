"""The probe that brings a server back into rotation: ``/health``, and for a prefill server a real PD pair.

Why: SGLang's ``/health`` does not exercise the KV transfer. A prefill server
whose mooncake transfer thread died (a race in SGLang 0.5.23) keeps
answering ``/health`` while every PD request through it hangs; re-admitting
it on ``/health`` alone would hand it requests again at once. So a prefill
server returns only after a one-token canary pair through it, with a decode
server in rotation, completes within a short deadline.
"""

from __future__ import annotations

from typing import Callable

from backends.adapter._dispatch import Dispatcher
from backends.adapter._health import answers_health
from backends.adapter._payloads import RoomAllocator
from backends.adapter._route import PairTarget
from backends.adapter._servers import ServerInfo
from backends.adapter._transport import Timeouts, Transport
from backends.errors import PDError

__all__ = ["Canary"]

_CANARY_BODY = {"text": "Health check.", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}


class Canary:
    """``canary(url) -> bool``: the health tracker's probe for one client's servers.

    Parameters
    ----------
    transport
        The client's transport.
    pools
        Discovered servers per role.
    decodes_in_rotation
        Decode URLs currently in rotation (the canary's decode leg goes to the first).
    timeouts
        Limits of the canary pair; short, so a stuck pair fails the probe, not the prober.
    """

    def __init__(self, transport: Transport, pools: dict[str, list[ServerInfo]],
                 decodes_in_rotation: Callable[[], list[str]],
                 timeouts: Timeouts = Timeouts(connect=1.0, first_byte=10.0, total=10.0)) -> None:
        self._transport = transport
        self._prefill = {s.url: s for s in pools["prefill"]}
        self._decode = {s.url: s for s in pools["decode"]}
        self._decodes_in_rotation = decodes_in_rotation
        self._dispatcher = Dispatcher(transport, timeouts, max_pairs=2)
        self._rooms = RoomAllocator()

    def __call__(self, url: str) -> bool:
        if not answers_health(self._transport, url):
            return False
        prefill = self._prefill.get(url)
        decodes = self._decodes_in_rotation() or list(self._decode)
        if prefill is None or not decodes:
            return True
        target = PairTarget(prefill.url, decodes[0], prefill.bootstrap_host, prefill.bootstrap_port,
                            room_stride=prefill.dp_ranks)
        try:
            exchange = self._dispatcher.pair(target, dict(_CANARY_BODY), self._rooms.allocate(1, ranks=prefill.dp_ranks))
            return bool(next(exchange.events, None))
        except PDError:
            return False

    def close(self) -> None:
        self._dispatcher.close()
