"""Parallel branches: several drafts from one prompt, then one step that judges them.

Why: ``s.fork(n)`` copies the program state into ``n`` branches that generate
concurrently and share the prompt before the fork (SGLang pre-fills it once;
on ``PDBackend`` one warm-up pair caches it on the prefill server every
branch is then routed to). ``join`` gathers each branch's variable into a list
on the parent, which a final ``select`` can judge.
"""

from __future__ import annotations

import sglang as sgl

from sgl_programs import _checks
from sgl_programs.templates import render


@sgl.function
def draft_and_judge(s, task, num_drafts=3, max_tokens=32, draft_temperature=0.0):
    """Write ``num_drafts`` drafts for ``task`` in parallel and pick the best.

    Each branch ends its prompt with its own draft number, so even greedy
    decoding gives branches different texts; raise ``draft_temperature`` for more
    variety. After the call, ``state["draft"]`` is the list of drafts,
    ``state["best"]`` the chosen number (``"1"``...) and ``state.ret_value`` the
    chosen draft's text.

    Parameters
    ----------
    task : str
    num_drafts : int
        Number of branches, at least 2.
    max_tokens, draft_temperature
        ``max_tokens`` and ``temperature`` of each draft's ``sgl.gen``. The
        judge always decodes greedily.

    Raises
    ------
    Exception
        The error of the first branch that failed.

    Examples
    --------
    >>> state = draft_and_judge.run(task="Name this library.", num_drafts=3)  # doctest: +SKIP
    >>> state["draft"], state["best"], state.ret_value                        # doctest: +SKIP
    """
    task = _checks.text("task", task)
    num_drafts = _checks.positive_int("num_drafts", num_drafts)
    if num_drafts < 2:
        raise ValueError(f"num_drafts must be >= 2 to have something to judge, got {num_drafts}")
    max_tokens = _checks.positive_int("max_tokens", max_tokens)
    draft_temperature = _checks.temperature("draft_temperature", draft_temperature)
    s += render("drafts.j2", task=task)
    s.sync()  # fork pre-fills the shared prompt only if the executor has appended it already
    branches = s.fork(num_drafts)
    for number, branch in enumerate(branches.states, start=1):
        branch += f"Draft {number}:" + sgl.gen("draft", max_tokens=max_tokens, temperature=draft_temperature, stop="\n\n")
    branches.join()
    failed = next((b.error() for b in branches.states if b.error() is not None), None)
    if failed is not None:
        raise failed
    drafts = s["draft"]
    s += "\n" + render("judge.j2", drafts=drafts)
    s += " " + sgl.select("best", choices=[str(n) for n in range(1, num_drafts + 1)])
    if s.error() is not None:  # the judge failed: state.error() reports it
        return None
    return drafts[int(s["best"]) - 1]
