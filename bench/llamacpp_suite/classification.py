"""Why each test of llama.cpp's server suite fails against the router (summarize.py applies these rules; the
reviewed report with the requests and answers behind each reason is RESULTS.md).

A test is put in the category of what would still fail if the router served the suite's own model: a test
that first trips on stories260K's token counts, but would then trip on a missing field, is (a). Gap keys
(``A1`` ...) are RESULTS.md's list of fidelity gaps; a reason starting "fixed:" is a gap that a later router
closed (RESULTS.md "Fixed while this ran"), kept to classify runs of older checkouts.
"""

from __future__ import annotations

import re

CATEGORIES = {
    "a": "(fidelity gap)",
    "b": "(model difference)",
    "c": "(outside scope)",
    "d": "(shim artefact)",
}

TEMPLATE = "A1 [server option] no chat template override (`--chat-template`, `--chat-template-file`)"
CORS_LOCALHOST = ("A2 [server option] `--cors-origins localhost` (any localhost origin) has no equivalent: "
                  "no Access-Control-Allow-Origin")
CORS = "A3 CORS preflight: Allow-Methods adds PATCH; Allow-Headers echoes the requested headers, not `*`"
DEFAULTS = "A4 [server option] no server-wide sampling defaults (`--seed`, `--temp`, `--n-predict`)"
HEALTH = "A5 GET /health is 200 before the model is served (llama.cpp: 503 \"Loading model\"): /models still empty"
SETTINGS = "A6 `generation_settings` lacks `adaptive_target`, `adaptive_decay` (and more)"
VERBOSE = " (and `__verbose`, c)"
# Gaps that a later router fixed, for runs of older checkouts (RESULTS.md "Fixed while this ran").
OLD_FINGERPRINT = "fixed: `system_fingerprint` was \"velesio\", not llama.cpp's build id (\"b...\")"
OLD_BARE_BODY = "fixed: a /completion body with only `prompt` got the OpenAI-style shape, no `content`"
OLD_PREFILL = "fixed: a final assistant message was closed and a new turn opened (no prefill)"
BIAS_MSG = r"KeyError: 'logit_bias'"

