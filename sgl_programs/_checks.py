"""Argument checks shared by the programs, run before any request is sent.

Why: a bad argument found by the server costs a round trip and comes back as
an HTTP error far from its cause; found here it names the argument and the
fix. Wrong *types* raise ``TypeError`` on purpose: SGLang's ``run_batch``
traces each program once with placeholder ``SglArgument`` objects to find a
shared prompt prefix, and it stops tracing cleanly only on ``TypeError`` (or
``AttributeError``). A program that checks its per-item arguments right after
emitting its shared text therefore gets that text pre-cached for the batch.

No program argument is named ``temperature`` or ``stop``: ``program.run()``
takes those names as its own keyword options (run-wide sampling defaults), so
an argument so named would never reach the program. Programs say
``reply_temperature``, ``draft_temperature``... instead.
"""

from __future__ import annotations

from typing import Any, Sequence


def text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """``value`` as a string; ``TypeError`` if it is not one, ``ValueError`` if blank."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty; give some text")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (``bool`` is refused: ``True`` is no token count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def temperature(name: str, value: Any) -> float:
    """A sampling temperature: a number >= 0 (0 is greedy)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 is greedy), got {value}")
    return float(value)


def choices(name: str, value: Any) -> list[str]:
    """At least two distinct, non-empty strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = list(value)
    if len(items) < 2:
        raise ValueError(f"{name} needs at least two entries to choose from, got {items!r}")
    for i, item in enumerate(items):
        text(f"{name}[{i}]", item)
    if len(set(items)) != len(items):
        raise ValueError(f"{name} has duplicates: {items!r}")
    return items


def mapping_list(name: str, value: Any, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """A non-empty list of dicts, each with string values under ``keys``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of dicts with keys {keys}, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is empty")
    checked = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in keys):
            raise ValueError(f"{name}[{i}] must be a dict with string values for {keys}, got {item!r}")
        checked.append({k: item[k] for k in keys})
    return checked
