"""backends.adapter._payloads: /generate bodies, PD legs (rids, bootstrap fields, rooms) and merged answers."""

import copy

import pytest
from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

from backends.adapter._payloads import (
    RoomAllocator,
    batch_size,
    check_sampling,
    merge_pd_answers,
    rids_of,
    routing_prompt,
    sampling_body,
    with_bootstrap,
    with_rids,
)
from backends.errors import BadRequestError

# ----- sampling_body ------------------------------------------------------------------


def test_sampling_body_is_the_servers_sampling_params_with_the_frontends_defaults():
    body = sampling_body(SglSamplingParams(max_new_tokens=7, temperature=0, stop=["\n\n"], top_k=5))
    params = body.pop("sampling_params")
    assert body == {}  # no logprob option asked, none sent
    assert params["skip_special_tokens"] is True and params["spaces_between_special_tokens"] is True
    assert (params["max_new_tokens"], params["temperature"], params["stop"], params["top_k"]) == (7, 0, ["\n\n"], 5)
    assert params["regex"] is None and "dtype" not in params


def test_sampling_body_puts_logprob_options_at_the_top_level():
    body = sampling_body(SglSamplingParams(return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                                           return_text_in_logprobs=True))
    assert (body["return_logprob"], body["logprob_start_len"], body["top_logprobs_num"],
            body["return_text_in_logprobs"]) == (True, 0, 3, True)
    assert not {"return_logprob", "logprob_start_len"} & set(body["sampling_params"])


@pytest.mark.parametrize("dtype, regex", [(int, REGEX_INT), ("int", REGEX_INT), (float, REGEX_FLOAT),
                                          ("float", REGEX_FLOAT)])
def test_a_numeric_dtype_becomes_its_regex_and_stops_at_a_space_or_newline(dtype, regex):
    params = SglSamplingParams(dtype=dtype)
    assert sampling_body(params)["sampling_params"]["regex"] == regex
    assert sampling_body(params)["sampling_params"]["stop"] == [" ", "\n"]
    with_stop = SglSamplingParams(dtype=dtype, stop="END")
    assert sampling_body(with_stop)["sampling_params"]["stop"] == ["END", " ", "\n"]
    listed = SglSamplingParams(dtype=dtype, stop=["a", "b"])
    assert sampling_body(listed)["sampling_params"]["stop"] == ["a", "b", " ", "\n"]
    assert listed.stop == ["a", "b"] and with_stop.stop == "END"  # the caller's params are not changed


@pytest.mark.parametrize("dtype, regex", [(str, REGEX_STR), ("str", REGEX_STR), (bool, REGEX_BOOL), ("bool", REGEX_BOOL)])
def test_a_str_or_bool_dtype_becomes_its_regex_without_extra_stops(dtype, regex):
    params = sampling_body(SglSamplingParams(dtype=dtype, stop="END"))["sampling_params"]
    assert params["regex"] == regex and params["stop"] == "END"


def test_a_dtype_overrides_a_regex_and_an_unknown_dtype_is_refused():
    assert sampling_body(SglSamplingParams(dtype=int, regex="x+"))["sampling_params"]["regex"] == REGEX_INT
    with pytest.raises(BadRequestError, match="dtype must be int, float, str or bool"):
        sampling_body(SglSamplingParams(dtype=list))


def test_check_sampling_refuses_what_no_server_can_serve():
    check_sampling({"text": "x", "sampling_params": {"regex": "[a-z]+", "max_new_tokens": 0}})
    check_sampling({"text": "x"})
    with pytest.raises(BadRequestError, match="does not compile"):
        check_sampling({"text": "x", "sampling_params": {"regex": "(unclosed"}})
    for limit in (-1, 2.5, "8"):
        with pytest.raises(BadRequestError, match="max_new_tokens"):
            check_sampling({"text": "x", "sampling_params": {"max_new_tokens": limit}})


