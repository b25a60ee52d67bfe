"""velesio-example-echo: the smallest useful Velesio backend (see docs/plugins.md).

Serves one model, ``echo-1``, that streams the prompt (or the last chat message) back reversed word by
word: deterministic, so it is easy to check end to end. It honours what every text backend must:
``max_tokens``, ``stop`` (with ``StopMatcher``: a stop string is never streamed, even across pieces),
``resume_text`` (failover: continue after the text an earlier attempt already streamed) and cancellation.
"""

import time

from velesio.backends import Backend, Cancelled, ModelConfig, NotSupported, StopMatcher, TextParams, TextResult

__version__ = "0.1.0"


class EchoBackend(Backend):
    name = "example-echo"  # the `backend:` value in mesh.yaml, and the entry point's name
    kind = "text"
    operations = ("completion", "chat")

    @classmethod
    def embedded_models(cls):
        # Installing the plugin is enough for this model to appear in /v1/models.
        return [ModelConfig(name="echo-1", backend=cls.name, slots=4)]

    def load(self):
        self.delay_s = float(self.config.options.get("delay_s", 0.0))  # pause per word, to watch streaming
        return {"n_ctx": 4096, "size": "0", "type": "completion", "template": None}

    def run(self, job, ctx):
        p = job.params  # completion and chat jobs carry TextParams, every default applied
        if not isinstance(p, TextParams):
            raise NotSupported(f"example-echo does not do {job.op!r}")
        t0 = time.perf_counter()
        if job.op == "chat":
            text = str(p.messages[-1].get("content") or "") if p.messages else ""
        else:
            text = p.prompt
        words = text.split()[::-1]
        # The "tokens" of this model: one piece per word, its id the word's position.
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]

        # resume_text: an earlier attempt streamed this much before its worker died. Skip the pieces it
        # covers (the rest of a piece it cut short, too) and stream only what follows.
        start, first = 0, None
        done = p.resume_text
        while start < len(pieces) and done.startswith(pieces[start]):
            done = done[len(pieces[start]):]
            start += 1
        if done and start < len(pieces) and pieces[start].startswith(done):
            first = pieces[start][len(done):]

        left = len(pieces) - start
        # max_tokens: -1 = until the end; the router lowers it by what an earlier attempt already streamed
        limit = left if p.max_tokens < 0 else min(p.max_tokens, left)
        matcher = StopMatcher(p.stop)
        out, held = [], []  # the text streamed; token ids of text the matcher still holds back
        used = 0
        t1 = time.perf_counter()  # the "prompt" is evaluated
        for i in range(start, start + limit):
            if ctx.cancelled:
                raise Cancelled("cancelled")
            used += 1
            held.append(i)
            shown = matcher.feed(first if i == start and first is not None else pieces[i])
            if shown:
                ctx.emit({"text": shown, "tokens": held})
                out.append(shown)
                held = []
            if matcher.stopped is not None:
                break
            time.sleep(self.delay_s)
        tail = matcher.flush()
        if tail:
            ctx.emit({"text": tail, "tokens": held})
            out.append(tail)

        if matcher.stopped is not None:
            finish, stop_type = "stop", "word"
        elif start + used < len(pieces):
            finish, stop_type = "length", "limit"
        else:
            finish, stop_type = "stop", "eos"
        return TextResult.timed(text="".join(out), finish_reason=finish, stop_type=stop_type,
                                stopping_word=matcher.stopped or "", prompt_tokens=len(words), completion_tokens=used,
                                prompt_ms=(t1 - t0) * 1000, predicted_ms=(time.perf_counter() - t1) * 1000)
