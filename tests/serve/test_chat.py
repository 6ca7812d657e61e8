"""/v1/chat/completions through the official ``openai`` client against a
real server: the conversation rendered with the model's chat template
(prompt tokens as transformers counts them), replies that end at the
template's end-of-turn token, at a stop string or at max_tokens, streamed
and not, n choices, seeds; and the error answers.

The model is a random GPT-2 made to answer predictably: its blocks add
nothing to the residual stream and its positions are zero, so each next
token depends on the current one only (a bigram model), and its untied LM
head makes the greedy successor of the prompt's last token the chain
CHAIN[0] -> CHAIN[1] -> CHAIN[2] -> <|im_end|>. Sampling at temperature 1
stays nearly uniform (the chain's margin is small against 600 tokens), so
seeds matter."""

from __future__ import annotations

import json

import pytest

from server_helpers import ServerThread, make_config

# SmolLM2-135M-Instruct's ChatML template (its GGUF's tokenizer.chat_template).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
WORDS = (" the", " and", " of")
MODEL = "tallow-gpt2"  # the generator's id before it named its model: still taken for a GPT-2
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.engine.chat import render_chat
    from tallow.testing import train_byte_level_bpe

    out = tmp_path_factory.mktemp("gpt2-chat")
    train_byte_level_bpe(out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}))
    im_end = tok.token_to_id("<|im_end|>")
    start = tok.encode(render_chat(CHATML, MESSAGES)).ids[-1]  # every generation prompt ends with it
    chain = [tok.encode(w).ids[0] for w in WORDS]
    assert len({start, im_end, 0, *chain}) == 6, "the chain's tokens must be distinct"
    torch.manual_seed(7)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # the residual stream is the token's embedding alone
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        for a, b in zip([start, *chain], [*chain, im_end]):
            head[b] = 3 * wte[a]
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, chat_model_dir):
    cfg = make_config(tmp_path_factory.mktemp("chat-data"), **{
        "models.generator": str(chat_model_dir), "data.demo_corpus": False, "workers.mode": "inline",
        "models.max_completion_tokens": 64})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf_tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model_dir))


@pytest.fixture
def oai(chat_server):
    import openai

    with openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def _chain_text(hf_tokenizer) -> list[str]:
    return [hf_tokenizer.decode(hf_tokenizer.encode(w, add_special_tokens=False)[:1]) for w in WORDS]


def _prompt_tokens(hf_tokenizer, messages) -> int:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_a_reply_ends_at_the_templates_end_of_turn_token(oai, hf_tokenizer):
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(_chain_text(hf_tokenizer))
    assert choice.finish_reason == "stop"
    # the chain's three tokens and the <|im_end|> that ended it
    assert r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens == _prompt_tokens(hf_tokenizer, MESSAGES)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4


def test_streamed_reply_sends_the_role_then_the_text_then_the_finish_reason(oai, hf_tokenizer):
    stream = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == "".join(_chain_text(hf_tokenizer))
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == _prompt_tokens(hf_tokenizer, MESSAGES)


def test_the_sse_stream_ends_with_done(chat_server):
    with chat_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_max_tokens_cuts_the_reply_with_finish_reason_length(oai, hf_tokenizer):
    words = _chain_text(hf_tokenizer)
    for kwargs in ({"max_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 30, "max_completion_tokens": 2}):
        r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, **kwargs)
        assert r.choices[0].finish_reason == "length", kwargs
        assert r.choices[0].message.content == words[0] + words[1]
        assert r.usage.completion_tokens == 2


def test_a_stop_string_cuts_the_reply(oai, hf_tokenizer):
    words = _chain_text(hf_tokenizer)
    for stream in (False, True):
        r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stop=[words[2]], stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            content, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (content, reason) == (words[0] + words[1], "stop")


def test_n_choices_and_seeds_reproduce(oai):
    def ask(seed, **kw):
        r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=12, n=2, seed=seed, **kw)
        assert [c.index for c in r.choices] == [0, 1]
        return [c.message.content for c in r.choices]

    first = ask(1234)
    assert ask(1234) == first
    assert ask(1234, top_p=0.999999) == first  # a different code path, the same draws
    assert first[0] != first[1] and ask(99) != first
    streamed = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=12, n=2, seed=1234,
                                           stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == first


