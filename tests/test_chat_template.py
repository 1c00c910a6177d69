"""backends.adapter._chat_template: the frontend's chat template, by name or read off the model's tokenizer."""

import logging

import pytest
from sglang.lang.chat_template import ChatTemplate, get_chat_template, get_chat_template_by_model_path

import backends
from backends.adapter._chat_template import resolve_chat_template, template_from_tokenizer
from backends.errors import ConfigurationError


@pytest.fixture(scope="module")
def tiny_model():
    return str(backends.ensure_tiny_model())


def test_a_name_picks_sglangs_registered_template():
    assert resolve_chat_template("/any/model", "chatml") is get_chat_template("chatml")
    assert resolve_chat_template("/any/model", "llama-2-chat").name == "llama-2-chat"


def test_a_template_object_is_used_as_given():
    template = ChatTemplate(name="mine", default_system_prompt=None,
                            role_prefix_and_suffix={"system": ("", ""), "user": ("U:", "\n"), "assistant": ("A:", "\n")})
    assert resolve_chat_template("/any/model", template) is template


def test_an_unknown_name_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="unknown chat template 'no-such-template'"):
        resolve_chat_template("/any/model", "no-such-template")


def test_the_template_is_read_from_the_models_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    template = resolve_chat_template(tiny_model)
    assert template.name == f"hf:{tiny_model}"
    assert template.role_prefix_and_suffix == {
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    }
    assert template.stop_str == ("<|im_end|>",)
    # The defining property: prefix + content + suffix per message is what the model's template renders.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    rendered = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True).apply_chat_template(
        messages, tokenize=False)
    prefix_and_suffix = template.role_prefix_and_suffix
    assert rendered == "".join(prefix_and_suffix[m["role"]][0] + m["content"] + prefix_and_suffix[m["role"]][1]
                               for m in messages)


def test_without_the_models_files_the_path_guess_remains_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "model-without-files"
    folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="backends.adapter._chat_template"):
        template = resolve_chat_template(str(folder))
    assert template is get_chat_template_by_model_path(str(folder))
    assert "not taken from the model" in caplog.text and "not readable here" in caplog.text


class _Tokenizer:
    """A tokenizer whose template wraps each message in ``[role]...[/role]`` after a BOS."""

    def __init__(self, bos="<s>", system=True):
        self.bos_token, self.system = bos, system

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        if not self.system and any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return (self.bos_token or "") + "".join(f"[{m['role']}]{m['content']}[/{m['role']}]" for m in messages)


def test_template_from_tokenizer_drops_the_bos_the_server_adds():
    template = template_from_tokenizer(_Tokenizer(), name="t")
    assert template.role_prefix_and_suffix == {"system": ("[system]", "[/system]"), "user": ("[user]", "[/user]"),
                                               "assistant": ("[assistant]", "[/assistant]")}
    assert template.stop_str == ("[/assistant]",) and template.name == "t"


def test_a_template_that_refuses_a_system_turn_gets_an_empty_system_role():
    template = template_from_tokenizer(_Tokenizer(system=False), name="t")
    assert template.role_prefix_and_suffix["system"] == ("", "")
    assert template.role_prefix_and_suffix["user"] == ("[user]", "[/user]")  # the BOS dropped from the first role


def test_a_template_that_drops_a_message_is_refused():
    class Dropping(_Tokenizer):
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return super().apply_chat_template([m for m in messages if m["role"] != "assistant"], tokenize,
                                               add_generation_prompt)

    with pytest.raises(ValueError, match="dropped the @@SGLPD_ASSISTANT@@ message"):
        template_from_tokenizer(Dropping(), name="t")
