"""Drafters propose up to k tokens; the one decode loop (decode.py) verifies them.

A drafter is one small module `quasar_bench/drafters/NAME.py` defining a subclass of `Drafter`
whose `name` is NAME, and one config `conf/drafter/NAME.yaml` whose `name:` is NAME. Nothing else
changes to add one: the loop and the harness learn what they need from the class (below), never
from the name. A drafter kept outside the package is named by its module in the config
(`{name: mine, module: my_pkg.my_drafter}`).

What a drafter declares:
    drafts        False for the plain-AR baseline (k = 0: one verify forward per token)
    k             drafts per verify step (from the config; 0 when `drafts` is False)
    cache_room    KV positions it writes past the verify window (the loop sizes the cache)
    forward_tokens  the widest forward it runs on the verifier (0: none wider than a verify step);
                  on CUDA the harness captures graphs up to this width, so those forwards replay a
                  graph like the verify steps do
    branch_tokens() / branch_logits()  a verifier forward wanted before drafting (lookahead's
                  Jacobi window): the loop batches it across the sequences of a batch
    replays       None, or which greedy continuation it replays, passed to start(): "own" (this
                  verifier's greedy AR output) or "reference" (the reference verifier's)
    forces_acceptance  True when the drafter, not the verifier, decides acceptance (speed-only
                  runs on random weights: see synthetic.py); rows record it
    row_fields()  extra columns for the cell's rows (e.g. the layers a self-speculative drafter
                  runs); {} by default

Drafters never import the loop or the harness: what they need from above (a greedy continuation,
a verifier at another precision, calibration prompts) comes through `tools` (DraftTools).
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import QuasarError, unknown
from ..sampling import sample, target_probs


@dataclass
class Draft:
    tokens: list[int]
    # Draft distribution per proposed token [len(tokens), V] for speculative sampling; None means a
    # deterministic proposal (q is one-hot on the token).
    probs: torch.Tensor | None = None
    # Set only by drafters with forces_acceptance: how many drafts the loop accepts, instead of the
    # verifier's verdict. The verify forward still runs over every drafted token.
    forced_accept: int | None = None
    # Set only by drafters that replay a recorded generation which ended at this step: the reason
    # it ended there (the loop stops after this step and records it as stopped_by).
    last: str | None = None


@dataclass
class DraftTools:
    """Services the harness lends to drafters (None where a caller has none to give).

    greedy(runtime, prompt_ids, n) -> ids       the runtime's greedy AR continuation (decode.generate)
    build_verifier(vcfg) -> runtime             the loaded model at another precision (verifiers.py; the
                                                harness builds each configuration once and shares it)
    calibration_prompts(n) -> list[list[int]]   n encoded prompts disjoint from evaluation data
    reference_runtime                           the reference verifier's runtime (the loaded model):
                                                what a drafter fits once (layerskip's search) is fitted
                                                there, so every verifier of a run gets the same choice
    """
    greedy: Callable | None = None
    build_verifier: Callable | None = None
    calibration_prompts: Callable | None = None
    reference_runtime: object | None = None

    def need(self, what: str, drafter: str):
        fn = getattr(self, what)
        if fn is None:
            raise QuasarError(f"the {drafter} drafter needs the harness's {what}(); build it with "
                              "make_drafter(..., tools=quasar_bench.references.draft_tools(loaded))")
        return fn


class Drafter:
    """Base class. Lifecycle per generation: setup(...), start(...), then propose/observe per step."""

    name = "base"
    drafts = True
    cache_room = 0
    forward_tokens = 0
    replays: str | None = None
    forces_acceptance = False

    def __init__(self, cfg, runtime, loaded=None, tools: DraftTools | None = None):
        self.cfg = cfg
        self.runtime = runtime  # the verifier's runtime (self-speculative drafters use its weights)
        self.loaded = loaded  # LoadedModel (tokenizer, eos) for drafters that need it
        self.tools = tools or DraftTools()
        if self.drafts and cfg.get("k") is None:
            raise QuasarError(f"drafter {self.name} needs k (drafts per verify step): set drafter.k=, e.g. 5")
        self.k = int(cfg["k"]) if self.drafts else 0
        if self.drafts and self.k < 1:
            raise QuasarError(f"drafter.k={self.k} is impossible for drafter {self.name}: k must be >= 1 (e.g. k=5)")
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

    def confidence(self, logits: torch.Tensor) -> float:
        """Top-1 probability of the drafter's own distribution (adaptive draft length)."""
        if self.temperature > 0:
            return float(target_probs(logits[None], self.temperature, self.top_p).max())
        return float(torch.softmax(logits, -1).max())

    def draft_chain(self, step, feed: list[int], k: int, threshold: float = 0.0) -> Draft:
        """The k-step loop of model-based drafters: step(fed ids) -> the logits row [V] after them;
        feed the picked token back, stop early when confidence < threshold (0: always k)."""
        tokens, probs = [], []
        for _ in range(k):
            logits = step(feed)
            if threshold > 0 and self.confidence(logits) < threshold:
                break
            tok, q = self.pick(logits)
            tokens.append(tok)
            probs.append(q)
            feed = [tok]
        if self.temperature > 0 and tokens:
            return Draft(tokens=tokens, probs=torch.stack(probs))
        return Draft(tokens=tokens)

    def for_sequence(self, runtime) -> "Drafter":
        """This drafter for one sequence of a batch (batch_size > 1), drafting on `runtime`, that
        sequence's view of the batched cache. A shallow copy: what was fitted at construction is
        shared, per-generation state is made by start(). Drafters holding a KV cache of their own
        override this to give each copy its own cache."""
        twin = copy.copy(self)
        twin.runtime = runtime
        return twin

    def begin(self, verifier: str, prompt_id: str, turn: int) -> None:
        """The harness names the generation about to start (verifier label, prompt id, turn), for
        drafters that keep per-prompt data (replay); called before setup()/start()."""

    def start(self, prompt_ids: list[int], reference: list[int] | None = None) -> None:
        """A new generation begins. `reference`: the continuation named by `replays`, if any."""

    def branch_tokens(self, context: list[int]) -> list[int] | None:
        """Tokens to run through the verifier past its cache (which holds context[:-1]) before this
        step's propose(), or None (the default: no such forward). The loop runs every sequence's
        branch of a batch in one batched forward and hands the logits to branch_logits(); a drafter
        that ran this forward itself on its per-sequence view would cost B forwards per step."""
        return None

    def branch_logits(self, logits: torch.Tensor) -> None:
        """The verifier's logits [len(branch_tokens), V] for the tokens branch_tokens() asked for,
        before propose() of the same step."""

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k tokens to follow `context` (prompt + generated so far). The verifier's KV cache
        holds context[:-1]; a drafter may run the verifier runtime past that, the loop rolls back."""
        raise NotImplementedError

    def observe(self, accepted: int, new_tokens: list[int]) -> None:
        """After verification: `accepted` draft tokens were kept; `new_tokens` were appended."""

    def row_fields(self) -> dict:
        """Columns this drafter adds to each row of its cell (what it chose that a reader needs to
        trust the numbers, e.g. the layers it drafts with); names must not clash with rows.py's."""
        return {}


def drafter_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def drafter_class(cfg) -> type[Drafter]:
    """The Drafter subclass a config names: quasar_bench/drafters/<name>.py, or `module:`."""
    name = cfg.get("name")
    module_name = cfg.get("module") if name not in drafter_names() else f"{__name__}.{name}"
    if not module_name:
        raise unknown("drafter", name, drafter_names(), " (or drafter.module=<importable module> for your own)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise QuasarError(f"drafter {name!r}: cannot import module {module_name!r} ({e}); "
                          "check drafter.module= and PYTHONPATH") from None
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Drafter) and c.__module__ == module.__name__ and c.name == name]
    if len(classes) != 1:
        raise QuasarError(f"module {module_name} must define one Drafter subclass with name = {name!r}")
    return classes[0]


def make_drafter(cfg, runtime, loaded=None, tools: DraftTools | None = None) -> Drafter:
    """The drafter a config names, its YAML defaults (conf/drafter/NAME.yaml) under `cfg`."""
    from ..config import entry_config

    cfg = entry_config("drafter", cfg)
    return drafter_class(cfg)(cfg, runtime, loaded, tools)


def baseline_drafter(runtime, loaded=None) -> Drafter:
    """The drafter that drafts nothing (plain autoregressive decoding)."""
    from .ar import AR

    return AR({"name": AR.name, "k": 0}, runtime, loaded)