def test_content_as_text_parts_is_the_parts_joined(oai):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You answer"}, {"type": "text",
                                                                                    "text": "briefly."}]},
             {"role": "user", "content": "Say something."}]
    joined = [{"role": "system", "content": "You answer\nbriefly."}, {"role": "user", "content": "Say something."}]
    a = oai.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=3)
    b = oai.chat.completions.create(model=MODEL, messages=joined, temperature=0, max_tokens=3)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_and_chat_share_one_generator(chat_server, hf_tokenizer):
    """The rendered conversation sent to /v1/completions gives the chat reply's
    tokens (there nothing ends at <|im_end|>: that is the chat route's rule)."""
    prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    with chat_server.client() as c:
        before = c.get("/metrics").text
        chat = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0}).json()
        comp = c.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 4}).json()
        gen = c.post("/generate", json={"prompt": prompt, "max_tokens": 4}).json()
        after = c.get("/metrics").text
    assert comp["choices"][0]["text"] == chat["choices"][0]["message"]["content"] == gen["generated_text"]
    assert comp["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]

    def tokens(text):
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("tallow_tokens_generated_total")))
    assert tokens(after) - tokens(before) == 4 + 4 + 4


def test_a_reply_ends_in_the_scheduler_at_the_end_of_turn_token(chat_server, generation_gate):
    """<|im_end|> is not the model's eos (0 here): the request carries it as
    a stop_token_id and the scheduler ends each row in the step that sampled
    it (finish_reason stop). Decided by steps and events: 4 tokens a row and
    the rows' end in the same step, no cancel from the server, not the 50
    tokens of max_tokens."""
    gate = generation_gate(lambda g: False)  # holds nothing: records the steps
    with chat_server.client() as c:
        before = c.get("/metrics").text
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 50,
                                                 "n": 2})
        after = c.get("/metrics").text
    assert r.status_code == 200 and [ch["finish_reason"] for ch in r.json()["choices"]] == ["stop", "stop"]
    rid = gate.submitted[0]
    assert gate.tokens[rid] == 2 * 4
    assert gate.ended_at[rid] == max(i for i, step in enumerate(gate.history) if rid in step)
    assert rid not in gate.cancelled and rid not in gate.dropped_at

    def cancelled(text):
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("tallow_generations_cancelled_total")))
    assert cancelled(after) == cancelled(before)  # a reply that ended is not a cancelled one


def test_chat_through_a_worker_process(tmp_path, chat_model_dir, hf_tokenizer):
    """In process mode (the default) the template, special tokens and eos ids
    come from the worker that loaded the model."""
    cfg = make_config(tmp_path, **{"models.generator": str(chat_model_dir), "data.demo_corpus": False,
                                   "workers.mode": "process", "models.max_completion_tokens": 64})
    server = ServerThread(cfg).start()
    try:
        with server.client() as c:
            r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("".join(_chain_text(hf_tokenizer)), "stop")
    assert r.json()["usage"]["prompt_tokens"] == _prompt_tokens(hf_tokenizer, MESSAGES)


# -- errors ----------------------------------------------------------------------------------------

def _error(r, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'wizard'"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role", "tool calls are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "only text parts"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ""),
    ({"messages": MESSAGES, "n": 0}, "n", "greater than or equal to 1"),
    ({"messages": MESSAGES, "n": 99}, "n", "models.max_n"),
    ({"messages": MESSAGES, "max_tokens": 500}, "max_tokens", "models.max_completion_tokens"),
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens", ""),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop", ""),
    ({"messages": MESSAGES, "temperature": 3}, "temperature", ""),
    ({"messages": MESSAGES, "logprobs": True}, "logprobs", "not supported"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages", "context"),
    ({"messages": [{"role": "user", "content": "x" * 100_000}]}, "messages", "characters"),
])
def test_bad_requests_name_the_field(chat_server, body, param, words):
    with chat_server.client() as c:
        message = _error(c.post("/v1/chat/completions", json=body), 422, param)
    assert words in message


def test_unknown_fields_are_tolerated_and_an_unknown_model_is_404(oai):
    import openai

    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=1, user="me",
                                    frequency_penalty=0, presence_penalty=0)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "gpt-4o" in str(e.value)


@pytest.fixture
def template(chat_server):
    """Sets the served generator's chat template for one test."""
    model = chat_server.services.models["generator"].model
    original = model.chat_template

    def set_template(value):
        model.chat_template = value

    yield set_template
    model.chat_template = original


def test_a_model_without_a_chat_template_is_400(chat_server, template, oai):
    import openai

    template(None)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "no chat template" in str(e.value) and "/v1/completions" in str(e.value)


@pytest.mark.parametrize("source,words", [
    ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
     "{% endif %}", "the model's chat template refused the conversation: Conversations must start with a user turn"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "stopped by the sandbox"),
    ("{{ cycler.__init__.__globals__.os.system('true') }}", "stopped by the sandbox"),
    ("{% set x = messages.append(1) %}", "stopped by the sandbox"),
    ("{% for m in messages %}", "does not compile"),
    ("{{ '  ' }}", "an empty prompt"),
])
def test_a_template_that_raises_or_escapes_is_400(chat_server, template, source, words):
    template(source)
    with chat_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES})
    status = 422 if "empty" in words else 400  # a prompt of nothing is the conversation's, as for completions
    assert words in _error(r, status, "messages")
