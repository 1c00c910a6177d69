"""The differential oracle: one ``/generate`` body through PD, the adapter's colocated mode, and the server itself.

Why: the promise to users is that a body or program behaves through the
adapter exactly as on one ordinary SGLang server. The colocated server,
asked directly over HTTP, is the reference; both adapter paths must give the
same outcome: equal ``text``, ``output_ids``, token counts, finish reason and
output logprobs (within float tolerance) when it answers, and a
``BadRequestError`` when it refuses (carrying its message, unless the adapter
refused first before sending anything).

Greedy parity on the random tiny model has one honest exception
(``shared/docs/sglang-facts.md``): its logits are nearly flat, so a PD answer
computed in another batch can flip a near-tie. A divergence is accepted only
where, at the first differing token, the other path chose a token the
reference scored within ``TIE_GAP`` of its own choice; then the
rest of that item is not compared. (A sequence that is shorter or longer is
never a tie.)
"""

from __future__ import annotations

import copy
from typing import Any

import httpx

from backends import BadRequestError, PDClient

TIE_GAP = 0.15  # bf16 steps are 0.03 at |logprob| ~7.5; another batch flipped top-2 gaps of 0.051 and 0.109 (this harness)
LOGPROB_TOLERANCE = {"same_server": 1e-3, "pd": 0.05}


def direct(url: str, body: dict) -> tuple[str, Any]:
    """The colocated server's own answer: ``("ok", json)`` or ``("refused", message)``."""
    if body.get("stream"):
        events, error = [], None
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=120, trust_env=False) as answer:
            if answer.status_code != 200:
                return "refused", answer.read().decode(errors="replace")
            for line in answer.iter_lines():
                payload = line[5:].strip() if line.startswith("data:") else ""
                if payload and payload != "[DONE]":
                    event = httpx.Response(200, content=payload).json()
                    if "error" in event:
                        error = str(event["error"])
                    events.append(event)
        return ("refused", error) if error else ("ok", events[-1])
    answer = httpx.post(f"{url}/generate", json=body, timeout=120, trust_env=False)
    return ("ok", answer.json()) if answer.status_code == 200 else ("refused", answer.text)


def through(client: PDClient, body: dict) -> tuple[str, Any]:
    """The adapter's answer for the same body (the last event of a stream)."""
    before = client.metrics.summary().get("requests", 0)
    try:
        if body.get("stream"):
            last = None
            for last in client.request_stream(copy.deepcopy(body)):
                pass
            return "ok", last
        return "ok", client.request(copy.deepcopy(body))
    except BadRequestError as exc:
        records = client.metrics.records()
        sent = client.metrics.summary().get("requests", 0) > before and records[-1].attempts > 0
        return "refused", ("server" if sent else "adapter", str(exc))


def assert_same(reference: tuple[str, Any], got: tuple[str, Any], *, url: str, body: dict, pd: bool) -> None:
    """``got`` (an adapter path) has ``reference``'s outcome (the server asked directly)."""
    kind, value = got
    assert kind == reference[0], f"server said {reference[0]} ({str(reference[1])[:300]}) but adapter {kind}: {value}"
    if kind == "refused":
        who, message = value
        if who == "server":  # the server's own words reach the user
            assert _core(reference[1]) in message, (reference[1], message)
        return
    expected, answer = _items(reference[1]), _items(value)
    assert len(expected) == len(answer)
    for i, (ref, out) in enumerate(zip(expected, answer)):
        _assert_item(ref, out, url=url, body=body, index=i, pd=pd)


