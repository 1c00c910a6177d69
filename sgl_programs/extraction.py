"""Structured extraction: output constrained by a regex or a JSON schema, then parsed.

Why: constrained decoding makes the server emit only text that matches the
pattern or schema, so the output can be parsed without retries. It cannot
make the model *finish*: a generation cut by ``max_tokens`` is a valid prefix
but not a valid value. Both programs therefore parse and check what came back
and raise :class:`ExtractionError` (with the raw text) instead of returning
something half-valid. The parsed value is the program's return value,
``state.ret_value``.

Small models under ``json_schema=`` may pad JSON with whitespace until
``max_tokens``: a server allows any whitespace between JSON tokens unless
started with ``--constrained-json-disable-any-whitespace`` (this project's
launcher adds it for the tiny model). ``compact=True`` works on any server:
it compiles the schema on the client, with SGLang's own JSON-schema-to-regex
converter (outlines), into a regex without optional whitespace.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import sglang as sgl

from sgl_programs import _checks
from sgl_programs.templates import render

_DEFAULT_INSTRUCTION = "Extract the requested value from the text."


class ExtractionError(ValueError):
    """The model's output is not a complete value of the requested shape.

    Attributes
    ----------
    raw : str
        The generated text, for logging or a retry with more ``max_tokens``.
    """

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(f"{message}; raw output: {raw!r}")
        self.raw = raw


@sgl.function
def extract_regex(s, text, pattern, instruction=_DEFAULT_INSTRUCTION, max_tokens=32):
    """Generate text matching ``pattern`` (in ``"value"``); return the match.

    Parameters
    ----------
    text : str
        The text to extract from.
    pattern : str
        A regular expression the whole value must match, e.g. ``r"\\d{3}-\\d{4}"``.
    instruction : str
        What to extract, in words.
    max_tokens : int
        Must leave room for a complete match.

    Returns
    -------
    re.Match
        The full match of ``pattern`` (``.group(0)``, named groups...), as ``state.ret_value``.

    Examples
    --------
    >>> state = extract_regex.run(text="Call 555-0199.", pattern=r"\\d{3}-\\d{4}")  # doctest: +SKIP
    >>> state.ret_value.group(0)                                                  # doctest: +SKIP
    """
    compiled = _compiled(pattern)
    _prompt(s, instruction, text)
    s += " " + sgl.gen("value", max_tokens=_checks.positive_int("max_tokens", max_tokens),
                       temperature=0.0, regex=pattern)
    raw = _generated(s, "value")
    if raw is None:
        return None
    match = compiled.fullmatch(raw)
    if match is None:
        raise ExtractionError(f"output does not match {pattern!r} (cut by max_tokens={max_tokens}?)", raw)
    return match


@sgl.function
def extract_json(s, text, schema, instruction=_DEFAULT_INSTRUCTION, max_tokens=128, compact=False):
    """Generate JSON valid under ``schema`` (in ``"json"``); return it parsed.

    Parameters
    ----------
    text : str
        The text to extract from.
    schema : dict
        A JSON Schema. Bound strings (``maxLength``), numbers and arrays
        (``maxItems``) so that a complete value fits in ``max_tokens``.
    instruction : str
        What to extract, in words.
    max_tokens : int
    compact : bool
        ``False``: the server enforces ``schema`` (``sgl.gen(json_schema=...)``).
        ``True``: enforce it as a whitespace-free regex compiled here (see
        the module docstring); the parsed result is validated the same way.

    Returns
    -------
    dict or list or scalar
        The parsed JSON, checked against ``schema``, as ``state.ret_value``.

    Raises
    ------
    ExtractionError
        The output is not complete JSON or does not satisfy ``schema``.

    Examples
    --------
    >>> schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
    ...           "required": ["name"]}
    >>> extract_json.run(text="Ada Lovelace wrote...", schema=schema).ret_value   # doctest: +SKIP
    {'name': 'Ada Lovelace'}
    """
    schema_text = _schema_text(schema)
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be True or False, got {type(compact).__name__}")
    constraint = {"regex": compact_json_regex(schema)} if compact else {"json_schema": schema_text}
    _prompt(s, instruction, text)
    s += " " + sgl.gen("json", max_tokens=_checks.positive_int("max_tokens", max_tokens),
                       temperature=0.0, **constraint)
    raw = _generated(s, "json")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ExtractionError(f"output is not complete JSON ({exc.msg}; cut by max_tokens={max_tokens}?)", raw) from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise ExtractionError(f"JSON does not satisfy the schema: {exc.message}", raw) from None
    return value


def compact_json_regex(schema: dict) -> str:
    """A regex for JSON valid under ``schema``, with no optional whitespace."""
    from outlines_core.fsm.json_schema import build_regex_from_schema  # comes with sglang

    return build_regex_from_schema(_schema_text(schema), whitespace_pattern="")


def _prompt(s, instruction: Any, text: Any) -> None:
    s += render("extract.j2", instruction=_checks.text("instruction", instruction),
                text=_checks.text("text", text))


def _generated(s, var: str) -> str | None:
    """The variable's text once generated; ``None`` if generation failed (see ``state.error()``)."""
    if s.error() is not None:
        return None
    return s[var]


def _compiled(pattern: Any) -> re.Pattern:
    _checks.text("pattern", pattern)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None


def _schema_text(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise TypeError(f"schema must be a JSON Schema as a dict, got {type(schema).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        return json.dumps(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"schema is not a valid JSON Schema: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schema is not JSON-serialisable: {exc}") from None
