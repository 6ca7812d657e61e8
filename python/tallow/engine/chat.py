"""Chat prompts: a conversation rendered with the model's own chat template.

A chat template is a Jinja program shipped with the model (Hugging Face's
``tokenizer_config.json`` / ``chat_template.jinja``, GGUF's
``tokenizer.chat_template``). It is untrusted code, so it runs in jinja2's
``ImmutableSandboxedEnvironment`` with exactly what transformers'
``apply_chat_template`` gives it (``transformers.utils.chat_template_utils``):
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension and a
``{% generation %}`` block, the globals ``raise_exception``,
``strftime_now``, ``dict`` and ``namespace`` (no underscore-prefixed
names), a ``tojson`` filter that does not escape HTML, and the variables
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...). So a
template renders here as it does in transformers, character for character.

Failures are the caller's to see, never a 500: a template that calls
``raise_exception`` (e.g. "roles must alternate"), fails to compile or
render, or tries an operation the sandbox refuses (an attribute like
``__class__``, a mutating method) raises ``ChatTemplateError`` (an
``InputError``; the server answers 400 naming ``messages``).

Where generation ends: at the model's eos and at the end-of-turn token its
template writes (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3,
...): ``stop_token_ids``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError

# Roles a conversation may hold. OpenAI's "developer" is its newer name for the
# system message (templates know only "system"); tool calls are not supported.
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}

# End-of-turn / end-of-generation token names (the ones llama.cpp treats as
# end of generation): one that the template writes and the vocabulary holds
# ends a reply as the eos does.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "<|EOT|>", "</s>", "<｜end▁of▁sentence｜>", "<|return|>",
                      "<|call|>")


class ChatTemplateError(InputError):
    """The conversation cannot be rendered: the model has no chat template, or
    its template raised, failed or was stopped by the sandbox."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param)


# -- the template environment (as transformers builds it) -----------------------------------

def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks the
        assistant's tokens with it): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() and dict.fromkeys() only: no attribute of the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace may hold no underscore-prefixed name (a way into CPython internals).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=1)
def _env():
    return _environment()


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2

    try:
        return _env().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc} (line {exc.lineno})") from None


