"""The random models build deterministically, share one tokenizer, and configs select them by name."""

from __future__ import annotations

import json

import pytest

from backends import PREFILL_BOUND_MODEL, TINY_MODEL, ConfigurationError, SGLangPDConfig, plan_servers
from backends.launcher._tiny_model import (
    MARKER_FILE,
    TINY_MODEL_NAME,
    ensure_tiny_model,
    is_tiny_model,
    random_model_kind,
    tiny_model_dir,
)


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


@pytest.fixture(scope="module")
def prefill_bound(two_builds):
    return ensure_tiny_model(two_builds[0].parent, kind="prefill-bound")


def test_prefill_bound_model_shape(prefill_bound):
    assert prefill_bound.name == "prefill-bound-llama-v1" and is_tiny_model(prefill_bound)
    config = json.loads((prefill_bound / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (512, 6, 1408)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert config["vocab_size"] == 4096 and config["max_position_embeddings"] >= 8192
    assert (prefill_bound / "model.safetensors").stat().st_size < 100e6  # ~44 MB of bf16 weights


def test_prefill_bound_shares_the_tiny_tokenizer(two_builds, prefill_bound):
    from transformers import AutoTokenizer

    tiny = two_builds[0]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny / name).read_bytes() == (prefill_bound / name).read_bytes(), name
    config = json.loads((prefill_bound / "config.json").read_text())
    assert {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {k: json.loads((tiny / "config.json").read_text())[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    a, b = AutoTokenizer.from_pretrained(tiny), AutoTokenizer.from_pretrained(prefill_bound)
    text = "<|im_start|>user\nimport os; print(os.getcwd())  # ✓<|im_end|>\n"
    assert a.encode(text) == b.encode(text) and len(a.encode(text)) > 5


def test_configs_select_random_models_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLPD_CACHE", str(tmp_path))
    assert (random_model_kind(None), random_model_kind(TINY_MODEL)) == ("tiny", "tiny")
    assert random_model_kind(PREFILL_BOUND_MODEL) == "prefill-bound"
    assert random_model_kind("meta-llama/Llama-2-7b-hf") is None and random_model_kind(str(tmp_path)) is None
    cfg = SGLangPDConfig(model_path=PREFILL_BOUND_MODEL, pd_ratio=(0, 0), colocated=1, device="cpu")
    assert cfg.is_tiny_model and cfg.random_model_kind == "prefill-bound"
    [spec] = plan_servers(cfg)
    assert spec.model_path == str(tmp_path / "models" / "prefill-bound-llama-v1")
    assert spec.argv[spec.argv.index("--model-path") + 1] == spec.model_path
    assert "--constrained-json-disable-any-whitespace" in spec.argv  # random text, like the tiny model
    [tiny] = plan_servers(SGLangPDConfig(model_path=TINY_MODEL, pd_ratio=(0, 0), colocated=1, device="cpu"))
    assert tiny.model_path == str(tiny_model_dir()) == str(tmp_path / "models" / TINY_MODEL_NAME)
    with pytest.raises(ConfigurationError, match="unknown random model 'huge'"):
        SGLangPDConfig(model_path="sglpd:huge")
    with pytest.raises(ConfigurationError, match="unknown random model"):
        ensure_tiny_model(tmp_path, kind="huge")
    assert not is_tiny_model("sglpd:huge") and is_tiny_model(PREFILL_BOUND_MODEL)
