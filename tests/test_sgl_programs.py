"""``sgl_programs`` without servers: templates, argument checks, what ``run_batch`` pre-caches, regexes.

The end-to-end behaviour of every program is in ``tests/e2e/test_programs.py``.
"""

from __future__ import annotations

import gc
import json
import re

import jinja2
import pytest
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.tracer import extract_prefix_by_tracing

from sgl_programs import (
    chat_completion,
    classify,
    collector_paused,
    compact_json_regex,
    default_examples,
    document_qa,
    few_shot_qa,
    run_batch_collected,
)
from sgl_programs.batch import _guarded
from sgl_programs.templates import render


def test_templates_render_and_refuse_missing_variables():
    block = render("few_shot_qa.j2", examples=default_examples())
    assert block.count("\nQ: ") + block.startswith("Q: ") == len(default_examples())
    assert "A: Paris" in block
    with pytest.raises(jinja2.UndefinedError):
        render("document_qa.j2")


def test_batch_prefix_of_a_bound_document_is_the_whole_document():
    document = "The contract runs for twelve months and renews itself. " * 5
    prefix = extract_prefix_by_tracing(document_qa.bind(document=document), BaseBackend())
    assert prefix == render("document_qa.j2", document=document)


def test_batch_prefix_of_few_shot_qa_is_the_examples_block():
    prefix = extract_prefix_by_tracing(few_shot_qa.bind(examples=None), BaseBackend())
    assert prefix == render("few_shot_qa.j2", examples=default_examples())
    # Unbound, the examples are a placeholder: the check stops tracing before any text.
    assert extract_prefix_by_tracing(few_shot_qa, BaseBackend()) == ""


def test_guarded_program_keeps_the_argument_names():
    guarded = _guarded(chat_completion, {})
    assert guarded.arg_names == chat_completion.arg_names
    assert guarded.arg_defaults == chat_completion.arg_defaults


@pytest.mark.parametrize("items, message", [
    ("not a list", "items must be a list"),
    ([{"messages": []}, "x"], r"items\[1\] must be a dict"),
])
def test_run_batch_collected_refuses_malformed_items(items, message):
    with pytest.raises(TypeError, match=message):
        run_batch_collected(chat_completion, items)


def test_run_batch_collected_refuses_a_plain_function():
    with pytest.raises(TypeError, match="@sgl.function"):
        run_batch_collected(print, [{}])


def test_compact_json_regex_allows_no_whitespace():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    pattern = compact_json_regex(schema)
    assert re.fullmatch(pattern, json.dumps({"ok": True}, separators=(",", ":")))
    assert not re.fullmatch(pattern, '{ "ok": true }')


def test_program_functions_raise_type_error_on_placeholders():
    # What run_batch's tracer passes: it only survives TypeError/AttributeError.
    assert extract_prefix_by_tracing(classify, BaseBackend()) == ""
    assert extract_prefix_by_tracing(chat_completion, BaseBackend()) == ""


def test_collector_paused_restores_the_collectors_previous_state():
    assert gc.isenabled() is False  # the suite's autouse fixture pauses it for every test
    gc.enable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled()
        gc.disable()
        with pytest.raises(RuntimeError), collector_paused():
            raise RuntimeError("inside")
        assert not gc.isenabled()  # stays as it was before the block
    finally:
        gc.disable()
