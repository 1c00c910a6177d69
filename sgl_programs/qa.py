"""Question answering where many questions share one long prompt prefix.

Why: with a long shared block first (worked examples, or a document) and the
question last, every question after the first reuses the server's cached KV
of the block, and ``PDBackend``'s cache-aware routing keeps those questions on
the prefill server that holds it. The batch helpers bind the shared block
(``program.bind``) so that SGLang's ``run_batch`` tracer sees it as constant
text and pre-caches it once before the batch starts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import sglang as sgl

from sgl_programs import _checks
from sgl_programs.batch import BatchResult, run_batch_collected
from sgl_programs.templates import render

#: (question, answer) pairs of :func:`default_examples`.
_DEFAULT_PAIRS = (
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "8"),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("What is the chemical symbol for gold?", "Au"),
    ("In which year did the first person walk on the Moon?", "1969"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("How many minutes are there in a day?", "1440"),
    ("Which language has the most native speakers?", "Mandarin Chinese"),
    ("What is the boiling point of water at sea level in Celsius?", "100"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("What is the square root of 144?", "12"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean"),
    ("What gas do plants take in for photosynthesis?", "Carbon dioxide"),
    ("How many sides does a hexagon have?", "6"),
    ("Who developed the theory of general relativity?", "Albert Einstein"),
    ("What is the longest river in South America?", "The Amazon"),
)


def default_examples() -> list[dict[str, str]]:
    """The worked examples :func:`few_shot_qa` uses when none are given (a fresh list)."""
    return [{"question": q, "answer": a} for q, a in _DEFAULT_PAIRS]


@sgl.function
def few_shot_qa(s, question, examples=None, max_tokens=32):
    """Answer ``question`` in the style of many worked examples; answer in ``"answer"``.

    The examples block (``templates/few_shot_qa.j2``) comes first and is the
    same for every question: the prefix-heavy case a radix cache is for.

    Parameters
    ----------
    question : str
    examples : list of {"question": str, "answer": str}, optional
        Worked examples; default :func:`default_examples`.
    max_tokens
        As in ``sgl.gen``; the answer is greedy and stops at the end of its line.

    Examples
    --------
    >>> few_shot_qa.run(question="What is the capital of Peru?")["answer"]   # doctest: +SKIP
    >>> answer_questions(["Q1?", "Q2?"], backend=backend).values("answer")    # doctest: +SKIP
    """
    shared = _checks.mapping_list("examples", default_examples() if examples is None else examples,
                              ("question", "answer"))
    s += render("few_shot_qa.j2", examples=shared)
    question = _checks.text("question", question)  # after the shared block: see _checks
    max_tokens = _checks.positive_int("max_tokens", max_tokens)
    s += f"Q: {question.strip()}\nA:" + sgl.gen("answer", max_tokens=max_tokens, temperature=0.0, stop="\n")


@sgl.function
def document_qa(s, document, question, max_tokens=32):
    """Answer ``question`` from ``document`` alone; answer in ``"answer"``.

    The document (``templates/document_qa.j2``) comes before the question, so
    many questions about one document share its cached prefix.

    Parameters
    ----------
    document, question : str
    max_tokens
        As in ``sgl.gen``; the answer is greedy and stops at the end of its line.

    Examples
    --------
    >>> document_qa.run(document=text, question="Who signed it?")["answer"]   # doctest: +SKIP
    >>> ask_document(text, ["Who signed it?", "When?"], backend=backend)     # doctest: +SKIP
    """
    s += render("document_qa.j2", document=_checks.text("document", document))
    question = _checks.text("question", question)  # after the shared block: see _checks
    max_tokens = _checks.positive_int("max_tokens", max_tokens)
    s += f"\nQuestion: {question.strip()}\nAnswer:" + sgl.gen(
        "answer", max_tokens=max_tokens, temperature=0.0, stop="\n")


def answer_questions(questions: Sequence[str], *, examples: Sequence[Mapping[str, str]] | None = None,
                     max_tokens: int = 32, **run_batch_options: Any) -> BatchResult:
    """Run :func:`few_shot_qa` over ``questions`` with one shared examples block.

    ``run_batch_options`` go to :func:`~sgl_programs.batch.run_batch_collected`
    (``backend=``, ``num_threads=``, ``progress_bar=``).
    """
    program = few_shot_qa.bind(examples=examples)
    return run_batch_collected(program, _question_items(questions, max_tokens), **run_batch_options)


def ask_document(document: str, questions: Sequence[str], *, max_tokens: int = 32,
                 **run_batch_options: Any) -> BatchResult:
    """Run :func:`document_qa` for each of ``questions`` about one ``document``.

    The document is bound, so ``run_batch`` pre-caches it once and every
    question then reuses it. ``run_batch_options`` as in :func:`answer_questions`.
    """
    _checks.text("document", document)
    program = document_qa.bind(document=document)
    return run_batch_collected(program, _question_items(questions, max_tokens), **run_batch_options)


def _question_items(questions: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    if isinstance(questions, (str, bytes)) or not isinstance(questions, Sequence):
        raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}")
    return [{"question": q, "max_tokens": max_tokens} for q in questions]
