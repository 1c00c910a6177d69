"""Read a generation's text while it is being produced, sync or async.

Why: ``program.run(stream=True)`` returns at once and fills the state from a
background thread; SGLang's ``text_iter`` / ``text_async_iter`` then yield the
new text of one variable as it arrives. They end quietly when the program
fails, so a broken stream would look like a short answer. :class:`TextStream`
wraps both iterators and raises the program's error at the end instead.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from sglang.lang.interpreter import ProgramState
from sglang.lang.ir import SglFunction

from sgl_programs._threads import settle


class TextStream:
    """The streamed text of variable ``var`` of one program run.

    Iterate it (``for``) or async-iterate it (``async for``), once. After the
    iteration, :attr:`text` is the whole value and :attr:`state` holds the
    meta info (``state.get_meta_info(var)``).

    Raises
    ------
    Exception
        At the end of the iteration, the error the program failed with
        (e.g. ``backends.StreamInterruptedError``), after the text received so far.
    """

    def __init__(self, state: ProgramState, var: str) -> None:
        self.state = state
        self.var = var

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self.state.text_iter(self.var):
                if chunk:
                    yield chunk
        except KeyError:
            self._raise_program_error()  # see _raise_program_error
            raise
        self._raise_program_error()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for chunk in self.state.text_async_iter(self.var):
                if chunk:
                    yield chunk
        except KeyError:
            self._raise_program_error()
            raise
        self._raise_program_error()

    @property
    def text(self) -> str:
        """The variable's full value (waits for the generation to finish)."""
        self._raise_program_error()
        return self.state[self.var]

    def _raise_program_error(self) -> None:
        """Raise the program's error, if any.

        Also called on ``KeyError``: SGLang's iterators look the variable up
        even when its generation failed before the first chunk, hiding the
        real error behind ``KeyError(var)``.
        """
        settle(self.state)  # see sgl_programs._threads
        error = self.state.error()
        if error is not None:
            raise error


def stream_text(program: SglFunction, var: str, /, **kwargs: Any) -> TextStream:
    """Start ``program`` with ``stream=True`` and stream its variable ``var``.

    Parameters
    ----------
    program
        Any ``@sgl.function``.
    var
        Name of the ``sgl.gen`` variable to follow, e.g. ``"reply"``.
    **kwargs
        The program's arguments plus ``program.run`` options (``backend=``...).

    Examples
    --------
    >>> msgs = [{"role": "user", "content": "Tell me a story."}]
    >>> for chunk in stream_text(chat_completion, "reply", messages=msgs):  # doctest: +SKIP
    ...     print(chunk, end="", flush=True)
    >>> async for chunk in stream_text(chat_completion, "reply", messages=msgs):  # doctest: +SKIP
    ...     print(chunk, end="", flush=True)
    """
    if not isinstance(program, SglFunction):
        raise TypeError(f"program must be an @sgl.function, got {type(program).__name__}")
    if not isinstance(var, str) or not var:
        raise TypeError(f"var must be the name of a gen variable such as 'reply', got {var!r}")
    if "stream" in kwargs:
        raise ValueError("stream_text always streams; do not pass stream=")
    return TextStream(program.run(stream=True, **kwargs), var)