def _plain(value: Any) -> Any:
    """Only JSON types reach the template (a rich object's methods are a way
    out of the sandbox that it does not know about)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None,
                special_tokens: Mapping[str, str] | None = None, tools: list | None = None,
                documents: list | None = None, **kwargs: Any) -> str:
    """The prompt text for ``messages`` (dicts with ``role`` and ``content``)
    as transformers' ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)`` renders it: ``special_tokens`` (the
    tokenizer's ``special_tokens_map``) and ``bos_token``/``eos_token`` are
    template variables (the latter two win), as are extra ``kwargs``. Keys
    whose value is None are dropped from each message (transformers does the
    same: templates test for a key, not for None). Raises ChatTemplateError."""
    import jinja2

    if not isinstance(template, str) or not template:
        raise ChatTemplateError("the chat template must be a non-empty string", param=None)
    compiled = _compile(template)
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update(kwargs)
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        return compiled.render(messages=_plain(chat), tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=bool(add_generation_prompt), **_plain(variables))
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the model's chat template was stopped by the sandbox (an unsafe operation): "
                                f"{exc}") from None
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(...), an undefined call, ...
        raise ChatTemplateError(f"the model's chat template refused the conversation: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            OverflowError, RecursionError) as exc:
        raise ChatTemplateError(f"the model's chat template failed on this conversation: "
                                f"{type(exc).__name__}: {exc}") from None


# -- OpenAI messages -----------------------------------------------------------------------

def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the templates read them: ``[{role, content}]``
    with ``content`` a string. A content given as a list of parts
    (``{"type": "text", "text": ...}``) is the parts' texts joined by
    newlines (as vLLM does); ``developer`` is taken as ``system``; ``name``
    is kept. Raises InputError naming the offending field."""
    from ..errors import check_utf8

    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise InputError(f"{where} must be an object with role and content", param=where)
        role = m.get("role")
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            extra = " (tool calls are not supported)" if role in ("tool", "function") else ""
            raise InputError(f"{where}.role is {m.get('role')!r}; it must be one of "
                             f"{', '.join(repr(r) for r in ROLES + tuple(_ROLE_ALIASES))}{extra}",
                             param=f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""  # an assistant turn that only called tools: nothing to show
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise InputError(f"{at} is a {kind!r} part; only text parts ({{\"type\": \"text\", "
                                     f"\"text\": ...}}) are supported", param=at)
                if not isinstance(part.get("text"), str):
                    raise InputError(f"{at}.text must be a string", param=f"{at}.text")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise InputError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        check_utf8(content, f"{where}.content", param=f"{where}.content")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# -- the model's side ----------------------------------------------------------------------

def _token_text(tokenizer: Any, token_id: Any) -> str | None:
    if tokenizer is None or not isinstance(token_id, int):
        return None
    lookup = getattr(tokenizer, "id_to_token", None)
    return lookup(token_id) if callable(lookup) else None


def chat_template_of(model: Any) -> str:
    """The model's chat template, or ChatTemplateError saying there is none."""
    template = getattr(model, "chat_template", None)
    if not template:
        raise ChatTemplateError("this model has no chat template (tokenizer_config.json's chat_template, "
                                "chat_template.jinja or GGUF tokenizer.chat_template), so it cannot chat: "
                                "use /v1/completions with a prompt instead", param="model")
    return template


def special_tokens_of(model: Any) -> dict[str, str]:
    """The template's special-token variables: the model's ``special_tokens``
    (from its tokenizer files) or, failing that, the texts of its bos/eos ids."""
    out = dict(getattr(model, "special_tokens", None) or {})
    tok = getattr(model, "tokenizer", None)
    for name in ("bos", "eos"):
        if f"{name}_token" not in out:
            text = _token_text(tok, _first_id(getattr(model, f"{name}_token_id", None)))
            if text is not None:
                out[f"{name}_token"] = text
    return out


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ids(value: Any) -> Iterable[int]:
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    return [v for v in items if isinstance(v, int) and not isinstance(v, bool)]


def stop_token_ids(model: Any, template: str | None = None) -> frozenset[int]:
    """Token ids that end a reply: the model's (or its config's)
    ``eos_token_id`` (an int or a list) and ``eos_token_ids``, the token its
    tokenizer files name ``eos_token``, and every
    end-of-turn token (END_OF_TURN_TOKENS) that ``template`` writes and the
    vocabulary holds."""
    config = getattr(model, "config", None)
    ids: set[int] = set()
    for owner in (model, config):
        for name in ("eos_token_id", "eos_token_ids"):  # eos_token_ids: Llama's eos, eot, eom
            ids.update(_ids(getattr(owner, name, None)))
    tok = getattr(model, "tokenizer", None)
    lookup = getattr(tok, "token_to_id", None)
    if callable(lookup):
        names = [(getattr(model, "special_tokens", None) or {}).get("eos_token")]
        if template:
            names += [t for t in END_OF_TURN_TOKENS if t in template]
        for name in names:
            if name:
                tid = lookup(name)
                if tid is not None:
                    ids.add(int(tid))
    return frozenset(ids)


def chat_prompt(model: Any, messages: Any, *, add_generation_prompt: bool = True) -> str:
    """The prompt text of an OpenAI-style conversation for ``model``
    (normalize_messages, then render_chat with the model's template and
    special tokens)."""
    template = chat_template_of(model)
    return render_chat(template, normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                       special_tokens=special_tokens_of(model))


def encode_chat_prompt(model: Any, prompt: str) -> list[int]:
    """Token ids of a rendered chat prompt. The template writes the special
    tokens itself (a bos included), so a tokenizer that would add its own bos
    would make it twice: a doubled leading bos is dropped."""
    ids = list(model.tokenizer.encode_unbounded([prompt])[0])
    bos = _first_id(getattr(model, "bos_token_id", None))
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids
