"""Reusable SGLang frontend programs (``@sgl.function``), portable across backends.

Each program is an ordinary ``@sgl.function``: run it with ``.run()``,
``.run_batch()`` or ``stream=True`` on any SGLang backend, including
:class:`backends.PDBackend` for prefill/decode-separated servers.
"""

from sgl_programs.chat import chat_completion, validate_messages

__all__ = ["chat_completion", "validate_messages"]
