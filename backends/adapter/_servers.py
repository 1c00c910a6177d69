"""Finding out what each server is before sending it work.

The adapter asks every server for its role and model instead of trusting the
lists it was given: a decode URL in the prefill list would otherwise show up
as a request hanging for 300 s. The prefill's bootstrap port is learnt the
same way, so users never type it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

from backends.errors import ConfigurationError, PDError
from backends.adapter._transport import Timeouts, Transport

__all__ = ["Role", "ServerInfo", "rank_key", "normalize_url", "discover", "discover_pools", "describe_server"]

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
    #: Prefill and colocated: the server's ``/server_info`` JSON (its KV-event
    #: endpoints, tokenizer settings); empty for decode servers.
    server_args: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def rank_key(url: str, rank: int) -> str:
    """The name a server's DP rank goes by in loads, prefix records and KV-event indexes (``URL#dpR``)."""
    return f"{url}#dp{rank}"


def normalize_url(url: str) -> str:
    """``http://host:port`` without a trailing slash; refuse anything else clearly."""
    if not isinstance(url, str):
        raise ConfigurationError(f"server URL must be a string like 'http://127.0.0.1:30000', got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"server URL {url!r} must look like 'http://HOST:PORT'")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def describe_server(transport: Transport, url: str, timeouts: Timeouts, listed_as: str | None = None) -> ServerInfo:
    """Ask ``url`` what it is: role, model, (prefill) bootstrap port and DP ranks, and its ``/server_info``.

    Parameters
    ----------
    transport
        How to reach it (e.g. ``HttpxTransport()``).
    url
        ``http://HOST:PORT`` of an SGLang server.
    timeouts
        Limits of each of the one or two calls (``/model_info``, ``/server_info``).
    listed_as
        The role the caller expects, named in the error when it cannot be reached.

    Raises
    ------
    ConfigurationError
        The server is unreachable or does not answer like an SGLang server.
    """
    url = normalize_url(url)
    try:
        model = transport.request("GET", f"{url}/model_info", timeouts=timeouts)
    except PDError as exc:
        what = f"the {listed_as} server {url}" if listed_as else url
        raise ConfigurationError(f"cannot reach {what}: {exc}. Is it running and is the URL right?", server=url) from exc
    if not model.ok or not isinstance(model.body, dict):
        raise ConfigurationError(
            f"{url}/model_info answered HTTP {model.status}: {model.error_message()}; is this an SGLang server?",
            server=url,
        )
    mode = model.body.get("disaggregation_mode")
    role = _ROLE_OF_MODE.get(mode)
    if role is None:
        raise ConfigurationError(f"{url} reports an unknown disaggregation_mode={mode!r}", server=url)
    host = urlsplit(url).hostname or "127.0.0.1"
    port, dp_ranks, serving, args = None, 1, (0,), {}
    if role != "decode":  # prefill and colocated servers are routed on: their caches, events and tokenizer
        info = transport.request("GET", f"{url}/server_info", timeouts=timeouts)
        args = info.body if info.ok and isinstance(info.body, dict) else {}
    if role == "prefill":
        if "disaggregation_bootstrap_port" not in args:
            raise ConfigurationError(f"{url}/server_info did not report a bootstrap port", server=url)
        port = int(args["disaggregation_bootstrap_port"])
        dp_ranks = _room_following_dp_ranks(args)
        if dp_ranks > 1 and args.get("enable_dp_attention"):
            serving = tuple(range(dp_ranks))
    return ServerInfo(url=url, role=role, model_path=str(model.body.get("model_path", "")), bootstrap_host=host,
                      bootstrap_port=port, dp_ranks=dp_ranks, serving_ranks=serving, server_args=args)


def discover(transport: Transport, url: str, expected: Role, timeouts: Timeouts) -> ServerInfo:
    """:func:`describe_server`, checking that the server has the role of the pool it was listed in.

    Raises
    ------
    ConfigurationError
        The server is unreachable, unhealthy, or of another role than ``expected``.
    """
    info = describe_server(transport, url, timeouts, listed_as=expected)
    if info.role != expected:
        mode = {"colocated": "null"}.get(info.role, info.role)
        raise ConfigurationError(
            f"{info.url} is a {info.role!r} server (disaggregation_mode={mode!r}) but was listed as {expected}; "
            f"move it to the {info.role} list or restart it with --disaggregation-mode {_SERVER_MODE[expected]}",
            server=info.url,
        )
    if info.dp_ranks > 1 and len(info.serving_ranks) == 1:
        logger.warning(
            "%s runs plain --dp-size %d: SGLang 0.5.23 fails PD prefill on every rank but 0 (its KV sender "
            "expects DP attention), so the adapter sends it rank-0 rooms only. Use --enable-dp-attention, "
            "or one prefill server per replica, to use all ranks.", info.url, info.dp_ranks)
    return info


def discover_pools(transport: Transport, given: dict[str, Sequence[str] | str | None],
                   timeouts: Timeouts) -> dict[str, list[ServerInfo]]:
    """Check and discover the servers given per role (``prefill``, ``decode``, ``colocated``).

    Raises
    ------
    ConfigurationError
        A list is malformed, PD has only one side, nothing was given, a URL is
        listed twice, a server is of the wrong role, or they serve different models.
    """
    urls = {role: [normalize_url(u) for u in _as_list(role, given.get(role))] for role in ("prefill", "decode", "colocated")}
    if bool(urls["prefill"]) != bool(urls["decode"]):
        missing = "decode" if urls["prefill"] else "prefill"
        raise ConfigurationError(f"PD needs both prefill and decode servers; no {missing} server was given")
    if not any(urls.values()):
        raise ConfigurationError("PDClient needs servers: give prefill=[...] and decode=[...], and/or colocated=[...]")
    every = [u for role_urls in urls.values() for u in role_urls]
    duplicates = sorted({u for u in every if every.count(u) > 1})
    if duplicates:
        raise ConfigurationError(f"servers listed more than once: {duplicates}")
    pools = {role: [discover(transport, url, role, timeouts) for url in role_urls] for role, role_urls in urls.items()}
    models = {s.model_path for servers in pools.values() for s in servers}
    if len(models) != 1:
        detail = ", ".join(f"{s.url}={s.model_path}" for servers in pools.values() for s in servers)
        raise ConfigurationError(f"all servers must serve one model; found {detail}")
    return pools


def _as_list(role: str, given: Sequence[str] | str | None) -> list[str]:
    if isinstance(given, str):
        return [given]
    if given is None:
        return []
    try:
        return list(given)
    except TypeError:
        raise ConfigurationError(f"{role} must be a list of URLs, got {given!r}") from None


def _room_following_dp_ranks(server_info: dict) -> int:
    """DP ranks of a prefill server whose rank is ``bootstrap_room % dp_size``; 1 if rooms do not decide."""
    try:
        dp_size = int(server_info.get("dp_size") or 1)
    except (TypeError, ValueError):
        return 1
    method = server_info.get("load_balance_method", "follow_bootstrap_room")
    return dp_size if dp_size > 1 and method in ("follow_bootstrap_room", "auto", None) else 1
