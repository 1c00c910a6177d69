"""Render the long prompts kept in ``sgl_programs/templates/*.j2``.

Why: prompts that run to many lines read and diff better as files than as
Python strings, and Jinja2's loops keep example blocks data-driven. The
environment is built once per process and is read-only afterwards:
``StrictUndefined`` turns a missing variable into an error instead of an empty
string silently dropped from a prompt.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("sgl_programs", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # prompts are plain text, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (e.g. ``"few_shot_qa.j2"``) with ``context``.

    Raises
    ------
    jinja2.TemplateNotFound
        No such file under ``sgl_programs/templates``.
    jinja2.UndefinedError
        The template uses a variable that ``context`` does not give.

    Examples
    --------
    >>> render("document_qa.j2", document="The sky is blue.")  # doctest: +SKIP
    """
    return _environment().get_template(name).render(**context)
