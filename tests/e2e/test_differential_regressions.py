"""Faults found by trying the adapter as a new user would (issue 11) and by the differential harness.

Each was one instance of a kind; the kind is fixed in the library and these
pin the instances, on real servers, PD and colocated.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import sglang as sgl
from sglang.lang.ir import SglSamplingParams

from backends import PDClient, RequestTimeoutError, Timeouts
from tests.e2e.differential import assert_same, direct, through


@sgl.function
def _pick(s, method):
    s += "The weather today is"
    s += sgl.select("answer", choices=[" sunny", " rainy", " cold and grey"], choices_method=method)


@pytest.mark.parametrize("method", [sgl.token_length_normalized, sgl.greedy_token_selection,
                                    sgl.unconditional_likelihood_normalized],
                         ids=["token_length_normalized", "greedy_token_selection", "unconditional"])
def test_every_choices_method_selects_the_same_on_pd_and_colocated(method, pd_backend, colocated_backend):
    # greedy_token_selection raised TypeError (None + float): SGLang returns no logprob for a range's first token.
    pd = _pick.run(method=method, backend=pd_backend)
    ref = _pick.run(method=method, backend=colocated_backend)
    assert pd.error() is None and ref.error() is None, (pd.error(), ref.error())
    assert pd["answer"] == ref["answer"] and pd["answer"] in (" sunny", " rainy", " cold and grey")


def test_a_total_timeout_raises_request_timeout_naming_the_server(cluster):
    # Was KeyError('http://HOST:PORT/generate') from the health tracker: errors named the endpoint.
    client = PDClient(prefill=cluster.prefill_urls, decode=cluster.decode_urls,
                      timeouts=Timeouts(connect=2.0, first_byte=60.0, total=3.0))
    try:
        with pytest.raises(RequestTimeoutError) as caught:
            client.request({"text": "Once upon a time", "sampling_params": {"max_new_tokens": 4000,
                                                                             "ignore_eos": True}})
        assert caught.value.server in cluster.prefill_urls + cluster.decode_urls
    finally:
        client.close()


def test_a_batch_with_one_sampling_params_dict_per_item_matches_the_server(cluster, pd_backend, colocated_backend):
    # Was refused ("max_new_tokens must be a non-negative integer, got 'temperature'") or a plain ValueError.
    body = {"text": ["The tide", "A lighthouse", "Once upon"],
            "sampling_params": [{"max_new_tokens": 2, "temperature": 0}, {"max_new_tokens": 5, "temperature": 0},
                                {"max_new_tokens": 9, "temperature": 0}]}
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert reference[0] == "ok" and [len(item["output_ids"]) for item in reference[1]] == [2, 5, 9]
    assert_same(reference, through(colocated_backend.client, body), url=url, body=body, pd=False)
    assert_same(reference, through(pd_backend.client, body), url=url, body=body, pd=True)
    # One-key dicts (crashed with a plain ValueError) sample at temperature 1: compare the shape only.
    one_key = {**body, "sampling_params": [{"max_new_tokens": n} for n in (2, 5, 9)]}
    kind, answer = through(pd_backend.client, one_key)
    assert kind == "ok" and [len(item["output_ids"]) for item in answer] == [2, 5, 9]


@sgl.function
def _story(s):
    s += "Once upon a time"
    s += sgl.gen("story", max_tokens=24, temperature=0, ignore_eos=True, return_logprob=True)


def test_a_streamed_gen_gives_each_chunk_only_its_new_logprobs(any_backend):
    # Was the cumulative list in every chunk, which SGLang's frontend concatenates again.
    params = SglSamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, return_logprob=True)
    chunks = list(any_backend.generate_stream(SimpleNamespace(text_="Once upon a time", sid=None), params))
    logprobs = [entry for _, meta in chunks for entry in meta["output_token_logprobs"]]
    assert len(chunks) > 1 and len(logprobs) == chunks[-1][1]["completion_tokens"] == 24
    # Through the frontend the text is exact and no logprob repeats. (SGLang's text_async_iter reads only
    # the latest chunk's meta_info when several chunks arrived between its wake-ups, interpreter.py
    # 984-998, so a consumer may see fewer than 24: the frontend's race, not the backend's.)
    state = _story.run(stream=True, backend=any_backend)

    async def collect():
        return [item async for item in state.text_async_iter("story", return_meta_data=True)]

    pieces = asyncio.run(collect())
    seen = [entry for _, meta in pieces for entry in meta.get("output_token_logprobs", [])]
    assert "".join(piece for piece, _ in pieces) == state["story"] and len(seen) <= 24


def test_a_streamed_pd_answer_carries_the_prompt_logprobs(cluster, pd_backend):
    # Found by the harness (100 examples): PD stream chunks had empty input_token_logprobs, as decode
    # never sees the prompt; the non-streamed answer merged prefill's, the stream did not.
    body = {"text": " os tide rose,The rose osThe os fellThe rose:) os", "stream": True, "return_logprob": True,
            "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert len(reference[1]["meta_info"]["input_token_logprobs"]) == reference[1]["meta_info"]["prompt_tokens"]
    assert_same(reference, through(pd_backend.client, body), url=url, body=body, pd=True)


@pytest.mark.parametrize("path", ["pd", "colocated"])
def test_a_request_its_grammar_cannot_finish_is_refused_without_costing_a_server(path, cluster, pd_backend,
                                                                                colocated_backend):
    # Found by the harness (200 examples): SGLang aborts it with HTTP 500 ("Grammar accept_token failed"),
    # the adapter retried it on every attempt and took the colocated server out of rotation. Now a known
    # request-caused answer: refused at once, like a 4xx.
    body = {"text": "Answer:", "sampling_params": {"max_new_tokens": 5, "min_new_tokens": 5, "temperature": 0,
                                                   "ebnf": 'root ::= "yes" | "no"'}}
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert reference[0] == "refused" and "Grammar accept_token failed" in reference[1]
    client = (pd_backend if path == "pd" else colocated_backend).client
    assert_same(reference, through(client, body), url=url, body=body, pd=path == "pd")
    assert client.metrics.records()[-1].attempts == 1
    assert all(state["healthy"] for state in client.health().values())


def test_zero_new_tokens_through_pd_lists_no_output_logprob(cluster, pd_backend):
    # Found by the harness (400 examples): a PD decode server lists the token prefill sampled.
    body = {"input_ids": [108, 147, 2573, 5], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0}}
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert reference[1]["meta_info"]["output_token_logprobs"] == []
    assert_same(reference, through(pd_backend.client, body), url=url, body=body, pd=True)
    # Found in CI (60 examples, fresh servers): in a batch holding a grammar, every item lists it.
    batch = {"input_ids": [[1224, 469, 446, 204], [57, 222, 1013, 124, 268]], "return_logprob": True,
             "sampling_params": [{"max_new_tokens": 0, "temperature": 0, "ebnf": 'root ::= "yes" | "no"'},
                                 {"max_new_tokens": 0, "temperature": 0}]}
    reference = direct(url, batch)
    assert [len(item["meta_info"]["output_token_logprobs"]) for item in reference[1]] == [1, 1]
    assert_same(reference, through(pd_backend.client, batch), url=url, body=batch, pd=True)


def test_a_custom_logit_processor_gets_the_servers_own_answer_through_pd(cluster, pd_backend):
    # Passed through, like every /generate field: the suite's servers run without
    # --enable-custom-logit-processor, so both paths carry the server's refusal.
    from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor

    body = {"text": "Hello", "custom_logit_processor": DisallowedTokensLogitsProcessor().to_str(),
            "sampling_params": {"max_new_tokens": 3, "temperature": 0, "custom_params": {"token_ids": [5]}}}
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert reference[0] == "refused" and "enable-custom-logit-processor" in reference[1]
    assert_same(reference, through(pd_backend.client, body), url=url, body=body, pd=True)