RULES: list[tuple[str, str, str, str]] = [
    # ---- test_basic
    (r"test_basic\.py::test_server_multiple_addresses$", "", "c",
     "several listen addresses (`--host 127.0.0.1,::1`): a llama-server command-line feature; the router binds one"),
    (r"test_basic\.py::test_server_props$", "", "a", DEFAULTS + " (/props `params.seed` 4294967295, not 42)"),
    (r"test_basic\.py::test_server_models$", "", "a", HEALTH),
    (r"test_basic\.py::test_server_model_aliases_and_tags$", "", "a",
     HEALTH + "; then /models entries have no `aliases` and `tags`"),
    (r"test_basic\.py::test_server_slots$", "", "a",
     "A9 [server option] /slots cannot be turned off (llama.cpp `--no-slots`: 501), and an idle slot carries "
     "`params` (llama.cpp: only once a task ran)"),
    (r"test_basic\.py::test_load_split_model$", "", "b", "expected text of stories15M (`little|girl`)"),
    (r"test_basic\.py::test_no_ui$", "", "c", "the web UI (GET / → HTML)"),
    # ---- test_completion
    (r"test_completion\.py::test_completion_stream\[", "", "a",
     SETTINGS + "; also A4 (`seed` 42 expected) (first trips on stories260K's prompt token count, b)"),
    (r"test_completion\.py::test_completion\[", "", "b", "stories260K's prompt token count and expected text"),
    (r"test_completion\.py::test_completion_stream_vs_non_stream$", "", "a",
     DEFAULTS + ": without a seed each answer is a new draw (llama-server's `--seed 42` makes both the same)"),
    (r"test_completion\.py::test_completion(_stream)?_with_openai_library$", "startswith|velesio", "a",
     OLD_FINGERPRINT),
    (r"test_completion\.py::test_completion(_stream)?_with_openai_library$", "", "b", "expected text (`going|bed`)"),
    (r"test_completion\.py::test_nocache_long_input_prompt$", "", "b",
     "SmolLM2 tokenizes the prompt into 224 tokens, within the 256-token slot (stories260K: 576)"),
    (r"test_completion\.py::test_json_prompt_no_mtmd$", "", "a",
     "fixed: a prompt object `{\"prompt_string\": ...}` was refused with 400"),
    (r"test_completion\.py::test_completion_with_tokens_input$", "400 == 200", "a",
     "fixed: several prompts in one /completion request were a 400"),
    (r"test_completion\.py::test_completion_with_tokens_input$", "", "a",
     DEFAULTS + ": llama-server `--temp 0.0` makes the batch's two answers equal; here each is a random draw"),
    (r"test_completion\.py::test_completion_parallel_slots\[", "", "a", OLD_BARE_BODY),
    (r"test_completion\.py::test_completion_unified\[", "", "b",
     "SmolLM2 ends the reply (EOS) before n_predict; stories260K does not"),
    (r"test_completion\.py::test_completion_response_fields\[", "", "b",
     "`prompt` echoes stories260K's BOS (`<s> `); SmolLM2 adds none, as llama.cpp would for it"),
    (r"test_completion\.py::test_completion_prompt_cache$", "", "b", "stories260K's prompt token count"),
    (r"test_completion\.py::test_(consistent|different)_result", "", "b", "sampling of another model (random)"),
    # ---- test_chat_completion
    (r"test_chat_completion\.py::test_chat_completion(_stream)?\[", "startswith", "a", OLD_FINGERPRINT),
    (r"test_chat_completion\.py::test_chat_completion\[.*This is not a chat template", "", "a",
     TEMPLATE + " (the template is the text itself: 23 prompt tokens)"),
    (r"test_chat_completion\.py::test_chat_completion(_stream)?\[", "", "b",
     "stories260K's token counts and text (`Suddenly`, `Aside|she`)"),
    (r"test_chat_completion\.py::test_chat_completion_with_openai_library$", "velesio", "a", OLD_FINGERPRINT),
    (r"test_chat_completion\.py::test_chat_completion_with_openai_library$", "", "b", "expected text (`Suddenly`)"),
    (r"test_chat_completion\.py::test_chat_completion_cached_tokens$", "", "b",
     "stories260K's prompt token counts (the cached counts follow the same rule: an identical prompt 25 of 26)"),
    (r"test_chat_completion\.py::test_chat_template$", "", "a", TEMPLATE + " (`llama3`)" + VERBOSE),
    (r"test_chat_completion\.py::test_apply_chat_template$", "", "a", TEMPLATE + " (`command-r`)"),
    (r"test_chat_completion\.py::test_chat_template_(assistant_prefill|continue_final_message_vllm)", "", "a",
     TEMPLATE + " (Llama 3.1 file)" + VERBOSE),
    (r"test_chat_completion\.py::test_chat_template_continue_final_message_mutual", "", "a", OLD_PREFILL),
    (r"test_chat_completion\.py::test_invalid_chat_completion_req\[messages7\]$", "", "a", OLD_PREFILL),
    (r"test_chat_completion\.py::test_chat_completion_with_timings_per_token$", "", "a",
     "fixed: the stream's usage chunk had no `timings`"),
    (r"test_chat_completion\.py::test_return_progress\[", "", "a",
     "A7 `return_progress` is accepted and ignored: no `prompt_progress` in stream chunks"),
    (r"test_chat_completion\.py::test_chat_completions_token_count$", "", "a",
     "fixed: no POST /chat/completions/input_tokens (404)"),
    (r"test_chat_completion\.py::test_verbose_debug$", "", "c",
     "`__verbose` (the request's `verbose: true` echo of the rendered prompt): llama.cpp debug output"),
    (r"test_chat_completion\.py::test_logprobs", "", "b", "sampling of another model"),
    # ---- test_tokenize, test_embedding
    (r"test_tokenize\.py::test_tokenize_with_bos$", "", "b",
     "SmolLM2 adds no BOS with add_special (llama.cpp follows the GGUF the same way)"),
    (r"test_embedding\.py::test_embedding_mixed_input\[-False\]$", "", "b",
     "\"\" has no tokens for SmolLM2 (no BOS): 400, as llama.cpp's \"Input content cannot be empty\"; bge adds [CLS]"),
    (r"test_embedding\.py::test_embedding_pooling_none", "", "a",
     "A8 [server option] no `--pooling` (none: per-token vectors on /embeddings, 400 on /v1/embeddings)"),
    (r"test_embedding\.py::test_embedding_usage_", "", "b", "bge's tokenizer adds [CLS] and [SEP] (SmolLM2: none)"),
    # ---- test_template
    (r"test_template\.py::test_reasoning\[", "", "c",
     "reasoning controls (`--reasoning on|off|auto` with thinking templates); needs A1 first"),
    (r"test_template\.py::test_(date_inside_prompt|add_generation_prompt)\[", "", "a", TEMPLATE),
    # ---- test_tool_call
    (r"test_tool_call\.py::test_completion_without_tool_call", "", "b",
     "SmolLM2 (random sampling, its own template) chose to call the offered tool where stories260K does not"),
    # ---- test_ctx_shift
    (r"test_ctx_shift\.py::test_ctx_shift_enabled$", "", "b",
     "the prompt is 117 SmolLM2 tokens (stories260K: 226); the shift itself works (tests/test_fidelity.py)"),
    (r"test_ctx_shift\.py::test_ctx_shift_disabled_short_prompt\[", "", "b",
     "SmolLM2 ends the reply (EOS) before n_predict or the end of the context"),
    (r"test_ctx_shift\.py::test_ctx_shift_disabled_long_prompt$", "", "b",
     "the prompt is 153 SmolLM2 tokens, within the 256-token slot (stories260K: more)"),
    (r"test_ctx_shift\.py::test_ctx_shift_disabled_stream$", "", "b",
     "SmolLM2 ends with EOS (finish_reason stop) before the context is full"),
    # ---- test_ignore_eos
    (r"test_ignore_eos\.py::", BIAS_MSG, "a", "fixed: `generation_settings` had no `logit_bias`"),
    # ---- test_security
    (r"test_security\.py::test_access_static_assets_without_api_key$", "", "c", "the web UI's static files"),
    (r"test_security\.py::test_correct_api_key", "", "a", OLD_BARE_BODY),
    (r"test_security\.py::test_cors_(options|origins_localhost_rejects)\[", "204 == 200", "a",
     "fixed: CORS preflights answered 204 (llama.cpp 200)"),
    (r"test_security\.py::test_cors_options\[", "", "a", CORS),
    (r"test_security\.py::test_cors_origins_localhost_reflects\[", "", "a", CORS_LOCALHOST),
    (r"test_security\.py::test_cors_origins_defaults_to_localhost_with_tools_enabled$", "", "c",
     "built-in tools (`--tools`) and their CORS default"),
    (r"test_security\.py::test_cors_proxy", "", "c", "the web UI's MCP CORS proxy (/cors-proxy)"),
    (r"test_security\.py::test_local_media_file\[", "", "c", "vision input (`--media-path`, image_url file://)"),
    # ---- test_stream, test_infill
    (r"test_stream\.py::", "", "c", "llama-server's multi-model router mode and resumable streams (/v1/stream)"),
    (r"test_infill\.py::", "", "c", "infill (/infill, FIM models)"),
]

def classify(test_id: str, message: str) -> tuple[str, str]:
    for id_re, msg_re, category, reason in RULES:
        if re.search(id_re, test_id) and (not msg_re or re.search(msg_re, message, re.S)):
            return category, reason
    return "unclassified", ""
