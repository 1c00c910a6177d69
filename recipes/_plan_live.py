"""The parts of ``recipes.plan_pd`` that talk to real servers: profiling and validation runs.

Only the public API is used: ``PDCluster`` / ``SGLangPDConfig`` to launch, the adapter's
client (``PDClient``, or ``PDBackend`` on older layouts) to send native ``/generate`` bodies,
and its ``metrics.records()``. Prompts are made of words the model's tokenizer holds as one
token each, so a workload's token counts and shared prefixes become real text.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from typing import Any, Iterator

import httpx
import numpy as np

import backends
from backends import PDCluster, SGLangPDConfig
from backends.planner import CostModel, Workload, calibrate

__all__ = ["Texts", "live_cluster", "profile", "run_workload"]


def _client(prefill=(), decode=(), colocated=()):
    cls = getattr(backends, "PDClient", None) or backends.PDBackend
    return cls(prefill=list(prefill), decode=list(decode), colocated=list(colocated))


def _close(client) -> None:
    (getattr(client, "close", None) or client.shutdown)()


@contextlib.contextmanager
def live_cluster(prefill: int, decode: int, colocated: int, *, base_port: int, model: str | None,
                 urls: dict | None = None) -> Iterator[tuple[Any, dict]]:
    """A client over a launched cluster (stopped on exit) or over given ``urls``; and the prefill/colocated server's info."""
    cluster = None
    if urls is None:
        config = SGLangPDConfig(pd_ratio=(prefill, decode), colocated=colocated, base_port=base_port, model_path=model)
        cluster = PDCluster(config).start()
        urls = {"prefill": cluster.prefill_urls, "decode": cluster.decode_urls, "colocated": cluster.colocated_urls}
    client = None
    try:
        client = _client(urls.get("prefill", ()), urls.get("decode", ()), urls.get("colocated", ()))
        first = (urls.get("prefill") or urls.get("colocated"))[0]
        info = httpx.get(f"{first}/server_info", timeout=30).json()
        yield client, {**info, "urls": urls}
    finally:
        if client is not None:
            _close(client)
        if cluster is not None:
            cluster.stop()


class Texts:
    """Prompt text with known token counts: single-token words, a shared stream per group."""

    def __init__(self, model_path: str, seed: int = 0) -> None:
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(model_path).get_vocab()
        self.words = sorted(t[1:] for t in vocab if t.startswith("\u0120") and re.fullmatch(r"[a-z]{3,}", t[1:]))
        if len(self.words) < 100:
            raise ValueError(f"{model_path}: too few single-token words ({len(self.words)}) to build prompts")
        self.seed, self.streams = seed, {}

    def _words(self, key: str, n: int) -> list[str]:
        rng = random.Random(f"{self.seed}/{key}")
        return [rng.choice(self.words) for _ in range(n)]

    def prompt(self, i: int, tokens: int, group: int = -1, prefix: int = 0) -> str:
        """Request ``i``: ``prefix`` words of group ``group``'s stream, then its own words, ``tokens`` in all."""
        shared = []
        if group >= 0 and prefix > 0:
            if len(self.streams.get(group, ())) < prefix:
                self.streams[group] = self._words(f"group/{group}", max(prefix, 2 * len(self.streams.get(group, ()))))
            shared = self.streams[group][:prefix]
        return " ".join(shared + self._words(f"request/{i}", max(tokens - len(shared), 1)))


def _body(text: str, out: int) -> dict:
    return {"text": text, "sampling_params": {"max_new_tokens": int(out), "ignore_eos": True, "temperature": 0.0}}


def _record(r: Any) -> dict:
    return asdict(r) if is_dataclass(r) else dict(r)


def _loads(url: str) -> dict:
    return httpx.get(f"{url}/v1/loads", params={"include": "core,disagg"}, timeout=30).json()


