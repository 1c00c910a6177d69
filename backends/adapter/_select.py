"""The arithmetic of ``sgl.select``: from the servers' prompt logprobs to SGLang's choice.

Pure functions, kept apart from the sending (``PDBackend.select``) so the
math can be read and tested alone. It follows SGLang's own
``RuntimeEndpoint.select`` (``sglang/lang/backend/runtime_endpoint.py``) with
two differences, both for SGLang 0.5.23's answers:

- the first logprob of a requested range comes back as ``None``; the stock
  client then fails in every choices method that adds logprobs
  (``greedy_token_selection``: ``None + float``; the unconditional method:
  ``None - float``). Here a missing logprob counts as 0.0 for every method,
  as ``compute_normalized_prompt_logprobs`` already skips it;
- the unconditional pass asks for ``logprob_start_len=0`` (by default
  0.5.23 returns no prompt logprobs, an ``IndexError`` in the stock client).
"""

from __future__ import annotations

from typing import Any

from sglang.lang.backend.runtime_endpoint import compute_normalized_prompt_logprobs
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod

__all__ = ["healed_logprobs", "unconditional_body", "decide"]

#: One prompt logprob entry as SGLang returns it: ``[logprob or None, token_id, token_text]``.
Entry = list[Any]


def healed_logprobs(prompt: str, scored: list[dict]) -> tuple[list[list[Entry]], list[float]]:
    """Each choice's prompt logprobs and normalized logprob, after token healing.

    Parameters
    ----------
    prompt
        The program's text before the choice.
    scored
        The servers' answers for ``prompt + choice``, one per choice, asked
        with ``logprob_start_len = prompt_tokens - 2`` and text in logprobs.

    Returns
    -------
    tuple
        ``(input_token_logprobs, normalized_prompt_logprobs)``, one entry per
        choice; missing logprobs (``None``) are 0.0 in the lists.
    """
    input_logprobs = [r["meta_info"]["input_token_logprobs"] for r in scored]
    normalized = [compute_normalized_prompt_logprobs(lp) for lp in input_logprobs]
    for i, logprobs in enumerate(input_logprobs):
        # Token healing: drop the boundary token when the prompt already ended with it.
        if len(logprobs) > 1 and prompt.endswith(logprobs[0][-1]):
            # The mean of what remains (SGLang rescales the mean instead, which is biased when the
            # dropped first entry is the None SGLang 0.5.23 returns there).
            normalized[i] = compute_normalized_prompt_logprobs(logprobs[1:])
            input_logprobs[i] = logprobs[1:]
    return [_filled(lps) for lps in input_logprobs], normalized


def unconditional_body(input_logprobs: list[list[Entry]]) -> dict:
    """The ``/generate`` body that scores each choice's tokens without the prompt."""
    return {
        "input_ids": [[entry[1] for entry in logprobs] for logprobs in input_logprobs],
        "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0,
    }


def decide(choices: list[str], method: ChoicesSamplingMethod, scored: list[dict],
           input_logprobs: list[list[Entry]], normalized: list[float],
           unconditional: list[dict] | None) -> ChoicesDecision:
    """Apply SGLang's ``method`` to the logprobs; ``unconditional`` answers only when it needs them."""
    return method(
        choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=input_logprobs,
        output_token_logprobs=[r["meta_info"]["output_token_logprobs"] for r in scored],
        unconditional_token_logprobs=None if unconditional is None else [
            _filled(r["meta_info"]["input_token_logprobs"]) for r in unconditional],
    )


def _filled(logprobs: list[Entry]) -> list[Entry]:
    return [[lp if lp is not None else 0.0, *rest] for lp, *rest in logprobs]
