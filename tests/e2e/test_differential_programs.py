"""Generated frontend programs through PD, the adapter's colocated mode and SGLang's own ``RuntimeEndpoint``.

The request-level harness (``test_differential.py``) covers ``/generate``
bodies; this one covers what programs do with them: ``gen`` with its options,
``select`` with every choices method, ``fork`` and ``join``, text in between.
Hypothesis draws a program as data (a list of steps) and :func:`program`
interprets it, so a failure shrinks to the shortest program that shows it.

The reference is SGLang's stock ``RuntimeEndpoint`` on the colocated server,
for programs without ``select``: its ``select`` crashes in SGLang 0.5.23 on
inputs the adapter serves (``greedy_token_selection``: ``TypeError`` None +
float, ``unconditional_likelihood_normalized``: ``IndexError``, in
``sglang/lang/choices.py``; and any method when token healing applies,
``TypeError`` in ``runtime_endpoint.py`` ``select``: the first prompt token
has no logprob). Programs with ``select`` are compared with the adapter's
colocated mode, and PD must equal it. Greedy parity has the tie exception of :mod:`tests.e2e.differential`:
a ``gen`` may diverge only where the reference's top-2 logprobs are within
``TIE_GAP``, a ``select`` only where the reference scored the other path's
choice within ``TIE_GAP`` of its own; the program is not compared past that point.
"""

from __future__ import annotations

import os

import pytest
import sglang as sgl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.differential import TIE_GAP, gen_diverged_by_near_tie

settings.register_profile("programs-ci", max_examples=int(os.environ.get("SGLPD_DIFF_PROGRAMS", 25)),
                          derandomize=True, deadline=None, phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("programs-nightly", parent=settings.get_profile("programs-ci"), max_examples=200)
PROFILE = "programs-nightly" if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else "programs-ci"

METHODS = {"token_length_normalized": sgl.token_length_normalized,
           "greedy_token_selection": sgl.greedy_token_selection,
           "unconditional_likelihood_normalized": sgl.unconditional_likelihood_normalized}
TOP = 5  # logprobs asked per generated token: enough to see a near-tie among several candidates
WORDS = [" The", " tide", " rose", " lighthouse", " keeper", "\n", " 42", " moon", " once", " upon", " Q:", " A:"]
CHOICES = [" yes", " no", " maybe so", " the moon", " 7", " a long answer about tides"]

texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map("".join)


@st.composite
def gen_options(draw) -> dict:
    options = {"max_tokens": draw(st.sampled_from([1, 3, 6])), "temperature": 0}
    if draw(st.booleans()):
        options["stop"] = draw(st.sampled_from(["\n", ",", " the"]))
    constraint = draw(st.sampled_from([None, None, r"[0-9]{1,3}", r"(yes|no)"]))
    if constraint:
        options["regex"] = constraint
    if draw(st.booleans()):
        options["ignore_eos"] = True
    return options


@st.composite
def steps(draw) -> list[dict]:
    made = [{"kind": "text", "text": draw(texts)}]
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["text", "gen", "select", "fork"]))
        if kind == "text":
            made.append({"kind": "text", "text": draw(texts)})
        elif kind == "gen":
            made.append({"kind": "gen", "name": f"g{i}", "options": draw(gen_options())})
        elif kind == "select":
            made.append({"kind": "select", "name": f"s{i}", "method": draw(st.sampled_from(sorted(METHODS))),
                         "choices": draw(st.lists(st.sampled_from(CHOICES), min_size=2, max_size=3, unique=True))})
        else:
            n = draw(st.integers(2, 3))
            made.append({"kind": "fork", "name": f"f{i}", "texts": draw(st.lists(texts, min_size=n, max_size=n)),
                         "options": draw(gen_options())})
    return made


@sgl.function
def program(s, plan):
    """Run ``plan``; return each named step's value and meta info, in order (fork branches included)."""
    seen = []
    for step in plan:
        if step["kind"] == "text":
            s += step["text"]
        elif step["kind"] == "gen":
            s += sgl.gen(step["name"], return_logprob=True, top_logprobs_num=TOP, **step["options"])
            seen.append((step["name"], s[step["name"]], s.get_meta_info(step["name"])))
        elif step["kind"] == "select":
            s += sgl.select(step["name"], choices=step["choices"], choices_method=METHODS[step["method"]])
            seen.append((step["name"], s[step["name"]], s.get_meta_info(step["name"])))
        else:
            forks = s.fork(len(step["texts"]))
            for branch, text in zip(forks, step["texts"]):
                branch += text + sgl.gen("b", return_logprob=True, top_logprobs_num=TOP, **step["options"])
            forks.join()
            for k, branch in enumerate(forks):
                seen.append((f"{step['name']}.{k}", branch["b"], branch.get_meta_info("b")))
            s += "|".join(branch["b"] for branch in forks)
    return seen


def _outcome(run) -> tuple:
    try:
        state = run()
    except Exception as exc:  # a program step's value was never set: its request failed
        return "error", repr(exc)
    return ("error", str(state.error())) if state.error() else ("ok", state.text(), state.ret_value)


def _tie(kind: str, ref_meta: dict, out_meta: dict, ref_value: str, value: str, choices: list[str]) -> bool:
    """Whether ``out`` diverged from the reference by a near-tie: a gen token or select choice scored within TIE_GAP."""
    if kind == "select":  # the other path's choice scored within TIE_GAP of the reference's
        scores = dict(zip(choices, ref_meta.get("normalized_prompt_logprobs") or []))
        return ref_value in scores and value in scores and scores[ref_value] - scores[value] < TIE_GAP
    return gen_diverged_by_near_tie(ref_meta, out_meta)


def assert_same_program(reference: tuple, got: tuple, plan: list[dict], path: str) -> None:
    assert reference[0] == got[0], f"{path}: reference {reference[:2]} but got {got[:2]}"
    if reference[0] == "error":
        return
    choices = {step["name"]: step["choices"] for step in plan if step["kind"] == "select"}
    assert [name for name, *_ in reference[2]] == [name for name, *_ in got[2]]
    for (name, ref_value, ref_meta), (_, value, meta) in zip(reference[2], got[2]):
        if ref_value != value:
            kind = "select" if name in choices else "gen"
            assert _tie(kind, ref_meta, meta, ref_value, value, choices.get(name, [])), \
                f"{path}: {name} = {value!r}, reference {ref_value!r} (not within a near-tie of the reference's pick)"
            return  # past a tie the programs legitimately differ
    assert reference[1] == got[1], f"{path}: program text differs"


@pytest.mark.timeout(1200)
@settings(settings.get_profile(PROFILE))
@given(plan=steps())
def test_generated_programs_run_the_same_through_pd(plan, cluster, pd_backend, colocated_backend):
    colocated = _outcome(lambda: program.run(plan=plan, backend=colocated_backend))
    if not any(step["kind"] == "select" for step in plan):
        stock = _outcome(lambda: program.run(plan=plan, backend=sgl.RuntimeEndpoint(cluster.colocated_urls[0])))
        assert_same_program(stock, colocated, plan, "adapter colocated vs RuntimeEndpoint")
    assert colocated[0] == "ok", colocated
    pd = _outcome(lambda: program.run(plan=plan, backend=pd_backend))
    assert_same_program(colocated, pd, plan, "PD vs colocated")
