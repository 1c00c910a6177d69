"""Classification by choosing among labels, not by parsing free text.

Why: ``sgl.select`` scores each label's tokens after the prompt and returns
the most likely one, so the answer is always exactly one of the labels; there
is no output to parse and nothing to retry. It needs prompt logprobs, which a
PD deployment computes on the prefill server (``PDBackend`` handles that).
"""

from __future__ import annotations

import sglang as sgl

from sgl_programs import _checks
from sgl_programs.templates import render

_DEFAULT_INSTRUCTION = "Classify the text."


@sgl.function
def classify(s, text, labels, instruction=_DEFAULT_INSTRUCTION):
    """Pick the label of ``text`` among ``labels``; the choice is in ``"label"``.

    Parameters
    ----------
    text : str
    labels : list of str
        At least two distinct labels, e.g. ``["positive", "negative", "neutral"]``.
    instruction : str
        What the labels mean, e.g. ``"Classify the sentiment of the review."``.

    Examples
    --------
    >>> state = classify.run(text="I loved it.", labels=["positive", "negative"])  # doctest: +SKIP
    >>> state["label"]                                                             # doctest: +SKIP
    'positive'
    """
    labels = _checks.choices("labels", labels)
    s += render("classify.j2", instruction=_checks.text("instruction", instruction),
                labels=labels, text=_checks.text("text", text))
    s += " " + sgl.select("label", choices=labels)