def _assert_item(ref: dict, out: dict, *, url: str, body: dict, index: int, pd: bool) -> None:
    ref_ids, out_ids = ref.get("output_ids"), out.get("output_ids")
    if ref_ids != out_ids and pd and ref_ids is not None and out_ids is not None:
        k = next(i for i, (a, b) in enumerate(zip(ref_ids + [None], out_ids + [None])) if a != b)
        gap = _gap_to_best(url, body, index, k, out_ids[k]) if k < len(out_ids) else None
        assert gap is not None and gap < TIE_GAP, \
            f"item {index}: PD diverged at token {k} to {out_ids[k:k + 1]} ({gap} below the reference's best)"
        return
    assert ref_ids == out_ids, f"item {index}: output_ids differ"
    assert ref["text"] == out["text"], f"item {index}: text differs"
    ref_meta, out_meta = ref["meta_info"], out["meta_info"]
    for key in ("prompt_tokens", "completion_tokens"):
        assert ref_meta.get(key) == out_meta.get(key), f"item {index}: {key}"
    assert _finish(ref_meta) == _finish(out_meta), f"item {index}: finish_reason"
    tolerance = LOGPROB_TOLERANCE["pd" if pd else "same_server"]
    for key in ("output_token_logprobs", "input_token_logprobs"):
        if key in ref_meta:
            _assert_logprobs_close(ref_meta[key], out_meta.get(key), tolerance, f"item {index}: {key}")


def _assert_logprobs_close(ref: list, out: list | None, tolerance: float, what: str) -> None:
    assert out is not None and len(ref) == len(out), f"{what}: lengths"
    for (ref_lp, ref_id, *_), (out_lp, out_id, *_) in zip(ref, out):
        assert ref_id == out_id, f"{what}: token ids"
        if ref_lp is None or out_lp is None:
            assert ref_lp is None and out_lp is None, f"{what}: a missing logprob"
        else:
            assert abs(ref_lp - out_lp) <= tolerance, f"{what}: {ref_lp} vs {out_lp}"


def _gap_to_best(url: str, body: dict, index: int, position: int, token: int) -> float | None:
    """How far below the reference's best token ``token`` scored at output ``position`` of item ``index``.

    A tie flip means the other path chose a token the reference scored within
    ``TIE_GAP`` of its choice (SGLang's ``token_ids_logprob`` gives that
    token's exact logprob); ``None`` if unknown.
    """
    probe = copy.deepcopy(body)
    probe.pop("stream", None)
    for key in ("text", "input_ids"):
        if isinstance(probe.get(key), list) and probe[key] and (key == "text" or isinstance(probe[key][0], list)):
            probe[key] = probe[key][index]
    if isinstance(probe.get("sampling_params"), list):
        probe["sampling_params"] = probe["sampling_params"][index]
    probe.update(return_logprob=True, top_logprobs_num=1, token_ids_logprob=[token])
    kind, answer = direct(url, probe)
    meta = answer.get("meta_info", {}) if kind == "ok" else {}
    tops, theirs = meta.get("output_top_logprobs") or [], meta.get("output_token_ids_logprobs") or []
    if position >= min(len(tops), len(theirs)) or not tops[position] or not theirs[position]:
        return None
    return tops[position][0][0] - theirs[position][0][0]


def gen_diverged_by_near_tie(ref_meta: dict, out_meta: dict) -> bool:
    """Whether a ``gen`` diverged from the reference's by a near-tie, from both ``get_meta_info`` dicts.

    Both need ``return_logprob=True``, the reference ``top_logprobs_num`` of
    about 5: at the first differing token, the other path's token must be among
    the reference's top tokens within ``TIE_GAP`` of its pick. A length change is no tie.
    """
    ref_ids = [t[1] for t in ref_meta.get("output_token_logprobs") or []]
    out_ids = [t[1] for t in out_meta.get("output_token_logprobs") or []]
    k = next((i for i, (a, b) in enumerate(zip(ref_ids, out_ids)) if a != b), None)
    tops = ref_meta.get("output_top_logprobs") or []
    scored = {token: logprob for logprob, token, *_ in tops[k]} if k is not None and k < len(tops) else {}
    return out_ids[k] in scored and tops[k][0][0] - scored[out_ids[k]] < TIE_GAP if scored else False


def _items(answer: Any) -> list[dict]:
    return answer if isinstance(answer, list) else [answer]


def _finish(meta: dict) -> Any:
    reason = meta.get("finish_reason")
    return {k: v for k, v in reason.items() if k != "message"} if isinstance(reason, dict) else reason


def _core(message: str) -> str:
    """The server's error text without the JSON wrapping, for a substring check."""
    try:
        body = httpx.Response(400, content=message).json()
        error = body.get("error", body) if isinstance(body, dict) else body
        return str(error.get("message", error) if isinstance(error, dict) else error)[:120]
    except ValueError:
        return message[:120]
