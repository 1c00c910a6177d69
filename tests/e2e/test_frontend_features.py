"""Every frontend feature through PD gives what the colocated server gives (greedy decoding)."""

from __future__ import annotations

import json
import re

import pytest
import sglang as sgl

from backends.errors import BadRequestError

COLORS = ["red", "green", "blue", "yellow"]


@sgl.function
def pick_color(s, question):
    s += "Question: " + question + "\nAnswer: "
    s += sgl.select("color", choices=COLORS)


@sgl.function
def pick_with_unconditional(s, question):
    s += question + " "
    s += sgl.select("word", choices=["alpha", "beta", "gamma"], choices_method=sgl.unconditional_likelihood_normalized)


@sgl.function
def branches(s, topic):
    s += "Topic: " + topic + "\n"
    s.text()  # let the executor catch up: fork() warms the shared text only if it has run
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += f"Draft {i}:" + sgl.gen("draft", max_tokens=8, temperature=0)
    forks.join()
    s += "Best:" + sgl.gen("best", max_tokens=6, temperature=0)


@sgl.function
def constrained(s, name):
    s += f"Record for {name}. Phone: " + sgl.gen("phone", max_tokens=20, regex=r"\d{3}-\d{4}", temperature=0)
    s += "\nAge: " + sgl.gen("age", dtype=int, max_tokens=4, temperature=0)


SCHEMA = {
    "type": "object",
    # Bounded values: the random model would otherwise write digits until max_tokens.
    "properties": {"name": {"type": "string", "maxLength": 8}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "count"],
    "additionalProperties": False,
}


@sgl.function
def json_record(s):
    s += "Output a JSON record: " + sgl.gen("record", max_tokens=64, json_schema=json.dumps(SCHEMA), temperature=0)


@sgl.function
def with_options(s):
    s += "Count: " + sgl.gen("a", max_tokens=12, min_tokens=6, stop=["\n\n"], temperature=0)
    s += sgl.gen("b", max_tokens=5, temperature=0, return_logprob=True, top_logprobs_num=2, logprob_start_len=0)


def _both(program, pd_backend, colocated_backend, **kwargs):
    pd = program.run(**kwargs, backend=pd_backend)
    ref = program.run(**kwargs, backend=colocated_backend)
    assert pd.error() is None, pd.error()
    assert ref.error() is None, ref.error()
    return pd, ref


def test_select_matches_colocated(pd_backend, colocated_backend):
    for question in ["What colour is the sky?", "Pick one.", "def f(x): return"]:
        pd, ref = _both(pick_color, pd_backend, colocated_backend, question=question)
        assert pd["color"] in COLORS
        assert pd["color"] == ref["color"]
        # The decision rests on the same prompt logprobs: prefill's, merged in front of decode's.
        assert pd.get_meta_info("color")["normalized_prompt_logprobs"] == ref.get_meta_info("color")[
            "normalized_prompt_logprobs"
        ]


def test_select_calls_stay_on_one_prefill_server(pd_backend):
    before = len(pd_backend.metrics.records())
    state = pick_with_unconditional.run(question="Choose a word:", backend=pd_backend)
    assert state.error() is None  # also waits for the program to finish
    select_records = [r for r in pd_backend.metrics.records()[before:] if r.kind == "select"]
    assert len(select_records) == 3  # prompt, choices, unconditional
    assert len({r.prefill for r in select_records}) == 1


def test_unconditional_select_matches_colocated(pd_backend, colocated_backend):
    pd, ref = _both(pick_with_unconditional, pd_backend, colocated_backend, question="Choose a word:")
    assert pd["word"] == ref["word"]


def test_fork_and_join_match_colocated(pd_backend, colocated_backend):
    before = len(pd_backend.metrics.records())
    pd, ref = _both(branches, pd_backend, colocated_backend, topic="lighthouses")
    drafts = pd["draft"]  # join() gathers each branch's variable into a list
    assert isinstance(drafts, list) and len(drafts) == 3 and all(drafts)
    assert drafts == ref["draft"] and pd["best"] == ref["best"]
    kinds = [r.kind for r in pd_backend.metrics.records()[before:]]
    assert kinds[0] == "warm"  # fork(3) prefilled the shared text once before the branches


def test_regex_and_dtype_match_colocated(pd_backend, colocated_backend):
    pd, ref = _both(constrained, pd_backend, colocated_backend, name="Ada")
    assert re.fullmatch(r"\d{3}-\d{4}", pd["phone"])
    assert re.fullmatch(r"[+-]?\d+", pd["age"].strip())
    assert (pd["phone"], pd["age"]) == (ref["phone"], ref["age"])


def test_json_schema_matches_colocated(pd_backend, colocated_backend):
    pd, ref = _both(json_record, pd_backend, colocated_backend)
    record = json.loads(pd["record"])
    assert set(record) == {"name", "count"} and isinstance(record["count"], int)
    assert pd["record"] == ref["record"]


def test_min_tokens_stop_and_logprobs_match_colocated(pd_backend, colocated_backend):
    pd, ref = _both(with_options, pd_backend, colocated_backend)
    assert pd["a"] == ref["a"] and pd["b"] == ref["b"]
    assert pd.get_meta_info("a")["completion_tokens"] >= 6
    pd_meta, ref_meta = pd.get_meta_info("b"), ref.get_meta_info("b")
    assert pd_meta["input_token_logprobs"] == ref_meta["input_token_logprobs"]
    assert len(pd_meta["input_token_logprobs"]) == pd_meta["prompt_tokens"]
    # Same tokens; values agree to bf16 noise (PD decode batches differ from colocated ones).
    for pd_top, ref_top in zip(pd_meta["output_top_logprobs"], ref_meta["output_top_logprobs"]):
        assert [t[1] for t in pd_top] == [t[1] for t in ref_top]
        assert [t[0] for t in pd_top] == pytest.approx([t[0] for t in ref_top], abs=1e-2)


def test_run_batch_hoists_the_shared_prefix(pd_backend):
    @sgl.function
    def prefixed(s, question):
        s += "You are a careful assistant. Answer every question in one short line. " * 3
        s += "Q: " + question + "\nA:" + sgl.gen("a", max_tokens=4, temperature=0)

    before = len(pd_backend.metrics.records())
    states = prefixed.run_batch([{"question": f"q{i}"} for i in range(4)], backend=pd_backend)
    assert [s.error() for s in states] == [None] * 4
    kinds = [r.kind for r in pd_backend.metrics.records()[before:]]
    assert kinds[0] == "warm" and kinds.count("gen") == 4


def test_flush_cache_empties_every_server(pd_backend):
    text = "Flush me please. " * 40
    pd_backend.client.request({"text": text, "sampling_params": {"max_new_tokens": 1}})
    assert pd_backend.client.request({"text": text, "sampling_params": {"max_new_tokens": 1}})["meta_info"]["cached_tokens"] > 0
    sgl.flush_cache(backend=pd_backend)
    assert pd_backend.client.request({"text": text, "sampling_params": {"max_new_tokens": 1}})["meta_info"]["cached_tokens"] == 0


def test_bad_regex_is_refused_before_sending(pd_backend):
    before = len(pd_backend.metrics.records())
    with pytest.raises(BadRequestError, match="regex"):
        pd_backend.client.request({"text": "x", "sampling_params": {"max_new_tokens": 4, "regex": "([a-z"}})
    assert len(pd_backend.metrics.records()) == before + 1
    assert pd_backend.metrics.records()[-1].attempts == 0  # refused before any server saw it
