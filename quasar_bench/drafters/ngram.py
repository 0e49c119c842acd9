"""Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
ngram_max down to ngram_min) in prompt + generated text and propose what followed it.
Quasar's setting: k=5, n=1..3."""
from ..errors import QuasarError
from . import Draft, Drafter


class NGram(Drafter):
    name = "ngram"

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        super().__init__(cfg, runtime, loaded, tools)
        self.ngram_min = int(cfg.ngram_min)
        self.ngram_max = int(cfg.ngram_max)
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise QuasarError(f"ngram drafter needs 1 <= ngram_min <= ngram_max, got "
                              f"{self.ngram_min}..{self.ngram_max}")

    def propose(self, context, k):
        for n in range(min(self.ngram_max, len(context) - 1), self.ngram_min - 1, -1):
            pattern = context[-n:]
            # Latest match first: recent text predicts the continuation best.
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == pattern:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return Draft(tokens=follow)
        return Draft(tokens=[])
