"""Reusable SGLang frontend programs (``@sgl.function``), portable across backends.

Each program is an ordinary ``@sgl.function``: run it with ``.run()``,
``.run_batch()`` or ``stream=True`` on any SGLang backend, including
:class:`backends.PDBackend` for prefill/decode-separated servers. None of
them knows about PD. Long prompts live in ``sgl_programs/templates/*.j2``.

==========================  ==================================================
``chat_completion``         one reply to chat messages
``Conversation``            multi-turn chat; each turn reuses the cached history
``stream_text``             iterate a generation's text as it arrives (sync/async)
``run_batch_collected``     ``run_batch`` with a progress bar and per-item errors
``few_shot_qa``             answers after a long shared block of worked examples
``document_qa``             many questions about one shared document
``extract_regex``           output constrained by a regex, returned as a match
``extract_json``            output constrained by a JSON schema, returned parsed
``classify``                one label among choices (``sgl.select``)
``draft_and_judge``         parallel drafts with ``fork``, then a judging select
``collector_paused``        no automatic GC in a block (Python < 3.13 hang, see README)
==========================  ==================================================
"""

from sgl_programs.batch import BatchResult, run_batch_collected
from sgl_programs.branches import draft_and_judge
from sgl_programs.chat import Conversation, chat_completion, validate_messages
from sgl_programs.classify import classify
from sgl_programs.extraction import ExtractionError, compact_json_regex, extract_json, extract_regex
from sgl_programs.qa import answer_questions, ask_document, default_examples, document_qa, few_shot_qa
from sgl_programs.streaming import TextStream, stream_text
from sgl_programs._threads import collector_paused

__all__ = [
    "chat_completion",
    "validate_messages",
    "Conversation",
    "stream_text",
    "TextStream",
    "run_batch_collected",
    "BatchResult",
    "few_shot_qa",
    "document_qa",
    "answer_questions",
    "ask_document",
    "default_examples",
    "extract_regex",
    "extract_json",
    "compact_json_regex",
    "ExtractionError",
    "classify",
    "draft_and_judge",
    "collector_paused",
]
