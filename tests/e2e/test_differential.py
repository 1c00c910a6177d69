"""Generated ``/generate`` bodies through PD, the adapter's colocated mode and the colocated server itself.

Hypothesis draws bodies over what SGLang 0.5.23's ``/generate`` accepts
(sampling parameters and their combinations, logprob options, batch shapes
with per-item parameters, text or input_ids, streaming on and off) and
:mod:`tests.e2e.differential` asserts one outcome on all three paths.
Seeded (``derandomize``) and bounded so CI stays short: ``SGLPD_DIFF_EXAMPLES``
(default 60) examples; ``HYPOTHESIS_PROFILE=nightly`` runs 400. Every failure
it finds becomes a plain regression test in ``test_differential_regressions.py``.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.differential import assert_same, direct, through

settings.register_profile("ci", max_examples=int(os.environ.get("SGLPD_DIFF_EXAMPLES", 60)), derandomize=True,
                          deadline=None, phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("nightly", parent=settings.get_profile("ci"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

WORDS = ["The", " tide", " rose", " and", " fell", ",", " lighthouse", " keeper", "\n", " 42", " moon", " def",
         " x", "(", ")", ":", " import", " os", " once", " upon"]
VOCAB = 4096  # the tiny model's (backends.launcher._tiny_model)

prompts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map("".join)
token_ids = st.lists(st.integers(min_value=5, max_value=VOCAB - 1), min_size=1, max_size=60)


@st.composite
def sampling(draw) -> dict:
    params: dict = {"max_new_tokens": draw(st.sampled_from([0, 1, 2, 5, 12]))}
    if draw(st.booleans()):
        params["min_new_tokens"] = draw(st.integers(0, params["max_new_tokens"]))
    if draw(st.booleans()):
        params["stop"] = draw(st.lists(st.sampled_from([" the", "\n", ",", "e", "zz"]), min_size=1, max_size=2))
    if draw(st.booleans()):
        params["stop_token_ids"] = draw(st.lists(st.integers(5, VOCAB - 1), min_size=1, max_size=3))
    if draw(st.booleans()):
        params["ignore_eos"] = True
    # Greedy only: seeded sampling (temperature > 0 with sampling_seed) differed between two runs of
    # the same body on the same server (found by this harness), so it cannot be an oracle.
    params.update(temperature=0, top_p=draw(st.sampled_from([0.5, 1.0])), top_k=draw(st.sampled_from([-1, 1, 20])))
    if draw(st.booleans()):
        params["frequency_penalty"] = draw(st.sampled_from([0.0, 0.5, 1.5]))
        params["presence_penalty"] = draw(st.sampled_from([0.0, 0.5]))
    constraint = draw(st.sampled_from([None, "regex", "json", "ebnf"]))
    if constraint == "regex":
        params["regex"] = draw(st.sampled_from([r"[0-9]{1,3}", r"(yes|no)", r"[a-z ]{2,8}"]))
    elif constraint == "json":
        params["json_schema"] = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                            "required": ["n"]})
    elif constraint == "ebnf":
        params["ebnf"] = 'root ::= "yes" | "no"'
    if draw(st.integers(0, 20)) == 0:
        params["temprature"] = 0  # an unknown key: the server refuses it, and so must the adapter
    return params


@st.composite
def bodies(draw) -> dict:
    batch = draw(st.sampled_from([None, 2, 3]))
    use_ids = draw(st.booleans())
    if batch is None:
        body = {"input_ids": draw(token_ids)} if use_ids else {"text": draw(prompts)}
        body["sampling_params"] = draw(sampling())
        if draw(st.booleans()):
            body["stream"] = True
    else:
        items = draw(st.lists(token_ids if use_ids else prompts, min_size=batch, max_size=batch))
        body = {"input_ids" if use_ids else "text": items}
        per_item = draw(st.booleans())
        body["sampling_params"] = [draw(sampling()) for _ in items] if per_item else draw(sampling())
    if draw(st.booleans()):
        body["return_logprob"] = True
        body["logprob_start_len"] = draw(st.sampled_from([-1, 0, 1]))
        if draw(st.booleans()):
            body["top_logprobs_num"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            body["token_ids_logprob"] = draw(st.lists(st.integers(5, 200), min_size=1, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        body["rid"] = "user-rid" if batch is None else [f"user-rid-{i}" for i in range(batch)]
    return body


@pytest.mark.timeout(1500)
@given(body=bodies())
def test_pd_and_colocated_adapter_match_the_colocated_server(body, cluster, pd_backend, colocated_backend):
    url = cluster.colocated_urls[0]
    reference = direct(url, body)
    assert_same(reference, through(colocated_backend.client, body), url=url, body=body, pd=False)
    assert_same(reference, through(pd_backend.client, body), url=url, body=body, pd=True)
