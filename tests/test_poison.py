"""The pre-send check against SGLang 0.5.23's poison inputs: one test per refused kind, and valid bodies pass."""

from __future__ import annotations

import time

import pytest

from backends.adapter._poison import (
    PD_TOP_LOGPROBS_CAPACITY,
    VOCAB_PROBE,
    ServerLimits,
    check_generate_body,
    vocab_size_from_probe,
)
from backends.errors import BadRequestError

PD = ServerLimits(vocab_size=4096, disaggregation_mode="prefill")
COLOCATED = ServerLimits(vocab_size=4096)
SP = {"max_new_tokens": 4, "temperature": 0}


def refused(body, limits=PD) -> str:
    with pytest.raises(BadRequestError) as caught:
        check_generate_body(body, limits)
    return str(caught.value)


@pytest.mark.parametrize("limits", [PD, COLOCATED])
@pytest.mark.parametrize("body", [
    {"text": "hello", "sampling_params": SP},
    {"text": ["a", "b c"], "sampling_params": [SP, {**SP, "max_new_tokens": 1}]},
    {"text": ["a", "b"], "sampling_params": SP, "return_logprob": [True, False], "logprob_start_len": [0, -1],
     "top_logprobs_num": [5, 0]},
    {"input_ids": [1, 2, 4095], "sampling_params": SP, "return_logprob": True, "top_logprobs_num": 128},
    {"input_ids": [[0, 1, 2], [3, 4095]], "sampling_params": [SP, SP], "rid": ["r1", "r2"]},
    {"input_ids": [[5, 6]], "sampling_params": [SP, SP, SP]},  # a longer list: SGLang ignores the rest
    {"text": [], "sampling_params": SP},  # SGLang answers []
    {"input_ids": [], "sampling_params": SP},  # SGLang's own 400
    {"text": "", "input_ids": [5, 6], "sampling_params": SP},  # input_ids are what gets prefilled
    {"text": "a", "sampling_params": {**SP, "n": 1, "stop_regex": ["a+", "b?"]}},
    {"text": "a", "top_logprobs_num": 100000, "sampling_params": SP},  # ignored without return_logprob
    {"text": "a", "token_ids_logprob": [1, 2, 3], "return_logprob": True, "sampling_params": SP},
    {"text": ["a", "b"], "token_ids_logprob": [1, 2, 3], "return_logprob": True, "sampling_params": SP},
    {"input_ids": ["x", 2], "sampling_params": SP},  # not ids at all: SGLang's 400
    {"text": "a", "disagg_prefill_dp_rank": 0, "sampling_params": SP},
    {"text": "a", "return_logprob": [True], "bootstrap_room": [5], "sampling_params": SP},  # served by SGLang
    {"text": ["a", "b"], "input_ids": [[5], [6, 7]], "sampling_params": SP},
    {"text": "a", "positional_embed_overrides": None, "sampling_params": SP},
])
def test_valid_bodies_pass(body, limits):
    check_generate_body(body, limits)


def test_empty_text_is_refused():
    assert "text is an empty string" in refused({"text": "", "sampling_params": SP}, COLOCATED)
    assert "text[1] is an empty string (batch of 2)" in refused({"text": ["hi", ""], "sampling_params": SP})


def test_empty_input_ids_row_is_refused():
    message = refused({"input_ids": [[101, 102, 103], []], "sampling_params": SP})
    assert "input_ids[1] is an empty list (batch of 2)" in message and "drop the item" in message


@pytest.mark.parametrize("ids, bad", [([5, 6, 4096], 4096), ([5, -1, 6], -1), ([[1], [2, 99999]], 99999)])
def test_token_ids_outside_the_vocabulary_are_refused(ids, bad):
    message = refused({"input_ids": ids, "sampling_params": SP}, COLOCATED)
    assert f"holds token id {bad}" in message and "[0, 4096)" in message


@pytest.mark.parametrize("bad", [4096, -1, 2**40])
def test_long_rows_take_the_vectorised_path_and_find_the_same_ids(bad):
    row = [7] * 300
    row[150] = bad
    assert f"holds token id {bad}" in refused({"input_ids": row}, COLOCATED)
    check_generate_body({"input_ids": [7] * 299 + ["x"]}, COLOCATED)  # not ids: SGLang's own 400


def test_ids_are_not_range_checked_without_a_vocabulary_size():
    check_generate_body({"input_ids": [5, 99999]}, ServerLimits(vocab_size=None))


def test_top_logprobs_over_the_pd_buffer_are_refused_in_pd_only():
    body = {"text": "a", "return_logprob": True, "top_logprobs_num": PD_TOP_LOGPROBS_CAPACITY + 1}
    assert "at most 128" in refused(body, PD)
    check_generate_body(body, COLOCATED)
    batch = {"text": ["a", "b"], "return_logprob": [False, True], "top_logprobs_num": [500, 200]}
    assert "top_logprobs_num[1] is 200" in refused(batch, PD)


def test_top_logprobs_over_the_vocabulary_are_refused():
    assert "the model has 4096 tokens" in refused({"text": "a", "return_logprob": True, "top_logprobs_num": 4097}, COLOCATED)


