"""Request bodies for SGLang's ``/generate`` and the answers they bring back.

Pure functions, no I/O: the frontend's sampling parameters become a body, a
body becomes the two legs of a PD pair, and the two answers become one. These
are the rules of SGLang's PD protocol (see ``sglang-facts.md``): the same body
to both servers plus ``bootstrap_host``, ``bootstrap_port`` and a fresh
``bootstrap_room`` per item; decode's answer is the answer, except that prompt
logprobs exist only in prefill's.
"""

from __future__ import annotations

import copy
import random
import re
import threading
from typing import Any

from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

from backends.errors import BadRequestError

__all__ = ["sampling_body", "sampling_items", "check_sampling", "batch_size", "routing_prompt", "with_rids", "with_bootstrap", "rids_of", "merge_pd_answers", "RoomAllocator",
           "OUTPUT_LOGPROB_FIELDS", "describe_shape"]

_LOGPROB_OPTIONS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
_DTYPE_REGEX = {int: REGEX_INT, "int": REGEX_INT, float: REGEX_FLOAT, "float": REGEX_FLOAT,
                str: REGEX_STR, "str": REGEX_STR, bool: REGEX_BOOL, "bool": REGEX_BOOL}
# Prompt-side logprob fields: only the prefill leg computes them.
_PROMPT_LOGPROB_FIELDS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
OUTPUT_LOGPROB_FIELDS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


def sampling_body(sampling_params: SglSamplingParams) -> dict[str, Any]:
    """``sampling_params`` plus top-level logprob options, as ``RuntimeEndpoint`` sends them.

    ``dtype`` (``sgl.gen(dtype=int)``) becomes SGLang's regex for that type, with
    the same stop strings the stock backend adds. The caller's object is not changed.
    """
    params = sampling_params.to_srt_kwargs()
    dtype = sampling_params.dtype
    if dtype is not None:
        if dtype not in _DTYPE_REGEX:
            raise BadRequestError(f"sgl.gen dtype must be int, float, str or bool, got {dtype!r}")
        params["regex"] = _DTYPE_REGEX[dtype]
        if dtype in (int, "int", float, "float"):
            stop = params["stop"]
            stop = [stop] if isinstance(stop, str) else list(stop or ())
            params["stop"] = stop + [" ", "\n"]
    body: dict[str, Any] = {
        "sampling_params": {"skip_special_tokens": True, "spaces_between_special_tokens": True, **params}
    }
    for option in _LOGPROB_OPTIONS:
        value = getattr(sampling_params, option, None)
        if value is not None:
            body[option] = value
    return body


