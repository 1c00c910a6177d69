"""``PDBackend``: SGLang's frontend language on prefill/decode-separated servers.

A :class:`sglang.lang.backend.base_backend.BaseBackend`, so any
``@sgl.function`` runs on it unchanged (``sgl.set_default_backend`` or
``backend=``). It only adapts the frontend's calls; sending, routing,
retries and metrics are its :class:`~backends.adapter.PDClient`'s.

==========================  ====================================================
frontend call               what the servers see
==========================  ====================================================
``gen``                     one pair, decode's answer
``gen`` with ``stream``     one pair, decode streams (SSE), retried until the first chunk
``select``                  2-3 pairs on the same prefill server (prompt logprobs
                            come from prefill and are merged before decode's)
``fork`` (n > 1)            a warm-up pair of the shared text (``commit_lazy_operations``)
``run_batch`` prefix        a warm-up pair on the server that will serve it (``cache_prefix``)
``end_program``             ``/abort_request`` for the program's legs still in flight
``sgl.flush_cache``         ``/flush_cache`` on every server
==========================  ====================================================
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized
from sglang.lang.ir import SglSamplingParams

from backends.adapter._chat_template import resolve_chat_template
from backends.adapter._client import PDClient
from backends.adapter._metrics import Metrics
from backends.adapter._payloads import OUTPUT_LOGPROB_FIELDS, sampling_body
from backends.adapter._select import decide, healed_logprobs, unconditional_body
from backends.errors import BadRequestError, ConfigurationError

__all__ = ["PDBackend"]

#: Per-token lists SGLang's frontend expects one chunk's worth of in each streamed meta_info
#: (``_INCREMENTAL_STREAMING_META_INFO_KEYS`` in ``sglang/lang/interpreter.py``, which concatenates
#: them across chunks); the server sends them cumulative.


class PDBackend(BaseBackend):
    """Runs SGLang programs on pools of prefill, decode and colocated servers.

    Parameters
    ----------
    prefill, decode, colocated : sequence of str
        Server URLs, as for :class:`~backends.adapter.PDClient`.
    client : PDClient, optional
        An existing client to adapt instead (then give no URLs or client options).
    chat_template : str or ChatTemplate, optional
        A ``ChatTemplate`` or the name of an SGLang template; by default read
        from the model's own tokenizer files.
    **client_options
        Passed to :class:`~backends.adapter.PDClient` (policies, timeouts,
        retry, transport, metrics_registry, ...).

    Raises
    ------
    ConfigurationError
        As :class:`~backends.adapter.PDClient`, or both ``client`` and URLs given.
    """

    def __init__(self, prefill: Sequence[str] = (), decode: Sequence[str] = (), colocated: Sequence[str] = (), *,
                 client: PDClient | None = None, chat_template: str | ChatTemplate | None = None,
                 **client_options: Any) -> None:
        super().__init__()
        # SGLang's interpreter would call /concate_and_append_request, a route that no longer exists.
        self.support_concate_and_append = False
        if client is not None and (prefill or decode or colocated or client_options):
            raise ConfigurationError("give PDBackend either a client or server URLs and client options, not both")
        self.client = client or PDClient(prefill, decode, colocated, **client_options)
        self.chat_template = resolve_chat_template(self.client.model_path, chat_template)

    @property
    def metrics(self) -> Metrics:
        """The client's per-request records and totals."""
        return self.client.metrics

    def get_model_name(self) -> str:
        return self.client.model_path

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def generate(self, s: Any, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        """One ``sgl.gen``: returns ``(text, meta_info)`` of the generated part.

        Raises
        ------
        PDError
            As :meth:`PDClient.request` (the interpreter stores it in ``state.error()``).
        """
        body = {"text": s.text_, **sampling_body(sampling_params)}
        answer = self.client.send("gen", body, program=s.sid).answer
        return answer["text"], answer["meta_info"]

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        """One streamed ``sgl.gen``: yields ``(new text, meta_info)`` per server chunk.

        Lazy (nothing is sent before the first ``next()``); retried until the
        first chunk, then a break raises ``StreamInterruptedError``.
        """
        body = {"text": s.text_, **sampling_body(sampling_params), "stream": True}
        sent: dict[str, int] = {}
        for event in self.client.stream("gen_stream", body, program=s.sid):
            text = event.get("text", "")
            delta = text[sent.get("text", 0):]
            sent["text"] = len(text)
            yield delta, _new_logprobs(event.get("meta_info", {}), sent)

    def select(self, s: Any, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod | None = None) -> ChoicesDecision:
        """``sgl.select``: score each choice after the prompt with greedy prompt logprobs.

        Parameters
        ----------
        choices
            Candidate continuations (at least one).
        temperature
            Must be 0 (SGLang scores choices greedily).
        choices_method
            Any of SGLang's methods; default ``token_length_normalized``.

        Raises
        ------
        BadRequestError
            No choices, or a temperature above 0.
        PDError
            As :meth:`PDClient.request`.
        """
        if temperature > 1e-5:
            raise BadRequestError(f"select needs greedy decoding (temperature 0), got temperature={temperature}")
        if not choices:
            raise BadRequestError("select needs at least one choice")
        method = choices_method or token_length_normalized
        # 1. cache the shared prompt and learn its token count; the rest follow it to the same prefill server.
        first = self.client.send("select", {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}, program=s.sid)
        sticky = first.route.prefill.url if first.route.prefill else None
        logprob_start_len = max(first.answer["meta_info"]["prompt_tokens"] - 2, 0)
        scored = self.client.send("select", {
            "text": [s.text_ + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": logprob_start_len,
        }, program=s.sid, prefer_prefill=sticky).answer
        input_logprobs, normalized = healed_logprobs(s.text_, scored)
        unconditional = None
        if method.requires_unconditional_logprobs:
            unconditional = self.client.send("select", unconditional_body(input_logprobs), program=s.sid,
                                             prefer_prefill=sticky).answer
        return decide(choices, method, scored, input_logprobs, normalized, unconditional)

    def commit_lazy_operations(self, s: Any) -> None:
        """Before ``fork``: prefill the shared text once so every branch hits the cache."""
        self._warm(s.text_, program=s.sid)

    def cache_prefix(self, prefix_str: str) -> None:
        """``run_batch``'s shared prefix: warm the server that will serve the batch."""
        self._warm(prefix_str)

    def _warm(self, text: str, program: str | None = None) -> None:
        # max_new_tokens=1: a PD prefill server inserts into its radix cache only for a real pair.
        self.client.send("warm", {"text": text, "sampling_params": {"max_new_tokens": 1}}, program=program)

    def end_program(self, s: Any) -> None:
        """Abort legs left behind by a program whose executor has stopped.

        SGLang calls this as soon as the program *function* returns, while the
        executor thread may still be running the queued ``gen`` calls, and
        again from ``__del__``. Aborting then would cancel live work, so only
        the legs of an executor that has finished (normally or by an error)
        are aborted: orphans that would otherwise hold a server slot. Never raises.
        """
        for executor in s if isinstance(s, list) else [s]:
            if not getattr(executor, "is_finished", True) and getattr(executor, "use_thread", False):
                continue
            self.client.abort_program(getattr(executor, "sid", None))

    def flush_cache(self, wait: float = 30.0) -> None:
        """``sgl.flush_cache``: see :meth:`PDClient.flush_cache`."""
        self.client.flush_cache(wait)

    def get_server_info(self) -> dict[str, Any]:
        """Each server's ``/server_info``, by URL."""
        return self.client.server_info()

    def shutdown(self) -> None:
        """Close the client (its threads and connections). The servers keep running."""
        self.client.close()

    close = shutdown

    def __enter__(self) -> "PDBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _new_logprobs(meta: dict, sent: dict[str, int]) -> dict:
    """``meta`` with each per-token list cut to the entries not yet sent (``sent`` is updated)."""
    meta = dict(meta)
    for key in OUTPUT_LOGPROB_FIELDS:
        if isinstance(meta.get(key), list):
            full = meta[key]
            meta[key], sent[key] = full[sent.get(key, 0):], len(full)
    return meta
