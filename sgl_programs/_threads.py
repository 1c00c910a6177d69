"""Keep SGLang's executor threads from deadlocking the garbage collector (CPython < 3.13).

Why: each program state runs on an SGLang ``StreamExecutor`` whose ``__del__``
calls ``Thread.is_alive()`` on its worker thread. A state caught in a
reference cycle (a failed program keeps its exception, whose traceback holds
the executor) is freed by the cyclic garbage collector, which may run inside
any thread that is just starting another thread, while it holds
``threading._shutdown_locks_lock``. If that worker has finished but was never
joined, ``is_alive()`` takes the same lock: the process hangs (seen in
``run_batch`` on Python 3.11.7; the stacks end in ``_maintain_shutdown_locks``
-> ``StreamExecutor.__del__`` -> ``Thread._stop``). A joined worker makes
``is_alive()`` lock-free, so :func:`settle` joins it; :func:`collector_paused`
keeps other garbage from being collected during a thread-heavy batch.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

from sglang.lang.interpreter import ProgramState


def settle(state: ProgramState) -> None:
    """Wait until ``state``'s program has finished and join its executor thread."""
    state.sync()
    worker = getattr(state.stream_executor, "worker", None)
    if worker is not None:
        worker.join()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic garbage collection inside the block (restored afterwards)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
