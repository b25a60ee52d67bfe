"""A continuous-batching llama.cpp engine: many text jobs on one context, decoded together, as llama.cpp's
own server does.

Import it inside a backend's ``load()``, not at module level (it imports llama_cpp and numpy).

```python
engine = Engine(path, n_ctx=2048, n_seq=4, n_threads=4)
gen = engine.submit(engine.tokenize(prompt), TextParams(max_tokens=64), on_piece=lambda text, ids, probs: ...)
result = gen.result()  # a TextResult; gen.tokens_cached: prompt tokens the prefix cache supplied
engine.close()
```

KV layout: one context with ``n_seq`` sequences and a KV stream per sequence (``kv_unified`` off), each of
``n_ctx`` tokens, so the context holds ``n_ctx * n_seq``. Chosen over one unified cache of ``n_ctx`` shared
by all sequences because:

- every job keeps the context a slot has today (the backend's ``n_ctx``, which the router checks prompts
  against), whatever its neighbours do: a job admitted with room to finish never meets a full cache in
  mid-generation, so there is no preemption or eviction of running sequences to write, and no decode that
  fails for lack of a KV slot;
- attention costs each sequence its own length, not the length of everything in a shared buffer (llama.cpp
  recommends non-unified streams when sequences do not share a long prefix);
- memory equals what the backend's ``slots: N`` separate contexts use now, so nothing grows on switching.

What it gives up: sequences cannot share the cells of a common prefix (in a unified cache ``seq_cp`` is a
metadata copy; across streams it copies the whole stream). A prefix is therefore reused in place where the
sequence holding it is idle and its conversation's, and copied (below) where that saves enough evaluation.

The step loop (one thread, the only one that touches the context): drop cancelled jobs; admit waiting jobs
while a sequence is idle (they start without waiting for running ones); build ONE ``llama_batch``: the next
token of every generating sequence first, then prompt chunks of newly started jobs in arrival order, up to
``n_batch`` tokens (a long prompt takes several steps, and generating sequences keep advancing during
them); ``llama_decode`` once; sample every sequence whose last token had logits (``llama_get_logits_ith`` by
batch row, through each job's sampler chain); deliver text; free finished sequences. A job's error (its
callback, its grammar) ends that job alone; a failed decode ends the jobs in that batch; ``close()`` fails
whatever has not finished with ``EngineClosed``.

Sampling (``sampling.py``): a llama.cpp sampler chain per sequence, built from the job's ``TextParams``
in llama.cpp's order (penalties, then greedy at temperature 0, else mirostat, else top-k, typical, top-p,
min-p, temperature and a seeded draw); ``ignore_eos`` bans the end-of-generation tokens with a logit bias.
A grammar or JSON schema runs through ``GrammarGuard`` (grammar_guard.py), which masks the logits in Python
before the chain sees them, so llama.cpp's grammar sampler never accepts a token it would abort on. A seed
is per sequence: a fixed seed gives the same text whatever runs beside it, as far as llama.cpp's logits are
the same — they can differ in the last bits when the prompt was split differently (a prefix taken from the
cache, or a chunk boundary set by the neighbours' load), and a different bit can change a draw. Send
``cache_prompt: False`` with a seed that must reproduce (as the llama backend documents).

Prefix cache (``cache.py``): a finished job's tokens stay in its sequence. A new job takes the idle
sequence sharing the longest prefix with its prompt (ties and no match: least recently used, which evicts
it; a sequence holding another conversation that merely shares a beginning is left alone), removes the rest
of that sequence (``llama_memory_seq_rm``) and evaluates only its own remainder, at least the last prompt
token. Where another sequence, busy or idle, holds a longer prefix (``MIN_COPY`` tokens more), the job
copies that sequence's KV into its own (``llama_memory_seq_cp``, then ``seq_rm`` of what it does not share):
a second player whose conversation starts with the same long system prompt evaluates only what differs.
Where a job still evaluating its prompt will hold that prefix (the ``n`` choices of one request, sent
together), the new job waits for that evaluation and copies it, as llama.cpp's server does for ``n``;
if that job ends first, the new one copies whatever of it reached the cache. ``Generation.tokens_cached``
reports the reused count. ``cache_prompt: False`` takes the least recently used sequence and evaluates the
whole prompt.

Limits: a prompt of ``n_ctx`` tokens or more raises ``ContextExceeded`` at submit; a generation stops with
finish "length" (stop_type "limit") at ``max_tokens`` or where the sequence's context is full
(``max_tokens`` -1: only there; ``TextResult.truncated``). With ``context_shift`` the context does not end
it: the sequence keeps the first ``params.n_keep`` tokens, drops half of the rest
(``llama_memory_seq_rm``), moves what follows back (``llama_memory_seq_add``) and goes on, as llama.cpp's
server; ``max_tokens`` -1 then means at most ``MAX_TOKENS``. ``max_tokens`` 0 evaluates the prompt (into
the cache) and samples nothing.
``completion_tokens`` counts the tokens of the reply: the end-of-generation token that ended it is not one
(what llama-cpp-python and OpenAI count; llama.cpp's server counts it too). ``tokens_cached`` in the result
is the prompt tokens the prefix cache supplied.
"""

from velesio.backends.llama_engine.engine import Engine, EngineClosed, Generation

__all__ = ["Engine", "EngineClosed", "Generation"]
