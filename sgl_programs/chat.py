"""Chat programs: one reply to a list of messages, and conversations that remember.

The programs render messages through the backend's chat template
(``sgl.system`` / ``sgl.user`` / ``sgl.assistant``), so the same program speaks
each model's own format. They know nothing of PD: run them on ``PDBackend``,
``RuntimeEndpoint`` or any other SGLang backend.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import sglang as sgl

from sgl_programs import _checks
from sgl_programs._threads import settle

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
    # sgl.user(...) builds the expression; s.user(...) would submit it at once
    # and ``s +=`` then a second time (every message and the reply twice).
    role = {"system": sgl.system, "user": sgl.user, "assistant": sgl.assistant}[message["role"]]
    s += role(message["content"])


@sgl.function
def chat_completion(s, messages, max_tokens=128, reply_temperature=0.0, reply_stop=None):
    """The assistant's reply to ``messages``, in the variable ``"reply"``.

    Parameters
    ----------
    messages
        ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; a
        system message is optional and first; the last is the user's.
    max_tokens
        As in ``sgl.gen``.
    reply_temperature, reply_stop
        ``temperature`` and ``stop`` of the reply's ``sgl.gen`` (not named
        ``temperature``/``stop``: ``run()`` would take those for itself).

    Examples
    --------
    >>> state = chat_completion.run(messages=[{"role": "user", "content": "Hi"}])   # doctest: +SKIP
    >>> state["reply"]                                                             # doctest: +SKIP
    >>> for chunk in chat_completion.run(messages=msgs, stream=True).text_iter("reply"):  # doctest: +SKIP
    ...     print(chunk, end="")
    >>> states = chat_completion.run_batch([{"messages": m} for m in many])         # doctest: +SKIP
    """
    checked = validate_messages(messages)
    _checks.positive_int("max_tokens", max_tokens)
    _checks.temperature("reply_temperature", reply_temperature)
    if reply_stop is not None and not isinstance(reply_stop, str) and not (
            isinstance(reply_stop, list) and all(isinstance(x, str) for x in reply_stop)):
        raise TypeError(f"reply_stop must be None, a string or a list of strings, got {reply_stop!r}")
    for message in checked:
        _say(s, message)
    s += sgl.assistant(sgl.gen("reply", max_tokens=max_tokens, temperature=reply_temperature, stop=reply_stop))


class Conversation:
    """A multi-turn chat whose history is resent, so each turn reuses the last one's cache.

    Every :meth:`ask` runs :func:`chat_completion` on the whole history plus
    the new user message and appends both the message and the reply. Each
    prompt therefore starts with the previous prompt and reply: a server's
    radix cache already holds that prefix, and ``PDBackend``'s cache-aware
    routing sends the turn to the prefill server that cached it
    (``state.get_meta_info("reply")["cached_tokens"]`` shows the reuse).

    Parameters
    ----------
    system
        Optional system message, kept as the first message.
    backend
        The SGLang backend; ``None`` uses ``sgl.set_default_backend``'s.
    max_tokens, temperature
        Per reply, as in ``sgl.gen``.

    Examples
    --------
    >>> chat = Conversation(system="You are terse.", backend=backend)   # doctest: +SKIP
    >>> chat.ask("Name a prime.")                                      # doctest: +SKIP
    >>> chat.ask("And the next one?")      # resends the history       # doctest: +SKIP
    >>> chat.last_state.get_meta_info("reply")["cached_tokens"]        # doctest: +SKIP
    """

    def __init__(self, system: str | None = None, *, backend=None, max_tokens: int = 128,
                 temperature: float = 0.0) -> None:
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        self._messages = [] if system is None else [{"role": "system", "content": system}]
        self.backend = backend
        self.max_tokens = _checks.positive_int("max_tokens", max_tokens)
        self.temperature = _checks.temperature("temperature", temperature)
        self.last_state = None

    @property
    def messages(self) -> list[dict[str, str]]:
        """A copy of the history so far."""
        return [dict(m) for m in self._messages]

    def ask(self, content: str) -> str:
        """Send ``content`` as the next user message; return the reply and keep both.

        Raises
        ------
        TypeError, ValueError
            ``content`` is not a string.
        Exception
            The backend's error (e.g. ``backends.PDError``); the history is
            then left unchanged, so the turn can simply be retried.
        """
        if not isinstance(content, str):
            raise TypeError(f"content must be a string, got {type(content).__name__}")
        messages = self._messages + [{"role": "user", "content": content}]
        state = chat_completion.run(messages=messages, max_tokens=self.max_tokens,
                                    reply_temperature=self.temperature, backend=self.backend)
        settle(state)  # see sgl_programs._threads
        if state.error() is not None:
            raise state.error()
        self.last_state = state
        self._messages = messages + [{"role": "assistant", "content": state["reply"]}]
        return state["reply"]
