"""A deterministic tiny Llama model, built locally, for CPU servers and tests.

Why: no model hub is reachable from CI or this machine, yet the serving path
(tokenizer, scheduler, KV cache, PD transfer) should be exercised for real.
A 1.4 M-parameter ``LlamaForCausalLM`` with random weights (fixed seed) and a
byte-level BPE tokenizer trained on a fixed list of Python standard-library
files is enough: its text is nonsense, but greedy output is deterministic, so a
PD pair can be checked token for token against a colocated server.

The model is built once and cached under ``$SGLPD_CACHE/models`` (default
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

__all__ = ["default_cache_dir", "is_tiny_model", "tiny_model_dir", "ensure_tiny_model", "TINY_MODEL_NAME", "MARKER_FILE"]

#: Folder name of the model; bump the suffix whenever the recipe changes.
TINY_MODEL_NAME = "tiny-llama-v1"
#: File whose presence marks a directory as this random tiny model.
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


def is_tiny_model(path: str | os.PathLike | None) -> bool:
    """Tell whether ``path`` is a directory holding the random tiny model."""
    if path is None:
        return False
    return (Path(path).expanduser() / MARKER_FILE).is_file()


def tiny_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`ensure_tiny_model` puts the tiny model (it may not be built yet)."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / TINY_MODEL_NAME


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the tiny model's directory, building it on first use.

    Parameters
    ----------
    cache_dir : path-like, optional
        Folder that holds model folders; default :func:`default_cache_dir`.

    Returns
    -------
    pathlib.Path
        ``<cache_dir>/tiny-llama-v1``, loadable with ``--model-path``.
    """
    final = tiny_model_dir(cache_dir)
    root = final.parent
    if is_tiny_model(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.tmp-", dir=root))
    try:
        _build(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_tiny_model(final):  # not a lost race: something else is there
                raise RuntimeError(
                    f"Cannot publish the tiny model at {final}: the path exists but is "
                    f"not a complete tiny model. Remove {final} and retry."
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def _build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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


def _build(out_dir: Path) -> None:
    tokenizer = _build_tokenizer()
    model = _build_model(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER_FILE).write_text(
        "Random-weight tiny Llama built by backends/tiny_model.py for tests and CPU "
        "servers. Its output is meaningless text; only the serving path is real.\n",
        encoding="utf-8",
    )
