"""Client-side tokenization giving exactly the ids an SGLang server computes for ``text``.

What the server does (SGLang 0.5.23): ``TokenizerManager._tokenize_texts``
(``sglang/srt/managers/tokenizer_manager.py``) calls ``tokenizer([text])`` for a
fast tokenizer (``tokenizer.encode(text)`` for a slow one), so special tokens
are added as the tokenizer's post-processor says (BOS on Llama-style models),
and the tokenizer comes from ``get_tokenizer`` (``sglang/srt/utils/hf_transformers/
tokenizer.py``) with the server's ``tokenizer_path``, ``tokenizer_mode``,
``trust_remote_code``, ``revision`` and ``tokenizer_backend``, which patches some
tokenizers after loading (e.g. restores ``add_bos_token`` under transformers v5).
We call that same loader when SGLang is importable, AutoTokenizer otherwise.
Frontend programs render their chat template themselves and send text holding
the special tokens as text; the server splits them out like any other text, so
nothing chat-specific is needed here.

Cost: a fast tokenizer takes ~1-1.5 us a token here (2 ms for 2,000 tokens),
far over a 300 us routing budget, so ``encode`` caches *segments*: the pieces
between added tokens (``<|im_start|>`` ...). A Hugging Face tokenizer extracts
added tokens first and normalizes, pre-tokenizes and encodes each piece on its
own, then its post-processor adds BOS/EOS once; so ids(text) is the
concatenation of the pieces' ids, plus that prefix/suffix. That holds only when
no added token strips whitespace (``lstrip``/``rstrip``/``single_word``), no
``Metaspace`` prepends only to the first piece (``prepend_scheme: "first"``),
and normalized added tokens meet no normalizer; we check these and a set of
probes against the full call at load, and otherwise tokenize whole texts.
Reusing the ids of an already-seen *text prefix* is not exact in general (BPE
merges across the cut), so a long prompt with no added token in it costs a
full tokenization each time it changes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from typing import Any, Optional

__all__ = ["ServerTokenizer", "load_server_tokenizer"]

logger = logging.getLogger(__name__)

_PROBES = ("", "a", " a", "a ", "\n", "Hello world", "  two  spaces ", "tabs\tand\nnewlines\n\n", "über 12345 ünï",
           "x=1;y = [2, 3]  # c", "'s 're n't", "\u4f60\u597d\uff0c\u4e16\u754c")


class ServerTokenizer:
    """``encode(text)`` -> the ids an SGLang server computes for ``{"text": text}``. Thread-safe.

    Parameters
    ----------
    tokenizer
        The tokenizer as the server loads it (see :func:`load_server_tokenizer`).
    slow
        The server's ``tokenizer_mode`` is ``"slow"`` (it then calls ``encode``).
    max_cached_tokens, max_segments
        Bounds of the segment cache.
    """

    def __init__(self, tokenizer: Any, *, slow: bool = False, max_cached_tokens: int = 1 << 20,
                 max_segments: int = 1 << 16):
        self.tokenizer, self._slow = tokenizer, slow
        self._max_tokens, self._max_segments = max_cached_tokens, max_segments
        self._lock = threading.Lock()  # the HF wrapper mutates padding state per call: not thread-safe
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_tokens = self.hits = self.misses = 0
        self._plan = self._segment_plan()
        if self._plan and any(self._segmented(p) != self.encode_full(p) for p in _probe_texts(self._plan[1])):
            logger.info("tokenizer is not separable at its added tokens; tokenizing whole prompts")
            self._plan = None
        self._cache.clear()
        self._cached_tokens = self.hits = self.misses = 0

    @property
    def segmented(self) -> bool:
        """Whether the (exact) segment cache is in use."""
        return self._plan is not None

    def encode_full(self, text: str) -> list[int]:
        """The server's own call, uncached."""
        with self._lock:
            if self._slow:
                return list(self.tokenizer.encode(text))
            return list(self.tokenizer([text])["input_ids"][0])

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the server computes them, special tokens included."""
        if self._plan is None or not text:
            return self.encode_full(text)
        return self._segmented(text)

    def stats(self) -> dict[str, int]:
        return {"segment_hits": self.hits, "segment_misses": self.misses, "cached_segments": len(self._cache),
                "cached_tokens": self._cached_tokens, "segmented": int(self.segmented)}

    def _segmented(self, text: str) -> list[int]:
        splitter, special, prefix, suffix, backend = self._plan
        parts = splitter.split(text)  # [piece, added token, piece, ...]
        ids, missing, cache = list(prefix), {}, self._cache
        with self._lock:
            for piece in parts[0::2]:
                if piece and piece not in cache:
                    missing[piece] = None
        if missing:  # the Rust tokenizer's encode is safe to call from many threads
            # One by one: encode_batch hands even two short pieces to a thread pool (~0.4 ms of overhead).
            encoded = [backend.encode(piece, add_special_tokens=False) for piece in missing]
            with self._lock:
                for piece, enc in zip(missing, encoded):
                    self._remember(piece, enc.ids)
        with self._lock:
            found = {}
            for i, part in enumerate(parts):
                if i & 1:
                    ids.append(special[part])
                elif part:
                    piece_ids = cache.get(part)
                    if piece_ids is not None:
                        cache.move_to_end(part)
                    elif (piece_ids := found.get(part)) is None:  # evicted meanwhile by another thread
                        piece_ids = backend.encode(part, add_special_tokens=False).ids
                    found[part] = piece_ids
                    ids.extend(piece_ids)
            self.hits += len(found) - len(missing)
            self.misses += len(missing)
        ids.extend(suffix)
        return ids

    def _remember(self, piece: str, ids: list[int]) -> None:
        if piece in self._cache:  # another thread encoded it meanwhile
            return
        self._cache[piece] = ids
        self._cached_tokens += len(ids)
        while self._cache and (self._cached_tokens > self._max_tokens or len(self._cache) > self._max_segments):
            self._cached_tokens -= len(self._cache.popitem(last=False)[1])

    def _segment_plan(self) -> Optional[tuple]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._slow or backend is None or getattr(backend, "encode_special_tokens", False):
            return None
        added = backend.get_added_tokens_decoder()
        if not added or any(t.lstrip or t.rstrip or t.single_word or (t.normalized and backend.normalizer is not None)
                            for t in added.values()):
            return None
        if re.search(r'"prepend_scheme"\s*:\s*"first"', backend.to_str()):
            return None
        special = {t.content: i for i, t in added.items()}
        # Longest first at each position, like the tokenizer's leftmost-longest matcher.
        splitter = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")
        inner = backend.encode("a", add_special_tokens=False).ids
        whole = backend.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(whole) - len(inner) + 1) if whole[i:i + len(inner)] == inner), None)
        if at is None:
            return None
        return splitter, special, whole[:at], whole[at + len(inner):], backend


def _probe_texts(special: dict[str, int]) -> list[str]:
    tokens = sorted(special)[:8]
    texts = list(_PROBES)
    for i, tok in enumerate(tokens):
        a, b = _PROBES[(i + 1) % len(_PROBES)], _PROBES[(i + 5) % len(_PROBES)]
        texts += [tok, a + tok + b, tok + "\n" + b + tok, " " + tok + " " + a, tok + tok + a, b + tok + "\n\n"]
    return texts


def load_server_tokenizer(model_info: dict, server_info: Optional[dict] = None) -> Optional[ServerTokenizer]:
    """The tokenizer a server uses, loaded locally; ``None`` when that cannot be done exactly.

    ``None`` when the tokenizer is not a local folder (we download nothing), the
    server does not tokenize (``skip_tokenizer_init``) or is multimodal (its
    processor tokenizes), or loading fails. The caller then routes approximately.
    """
    args = {**(server_info or {}), **{k: v for k, v in model_info.items() if v is not None}}
    path = args.get("tokenizer_path") or args.get("model_path")
    if args.get("skip_tokenizer_init") or args.get("has_image_understanding") or args.get("has_audio_understanding"):
        return None
    if not path or not os.path.isdir(path):
        logger.info("tokenizer %r is not a local folder; routing on text instead of tokens", path)
        return None
    mode = args.get("tokenizer_mode") or "auto"
    kwargs = {"tokenizer_mode": mode, "trust_remote_code": bool(args.get("trust_remote_code")),
              "revision": args.get("revision")}
    try:
        try:
            from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer
        except ImportError:  # no SGLang here: transformers with the loader's own defaults
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, use_fast=mode != "slow", clean_up_tokenization_spaces=False,
                                                trust_remote_code=kwargs["trust_remote_code"],
                                                revision=kwargs["revision"])
        else:
            tok = get_tokenizer(path, tokenizer_backend=args.get("tokenizer_backend") or "huggingface", **kwargs)
        return ServerTokenizer(tok, slow=mode == "slow" or not getattr(tok, "is_fast", False))
    except Exception as exc:  # any loader failure means approximate routing, never a failed request
        logger.warning("cannot load the tokenizer at %s (%s); routing on text instead of tokens", path, exc)
        return None

