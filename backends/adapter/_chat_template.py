"""The frontend chat template, taken from the model itself.

SGLang's frontend picks a chat template by string-matching the model path and
silently falls back to a generic ``USER:/ASSISTANT:`` format, which a model
was never trained on. Here the template comes from the model's own Hugging
Face ``chat_template``: each role's prefix and suffix are read off by
rendering sentinel messages. Only when the model's files are not on this
machine does the path guess remain, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.lang.chat_template import ChatTemplate, get_chat_template, get_chat_template_by_model_path

from backends.errors import ConfigurationError

__all__ = ["template_from_tokenizer", "resolve_chat_template"]

logger = logging.getLogger(__name__)

_SENTINELS = {"system": "@@SGLPD_SYSTEM@@", "user": "@@SGLPD_USER@@", "assistant": "@@SGLPD_ASSISTANT@@"}


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _split(segment: str, sentinel: str) -> tuple[str, str]:
    prefix, found, suffix = segment.partition(sentinel)
    if not found:
        raise ValueError(f"template dropped the {sentinel} message")
    return prefix, suffix


def template_from_tokenizer(tokenizer: Any, name: str) -> ChatTemplate:
    """Role prefixes and suffixes of a Hugging Face tokenizer's chat template.

    Renders one, two and three messages (system, user, assistant); the text
    each message adds, split around its sentinel, is that role's prefix and
    suffix. A leading BOS token is dropped: the server adds it when tokenizing.
    """
    roles: dict[str, tuple[str, str]] = {}
    history: list[dict[str, str]] = []
    rendered = ""
    for role in ("system", "user", "assistant"):
        history.append({"role": role, "content": _SENTINELS[role]})
        try:
            text = _render(tokenizer, history)
        except Exception:  # noqa: BLE001 - some templates refuse a system turn
            if role != "system":
                raise
            history.pop()
            roles["system"] = ("", "")
            continue
        roles[role] = _split(text[len(rendered) :], _SENTINELS[role])
        rendered = text
    bos = getattr(tokenizer, "bos_token", None)
    first = "system" if roles["system"] != ("", "") else "user"
    if bos and roles[first][0].startswith(bos):
        roles[first] = (roles[first][0][len(bos) :], roles[first][1])
    stop = roles["assistant"][1].strip()
    return ChatTemplate(
        name=name, default_system_prompt=None, role_prefix_and_suffix=roles, stop_str=(stop,) if stop else ()
    )


def resolve_chat_template(model_path: str, choice: str | ChatTemplate | None = None) -> ChatTemplate:
    """The chat template for ``model_path``.

    Parameters
    ----------
    model_path
        As the server reports it (a local folder or a hub id in the local cache).
    choice
        A ``ChatTemplate``, the name of one of SGLang's registered templates,
        or ``None`` to read the model's own.
    """
    if isinstance(choice, ChatTemplate):
        return choice
    if isinstance(choice, str):
        try:
            return get_chat_template(choice)
        except KeyError:
            raise ConfigurationError(
                f"unknown chat template {choice!r}; pass a name SGLang registers (e.g. 'chatml', 'llama-2-chat') "
                "or a sglang.lang.chat_template.ChatTemplate"
            ) from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if getattr(tokenizer, "chat_template", None):
            return template_from_tokenizer(tokenizer, name=f"hf:{model_path}")
        reason = "it has no chat_template"
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        reason = f"its tokenizer is not readable here ({type(exc).__name__})"
    guess = get_chat_template_by_model_path(model_path)
    logger.warning(
        "chat template of %s not taken from the model because %s; using SGLang's %r guess. "
        "Pass chat_template= to choose one.", model_path, reason, guess.name,
    )
    return guess
