"""Routing on the servers' own KV cache events, on the session cluster (events on: the launcher's default).

What only real servers can show: the client-side tokenizer computes the ids
the server computes; a prefix sent by one client *process* is routed by another
to the server that holds it; ``input_ids`` prompts are cache-routed; a flush
empties the index; without events the approximate record takes over and says
so; no thread or socket outlives ``close()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time


from backends import PDClient, Timeouts

_TIMEOUTS = Timeouts(connect=2.0, first_byte=60.0, total=120.0)
_GREEDY = {"temperature": 0, "max_new_tokens": 2}


def _client(cluster, **options) -> PDClient:
    return PDClient(prefill=cluster.prefill_urls, decode=cluster.decode_urls, timeouts=_TIMEOUTS, **options)


def _prefix(topic: str) -> str:
    return "".join(f"Clause {i} of the {topic} charter: ledger {i * 7} rests on rack {i % 5}.\n" for i in range(14))


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _indexed(client: PDClient) -> int:
    return sum(s.get("blocks", 0) or 0 for s in client.cache_status().values())


def test_the_client_tokenizes_exactly_as_the_server(cluster):
    with _client(cluster) as client:
        tokenizer = client._events.tokenizer  # the one routing uses
        assert tokenizer is not None
        texts = ["Hello world", "  two  spaces\tand tabs\n\n", "<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\n", "über 12345 ünï <s> inline </s> tokens", _prefix("mill")]
        for text in texts:
            answer = client.request({"text": text, "sampling_params": _GREEDY, "return_logprob": True,
                                     "logprob_start_len": 0})
            server_ids = [token for _, token, _ in answer["meta_info"]["input_token_logprobs"]]
            assert tokenizer.encode(text) == server_ids, text


_OTHER_PROCESS = textwrap.dedent("""
    import json, sys
    from backends import PDClient, Timeouts
    prefill, decode, prefixes = json.loads(sys.argv[1])
    with PDClient(prefill=prefill, decode=decode, timeouts=Timeouts(connect=2, first_byte=60, total=120)) as client:
        placed = {}
        for prefix in prefixes:
            delivered = client.send("native", {"text": prefix + "First question?", "sampling_params":
                                               {"temperature": 0, "max_new_tokens": 2}})
            placed[prefix] = delivered.route.prefill.url
    print(json.dumps(placed))
""")


def test_a_prefix_sent_by_another_process_is_routed_to_the_server_holding_it(cluster):
    prefixes = [_prefix(topic) for topic in ("orchard", "harbour", "quarry", "meadow")]
    with _client(cluster) as client:
        client.flush_cache()
        argv = json.dumps([cluster.prefill_urls, cluster.decode_urls, prefixes])
        done = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, argv], capture_output=True, text=True,
                              timeout=300, cwd=os.getcwd())
        assert done.returncode == 0, done.stderr[-3000:]
        placed = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(set(placed.values())) == 2, placed  # new prefixes were spread over both servers
        # The other process's requests are done: their blocks are announced (after each KV transfer).
        _wait(lambda: _indexed(client) > 0, 30, "the other process's prefixes to be indexed here")
        for prefix in prefixes:
            delivered = client.send("native", {"text": prefix + "Second question?", "sampling_params": _GREEDY})
            route, meta = delivered.route, delivered.answer["meta_info"]
            assert route.prefill.url == placed[prefix], route.reason
            assert route.index == "events" and route.rule == "prefix_match", route.reason
            prefix_tokens = len(client._events.tokenizer.encode(prefix))
            assert meta["cached_tokens"] >= 0.9 * prefix_tokens, (meta, prefix_tokens)


def test_input_ids_prompts_are_cache_routed(cluster):
    with _client(cluster) as first, _client(cluster) as second:
        ids = first._events.tokenizer.encode(_prefix("foundry"))
        sent = first.send("native", {"input_ids": ids + [101, 102], "sampling_params": _GREEDY})
        assert sent.route.index == "events"
        holder = sent.route.prefill.url
        _wait(lambda: second.cache_status()[holder].get("blocks", 0) >= len(ids), 30, "the ids to be indexed")
        again = second.send("native", {"input_ids": ids + [103, 104, 105], "sampling_params": _GREEDY})
        assert again.route.prefill.url == holder and again.route.rule == "prefix_match", again.route.reason
        assert again.answer["meta_info"]["cached_tokens"] >= 0.9 * len(ids)


def test_a_flush_empties_the_index_and_the_status_reports_each_stream(cluster):
    with _client(cluster) as client:
        client.request({"text": _prefix("granary") + "Q?", "sampling_params": _GREEDY})
        _wait(lambda: _indexed(client) > 0, 30, "blocks to be indexed")
        _wait(lambda: all(s["load_age_s"] is not None for s in client.cache_status().values()), 10,
              "every server's LoadStat (published about once a second)")
        status = client.cache_status()
        assert set(status) == set(cluster.prefill_urls)
        for stream in status.values():
            assert stream["index"] == "events" and stream["replays"] >= 1 and stream["errors"] == 0
            assert stream["load_age_s"] is not None and stream["load_age_s"] < 5  # LoadStat keeps coming
        assert any(s["last_event_age_s"] is not None and s["event_lag_s"] < 5 for s in status.values())
        client.flush_cache()
        _wait(lambda: _indexed(client) == 0, 30, "the flushed servers' index to empty")


def test_without_events_the_approximate_record_routes_and_says_so(cluster):
    with _client(cluster, kv_events=False) as client:
        delivered = client.send("native", {"text": _prefix("tannery") + "Q?", "sampling_params": _GREEDY})
        assert delivered.route.index == "approximate" and "approximate" in delivered.route.reason
        assert {s["index"] for s in client.cache_status().values()} == {"approximate"}
        again = client.send("native", {"text": _prefix("tannery") + "Q2?", "sampling_params": _GREEDY})
        assert again.route.prefill.url == delivered.route.prefill.url and again.route.rule == "prefix_match"


def test_no_thread_or_socket_outlives_close(cluster):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    warm = _client(cluster)  # first use loads libraries and opens their files for good
    warm.close()
    threads, files = set(threading.enumerate()), fds()
    for _ in range(3):
        client = _client(cluster)
        client.request({"text": "Hello", "sampling_params": _GREEDY})
        assert any(t.name == "sgl-pd-kv-events" for t in threading.enumerate())
        client.close()
    _wait(lambda: set(threading.enumerate()) <= threads, 10, "every client thread to end")
    assert fds() <= files + 2, "sockets or files left open by closed clients"
