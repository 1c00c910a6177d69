"""The first slice end to end: programs through PDBackend on real prefill/decode servers."""

from __future__ import annotations

import time

import pytest
import sglang as sgl
from transformers import AutoTokenizer

from backends import ensure_tiny_model
from backends.errors import BadRequestError
from sgl_programs import chat_completion

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "In the beginning there was",
    "class Config:\n    def __init__(self",
    "Once upon a time, in a land far away,",
]


def _greedy(backend, text: str, tokens: int = 24) -> dict:
    return backend.client.request({"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": tokens}})


def test_pd_output_equals_colocated_token_for_token(pd_backend, colocated_backend):
    for prompt in PROMPTS:
        pd, ref = _greedy(pd_backend, prompt), _greedy(colocated_backend, prompt)
        assert pd["output_ids"] == ref["output_ids"], prompt
        assert pd["text"] == ref["text"]
        assert len(pd["output_ids"]) > 0
    # Every PD request really went through a prefill server and the decode server.
    records = [r for r in pd_backend.metrics.records() if r.kind == "native"][-len(PROMPTS):]
    assert all(r.mode == "pd" and r.prefill and r.decode and r.error is None for r in records)


def test_chat_completion_same_reply_on_pd_and_colocated(pd_backend, colocated_backend):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    pd = chat_completion.run(messages=messages, max_tokens=16, backend=pd_backend)
    ref = chat_completion.run(messages=messages, max_tokens=16, backend=colocated_backend)
    assert pd.error() is None and ref.error() is None
    assert pd["reply"] == ref["reply"]
    # The prompt was rendered with the model's own (ChatML) template, not SGLang's generic guess.
    assert "<|im_start|>user\nName a prime.<|im_end|>" in pd.text()


def test_streamed_chunks_concatenate_to_the_full_text(pd_backend):
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    full = chat_completion.run(messages=messages, max_tokens=32, backend=pd_backend)
    state = chat_completion.run(messages=messages, max_tokens=32, stream=True, backend=pd_backend)
    chunks = list(state.text_iter("reply"))
    assert len(chunks) > 1, "the reply arrived in one piece: not streamed"
    assert "".join(chunks) == full["reply"] == state["reply"]


def test_native_stream_ends_with_the_non_streamed_answer(any_backend):
    body = {"text": "The lighthouse keeper wrote",
            "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
    whole = any_backend.client.request(body)
    events = list(any_backend.client.request_stream(body))
    assert len(events) > 1, "the answer arrived in one piece: not streamed"
    texts = [e["text"] for e in events]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # cumulative, like SGLang
    assert texts[-1] == whole["text"]
    assert events[-1]["meta_info"]["completion_tokens"] == whole["meta_info"]["completion_tokens"] == 16
    assert not any_backend.client.loads()


def test_run_batch_of_16(pd_backend):
    items = [{"messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": 8} for i in range(16)]
    states = chat_completion.run_batch(items, backend=pd_backend, num_threads=8)
    assert len(states) == 16
    assert [s.error() for s in states] == [None] * 16
    assert all(isinstance(s["reply"], str) for s in states)


def test_shared_prefix_hits_the_prefill_cache(pd_backend):
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    prefix = " ".join(f"Line {i}: the archive records entry {i * 7} in ledger {i % 13}." for i in range(60))
    prefix_tokens = len(tokenizer(prefix)["input_ids"])
    assert prefix_tokens >= 500
    _greedy(pd_backend, prefix + " First question?", tokens=2)
    second = _greedy(pd_backend, prefix + " Second question?", tokens=2)
    assert second["meta_info"]["cached_tokens"] >= 0.9 * prefix_tokens


def test_bad_sampling_parameter_raises_the_servers_message(pd_backend):
    started = time.monotonic()
    with pytest.raises(BadRequestError) as caught:
        pd_backend.client.request({"text": "hello", "sampling_params": {"max_new_tokens": 4, "not_a_param": 1}})
    assert "not_a_param" in str(caught.value)
    assert caught.value.status == 400
    assert time.monotonic() - started < 10


def test_bad_temperature_inside_a_program_surfaces_in_state_error(pd_backend):
    @sgl.function
    def hot(s):
        s += "Hi" + sgl.gen("x", max_tokens=4, temperature=-1.0)

    state = hot.run(backend=pd_backend)
    assert isinstance(state.error(), BadRequestError)
    assert "temperature" in str(state.error())