@pytest.mark.parametrize("body", [{"text": "a", "sampling_params": {"n": 2}},
                                  {"text": ["a", "b"], "sampling_params": [SP, {**SP, "n": 3}]}])
def test_parallel_sampling_is_refused_in_pd_only(body):
    assert ".n is" in refused(body, PD) and "requests instead" in refused(body, PD)
    check_generate_body(body, COLOCATED)


@pytest.mark.parametrize("field, value", [("logprob_start_len", [0]), ("top_logprobs_num", [2]),
                                          ("return_hidden_states", [False]), ("sampling_params", [SP]),
                                          ("rid", ["r"])])
def test_lists_for_one_prompt_are_refused(field, value):
    message = refused({"input_ids": [5, 6, 7], "return_logprob": True, field: value}, COLOCATED)
    assert message.startswith(f"{field} is a list of 1 for one prompt")


@pytest.mark.parametrize("field, value", [("sampling_params", []), ("sampling_params", [SP]),
                                          ("logprob_start_len", [0]), ("return_logprob", [True]),
                                          ("top_logprobs_num", [2]), ("lora_path", [None]),
                                          ("token_ids_logprob", [[1, 2]]), ("bootstrap_room", [1])])
def test_per_item_lists_shorter_than_the_batch_are_refused(field, value):
    message = refused({"text": ["a b", "c d", "e"], field: value}, COLOCATED)
    assert message.startswith(f"{field} is a list of {len(value)} for a batch of 3")


def test_stop_regex_that_does_not_compile_is_refused():
    assert "sampling_params.stop_regex '(bad' does not compile" in refused(
        {"text": "a", "sampling_params": {"stop_regex": "(bad"}}, COLOCATED)
    assert "sampling_params[1].stop_regex" in refused(
        {"text": ["a", "b"], "sampling_params": [SP, {"stop_regex": ["ok", "[z"]}]}, COLOCATED)


@pytest.mark.parametrize("body", [{"text": "hello", "input_ids": []},
                                  {"text": ["a", "b"], "input_ids": [5, 6]},
                                  {"text": "a", "input_ids": [[5], [6]]},
                                  {"text": ["a", "b", "c"], "input_ids": [[5], [6]]}])
def test_text_and_input_ids_of_different_shapes_are_refused(body):
    assert "given with text" in refused(body, COLOCATED)


def test_ids_are_checked_when_text_comes_too():
    assert "holds token id 4096" in refused({"text": "hello", "input_ids": [5, 4096]}, COLOCATED)


def test_choice_is_refused():
    assert "sampling_params.choice is set" in refused({"text": "a", "sampling_params": {"choice": ["x"]}}, COLOCATED)


def test_positional_embed_overrides_are_refused():
    assert "positional_embed_overrides is set" in refused({"text": "a", "positional_embed_overrides": {"x": 1}})


def test_dp_rank_hints_are_refused_in_pd():
    assert "disagg_prefill_dp_rank is 3" in refused({"text": "a", "disagg_prefill_dp_rank": 3})
    check_generate_body({"text": "a", "disagg_prefill_dp_rank": 3}, COLOCATED)
    dp = ServerLimits(vocab_size=4096, disaggregation_mode="prefill", dp_size=2)
    assert "routed_dp_rank is 1" in refused({"text": "a", "routed_dp_rank": 1}, dp)
    check_generate_body({"text": "a", "routed_dp_rank": 0}, PD)  # dp 1: SGLang ignores 0, 400s the rest


def test_limits_from_server_json_and_the_vocabulary_probe():
    limits = ServerLimits.from_json({"disaggregation_mode": "prefill", "dp_size": 2}, {"model_path": "m"},
                                    vocab_size=vocab_size_from_probe(
                                        "token_ids_logprob contains out-of-vocabulary token id 4611686018427387904; "
                                        "valid range is [0, 4096)."))
    assert limits == ServerLimits(vocab_size=4096, disaggregation_mode="prefill", dp_size=2) and limits.pd
    assert not ServerLimits.from_json({"disaggregation_mode": "null"}).pd
    assert vocab_size_from_probe("something else") is None and VOCAB_PROBE["token_ids_logprob"][0] >= 2**62


def _best_per_call(function, rounds: int = 50) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            function()
        best = min(best, (time.perf_counter() - started) / rounds)
    return best


def test_the_check_costs_about_two_passes_over_the_ids():
    # Relative to one C-level pass (max) over the same tokens, so a loaded 2-core machine does not
    # fail it; a Python-level loop over the ids would cost 10x a pass and fail it.
    rows = [[(i * 7919 + j) % 4096 for i in range(2000)] for j in range(16)]
    batch = {"input_ids": rows, "sampling_params": [SP] * 16, "return_logprob": True, "top_logprobs_num": 5}
    one_pass = _best_per_call(lambda: [max(row) for row in rows])
    check = _best_per_call(lambda: check_generate_body(batch, PD))
    assert check < 3 * one_pass + 50e-6, f"check {check * 1e6:.0f} us vs one pass {one_pass * 1e6:.0f} us"
