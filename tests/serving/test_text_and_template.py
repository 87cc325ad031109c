"""Incremental detokenization with stop strings, and chat templates rendered as transformers renders them."""
from __future__ import annotations

import json

import pytest

from cpuformer.serving.text import IncrementalText


class ByteTokenizer:
    """ids are UTF-8 bytes; decode replaces an incomplete character with U+FFFD (as byte-level tokenizers do)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text, stop=()):
    t = IncrementalText(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode("utf-8"):
        pieces.append(t.push(b))
        if t.stopped:
            break
    pieces.append(t.finish())
    return pieces, t


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld ✓ 日本語 🙂!", "🙂🙂", "a\ufffdb"])
def test_pieces_concatenate_and_hold_back_partial_characters(text):
    pieces, _ = stream(text)
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_cut_at_the_first_occurrence():
    pieces, t = stream("hello world, hello moon", stop=["o w", "moon"])
    assert "".join(pieces) == "hell" and t.stopped
    assert all("o" not in p or "o w" not in p for p in pieces)
    pieces, t = stream("abc ✓ def ✓ ghi", stop=["✓ g", "f ✓"])
    assert "".join(pieces) == "abc ✓ de"
    pieces, t = stream("abcx", stop=["xyz"])  # a held-back prefix of a stop string comes out at the end
    assert "".join(pieces) == "abcx" and not t.stopped and pieces[-1] == "x"
    pieces, t = stream("stop at start", stop=["stop"])
    assert "".join(pieces) == "" and t.stopped


def test_no_piece_ever_shows_part_of_a_stop_string():
    text = "the quick brown fox jumps"
    pieces, _ = stream(text, stop=["fox"])
    sent = ""
    for p in pieces:
        sent += p
        assert "f" not in sent[len("the quick brown "):]
    assert sent == "the quick brown "


TEMPLATES = {
    "zephyr": ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content']"
               " + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
               "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
               "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
               "{% endif %}\n{% endfor %}"),
    "llama3": ("{{- bos_token }}{%- set ns = namespace(sys='') %}{%- for m in messages %}{%- if m.role == 'system' %}"
               "{%- set ns.sys = m.content %}{%- continue %}{%- endif %}<|start_header_id|>{{ m.role }}"
               "<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{%- endfor %}{%- if ns.sys %}[{{ ns.sys | "
               "tojson }}]{%- endif %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "\n\n{%- endif %}"),
    "alternating": ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}{{ '[' + m['role'] + '] ' + m['content'] + ' ' }}{% endfor %}"
                    "{{ dict(a=1) | tojson }}"),
}

CHATS = [[{"role": "system", "content": "be \"brief\" <b>"}, {"role": "user", "content": "  hi  "},
          {"role": "assistant", "content": "hello ✓"}, {"role": "user", "content": "bye"}],
         [{"role": "user", "content": "only"}]]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from cpuformer.serving.chat_template import load_chat_template
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = TEMPLATES[name]
    fast.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = load_chat_template(str(tmp_path))
    assert mine is not None
    for chat in CHATS:
        for agp in (True, False):
            try:
                want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp)
            except Exception as exc:  # the template refuses: so must we
                from cpuformer.serving.chat_template import TemplateError
                with pytest.raises(TemplateError, match="alternate"):
                    mine.render(chat, add_generation_prompt=agp)
                assert "alternate" in str(exc)
                continue
            assert mine.render(chat, add_generation_prompt=agp) == want


def test_template_from_tokenizer_config_list_form(tmp_path):
    from cpuformer.serving.chat_template import load_chat_template
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_chat_template(str(tmp_path)).render([]) == "<s>D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(str(tmp_path)) is None


def test_sandbox_refuses_unsafe_templates(tmp_path):
    from cpuformer.serving.chat_template import ChatTemplate, TemplateError
    t = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])
    t = ChatTemplate("{% set ns = namespace(_x=1) %}", {})
    with pytest.raises(TemplateError):
        t.render([])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}", {})
