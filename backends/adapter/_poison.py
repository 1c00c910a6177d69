"""Refuse, before sending, the ``/generate`` bodies SGLang 0.5.23 accepts but cannot survive.

Every row was sent to real servers (tiny model, CPU, 1 prefill + 1 decode + 1
colocated). "dies": the scheduler raised and the server exited. "500": the HTTP
worker raised; the server lives, but the adapter takes a 5xx for a server fault
and retries it on every pair. Paths are inside the ``sglang`` package.

=================================  ===================  =========  ============================================
input                              PD pair              colocated  where it breaks (``sglang/srt/...``)
=================================  ===================  =========  ============================================
``text: ""``; ``""`` in a list     prefill dies         dies       ``layers/rotary_embedding/base.py``
                                                                   ``forward_native``: reshape of 0 tokens
``input_ids: [[1], []]``           prefill dies         200        ``mem_cache/common.py`` ``release_kv_cache``
                                                                   assert, via ``disaggregation/prefill.py``
``text`` with ``input_ids: []``    (not run)            dies       the tokenizer manager prefills ``input_ids``
token id < 0 or >= vocab_size      prefill dies         dies       ``layers/vocab_parallel_embedding.py``
                                                                   ``_embed_local_shard``: IndexError
``top_logprobs_num`` > 128,        prefill dies         200        ``disaggregation/utils.py``
with ``return_logprob``                                            ``MetadataBuffers.set_buf``: 128 columns
``top_logprobs_num`` > vocab,      prefill dies         dies       ``layers/logprob_processor.py``
with ``return_logprob``                                            ``get_top_logprobs_raw``: topk out of range
``sampling_params.n`` > 1          one prompt: decode   200        ``managers/tokenizer_manager.py``
                                   hangs; a batch:                 ``_handle_batch_request``: the warm-up and
                                   both legs hang                  the samples share one bootstrap room
one prompt, a list for             both die (run with   dies       ``managers/scheduler.py``
``logprob_start_len``,             logprob_start_len)              ``_handle_generate_request`` (list > int),
``top_logprobs_num``,                                              ``managers/schedule_batch.py``
``return_hidden_states``                                           ``get_return_hidden_states_mode``
one prompt, a list for             500                  500        ``tokenizer_manager.py``
``sampling_params`` or ``rid``                                     ``_validate_one_request``, ``_init_req_state``
a batch, a per-item list shorter   500                  500        ``managers/io_struct.py``
than the batch (``_PER_ITEM``)                                     ``GenerateReqInput.__getitem__``: IndexError
``text`` and ``input_ids`` of      (not run)            500        ``io_struct.py`` counts items by ``text``;
different shapes                                                   ``input_ids`` are what is prefilled
``stop_regex`` ``re`` rejects      500                  500        ``sampling/sampling_params.py`` ``normalize``
``sampling_params.choice``         (not run)            500        in the API schema, not in ``SamplingParams``
``positional_embed_overrides``     (not run)            dies       ``scheduler.py`` ``process_input_requests``:
                                                                   a JSON dict has no ``reconstruct``
``disagg_prefill_dp_rank`` of      decode 500, prefill  (not run)  ``disaggregation/decode.py``
another rank (``routed_dp_rank``   leg hangs (300 s)               ``_resolve_prefill_dp_rank``
on a DP prefill: from the source)
=================================  ===================  =========  ============================================

Left to SGLang (a clean 400, servers fine): prompts or ``max_new_tokens`` over
the context, ``input_ids: []`` alone, grammars that do not compile (huge ones
compile), out-of-vocabulary ``token_ids_logprob``/``logit_bias``,
``min_new_tokens > max_new_tokens``, ``logprob_start_len`` past the prompt, beam
search in PD, features the server was not started with (LoRA, hidden states,
custom logit processors, ``input_embeds``, watermarks). Not decidable here: a
grammar that ends before ``min_new_tokens`` (500 "Grammar accept_token failed").
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.adapter._payloads import sampling_items
from backends.errors import BadRequestError

__all__ = ["ServerLimits", "check_generate_body", "VOCAB_PROBE", "vocab_size_from_probe", "PD_TOP_LOGPROBS_CAPACITY"]

#: Columns of a PD prefill server's first-token top-logprob buffer: a default argument of
#: ``MetadataBuffers`` (``srt/disaggregation/utils.py``) that no flag or variable changes.
PD_TOP_LOGPROBS_CAPACITY = 128

#: A body every SGLang server (prefill, decode, colocated) refuses with HTTP 400 before
#: scheduling, naming the vocabulary: "...valid range is [0, 4096)." Neither ``/server_info``
#: nor ``/model_info`` reports the vocabulary size.
VOCAB_PROBE = {"text": "a", "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
               "token_ids_logprob": [2**62]}
_VOCAB_IN_MESSAGE = re.compile(r"valid range is \[0, (\d+)\)")

# Below this many ids, min() + max() on the list beat the array + numpy set-up (~5 us).
_VECTOR_FROM = 96

# Indexed per batch item by GenerateReqInput.__getitem__ with no length check.
_PER_ITEM = ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
             "return_sampling_mask", "sampling_logprobs_mode", "lora_path", "custom_logit_processor",
             "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
             "video_data", "audio_data")
# A list here for ONE prompt kills the scheduler (the first three) or answers 500 (the rest);
# other per-item fields given as lists for one prompt are served, ignored or refused with a 400.
_SCALAR_FOR_ONE = ("logprob_start_len", "top_logprobs_num", "return_hidden_states", "sampling_params", "rid")


@dataclass(frozen=True)
class ServerLimits:
    """What the check needs to know about the servers a body will reach.

    Parameters
    ----------
    vocab_size
        Rows of the model's embedding; ``None`` skips the checks that need it.
    disaggregation_mode
        ``"prefill"`` or ``"decode"`` for a PD deployment, ``"null"`` for colocated servers.
    dp_size
        Data-parallel ranks of the prefill server(s).
    """

    vocab_size: int | None
    disaggregation_mode: str = "null"
    dp_size: int = 1

    @property
    def pd(self) -> bool:
        return self.disaggregation_mode in ("prefill", "decode")

    @classmethod
    def from_json(cls, server_info: dict, model_info: dict | None = None, *,
                  vocab_size: int | None = None) -> ServerLimits:
        """Limits from one server's ``/server_info`` (and ``/model_info``) JSON.

        ``vocab_size`` is in neither: pass :func:`vocab_size_from_probe` of the
        server's answer to :data:`VOCAB_PROBE` (or the model's ``config.json``).
        Context length and token budgets are not needed: SGLang refuses what
        exceeds them with a clean 400.
        """
        mode = server_info.get("disaggregation_mode") or (model_info or {}).get("disaggregation_mode") or "null"
        return cls(vocab_size=vocab_size, disaggregation_mode=str(mode), dp_size=int(server_info.get("dp_size") or 1))


def vocab_size_from_probe(error_message: str) -> int | None:
    """The vocabulary size in a server's 400 message for :data:`VOCAB_PROBE`, else ``None``."""
    found = _VOCAB_IN_MESSAGE.search(error_message or "")
    return int(found.group(1)) if found else None


