"""Chat templates as ``transformers``' ``apply_chat_template`` renders them (tokenizer_config.json's
``chat_template``, or the directory's ``chat_template.jinja``): jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, ``raise_exception``, a ``tojson`` that does not escape
HTML, ``strftime_now``, the special tokens (``bos_token``, ``eos_token``, ...) as variables, and
``add_generation_prompt``. The rendered text is tokenized without adding special tokens, as transformers does."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

__all__ = ["ChatTemplate", "TemplateError", "load_chat_template"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed while rendering it."""


def _token(v):
    if isinstance(v, dict):  # AddedToken as transformers saves it
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_chat_template(directory: str) -> Optional["ChatTemplate"]:
    """The directory's chat template with its special tokens, or None when it has none."""
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            d = _read(p)
            if isinstance(d, dict):
                cfg.update(d)
    source = None
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    else:
        t = cfg.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
            t = named.get("default")
        if isinstance(t, str):
            source = t
    if source is None:
        return None
    specials = {k: _token(cfg.get(k)) for k in _SPECIAL_KEYS if _token(cfg.get(k)) is not None}
    return ChatTemplate(source, specials)


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """{% generation %} ... {% endgeneration %} (assistant masks in transformers): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _plain(value):
    """JSON types only (what the request body holds anyway): the sandbox never sees other objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict) -> None:
        import jinja2
        self.source = source
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat_template does not compile: {exc}") from None

    def render(self, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
        import jinja2
        try:
            return self._template.render(messages=_plain(messages), tools=_plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **_plain(kwargs)})
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"chat template: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise TemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None
