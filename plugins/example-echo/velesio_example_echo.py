"""velesio-example-echo: the smallest useful Velesio backend (see docs/plugins.md).

Serves one model, ``echo-1``, that streams the prompt (or the last chat message) back reversed word by
word: deterministic, so it is easy to check end to end.
"""

import time

from velesio.backends import Backend, Cancelled, ModelConfig

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
        p = job.params
        if job.op == "chat":
            text = str((p.get("messages") or [{}])[-1].get("content") or "")
        else:
            text = str(p.get("prompt") or "")
        words = text.split()[::-1]
        limit = p.get("max_tokens")
        limit = len(words) if limit is None or limit < 0 else min(limit, len(words))
        out = []
        for i in range(limit):
            if ctx.cancelled:
                raise Cancelled("cancelled")
            piece = words[i] if i == 0 else " " + words[i]
            ctx.emit({"text": piece, "tokens": [i]})
            out.append(piece)
            time.sleep(self.delay_s)
        truncated = limit < len(words)
        return {"text": "".join(out), "finish_reason": "length" if truncated else "stop",
                "stop_type": "limit" if truncated else "eos", "stopping_word": "",
                "prompt_tokens": len(words), "completion_tokens": len(out), "timings": {}}