def _refuse(field: str, shape: str, why: str, fix: str) -> BadRequestError:
    return BadRequestError(f"{field} {shape}: {why}; {fix}")


def _is_batch_ids(ids: Any) -> bool:
    return isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)


def _check_ids(field: str, ids: list, vocab_size: int | None, shape: str) -> None:
    if vocab_size is None or not ids:
        return
    try:
        if len(ids) < _VECTOR_FROM:
            low, high = min(ids), max(ids)
            bad = low if low < 0 else high if high >= vocab_size else None
        else:
            # One C pass that also refuses negatives (array "I" is unsigned), then a vectorised
            # max: ~7 ns a token here, a third of min() + max() over a long list.
            high = int(np.frombuffer(array("I", ids), dtype=np.uintc).max())
            bad = high if high >= vocab_size else None
    except OverflowError:  # below 0 or at least 2**32: find which, off the fast path
        low = min(ids)
        bad = low if low < 0 else max(ids)
    except TypeError:
        return  # not ints: SGLang's own 400
    if bad is not None:
        raise _refuse(field, f"({shape}) holds token id {bad}",
                      f"the embedding has rows 0..{vocab_size - 1} and SGLang does not check, so the scheduler "
                      "dies on the lookup and takes the server down", f"send ids in [0, {vocab_size})")