# ----- batches, rids and bootstrap fields ---------------------------------------------


@pytest.mark.parametrize("body, size", [
    ({"text": "one"}, None), ({"text": ["a", "b", "c"]}, 3), ({"text": []}, 0),
    ({"input_ids": [1, 2, 3]}, None), ({"input_ids": [[1], [2, 3]]}, 2), ({"input_ids": []}, None), ({}, None),
])
def test_batch_size_counts_text_and_input_ids_batches(body, size):
    assert batch_size(body) == size


@pytest.mark.parametrize("body, prompt", [
    ({"text": "prompt"}, ("prompt", None)), ({"text": ["first", "second"]}, ("first", None)), ({"text": []}, ("", None)),
    ({"input_ids": [[1, 2], [3]]}, ("", [1, 2])), ({"input_ids": [1, 2]}, ("", [1, 2])), ({"input_ids": []}, ("", None)),
])
def test_routing_prompt_is_the_prompt_or_a_batchs_first(body, prompt):
    assert routing_prompt(body) == prompt


def test_with_rids_names_every_item_of_a_batch():
    single = {"text": "x", "sampling_params": {}}
    assert with_rids(single, "r")["rid"] == "r" and "rid" not in single
    assert with_rids({"text": ["a", "b", "c"]}, "r")["rid"] == ["r-0", "r-1", "r-2"]
    assert with_rids({"input_ids": [[1], [2]]}, "r")["rid"] == ["r-0", "r-1"]
    assert with_rids({"input_ids": [1, 2]}, "r")["rid"] == "r"


def test_rids_of_lists_a_legs_request_ids():
    assert rids_of({}) == [] and rids_of({"rid": "a"}) == ["a"] and rids_of({"rid": ["a-0", "a-1"]}) == ["a-0", "a-1"]


def test_with_bootstrap_pairs_one_prompt():
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    leg = with_bootstrap(body, "10.0.0.1", 8998, 1234)
    assert (leg["bootstrap_host"], leg["bootstrap_port"], leg["bootstrap_room"]) == ("10.0.0.1", 8998, 1234)
    assert leg["text"] == "x" and "bootstrap_room" not in body


def test_with_bootstrap_gives_a_batch_one_room_per_item_stepping_by_the_stride():
    leg = with_bootstrap({"text": ["a", "b", "c"]}, "h", 9000, 40)
    assert leg["bootstrap_room"] == [40, 41, 42]
    assert leg["bootstrap_host"] == ["h"] * 3 and leg["bootstrap_port"] == [9000] * 3
    on_rank = with_bootstrap({"input_ids": [[1], [2], [3]]}, "h", None, 42, stride=4)
    assert on_rank["bootstrap_room"] == [42, 46, 50] and on_rank["bootstrap_port"] == [None] * 3
    assert {room % 4 for room in on_rank["bootstrap_room"]} == {42 % 4}


# ----- merged answers -----------------------------------------------------------------


def _answer(text, **meta):
    return {"text": text, "output_ids": [7], "meta_info": {"completion_tokens": 1, **meta}}


