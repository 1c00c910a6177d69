"""backends.adapter._select: sgl.select's arithmetic (token healing, missing logprobs, SGLang's choice methods)."""

import copy

import pytest
from sglang.lang.choices import (
    ChoicesDecision,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)

from backends.adapter._select import decide, healed_logprobs, unconditional_body


def _scored(*logprob_lists, output=None):
    """Answers as SGLang 0.5.23 gives them for ``prompt + choice``: ``[logprob or None, token_id, text]`` entries."""
    return [{"meta_info": {"input_token_logprobs": lps, "output_token_logprobs": output or []}}
            for lps in logprob_lists]


def test_without_healing_every_entry_counts():
    scored = _scored([[-0.5, 11, "The"], [-1.0, 12, " sky"], [-2.5, 13, " blue"]])
    kept = copy.deepcopy(scored)
    logprobs, normalized = healed_logprobs("Q: colour?", scored)
    assert logprobs == [[[-0.5, 11, "The"], [-1.0, 12, " sky"], [-2.5, 13, " blue"]]]
    assert normalized == [pytest.approx(-4.0 / 3)]
    assert scored == kept  # the servers' answers are not changed


def test_healing_drops_the_boundary_token_the_prompt_already_ends_with():
    scored = _scored([[-0.5, 11, " is"], [-1.0, 12, " blue"], [-3.0, 13, "."]],
                     [[-0.7, 11, " is"], [-2.0, 14, " red"]])
    logprobs, normalized = healed_logprobs("The sky is", scored)
    assert logprobs == [[[-1.0, 12, " blue"], [-3.0, 13, "."]], [[-2.0, 14, " red"]]]
    assert normalized == [pytest.approx(-2.0), pytest.approx(-2.0)]  # the mean of what remains


def test_a_single_entry_is_never_healed_away():
    logprobs, normalized = healed_logprobs("ends with x", _scored([[-1.5, 1, "x"]]))
    assert logprobs == [[[-1.5, 1, "x"]]] and normalized == [-1.5]


def test_a_missing_first_logprob_is_skipped_in_the_mean_and_zero_in_the_lists():
    logprobs, normalized = healed_logprobs("Q:", _scored([[None, 11, "The"], [-1.0, 12, " sky"], [-3.0, 13, "!"]]))
    assert logprobs == [[[0.0, 11, "The"], [-1.0, 12, " sky"], [-3.0, 13, "!"]]]
    assert normalized == [pytest.approx(-2.0)]


def test_healing_a_missing_first_logprob_gives_the_mean_of_what_remains():
    tail = [[-1.0, 12, " blue"], [-3.0, 13, "."]]
    _, with_value = healed_logprobs("The sky is", _scored([[-0.7, 11, " is"], *tail]))
    _, with_none = healed_logprobs("The sky is", _scored([[None, 11, " is"], *tail]))
    assert with_value == [pytest.approx(-2.0)]
    assert with_none == with_value  # the dropped token's logprob, present or not, cannot matter
    # What it decides: "a" (mean -1.0) beats "b" (mean -1.1) once the boundary token is healed away.
    scored = _scored([[None, 11, " is"], [-1.0, 1, " a"], [-1.0, 2, "."]],
                     [[None, 11, " is"], [-1.1, 3, " b"], [-1.1, 4, " b"], [-1.1, 5, " b"], [-1.1, 6, "."]])
    input_logprobs, normalized = healed_logprobs("The sky is", scored)
    decision = decide(["a", "b"], token_length_normalized, scored, input_logprobs, normalized, None)
    assert decision.decision == "a"


def test_unconditional_body_scores_each_choices_tokens_without_the_prompt():
    body = unconditional_body([[[-1.0, 12, " blue"], [-3.0, 13, "."]], [[-2.0, 14, " red"]]])
    assert body == {"input_ids": [[12, 13], [14]], "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True, "logprob_start_len": 0}


def test_token_length_normalized_picks_the_best_mean():
    scored = _scored([[-0.5, 1, "A"], [-2.0, 2, " x"]], [[-0.5, 1, "A"], [-0.5, 3, " y"]], output=[[-0.1, 9, "z"]])
    input_logprobs, normalized = healed_logprobs("Q:", scored)
    decision = decide(["x", "y"], token_length_normalized, scored, input_logprobs, normalized, None)
    assert isinstance(decision, ChoicesDecision) and decision.decision == "y"
    assert decision.meta_info["normalized_prompt_logprobs"] == normalized
    assert decision.meta_info["output_token_logprobs"] == [[[-0.1, 9, "z"]], [[-0.1, 9, "z"]]]


def test_greedy_token_selection_decides_despite_a_missing_first_logprob():
    # The stock client fails here with None + float; missing logprobs count as 0.0.
    scored = _scored([[None, 1, "A"], [-1.0, 2, " x"], [-1.0, 3, " x"]], [[None, 1, "A"], [-0.5, 4, " y"]])
    input_logprobs, normalized = healed_logprobs("Q:", scored)
    decision = decide(["x", "y"], greedy_token_selection, scored, input_logprobs, normalized, None)
    assert isinstance(decision, ChoicesDecision) and decision.decision == "y"  # -0.5 beats -1.0 on the 2nd token
    assert decision.meta_info["greedy_logprob_matrix"] == [[0.0, -1.0, -1.0], [0.0, -0.5, -0.25]]


def test_unconditional_likelihood_normalized_uses_the_unconditional_pass():
    assert unconditional_likelihood_normalized.requires_unconditional_logprobs
    scored = _scored([[-0.5, 11, " is"], [-1.0, 12, " blue"], [-1.0, 13, "."]],
                     [[-0.5, 11, " is"], [-0.5, 14, " red"], [-3.0, 13, "."]])
    input_logprobs, normalized = healed_logprobs("The sky is", scored)
    assert unconditional_body(input_logprobs)["input_ids"] == [[12, 13], [14, 13]]
    # The unconditional answers start with SGLang's None too.
    unconditional = _scored([[None, 12, " blue"], [-2.0, 13, "."]], [[None, 14, " red"], [-1.0, 13, "."]])
    decision = decide(["blue", "red"], unconditional_likelihood_normalized, scored, input_logprobs, normalized,
                      unconditional)
    # blue: mean(-1 - 0, -1 + 2) = 0.0; red: mean(-0.5 - 0, -3 + 1) = -1.25
    assert decision.meta_info["normalized_unconditional_prompt_logprobs"] == [pytest.approx(0.0),
                                                                              pytest.approx(-1.25)]
    assert decision.decision == "blue"
    assert decision.meta_info["unconditional_token_logprobs"] == [[[0.0, 12, " blue"], [-2.0, 13, "."]],
                                                                  [[0.0, 14, " red"], [-1.0, 13, "."]]]