def sampling_items(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(name, params)`` of each sampling-params dict of ``body``: one, or one per batch item."""
    params = body.get("sampling_params") or {}
    if isinstance(params, list):
        return [(f"sampling_params[{i}]", item) for i, item in enumerate(params)]
    return [("sampling_params", params)]


def check_sampling(body: dict[str, Any]) -> None:
    """Refuse, before any server sees it, what no server can serve.

    The servers validate too; checking here saves a round trip to two servers
    and gives the message in the caller's terms. ``sampling_params`` is a dict,
    or (for a batch) a list of one dict per item, as SGLang's ``/generate`` takes it.

    Raises
    ------
    BadRequestError
        Naming the item and field.
    """
    for where, item in sampling_items(body):
        if not isinstance(item, dict):
            raise BadRequestError(f"{where} must be a dict (or a list of dicts, one per batch item), "
                                  f"got {type(item).__name__}")
        regex = item.get("regex")
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise BadRequestError(f"{where}: regex {regex!r} does not compile: {exc}") from None
        limit = item.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise BadRequestError(f"{where}: max_new_tokens must be a non-negative integer, got {limit!r}")


def batch_size(body: dict[str, Any]) -> int | None:
    """Items in a batched body (``text`` or ``input_ids`` given as a list), else ``None``."""
    if isinstance(body.get("text"), list):
        return len(body["text"])
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return None


def routing_prompt(body: dict[str, Any]) -> tuple[str, list[int] | None]:
    """What the router keys on: ``(text, input_ids)`` of the prompt, or of a batch's first item.

    ``input_ids`` is ``None`` for a text prompt; ``text`` is ``""`` for an ids prompt.
    """
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list):
        text = text[0] if text else ""
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]
    return (text if isinstance(text, str) else ""), (ids if isinstance(ids, list) and ids else None)


def with_rids(body: dict[str, Any], rid: str) -> dict[str, Any]:
    """A copy of ``body`` with our request ids, so any leg can be aborted by id."""
    leg = dict(body)
    size = batch_size(body)
    leg["rid"] = rid if size is None else [f"{rid}-{i}" for i in range(size)]
    return leg


def with_bootstrap(body: dict[str, Any], host: str, port: int | None, room: int, stride: int = 1) -> dict[str, Any]:
    """A copy of ``body`` carrying the PD pairing fields; a batch gets rooms ``room + i * stride``.

    ``stride`` is the prefill server's DP rank count, so every item of a batch
    (the options of one ``select``) lands on the same rank as ``room``.
    """
    leg = dict(body)
    size = batch_size(body)
    leg["bootstrap_host"] = host if size is None else [host] * size
    leg["bootstrap_port"] = port if size is None else [port] * size
    leg["bootstrap_room"] = room if size is None else [room + i * stride for i in range(size)]
    return leg


def rids_of(body: dict[str, Any]) -> list[str]:
    rid = body.get("rid")
    if rid is None:
        return []
    return list(rid) if isinstance(rid, list) else [rid]


def describe_shape(body: dict[str, Any]) -> str:
    """A body's shape for error messages, without its content: prompt kind and sizes, option names."""
    parts = []
    for key in ("text", "input_ids"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(f"text of {len(value)} characters")
        elif isinstance(value, list) and value and isinstance(value[0], (list, str)):
            parts.append(f"{key} batch of {len(value)} ({', '.join(str(len(v)) for v in value[:8])}"
                         f"{', ...' if len(value) > 8 else ''})")
        elif isinstance(value, list):
            parts.append(f"{key} of {len(value)} tokens")
    options = sorted({k for _, item in sampling_items(body) if isinstance(item, dict) for k in item})
    extras = sorted(k for k in body if k not in ("text", "input_ids", "sampling_params", "rid", "stream"))
    return "; ".join(parts + [f"sampling_params {options}" if options else "", f"fields {extras}" if extras else ""]
                     ).strip("; ").replace("; ; ", "; ")


def merge_pd_answers(prefill: Any, decode: Any, sampling: Any = None) -> Any:
    """Decode's answer with prefill's prompt logprobs put first.

    Decode's own prompt-logprob lists are empty (it never saw the prompt), so
    the merged lists equal what a colocated server returns. With
    ``max_new_tokens=0`` a PD decode server still lists the token prefill
    sampled, where a colocated server lists it only when its batch holds a
    grammar (``regex``/``json_schema``/``ebnf``, any item's; measured on
    SGLang 0.5.23): the output lists are cut to match. ``sampling`` is the
    request's ``sampling_params`` (a dict, or one per batch item).
    """
    items = sampling if isinstance(sampling, list) else [sampling]
    grammar = any(isinstance(s, dict) and any(s.get(k) for k in ("regex", "json_schema", "ebnf")) for s in items)
    return _merged(prefill, decode, grammar)


def _merged(prefill: Any, decode: Any, grammar: bool) -> Any:
    if isinstance(decode, list):
        return [_merged(p, d, grammar) for p, d in zip(prefill, decode)]
    merged = copy.copy(decode)
    meta = dict(decode.get("meta_info", {}))
    prefill_meta = prefill.get("meta_info", {}) if isinstance(prefill, dict) else {}
    for name in _PROMPT_LOGPROB_FIELDS:
        if name in prefill_meta and prefill_meta[name] is not None:
            meta[name] = list(prefill_meta[name]) + list(meta.get(name) or [])
    if meta.get("completion_tokens") == 0 and not grammar:
        for name in OUTPUT_LOGPROB_FIELDS:
            if isinstance(meta.get(name), list):
                meta[name] = []
        if "output_token_logprobs_length" in meta:
            meta["output_token_logprobs_length"] = 0
    merged["meta_info"] = meta
    return merged


class RoomAllocator:
    """Bootstrap rooms that never repeat within this allocator's life.

    SGLang crashes both schedulers when two requests in flight share a room,
    and a retried request must not reuse its failed room either. Rooms start
    at a random offset below 2**62 (so two processes sharing servers almost
    surely never meet) and only move forward: a batch of ``n`` for a server
    with ``ranks`` DP ranks uses ``room, room + ranks, ... room + (n-1) * ranks``.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._next = random.Random(seed).randrange(2**62)
        self._lock = threading.Lock()

    def allocate(self, count: int = 1, ranks: int = 1, rank: int = 0) -> int:
        """The first room of ``count``, congruent to ``rank`` modulo ``ranks``.

        A DP prefill server serves a request on rank ``room % dp_size``, so
        the room is how the adapter puts a prompt on the rank holding its prefix.
        """
        if ranks < 1 or not 0 <= rank < ranks:
            raise ValueError(f"need 0 <= rank < ranks, got rank={rank}, ranks={ranks}")
        with self._lock:
            room = self._next + (rank - self._next) % ranks
            self._next = (room + count * ranks) % 2**63
            return room
