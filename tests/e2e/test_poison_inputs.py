"""Inputs SGLang 0.5.23 accepts but that kill or hang its servers: refused before sending, servers untouched.

Each body below, sent raw, crashed a server or hung a PD pair (or made a server
answer HTTP 500, which the adapter would retry on every pair); see
``backends/adapter/_poison.py`` for what each does to which server. Through the
adapter each must raise :class:`BadRequestError` naming the field, send
nothing, and leave every server of the session cluster healthy.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from backends import BadRequestError
from backends.adapter._poison import VOCAB_PROBE, vocab_size_from_probe

SP = {"max_new_tokens": 2, "temperature": 0}
VOCAB, OVER_VOCAB = "VOCAB", "VOCAB+1"  # replaced by the served model's vocabulary size (plus one)

# (name, body, the field the message must name, also kills a colocated server)
POISON = [
    ("empty text", {"text": ""}, "text", True),
    ("empty text in a batch", {"text": ["hello", ""]}, "text[1]", True),
    ("empty input_ids row", {"input_ids": [[101, 102, 103], []]}, "input_ids[1]", False),
    ("token id == vocab size", {"input_ids": [5, 6, VOCAB]}, "input_ids", True),
    ("negative token id", {"input_ids": [5, -1, 6]}, "input_ids", True),
    ("text with empty input_ids", {"text": "hello", "input_ids": []}, "input_ids", True),
    ("text and input_ids of different shapes", {"text": ["a", "b"], "input_ids": [5, 6]}, "input_ids", False),
    ("top logprobs over the PD buffer", {"text": "hi", "return_logprob": True, "top_logprobs_num": 129},
     "top_logprobs_num", False),
    ("top logprobs over the vocabulary", {"text": "hi", "return_logprob": True, "top_logprobs_num": OVER_VOCAB},
     "top_logprobs_num", True),
    ("parallel sampling", {"text": "hi", "sampling_params": {**SP, "n": 2}}, "n", False),
    ("parallel sampling of a batch", {"input_ids": [[5, 6], [7, 8]], "sampling_params": {**SP, "n": 2}}, "n", False),
    ("list logprob_start_len for one prompt", {"text": "hi", "return_logprob": True, "logprob_start_len": [0]},
     "logprob_start_len", True),
    ("list top_logprobs_num for one prompt", {"text": "hi", "return_logprob": True, "top_logprobs_num": [2]},
     "top_logprobs_num", True),
    ("list return_hidden_states for one prompt", {"text": "hi", "return_hidden_states": [False]},
     "return_hidden_states", True),
    ("sampling_params list for one prompt", {"text": "hi", "sampling_params": [SP]}, "sampling_params", False),
    ("sampling_params list shorter than the batch", {"text": ["a b", "c d", "e"], "sampling_params": [SP, SP]},
     "sampling_params", False),
    ("logprob_start_len list shorter than the batch",
     {"text": ["a b", "c d"], "return_logprob": True, "logprob_start_len": [0]}, "logprob_start_len", False),
    ("stop_regex that does not compile", {"text": "hi", "sampling_params": {**SP, "stop_regex": "(bad"}},
     "stop_regex", False),
    ("sampling choice", {"text": "hi", "sampling_params": {**SP, "choice": ["x"]}}, "choice", False),
    ("positional_embed_overrides", {"text": "hi", "positional_embed_overrides": {"x": 1}},
     "positional_embed_overrides", True),
    ("decode told another prefill DP rank", {"text": "hi", "disagg_prefill_dp_rank": 3}, "disagg_prefill_dp_rank",
     False),
]


@pytest.fixture(scope="module")
def vocab_size(pd_backend) -> int:
    url = pd_backend.client.pools["prefill"][0].url
    answer = httpx.post(f"{url}/generate", json=VOCAB_PROBE, timeout=30)
    size = vocab_size_from_probe(answer.json()["error"]["message"])
    assert answer.status_code == 400 and size, answer.text
    return size


def _with_vocab(value, vocab_size: int):
    if isinstance(value, str) and value in (VOCAB, OVER_VOCAB):
        return vocab_size + (value == OVER_VOCAB)
    if isinstance(value, dict):
        return {k: _with_vocab(v, vocab_size) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_vocab(v, vocab_size) for v in value]
    return value


def _unhealthy(backend) -> list[str]:
    """Servers of ``backend`` whose ``/health`` fails (a busy server gets three tries)."""
    down = []
    for servers in backend.client.pools.values():
        for server in servers:
            for _ in range(3):
                try:
                    if httpx.get(f"{server.url}/health", timeout=30).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(5)
            else:
                down.append(server.url)
    return down


def _restarts(cluster) -> int:
    """Restarts by the cluster's supervisor so far (a reused cluster has none to report)."""
    restarts = getattr(cluster, "restarts", None)
    return len(restarts()) if callable(restarts) else 0


def _refused_before_sending(backend, cluster, body: dict, field: str) -> None:
    restarts = _restarts(cluster)
    with pytest.raises(BadRequestError) as caught:
        backend.client.request(body)
    message = str(caught.value)
    assert re.search(rf"(?<!\w){re.escape(field)}(?!\w)", message), message
    assert backend.metrics.records()[-1].attempts == 0, "the body reached a server"
    assert not _unhealthy(backend)
    assert _restarts(cluster) == restarts, "a server was restarted meanwhile"


@pytest.mark.parametrize("name, body, field, kills_colocated", POISON, ids=[p[0] for p in POISON])
def test_poison_is_refused_through_pd(pd_backend, cluster, vocab_size, name, body, field, kills_colocated):
    _refused_before_sending(pd_backend, cluster, _with_vocab(body, vocab_size), field)


COLOCATED_POISON = [p for p in POISON if p[3]]


@pytest.mark.parametrize("name, body, field, kills_colocated", COLOCATED_POISON, ids=[p[0] for p in COLOCATED_POISON])
def test_poison_is_refused_on_colocated_servers(colocated_backend, cluster, vocab_size, name, body, field,
                                                kills_colocated):
    _refused_before_sending(colocated_backend, cluster, _with_vocab(body, vocab_size), field)


def test_the_servers_still_serve_after_every_poison_kind(pd_backend, colocated_backend, vocab_size):
    body = {"input_ids": [[5, 6, vocab_size - 1], [7]], "sampling_params": [SP, SP], "return_logprob": True,
            "top_logprobs_num": 128}
    for backend in (pd_backend, colocated_backend):
        answers = backend.client.request(body)
        assert [len(answer["output_ids"]) for answer in answers] == [2, 2]