def test_merge_puts_prefills_prompt_logprobs_before_decodes():
    prefill = _answer("", input_token_logprobs=[[None, 1, "a"], [-0.5, 2, "b"]], input_top_logprobs=[None, []],
                      prompt_tokens=2)
    decode = _answer(" out", input_token_logprobs=[], input_top_logprobs=[], output_token_logprobs=[[-0.1, 7, " out"]],
                     prompt_tokens=2)
    before = copy.deepcopy(decode)
    merged = merge_pd_answers(prefill, decode)
    assert merged["text"] == " out" and merged["output_ids"] == [7]
    meta = merged["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 1, "a"], [-0.5, 2, "b"]]
    assert meta["input_top_logprobs"] == [None, []]
    assert meta["output_token_logprobs"] == [[-0.1, 7, " out"]] and meta["completion_tokens"] == 1
    assert decode == before  # decode's answer is not changed


def test_merge_keeps_decodes_own_entries_after_prefills_and_ignores_missing_ones():
    merged = merge_pd_answers(_answer("", input_token_logprobs=[[-1.0, 1, "a"]], input_token_ids_logprobs=None),
                              _answer("d", input_token_logprobs=[[-2.0, 2, "b"]]))
    assert merged["meta_info"]["input_token_logprobs"] == [[-1.0, 1, "a"], [-2.0, 2, "b"]]
    assert "input_token_ids_logprobs" not in merged["meta_info"]
    plain = merge_pd_answers(_answer(""), _answer("d"))
    assert plain == _answer("d")


def test_merge_of_a_batch_pairs_the_items_in_order():
    prefill = [_answer("", input_token_logprobs=[[-1.0, 1, "a"]]), _answer("", input_token_logprobs=[[-3.0, 3, "c"]])]
    decode = [_answer("x", input_token_logprobs=[]), _answer("y", input_token_logprobs=[])]
    merged = merge_pd_answers(prefill, decode)
    assert [m["text"] for m in merged] == ["x", "y"]
    assert [m["meta_info"]["input_token_logprobs"] for m in merged] == [[[-1.0, 1, "a"]], [[-3.0, 3, "c"]]]


# ----- rooms --------------------------------------------------------------------------


def test_rooms_never_repeat_and_land_on_the_asked_rank():
    rooms = RoomAllocator(seed=7)
    used = []
    for count, ranks, rank in [(1, 1, 0), (3, 4, 2), (1, 4, 0), (2, 2, 1), (1, 1, 0), (5, 8, 7)]:
        first = rooms.allocate(count, ranks=ranks, rank=rank)
        items = with_bootstrap({"text": ["x"] * count}, "h", 1, first, stride=ranks)["bootstrap_room"]
        assert all(room % ranks == rank for room in items)  # every item of a select on one DP rank
        used += items
    assert len(used) == len(set(used))
    with pytest.raises(ValueError, match="rank"):
        rooms.allocate(1, ranks=2, rank=2)


def test_rooms_start_at_a_seeded_offset_and_move_forward_by_what_was_taken():
    a, b = RoomAllocator(seed=11), RoomAllocator(seed=11)
    first = a.allocate(3)
    assert b.allocate(3) == first and 0 <= first < 2**62
    assert a.allocate(1) == first + 3  # a batch of 3 took 3 rooms
    assert RoomAllocator(seed=12).allocate() != first


@pytest.mark.parametrize("ranks, rank", [(0, 0), (2, -1), (3, 3)])
def test_a_rank_outside_the_servers_ranks_is_refused(ranks, rank):
    with pytest.raises(ValueError, match="need 0 <= rank < ranks"):
        RoomAllocator(seed=1).allocate(1, ranks=ranks, rank=rank)


def test_merge_of_zero_new_tokens_lists_the_sampled_token_only_when_the_batch_has_a_grammar_as_a_colocated_server():
    sampled = {"output_token_logprobs": [[-7.5, 1091, None]], "output_token_logprobs_length": 1,
               "output_top_logprobs": [[]], "completion_tokens": 0}
    decode = [{"text": "", "output_ids": [], "meta_info": dict(sampled)} for _ in range(2)]
    plain = merge_pd_answers([_answer("")] * 2, decode, [{"max_new_tokens": 0}] * 2)
    assert all(m["meta_info"]["output_token_logprobs"] == m["meta_info"]["output_top_logprobs"] == []
               and m["meta_info"]["output_token_logprobs_length"] == 0 for m in plain)
    mixed = merge_pd_answers([_answer("")] * 2, decode, [{"max_new_tokens": 0}, {"max_new_tokens": 0, "regex": "a"}])
    assert all(m["meta_info"]["output_token_logprobs"] == sampled["output_token_logprobs"] for m in mixed)
