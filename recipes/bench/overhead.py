"""The adapter's own cost per request, with the servers replaced by instant in-process stubs.

Why stubs: on real servers the adapter's work (routing, prefix hashing, room
allocation, the prefill leg's pool thread, retries bookkeeping, metrics) hides
behind milliseconds of model time. With servers that answer instantly through
an :class:`~backends.testing.InMemoryTransport` (the library's own :class:`~backends.testing.FakeServer`
stubs), what remains is the adapter itself.

Baseline ("direct"): what any PD client must do at the least, calling the
same stub handlers directly: one call to the prefill stub and one to the
decode stub with the body, in the caller's thread. The difference is what the
adapter adds. CPU time is the process's (``time.process_time``: every thread,
including the prefill-leg pool), wall time is ``time.perf_counter``.
"""

from __future__ import annotations

import time
from typing import Any

from backends import PDClient, ensure_tiny_model
from backends.testing import FakeServer, InMemoryTransport

METHOD = ("N requests through PDClient.request on an InMemoryTransport whose stub prefill/decode servers answer "
          "at once, against N direct calls of the same stub handlers (prefill then decode); process CPU time "
          "(all threads) and wall time per request")

_PREFILL = ("http://stub-prefill-0:1", "http://stub-prefill-1:1")
_DECODE = ("http://stub-decode-0:1",)


def _timed(call, count: int) -> dict[str, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(count):
        call(i)
    return {"wall_us": (time.perf_counter() - wall0) / count * 1e6,
            "cpu_us": (time.process_time() - cpu0) / count * 1e6}


def _prompts(chars: int, count: int) -> list[str]:
    # Distinct prompts sharing a long head, so the prefix index really hashes and matches.
    head = ("shared head of the prompt " * (chars // 26 + 1))[: max(chars - 12, 0)]
    return [f"{head}{i:012d}" for i in range(count)]


def measure(requests: int = 2000, prompt_chars: tuple[int, ...] = (200, 8000)) -> dict[str, Any]:
    """Microseconds per request through ``PDClient.request`` and through direct stub calls."""
    servers = {url: FakeServer("prefill", model="stub-model") for url in _PREFILL} | {
        url: FakeServer("decode", model="stub-model") for url in _DECODE}
    transport = InMemoryTransport(servers)
    client = PDClient(prefill=list(_PREFILL), decode=list(_DECODE), transport=transport)
    prefill_stub, decode_stub = servers[_PREFILL[0]], servers[_DECODE[0]]
    cases = []
    try:
        for chars in prompt_chars:
            prompts = _prompts(chars, requests)
            bodies = [{"text": p, "sampling_params": {"max_new_tokens": 2}} for p in prompts]
            for body in bodies[: min(50, requests)]:  # warm-up: imports, pool threads, allocator
                client.request(body)
            transport.calls.clear()

            paired = [{**body, "bootstrap_host": "stub", "bootstrap_room": i} for i, body in enumerate(bodies)]

            def direct(i: int) -> None:
                prefill_stub("POST", "/generate", paired[i])
                decode_stub("POST", "/generate", paired[i])

            adapter = _timed(lambda i: client.request(bodies[i]), requests)
            transport.calls.clear()  # the in-memory transport records every call; keep memory flat
            baseline = _timed(direct, requests)
            cases.append({
                "prompt_chars": chars, "requests": requests, "adapter": adapter, "direct": baseline,
                "added_wall_us": adapter["wall_us"] - baseline["wall_us"],
                "added_cpu_us": adapter["cpu_us"] - baseline["cpu_us"],
            })
    finally:
        client.close()
    return {"method": METHOD, "cases": cases}


ROUTING_METHOD = ("client CPU (time.process_time, all threads) per PDClient.request on stub servers, minus the same "
                  "requests with routing on the approximate record's shortest path (a 1-character prompt); "
                  "prompts of ~2,000 tokens of the tiny model's tokenizer")


def _chat_turns(count: int, window: int = 30) -> list[str]:
    """Chat prompts (ChatML) of ``window`` turns each, the window sliding one turn per prompt.

    Consecutive prompts share all but one turn, as a long conversation's do once its
    history is trimmed to the context: what the tokenizer's segment cache is for.
    """
    turns = [f"<|im_start|>user\nEntry {i}: " + "log the tide, wind and the cargo tally. " * 6
             + f"<|im_end|>\n<|im_start|>assistant\nNoted entry {i}.<|im_end|>\n" for i in range(count + window)]
    return ["".join(turns[i:i + window]) + "<|im_start|>assistant\n" for i in range(count)]


def measure_routing(requests: int = 200, prompt_tokens: int = 2000) -> dict[str, Any]:
    """Client CPU spent routing one ~``prompt_tokens``-token prompt: approximate record vs KV events.

    The stub prefill servers advertise KV events (nothing publishes on their ports), so the client
    tokenizes every prompt with the tiny model's tokenizer and matches it in tokens, as it does on
    real servers; the event thread idles. Cases: distinct prompts (nothing to reuse), and chat turns
    (each prompt resends the last one plus a turn: the tokenizer's segment cache reuses the history).
    """
    model = str(ensure_tiny_model())
    urls = {"prefill": ["http://127.0.0.1:1", "http://127.0.0.1:2"], "decode": ["http://127.0.0.1:3"]}
    servers = {u: FakeServer("prefill", model=model) for u in urls["prefill"]} | {
        u: FakeServer("decode", model=model) for u in urls["decode"]}
    for i, url in enumerate(urls["prefill"]):  # ports nobody listens on: ZeroMQ keeps retrying quietly
        servers[url].kv_events = {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": 9 + i,
                                  "topic": "kv", "block_size": 1, "dp_size": 1}
    transport = InMemoryTransport(servers)
    chars = prompt_tokens * 4  # the tiny tokenizer's ~4 characters a token on English text
    distinct = [f"{i:06d} " + ("an archive of tides and cargo, entry by entry. " * (chars // 48)) for i in range(requests)]
    turns = _chat_turns(requests, window=prompt_tokens // 120)  # ~120 tokens a turn
    cases = []
    for events in (False, True):
        with PDClient(**urls, transport=transport, kv_events=events) as client:
            def send(prompt: str) -> None:
                client.request({"text": prompt, "sampling_params": {"max_new_tokens": 1}})
            for prompt in distinct[:20]:
                send(prompt)  # warm-up
            floor = _timed(lambda i: send("x"), requests)["cpu_us"]
            for name, prompts in (("chat turns", turns), ("distinct prompts", distinct)):
                transport.calls.clear()
                cpu = _timed(lambda i: send(prompts[i]), requests)["cpu_us"]
                cases.append({"index": "events" if events else "approximate", "prompts": name,
                              "routing_cpu_us": cpu - floor, "request_cpu_us": cpu})
    return {"method": ROUTING_METHOD, "prompt_tokens": prompt_tokens, "cases": cases}
