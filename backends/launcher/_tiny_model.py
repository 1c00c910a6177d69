"""Deterministic random Llama models, built locally, for CPU servers and tests.

Why: no model hub is reachable from CI or this machine, yet the serving path
(tokenizer, scheduler, KV cache, PD transfer) should be exercised for real.
A 1.4 M-parameter ``LlamaForCausalLM`` with random weights (fixed seed) and a
byte-level BPE tokenizer trained on a fixed list of Python standard-library
files is enough: its text is nonsense, but greedy output is deterministic, so a
PD pair can be checked token for token against a colocated server.

Two kinds share that one tokenizer build (same ids, chat template and special
tokens), so any prompt means the same tokens on both:

- ``"tiny"`` (the default): prefill is nearly free, so it shows the framework.
- ``"prefill-bound"``: 22 M parameters (hidden 512, 6 layers), sized so that
  prefilling 1,000 tokens costs ~0.7 s on one CPU core (SGLang CPU server)
  while a decode step stays ~12 ms; prefix-cache hits then show as latency.

Servers select them by ``model_path``: ``PREFILL_BOUND_MODEL``
(``"sglpd:prefill-bound"``), and ``None`` or ``TINY_MODEL`` (``"sglpd:tiny"``).

Each is built once and cached under ``$SGLPD_CACHE/models`` (default
``~/.cache/sgl-pd/models``). Building goes to a temporary directory first and
is published with one atomic ``rename``, so two processes racing to build it
both end up using one complete copy. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from backends.errors import ConfigurationError

__all__ = ["default_cache_dir", "is_tiny_model", "tiny_model_dir", "ensure_tiny_model", "random_model_kind",
           "MODEL_KINDS", "PREFILL_BOUND_MODEL", "TINY_MODEL", "TINY_MODEL_NAME", "MARKER_FILE"]

#: Per kind: folder name (bump its suffix whenever that recipe changes) and the
#: ``LlamaConfig`` shape. Everything else (tokenizer, seed, positions) is shared.
_KINDS: dict[str, tuple[str, dict]] = {
    "tiny": ("tiny-llama-v1", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)),
    # Prefill is FLOPs, decode is bytes: 17.7 M weights outside the embeddings
    # cost ~35 MFLOP per prompt token (~0.7 s per 1,000 at SGLang's ~55
    # GFLOP/s bf16 on one AVX2 core), while a decode step reads 44 MB once.
    "prefill-bound": ("prefill-bound-llama-v1", dict(hidden_size=512, intermediate_size=1408,
                                                     num_hidden_layers=6, num_attention_heads=8,
                                                     num_key_value_heads=4)),
}
#: Kinds of random model, for ``kind=`` below.
MODEL_KINDS = tuple(_KINDS)
#: ``model_path`` that names a random model without a folder: ``"sglpd:<kind>"``.
_ALIAS_PREFIX = "sglpd:"
#: ``SGLangPDConfig(model_path=PREFILL_BOUND_MODEL)`` builds and serves the prefill-bound model.
PREFILL_BOUND_MODEL = _ALIAS_PREFIX + "prefill-bound"
#: The tiny model by name, as ``model_path=None`` is (for overriding a preset's model, say).
TINY_MODEL = _ALIAS_PREFIX + "tiny"
#: Folder name of the tiny model.
TINY_MODEL_NAME = _KINDS["tiny"][0]
#: File whose presence marks a directory as one of these random models (random
#: weights, nonsense text), whichever kind.
MARKER_FILE = "TINY_RANDOM_MODEL"

_SEED = 1234
_VOCAB_SIZE = 4096
_MAX_POSITIONS = 8192  # room for ~4096-token prompts plus generation
_BOS, _EOS, _PAD = "<s>", "</s>", "<pad>"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_SPECIAL_TOKENS = (_PAD, _BOS, _EOS, _IM_START, _IM_END)
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Fixed, sorted list of standard-library sources (~1.1 MB): same inputs, same files.
_CORPUS_FILES = (
    "argparse.py", "ast.py", "collections/__init__.py", "dataclasses.py",
    "enum.py", "functools.py", "inspect.py", "json/decoder.py",
    "json/encoder.py", "logging/__init__.py", "os.py", "pathlib.py",
    "random.py", "re/_parser.py", "shutil.py", "string.py",
    "subprocess.py", "textwrap.py", "threading.py", "typing.py",
)


def default_cache_dir() -> Path:
    """Return the models cache folder (``$SGLPD_CACHE/models`` or ``~/.cache/sgl-pd/models``)."""
    root = os.environ.get("SGLPD_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sgl-pd"
    return base / "models"


def random_model_kind(model_path: str | os.PathLike | None) -> str | None:
    """The random model a ``model_path`` asks the launcher to build, or ``None`` for any other model.

    ``None`` means ``"tiny"``; ``"sglpd:<kind>"`` means that kind. Folders are
    not inspected: a built model's path is served as it is, like any model.

    Raises
    ------
    ConfigurationError
        ``"sglpd:<kind>"`` with an unknown kind.
    """
    if model_path is None:
        return "tiny"
    if not isinstance(model_path, str) or not model_path.startswith(_ALIAS_PREFIX):
        return None
    kind = model_path[len(_ALIAS_PREFIX):]
    _check_kind(kind, f"model_path {model_path!r}")
    return kind


def is_tiny_model(path: str | os.PathLike | None) -> bool:
    """Tell whether ``path`` holds (or, as ``"sglpd:<kind>"``, names) a random model of any kind."""
    if path is None:
        return False
    if isinstance(path, str) and path.startswith(_ALIAS_PREFIX):
        return path[len(_ALIAS_PREFIX):] in _KINDS
    return (Path(path).expanduser() / MARKER_FILE).is_file()


def tiny_model_dir(cache_dir: str | os.PathLike | None = None, kind: str = "tiny") -> Path:
    """Where :func:`ensure_tiny_model` puts the model of ``kind`` (it may not be built yet)."""
    _check_kind(kind, "kind")
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / _KINDS[kind][0]


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None, kind: str = "tiny") -> Path:
    """Return a random model's directory, building it on first use.

    Parameters
    ----------
    cache_dir : path-like, optional
        Folder that holds model folders; default :func:`default_cache_dir`.
    kind : {"tiny", "prefill-bound"}
        Which model (see the module docstring); both share one tokenizer.

    Returns
    -------
    pathlib.Path
        ``<cache_dir>/tiny-llama-v1`` (or ``prefill-bound-llama-v1``), loadable
        with ``--model-path``.

    Raises
    ------
    ConfigurationError
        Unknown ``kind``.
    """
    final = tiny_model_dir(cache_dir, kind)
    root = final.parent
    if is_tiny_model(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _build(tmp, kind)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_tiny_model(final):  # not a lost race: something else is there
                raise RuntimeError(
                    f"Cannot publish the {kind} model at {final}: the path exists but is "
                    f"not a complete random model. Remove {final} and retry."
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_kind(kind: str, what: str) -> None:
    if kind not in _KINDS:
        raise ConfigurationError(f"{what}: unknown random model {kind!r}; choose one of {list(_KINDS)} "
                                 f"(as a model_path: {[_ALIAS_PREFIX + k for k in _KINDS]}).")


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / rel).read_text(encoding="utf-8") for rel in _CORPUS_FILES
             if (stdlib / rel).is_file()]
    if not texts:
        raise RuntimeError(
            f"No standard-library source found under {stdlib} to train the tiny "
            f"tokenizer on; is this a full CPython install?"
        )
    return texts


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        additional_special_tokens=[_IM_START, _IM_END],
        chat_template=_CHAT_TEMPLATE,
        model_max_length=_MAX_POSITIONS,
    )


def _build_model(tokenizer, kind: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **_KINDS[kind][1],
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Zero the special tokens' output rows: their logit is then 0 while the
        # best random logit is positive, so greedy decoding never stops early.
        for token in _SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    return model.to(torch.bfloat16)


def _build(out_dir: Path, kind: str) -> None:
    tokenizer = _build_tokenizer()  # the same for every kind: same ids, template, special tokens
    model = _build_model(tokenizer, kind)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER_FILE).write_text(
        f"Random-weight {kind} Llama built by backends/launcher/_tiny_model.py for tests and CPU "
        "servers. Its output is meaningless text; only the serving path is real.\n",
        encoding="utf-8",
    )