def _check_prompts(body: dict, limits: ServerLimits) -> int | None:
    """Check what will be prefilled; return the batch size as SGLang counts it (``None``: one prompt)."""
    text, ids = body.get("text"), body.get("input_ids")
    size = (len(text) if isinstance(text, list) else None) if text is not None else \
        (len(ids) if _is_batch_ids(ids) else None)
    if text is not None and ids is not None:
        # SGLang counts items by text but prefills input_ids whenever they are present.
        if isinstance(text, list) != _is_batch_ids(ids) or (size and len(ids) < size) or ids == []:
            raise _refuse("input_ids", f"(a list of {len(ids) if isinstance(ids, list) else '?'}) given with text",
                          "SGLang counts the items by text but prefills input_ids: mismatched shapes fail "
                          "(HTTP 500) and empty ids kill the server", "send text or input_ids, not both")
    elif text is not None:
        if text == "":
            raise _refuse("text", "is an empty string", "a prompt of 0 tokens kills the server's scheduler "
                          "(SGLang on CPU cannot reshape an empty tensor)", "send at least one token")
        if size and "" in text:
            raise _refuse(f"text[{text.index('')}]", f"is an empty string (batch of {size})",
                          "a prompt of 0 tokens kills the server's scheduler", "drop the item or give it text")
        return size
    if not isinstance(ids, list) or not ids:
        return size
    if not isinstance(ids[0], list):
        _check_ids("input_ids", ids, limits.vocab_size, f"one prompt of {len(ids)} tokens")
        return size
    for i, row in enumerate(ids):
        if isinstance(row, list) and not row:
            raise _refuse(f"input_ids[{i}]", f"is an empty list (batch of {len(ids)})", "a prompt of 0 tokens "
                          "kills a PD prefill server (SGLang refuses input_ids: [] but not an empty row)",
                          "drop the item or give it tokens")
        if isinstance(row, list):
            _check_ids(f"input_ids[{i}]", row, limits.vocab_size, f"{len(row)} tokens, batch of {len(ids)}")
    return size


def _check_shapes(body: dict, size: int | None) -> None:
    if size is None:
        for field in _SCALAR_FOR_ONE:
            if isinstance(body.get(field), list):
                raise _refuse(field, f"is a list of {len(body[field])} for one prompt",
                              "SGLang takes lists only for batches; for one prompt its scheduler dies on this "
                              "field or it answers HTTP 500", "send a single value")
        return
    for field in _PER_ITEM:
        value = body.get(field)
        if isinstance(value, list) and len(value) < size and not (
                field == "token_ids_logprob" and value and not isinstance(value[0], list)):  # flat: shared by all
            raise _refuse(field, f"is a list of {len(value)} for a batch of {size}", "SGLang indexes it per "
                          "item without checking the length (IndexError, HTTP 500)",
                          "send one value per item, or a single value for all")


