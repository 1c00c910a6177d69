"""Every program of ``sgl_programs`` on real servers, through PD and through the colocated server.

The tiny model's text is nonsense, so the asserts are structural: parsed
values satisfy their schema or regex, labels are among the choices, streamed
text is the final text, a batch returns one state or one recorded error per
item, follow-up turns reuse the cache. Under greedy decoding PD and colocated
must also agree exactly.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import jsonschema
import pytest

from backends.errors import BadRequestError
from sgl_programs import (
    Conversation,
    ExtractionError,
    answer_questions,
    ask_document,
    chat_completion,
    classify,
    document_qa,
    draft_and_judge,
    extract_json,
    extract_regex,
    few_shot_qa,
    run_batch_collected,
    stream_text,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "mood", "verified"],
    "additionalProperties": False,
}
COLOR = {"enum": ["red", "green", "blue"]}
PHONE = r"\d{3}-\d{4}"
LABELS = ["positive", "negative", "neutral"]
DOCUMENT = " ".join(f"Clause {i}: the tenant pays {i * 10} euros on day {i % 28 + 1}." for i in range(40))


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _run(program, backend, **kwargs):
    state = program.run(**kwargs, backend=backend)
    assert state.error() is None, state.error()
    return state


def _on_both(program, pd_backend, colocated_backend, **kwargs):
    return _run(program, pd_backend, **kwargs), _run(program, colocated_backend, **kwargs)


# ----- chat ---------------------------------------------------------------------------


def test_conversation_follow_up_reuses_the_cached_history(any_backend):
    chat = Conversation(system=f"Session {uuid.uuid4()}.", backend=any_backend, max_tokens=12)
    first = chat.ask("Tell me about lighthouses.")
    first_meta = chat.last_state.get_meta_info("reply")
    first_route = any_backend.metrics.records()[-1]
    second = chat.ask("And what about their keepers?")
    second_meta = chat.last_state.get_meta_info("reply")
    assert isinstance(first, str) and isinstance(second, str)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first
    # The whole first prompt (unique system message included) was served from the cache.
    assert first_meta["cached_tokens"] < first_meta["prompt_tokens"] // 2
    assert second_meta["cached_tokens"] >= first_meta["prompt_tokens"]
    second_route = any_backend.metrics.records()[-1]
    assert second_route.cached_tokens == second_meta["cached_tokens"]
    # Cache-aware routing kept the conversation on the server that holds it.
    assert (second_route.prefill, second_route.colocated) == (first_route.prefill, first_route.colocated)


def test_conversation_refuses_bad_arguments_before_sending(pd_backend):
    with pytest.raises(TypeError, match="system"):
        Conversation(system=42, backend=pd_backend)
    with pytest.raises(ValueError, match="max_tokens"):
        Conversation(backend=pd_backend, max_tokens=0)
    chat = Conversation(backend=pd_backend)
    with pytest.raises(TypeError, match="content"):
        chat.ask(["not", "a", "string"])
    assert chat.messages == []


# ----- streaming ------------------------------------------------------------------------


def test_stream_text_yields_the_final_text(any_backend):
    messages = _user("Describe the sea in detail.")
    stream = stream_text(chat_completion, "reply", messages=messages, max_tokens=24, backend=any_backend)
    chunks = list(stream)
    assert chunks and all(chunks)
    assert "".join(chunks) == stream.text == stream.state["reply"]
    assert any_backend.metrics.records()[-1].kind == "gen_stream"
    # Greedy: the same reply as without streaming.
    assert stream.text == _run(chat_completion, any_backend, messages=messages, max_tokens=24)["reply"]


def test_stream_text_async(any_backend):
    async def collect():
        stream = stream_text(chat_completion, "reply", messages=_user("Count the waves."),
                             max_tokens=24, backend=any_backend)
        return [chunk async for chunk in stream], stream

    chunks, stream = asyncio.run(collect())
    assert chunks and "".join(chunks) == stream.text
    assert stream.state.get_meta_info("reply")["completion_tokens"] == 24


def test_stream_text_raises_the_programs_error(pd_backend):
    stream = stream_text(chat_completion, "reply", messages=_user("word " * 9000), max_tokens=8, backend=pd_backend)
    with pytest.raises(BadRequestError, match="context length"):
        list(stream)


# ----- batches ------------------------------------------------------------------------


def test_batch_returns_one_state_or_one_error_per_item(any_backend):
    items = [{"messages": _user(f"Question {i}?"), "max_tokens": 8} for i in range(6)]
    items[2] = {"messages": [], "max_tokens": 8}  # refused by the program's own check
    items[4] = {"messages": _user("word " * 9000), "max_tokens": 8}  # refused by the server
    result = run_batch_collected(chat_completion, items, backend=any_backend, num_threads=4)
    assert len(result.states) == 6 and not result.ok
    assert [i for i, _ in result.errors] == [2, 4]
    assert isinstance(result.errors[0][1], ValueError) and "messages" in str(result.errors[0][1])
    assert isinstance(result.errors[1][1], BadRequestError)
    replies = result.values("reply")
    assert replies[2] is None and replies[4] is None
    assert all(isinstance(replies[i], str) for i in (0, 1, 3, 5))


def test_few_shot_batch_shares_the_examples_block(any_backend):
    questions = ["What is the capital of Peru?", "How many moons has Mars?", "Who wrote Hamlet?"]
    result = answer_questions(questions, backend=any_backend, max_tokens=8, progress_bar=False)
    assert result.ok, result.errors
    for answer in result.values("answer"):
        assert isinstance(answer, str) and "\n" not in answer
    for state in result.states:
        meta = state.get_meta_info("answer")
        assert meta["prompt_tokens"] > 300  # the long examples block
        assert meta["cached_tokens"] >= 0.8 * meta["prompt_tokens"]  # pre-cached once for the batch


def test_document_batch_shares_the_document(any_backend):
    before = len(any_backend.metrics.records())
    questions = ["How much is paid in clause 3?", "On which day is clause 7 due?", "Who is the tenant?"]
    result = ask_document(DOCUMENT, questions, backend=any_backend, max_tokens=8, progress_bar=False)
    assert result.ok, result.errors
    assert len(result.values("answer")) == 3
    kinds = [r.kind for r in any_backend.metrics.records()[before:]]
    assert kinds[0] == "warm" and kinds.count("gen") == 3  # the document was cached before the questions
    for state in result.states:
        meta = state.get_meta_info("answer")
        assert meta["cached_tokens"] >= 0.9 * meta["prompt_tokens"]


def test_qa_programs_match_colocated(pd_backend, colocated_backend):
    pd, ref = _on_both(few_shot_qa, pd_backend, colocated_backend, question="What is 2 + 2?", max_tokens=8)
    assert pd["answer"] == ref["answer"]
    pd, ref = _on_both(document_qa, pd_backend, colocated_backend, document=DOCUMENT,
                       question="What is clause 5?", max_tokens=8)
    assert pd["answer"] == ref["answer"]


# ----- structured output ------------------------------------------------------------------


def test_extract_regex_returns_a_full_match(pd_backend, colocated_backend):
    pd, ref = _on_both(extract_regex, pd_backend, colocated_backend, text="Call Ada on 555-0199.",
                       pattern=PHONE, instruction="Extract the phone number.")
    match = pd.ret_value
    assert isinstance(match, re.Match) and re.fullmatch(PHONE, match.group(0))
    assert match.group(0) == pd["value"] == ref.ret_value.group(0)


def test_extract_json_compact_object_satisfies_the_schema(pd_backend, colocated_backend):
    pd, ref = _on_both(extract_json, pd_backend, colocated_backend, text="Ada is calm and verified.",
                       schema=PERSON, compact=True, max_tokens=48)
    record = pd.ret_value
    jsonschema.validate(record, PERSON)
    assert set(record) == {"name", "mood", "verified"}
    assert record == ref.ret_value and pd["json"] == ref["json"]


def test_extract_json_server_schema(pd_backend, colocated_backend):
    pd, ref = _on_both(extract_json, pd_backend, colocated_backend, text="The sky was red.",
                       schema=COLOR, max_tokens=8)
    assert pd.ret_value in COLOR["enum"]
    assert pd.ret_value == ref.ret_value


def test_extract_json_cut_short_raises_extraction_error(pd_backend):
    with pytest.raises(ExtractionError, match="not complete JSON") as caught:
        extract_json.run(text="Ada.", schema=PERSON, max_tokens=3, backend=pd_backend)
    assert caught.value.raw.startswith("{")


# ----- choice and branches ------------------------------------------------------------------


def test_classify_picks_one_of_the_labels(pd_backend, colocated_backend):
    before = len(pd_backend.metrics.records())
    pd, ref = _on_both(classify, pd_backend, colocated_backend, text="What a wonderful day!", labels=LABELS,
                       instruction="Classify the sentiment.")
    assert pd["label"] in LABELS
    assert pd["label"] == ref["label"]
    assert pd.text().endswith(" " + pd["label"])
    assert "select" in [r.kind for r in pd_backend.metrics.records()[before:]]


def test_draft_and_judge_forks_n_branches(pd_backend, colocated_backend):
    before = len(pd_backend.metrics.records())
    pd, ref = _on_both(draft_and_judge, pd_backend, colocated_backend, task="Name a colour.",
                       num_drafts=3, max_tokens=8)
    drafts = pd["draft"]
    assert isinstance(drafts, list) and len(drafts) == 3 and all(isinstance(d, str) for d in drafts)
    assert pd["best"] in {"1", "2", "3"}
    assert pd.ret_value == drafts[int(pd["best"]) - 1]
    assert (drafts, pd["best"]) == (ref["draft"], ref["best"])
    kinds = [r.kind for r in pd_backend.metrics.records()[before:]]
    assert kinds[0] == "warm" and kinds.count("gen") == 3  # shared prompt pre-filled once, then 3 branches


# ----- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("program, kwargs, error, name", [
    (chat_completion, {"messages": "hi"}, TypeError, "messages"),
    (chat_completion, {"messages": _user("hi"), "reply_stop": 5}, TypeError, "reply_stop"),
    (chat_completion, {"messages": _user("hi"), "reply_temperature": "hot"}, TypeError, "reply_temperature"),
    (few_shot_qa, {"question": ""}, ValueError, "question"),
    (few_shot_qa, {"question": "q?", "examples": [{"question": "a"}]}, ValueError, "examples"),
    (document_qa, {"document": None, "question": "q?"}, TypeError, "document"),
    (document_qa, {"document": "d", "question": "q?", "max_tokens": 0}, ValueError, "max_tokens"),
    (extract_regex, {"text": "t", "pattern": "([a-z"}, ValueError, "pattern"),
    (extract_json, {"text": "t", "schema": "{}"}, TypeError, "schema"),
    (extract_json, {"text": "t", "schema": {"type": "nonsense"}}, ValueError, "schema"),
    (classify, {"text": "t", "labels": ["only"]}, ValueError, "labels"),
    (classify, {"text": "t", "labels": "ab"}, TypeError, "labels"),
    (draft_and_judge, {"task": "t", "num_drafts": 1}, ValueError, "num_drafts"),
    (draft_and_judge, {"task": "t", "draft_temperature": -1.0}, ValueError, "draft_temperature"),
])
def test_bad_arguments_are_refused_before_any_request(pd_backend, program, kwargs, error, name):
    before = len(pd_backend.metrics.records())
    with pytest.raises(error, match=name):
        program.run(**kwargs, backend=pd_backend)
    assert len(pd_backend.metrics.records()) == before
