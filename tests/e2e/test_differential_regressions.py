"""Faults found by trying the adapter as a new user would (issue 11) and by the differential harness.

Each was one instance of a kind; the kind is fixed in the library and these
pin the instances, on real servers, PD and colocated.
"""

from __future__ import annotations

import asyncio

import pytest
import sglang as sgl

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
    one_key = {**body, "sampling_params": [{"max_new_tokens": n} for n in (2, 5, 9)]}
    assert_same(direct(url, one_key), through(pd_backend.client, one_key), url=url, body=one_key, pd=True)


@sgl.function
def _story(s):
    s += "Once upon a time"
    s += sgl.gen("story", max_tokens=24, temperature=0, ignore_eos=True, return_logprob=True)


def test_a_streamed_gen_gives_each_chunk_only_its_new_logprobs(any_backend):
    # Was the cumulative list in every chunk, which SGLang's frontend concatenates again.
    state = _story.run(stream=True, backend=any_backend)

    async def collect():
        return [item async for item in state.text_async_iter("story", return_meta_data=True)]

    pieces = asyncio.run(collect())
    text = "".join(piece for piece, _ in pieces)
    logprobs = [entry for _, meta in pieces for entry in meta.get("output_token_logprobs", [])]
    assert text == state["story"] and len(pieces) > 1
    assert len(logprobs) == state.get_meta_info("story")["completion_tokens"] == 24