def _check_sampling(body: dict, limits: ServerLimits) -> None:
    for where, item in sampling_items(body):
        if not isinstance(item, dict):
            continue  # SGLang's own 400
        n = item.get("n")
        if limits.pd and isinstance(n, int) and n > 1:
            raise _refuse(f"{where}.n", f"is {n}", "SGLang sends the n samples and a prefix warm-up of a prompt "
                          "with one bootstrap room, so the PD pair hangs", f"send {n} requests instead (in a program: s.fork({n}) or run_batch)")
        if "choice" in item:
            raise _refuse(f"{where}.choice", "is set", "SGLang 0.5.23's API schema has it but its sampler does "
                          "not (HTTP 500)", "leave it out; use regex or sgl.select")
        stop_regex = item.get("stop_regex")
        for pattern in [stop_regex] if isinstance(stop_regex, str) else stop_regex or ():
            try:
                re.compile(pattern)  # what SGLang does, uncaught; re caches compiled patterns
            except (re.error, TypeError) as exc:
                raise _refuse(f"{where}.stop_regex", f"{pattern!r} does not compile ({exc})",
                              "SGLang answers HTTP 500 for it", "fix the pattern") from None


def _check_logprobs(body: dict, size: int | None, limits: ServerLimits) -> None:
    top, wanted = body.get("top_logprobs_num"), body.get("return_logprob")
    if not top or not wanted:
        return  # top logprobs are computed only with return_logprob
    tops = top if isinstance(top, list) else [top]
    if isinstance(wanted, list):
        wants = wanted if isinstance(top, list) else [any(wanted)]
    else:
        wants = [wanted] * len(tops)
    for i, (k, want) in enumerate(zip(tops, wants)):
        if not (want and isinstance(k, int)):
            continue
        field = f"top_logprobs_num[{i}]" if isinstance(top, list) else "top_logprobs_num"
        if limits.pd and k > PD_TOP_LOGPROBS_CAPACITY:
            raise _refuse(field, f"is {k} with return_logprob", "a PD prefill server ships the first token's top "
                          f"logprobs in a buffer of {PD_TOP_LOGPROBS_CAPACITY} columns and dies when it overflows",
                          f"ask for at most {PD_TOP_LOGPROBS_CAPACITY}")
        if limits.vocab_size is not None and k > limits.vocab_size:
            raise _refuse(field, f"is {k} with return_logprob", f"the model has {limits.vocab_size} tokens and "
                          "the scheduler dies in topk", f"ask for at most {limits.vocab_size}")


def check_generate_body(body: dict, limits: ServerLimits) -> None:
    """Raise :class:`~backends.errors.BadRequestError` for a body that would crash or hang a server.

    Pure and cheap: dict look-ups, plus one conversion and one vectorised
    ``max`` per ``input_ids`` row (~15 us for 2,000 tokens here). What it does not recognise is left to SGLang,
    which validates the rest itself with a clean 400.

    Parameters
    ----------
    body
        A native ``/generate`` body, before the adapter adds rids and bootstrap fields.
    limits
        The servers it will reach.
    """
    if not isinstance(body, dict):
        return
    size = _check_prompts(body, limits)
    _check_shapes(body, size)
    _check_sampling(body, limits)
    _check_logprobs(body, size, limits)
    if body.get("positional_embed_overrides") is not None:
        raise _refuse("positional_embed_overrides", "is set", "it is an in-process tensor object; from JSON the "
                      "scheduler calls a method a dict lacks and dies", "leave it out")
    if limits.pd:
        rank = body.get("disagg_prefill_dp_rank")
        if rank is not None and not (rank == 0 and limits.dp_size == 1):
            raise _refuse("disagg_prefill_dp_rank", f"is {rank!r}", "the adapter puts each prompt on a prefill DP "
                          "rank through its bootstrap room; a decode server sent to another rank fails its "
                          "handshake while the prefill leg hangs", "leave it out")
        if body.get("routed_dp_rank") is not None and limits.dp_size > 1:
            raise _refuse("routed_dp_rank", f"is {body['routed_dp_rank']!r}", "it moves the prefill leg off the "
                          "rank its bootstrap room names, so the decode server waits for it", "leave it out")
