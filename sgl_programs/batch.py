"""Run one program over many inputs and keep every item's failure.

Why: SGLang's ``run_batch`` records an error that happens while *generating*
in that item's ``state.error()``, but an exception raised by the program
*function* itself (an argument check, a parse of the output) propagates out
of ``run_batch`` and discards the whole batch. :func:`run_batch_collected`
runs the same ``run_batch`` (shared-prefix pre-caching, thread pool, tqdm
progress bar) with each item's function call guarded, and returns one
:class:`BatchResult` holding every state and every error by index, once every
item has finished (see :mod:`sgl_programs._threads` for why it also pauses
the garbage collector and joins each item's executor thread).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from sglang.lang.interpreter import ProgramState
from sglang.lang.ir import SglFunction
from sglang.lang.tracer import TracerProgramState

from sgl_programs._threads import collector_paused, settle


@dataclass
class BatchResult:
    """What a batch produced.

    Attributes
    ----------
    states
        One ``ProgramState`` per input, in input order (also for failed items).
    errors
        ``(index, exception)`` for every failed item, in index order.
    """

    states: list[ProgramState]
    errors: list[tuple[int, BaseException]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no item failed."""
        return not self.errors

    def values(self, var: str) -> list[Any]:
        """Variable ``var`` of each item, ``None`` for failed items."""
        failed = {i for i, _ in self.errors}
        return [None if i in failed else state[var] for i, state in enumerate(self.states)]


def run_batch_collected(
    program: SglFunction,
    items: Sequence[Mapping[str, Any]],
    *,
    progress_bar: bool = True,
    **run_batch_options: Any,
) -> BatchResult:
    """``program.run_batch(items)`` with per-item errors collected, not raised.

    Parameters
    ----------
    program
        Any ``@sgl.function`` (bound arguments, ``program.bind(...)``, are kept).
    items
        One dict of program arguments per run.
    progress_bar
        Show a tqdm bar (SGLang's own) while items finish.
    **run_batch_options
        Passed to ``run_batch``: ``backend=``, ``num_threads=``, ``temperature=``...

    Examples
    --------
    >>> result = run_batch_collected(chat_completion, [{"messages": m} for m in conversations])  # doctest: +SKIP
    >>> result.ok, [i for i, _ in result.errors]                                                # doctest: +SKIP
    (False, [3])
    """
    if not isinstance(program, SglFunction):
        raise TypeError(f"program must be an @sgl.function, got {type(program).__name__}")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a list of argument dicts, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"items[{i}] must be a dict of program arguments, got {type(item).__name__}")
    if not items:
        return BatchResult(states=[])
    raised: dict[int, BaseException] = {}
    with collector_paused():
        states = _guarded(program, raised).run_batch(
            [dict(item) for item in items], progress_bar=progress_bar, **run_batch_options
        )
    errors = []
    for i, state in enumerate(states):
        settle(state)
        error = raised.get(id(state)) or state.error()
        if error is not None:
            errors.append((i, error))
    return BatchResult(states=states, errors=errors)


def _guarded(program: SglFunction, raised: dict[int, BaseException]) -> SglFunction:
    """A copy of ``program`` whose function records its exception per state.

    The tracer's run (placeholder arguments) is not guarded: it relies on the
    ``TypeError`` to stop tracing.
    """
    func = program.func

    @functools.wraps(func)
    def guarded(s, **kwargs):
        if isinstance(s, TracerProgramState):
            return func(s, **kwargs)
        try:
            return func(s, **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded and returned to the caller
            raised[id(s)] = exc
            return None

    guarded.__signature__ = inspect.signature(func)  # SglFunction reads the argument names from it
    return SglFunction(guarded, num_api_spec_tokens=program.num_api_spec_tokens, bind_arguments=program.bind_arguments)