def profile(client, info: dict, texts: Texts, *, lengths=(64, 256, 1024), batches=(2, 4, 8), repeats: int = 2,
            source: str = "calibrated") -> tuple[CostModel, dict, list[dict]]:
    """A short profiling run on a 1:1 PD pair, then :func:`calibrate` (costs, fit report, records).

    One request at a time: ``lengths`` x cached shares of 0, 50 and 90 % (each prefix warmed by a
    request of its own first), outputs of 4, 16 and 32 tokens; then ``batches`` of 128-token
    prompts sent together, 32 tokens each. Everything ``repeats`` times.
    """
    urls, records = info["urls"], []
    loads_before = {role: [_loads(urls[role][0])] for role in ("prefill", "decode")}
    take = lambda start: [{**_record(r), "start": start} for r in client.metrics.records()[len(records):]]  # noqa: E731
    key, outs = 0, [4, 16, 32]
    for length in [n for n in lengths for _ in range(repeats)]:  # one at a time: prefill legs alone
        for frac in (0.0, 0.5, 0.9):
            cached = int(length * frac)
            if cached:
                start = time.monotonic()
                client.request(_body(texts.prompt(key, cached + 8, key, cached), 2))
                records += take(start)
            start = time.monotonic()
            client.request(_body(texts.prompt(key + 1, length, key, cached), outs[key % 3]))
            records += take(start)
            key += 2
    for b in [n for n in batches for _ in range(repeats)]:  # b at once: the decode batch
        start = time.monotonic()
        with ThreadPoolExecutor(b) as pool:
            list(pool.map(lambda j: client.request(_body(texts.prompt(key + j, 128), 32)), range(b)))
        records += take(start)
        key += b
    loads = {role: loads_before[role] + [_loads(urls[role][0])] for role in ("prefill", "decode")}
    decode_info = httpx.get(f"{urls['decode'][0]}/server_info", timeout=30).json()
    chunk = int(info.get("chunked_prefill_size") or 0)  # <= 0: SGLang does not chunk
    base = CostModel(kv_capacity_tokens=int(info.get("max_total_num_tokens") or 1_000_000),
                     max_prefill_tokens=chunk if chunk > 0 else int(info.get("max_prefill_tokens") or 16384),
                     max_running_requests=int(decode_info.get("max_running_requests") or 256))
    cal = calibrate(records, loads=loads, base=base, source=source)
    return cal.costs, cal.report, records


def run_workload(client, workload: Workload, texts: Texts, *, stream: bool = False, workers: int = 64) -> dict:
    """Send ``workload`` at its arrival times (open loop); what the client measured, in the planner's terms."""
    bodies = [_body(texts.prompt(i, int(workload.prompt_tokens[i]), int(workload.group[i]), int(workload.prefix_tokens[i])),
                    int(workload.output_tokens[i])) for i in range(len(workload))]
    done, errors, lock = [], [], threading.Lock()

    def send(body: dict) -> None:
        try:
            if stream:
                for _ in client.request_stream(body):
                    pass
            else:
                client.request(body)
        except Exception as exc:  # counted, not raised: the run goes on
            with lock:
                errors.append(repr(exc))
        with lock:
            done.append(time.monotonic())

    before = len(client.metrics.records())
    t0 = time.monotonic()
    with ThreadPoolExecutor(min(workers, len(bodies))) as pool:
        for i, body in enumerate(bodies):
            time.sleep(max(0.0, t0 + float(workload.arrival_s[i]) - time.monotonic()))
            pool.submit(send, body)
    records = [r for r in client.metrics.records()[before:] if getattr(r, "error", None) is None]
    ttft = np.array([r.ttft for r in records if r.ttft is not None], dtype=float)
    tpot = np.array([r.decode_time / (r.completion_tokens - 1) for r in records
                     if r.decode_time is not None and r.completion_tokens > 1], dtype=float)
    prompt = sum(r.prompt_tokens for r in records)
    return {"records": [_record(r) for r in records], "errors": errors, "makespan_s": max(done) - t0 if done else 0.0,
            "ttft": ttft, "tpot": tpot, "cache_hit_ratio": sum(r.cached_tokens for r in records) / prompt if prompt else 0.0}
