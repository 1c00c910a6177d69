"""Chat programs: one reply to a list of messages, and conversations that remember.

The programs render messages through the backend's chat template
(``s.system`` / ``s.user`` / ``s.assistant``), so the same program speaks
each model's own format. They know nothing of PD: run them on ``PDBackend``,
``RuntimeEndpoint`` or any other SGLang backend.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import sglang as sgl

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Check chat messages before any request is sent.

    Raises
    ------
    TypeError
        ``messages`` is not a list (a ``TypeError`` also lets SGLang's
        ``run_batch`` tracer skip this program's prefix hoisting cleanly).
    ValueError
        Naming the first bad message and what a good one looks like.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list like [{{'role': 'user', 'content': 'Hi'}}], got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one user message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a 'role' of {ROLES}, got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs 'content' as a string, got {message.get('content')!r}")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] == "assistant":
        raise ValueError("the last message is the assistant's; end with a user message to get a reply")
    return checked


def _say(s, message: Mapping[str, str]) -> None:
    role = {"system": s.system, "user": s.user, "assistant": s.assistant}[message["role"]]
    s += role(message["content"])


@sgl.function
def chat_completion(s, messages, max_tokens=128, temperature=0.0, stop=None):
    """The assistant's reply to ``messages``, in the variable ``"reply"``.

    Parameters
    ----------
    messages
        ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; a
        system message is optional and first; the last is the user's.
    max_tokens, temperature, stop
        As in ``sgl.gen``.

    Examples
    --------
    >>> state = chat_completion.run(messages=[{"role": "user", "content": "Hi"}])   # doctest: +SKIP
    >>> state["reply"]                                                             # doctest: +SKIP
    >>> for chunk in chat_completion.run(messages=msgs, stream=True).text_iter("reply"):  # doctest: +SKIP
    ...     print(chunk, end="")
    >>> states = chat_completion.run_batch([{"messages": m} for m in many])         # doctest: +SKIP
    """
    for message in validate_messages(messages):
        _say(s, message)
    s += s.assistant(sgl.gen("reply", max_tokens=max_tokens, temperature=temperature, stop=stop))
