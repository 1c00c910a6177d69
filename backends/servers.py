"""Finding out what each server is before sending it work.

The adapter asks every server for its role and model instead of trusting the
lists it was given: a decode URL in the prefill list would otherwise show up
as a request hanging for 300 s. The prefill's bootstrap port is learnt the
same way, so users never type it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from backends.errors import ConfigurationError, PDError
from backends.transport import Timeouts, Transport

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "colocated"]
_SERVER_MODE = {"prefill": "prefill", "decode": "decode", "colocated": "null"}
_ROLE_OF_MODE = {"prefill": "prefill", "decode": "decode", "null": "colocated", None: "colocated"}


@dataclass(frozen=True)
class ServerInfo:
    """One server as discovered: where, what role, which model, and (prefill) its bootstrap endpoint."""

    url: str
    role: Role
    model_path: str
    bootstrap_host: str
    bootstrap_port: int | None = None
    #: Prefill only: data-parallel ranks that pick requests by ``bootstrap_room % dp_ranks``
    #: (SGLang's default for a PD prefill server with ``--dp-size``); 1 otherwise.
    dp_ranks: int = 1
    #: Of those, the ranks that can serve a PD prefill: all with DP attention; only rank 0
    #: for plain ``--dp-size`` (SGLang 0.5.23's KV sender checks ``room % dp_size``
    #: against its attention-DP rank, which is 0 on every plain-DP rank).
    serving_ranks: tuple[int, ...] = (0,)


def normalize_url(url: str) -> str:
    """``http://host:port`` without a trailing slash; refuse anything else clearly."""
    if not isinstance(url, str):
        raise ConfigurationError(f"server URL must be a string like 'http://127.0.0.1:30000', got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"server URL {url!r} must look like 'http://HOST:PORT'")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def discover(transport: Transport, url: str, expected: Role, timeouts: Timeouts) -> ServerInfo:
    """Ask ``url`` what it is and check it matches the pool it was listed in.

    Raises
    ------
    ConfigurationError
        The server is unreachable, unhealthy, or of another role than ``expected``.
    """
    try:
        model = transport.request("GET", f"{url}/model_info", timeouts=timeouts)
    except PDError as exc:
        raise ConfigurationError(
            f"cannot reach the {expected} server {url}: {exc}. Is it running and is the URL right?", server=url
        ) from exc
    if not model.ok or not isinstance(model.body, dict):
        raise ConfigurationError(
            f"{url}/model_info answered HTTP {model.status}: {model.error_message()}; is this an SGLang server?",
            server=url,
        )
    mode = model.body.get("disaggregation_mode")
    role = _ROLE_OF_MODE.get(mode)
    if role != expected:
        raise ConfigurationError(
            f"{url} is a {role or mode!r} server (disaggregation_mode={mode!r}) but was listed as {expected}; "
            f"move it to the {role} list or restart it with --disaggregation-mode {_SERVER_MODE[expected]}",
            server=url,
        )
    host = urlsplit(url).hostname or "127.0.0.1"
    port, dp_ranks, serving = None, 1, (0,)
    if role == "prefill":
        info = transport.request("GET", f"{url}/server_info", timeouts=timeouts)
        if not info.ok or "disaggregation_bootstrap_port" not in info.body:
            raise ConfigurationError(f"{url}/server_info did not report a bootstrap port", server=url)
        port = int(info.body["disaggregation_bootstrap_port"])
        dp_ranks = _room_following_dp_ranks(info.body)
        if dp_ranks > 1 and info.body.get("enable_dp_attention"):
            serving = tuple(range(dp_ranks))
    if dp_ranks > 1 and len(serving) == 1:
        logger.warning(
            "%s runs plain --dp-size %d: SGLang 0.5.23 fails PD prefill on every rank but 0 (its KV sender "
            "expects DP attention), so the adapter sends it rank-0 rooms only. Use --enable-dp-attention, "
            "or one prefill server per replica, to use all ranks.", url, dp_ranks)
    return ServerInfo(url=url, role=role, model_path=str(model.body.get("model_path", "")), bootstrap_host=host,
                      bootstrap_port=port, dp_ranks=dp_ranks, serving_ranks=serving)


def _room_following_dp_ranks(server_info: dict) -> int:
    """DP ranks of a prefill server whose rank is ``bootstrap_room % dp_size``; 1 if rooms do not decide."""
    try:
        dp_size = int(server_info.get("dp_size") or 1)
    except (TypeError, ValueError):
        return 1
    method = server_info.get("load_balance_method", "follow_bootstrap_room")
    return dp_size if dp_size > 1 and method in ("follow_bootstrap_room", "auto", None) else 1
