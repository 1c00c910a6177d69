"""The tiny model builds deterministically and its tokenizer is usable."""

from __future__ import annotations

import json

import pytest

from backends.launcher._tiny_model import MARKER_FILE, TINY_MODEL_NAME, ensure_tiny_model, is_tiny_model


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    a = ensure_tiny_model(tmp_path_factory.mktemp("a"))
    b = ensure_tiny_model(tmp_path_factory.mktemp("b"))
    return a, b


def test_builds_are_byte_identical(two_builds):
    a, b = two_builds
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_layout_and_marker(two_builds):
    a, _ = two_builds
    assert a.name == TINY_MODEL_NAME and is_tiny_model(a)
    assert not is_tiny_model(a.parent) and not is_tiny_model(None)
    assert not any(p.name.startswith(".") for p in a.parent.iterdir())  # no temp dirs left
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["intermediate_size"] == 352 and config["vocab_size"] == 4096
    assert config["max_position_embeddings"] >= 4096 + 1024
    assert config["dtype"] == "bfloat16"


def test_second_call_reuses_cache(two_builds):
    a, _ = two_builds
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(a.parent) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp


def test_env_var_moves_default_cache(monkeypatch, tmp_path):
    from backends.launcher._tiny_model import default_cache_dir

    monkeypatch.setenv("SGLPD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"


def test_tokenizer_round_trip_and_chat_template(two_builds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(two_builds[0])
    assert len(tok) == 4096
    text = "def f(x):\n    return {'a': x ** 2}  # héllo ✓\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges actually compress
    assert tok.bos_token and tok.eos_token and tok.pad_token
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == im_start
