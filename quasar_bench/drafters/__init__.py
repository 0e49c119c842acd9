"""Drafters propose up to k tokens; the one decode loop (decode.py) verifies them.

A drafter is one small module `quasar_bench/drafters/NAME.py` defining a subclass of `Drafter`
and one config `conf/drafter/NAME.yaml` whose `name:` is NAME. Nothing else changes to add one.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from ..errors import QuasarError
from ..sampling import sample, target_probs


@dataclass
class Draft:
    tokens: list[int]
    # Draft distribution per proposed token [len(tokens), V] for speculative sampling; None means a
    # deterministic proposal (q is one-hot on the token).
    probs: torch.Tensor | None = None
    # Speed-only runs (synthetic drafter, acceptance=forced): how many drafts the loop accepts,
    # instead of the verifier's verdict. The verify forward still runs over every drafted token.
    forced_accept: int | None = None


class Drafter:
    """Base class. Lifecycle per generation: start(...) once, then propose/observe per verify step."""

    name = "base"
    cache_room = 0  # KV positions a drafter writes past the verify window (lookahead's extra forward)

    def __init__(self, cfg, runtime, loaded=None):
        self.cfg = cfg
        self.runtime = runtime  # the verifier's runtime (self-speculative drafters use its weights)
        self.loaded = loaded  # LoadedModel (tokenizer, eos) for drafters that need it
        self.k = int(cfg.get("k", 1))
        if self.k < 1 and self.name != "ar":  # ar drafts nothing; its k is 0
            raise QuasarError(f"drafter.k={self.k} is impossible: k must be >= 1")
        self.setup()

    def setup(self, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
              max_len: int | None = None) -> None:
        """Called by generate() before start(): the sampling settings (model-based drafters sample
        their drafts from their own q at the same temperature / top-p) and the positions the
        generation may use (drafters with a KV cache of their own size it from this)."""
        self.temperature, self.top_p, self.generator, self.max_len = float(temperature), float(top_p), generator, max_len

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The next draft token from a drafter's own logits row [V]: the argmax when greedy (q is
        one-hot: returns None), else a sample from q = softmax(logits / T) with the verifier's top-p,
        returned with q so verification can accept with min(1, p/q)."""
        if self.temperature <= 0:
            return int(logits.argmax()), None
        q = target_probs(logits[None], self.temperature, self.top_p)[0]
        if self.generator is not None and q.device != self.generator.device:
            q = q.to(self.generator.device)
        return sample(q, self.generator), q

    def start(self, prompt_ids: list[int], reference: list[int] | None = None) -> None:
        """A new generation begins. `reference`: the reference continuation, if one was computed."""

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k tokens to follow `context` (prompt + generated so far). The verifier's KV cache
        holds context[:-1]; a drafter may run the verifier runtime past that, the loop rolls back."""
        raise NotImplementedError

    def observe(self, accepted: int, new_tokens: list[int]) -> None:
        """After verification: `accepted` draft tokens were kept; `new_tokens` were appended."""


def drafter_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def make_drafter(cfg, runtime, loaded=None) -> Drafter:
    name = cfg.get("name")
    if name not in drafter_names():
        raise QuasarError(f"unknown drafter {name!r}; choose one of {', '.join(drafter_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Drafter) and c is not Drafter and c.name == name]
    return classes[0](cfg, runtime, loaded)
