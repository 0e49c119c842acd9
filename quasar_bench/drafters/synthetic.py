"""Synthetic drafter: replays a reference continuation passed to start() (the experiment runner
passes the verifier's own greedy AR output by default, `replay: own`, or the reference verifier's
with `replay: reference`) and corrupts each proposed token with probability 1 - alpha, so speed can be
measured at a chosen acceptance. With the verifier that produced the reference and greedy
verification, every untouched token is accepted and a corrupted one (any token != the reference
one, uniform over the rest of the vocabulary) is rejected, so tau follows the geometric law
(1 - alpha^(k+1)) / (1 - alpha); alpha = 1 is the oracle upper bound (tau = k + 1).

The proposal at a step is reference[pos : pos + k] with pos = len(context) - len(prompt). Once the
generated text leaves the reference (sampling, another verifier precision, a near-tie flipped by
batching), there is nothing to replay: the drafter proposes nothing (plain AR) until the end of that
generation; the same happens past the end of the reference.

Paired draws: every random decision depends only on (generation seed, `seed`, step), never on the
prompt's token ids, so every verifier of a run sees the same acceptance sequence for a (prompt,
turn), even on a later turn whose prompt holds that verifier's own earlier answer. The generation
seed is the `generator` the loop passes to setup() (the harness seeds it per (run seed, prompt id,
turn), identically for every verifier: cell.prompt_seed); without one (direct API use) it is a
hash of the prompt ids. Step i draws from two private streams, `random.Random(
"{base}/{seed}/{i}/accept")` for which drafts are kept and `.../corrupt` for the corrupted tokens,
so the acceptance decisions never depend on how many corrupted tokens were drawn before.

`acceptance: forced` is for speed runs only (random weights): see __init__.
"""
from __future__ import annotations

import random
import zlib

from ..errors import QuasarError
from . import Draft, Drafter


class Synthetic(Drafter):
    name = "synthetic"

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        super().__init__(cfg, runtime, loaded, tools)
        try:
            self.alpha = float(cfg.alpha)
        except (TypeError, ValueError):
            raise QuasarError(f"drafter.alpha={cfg.alpha!r} must be a number in [0, 1]") from None
        if not 0.0 <= self.alpha <= 1.0:
            raise QuasarError(f"drafter.alpha={self.alpha} is outside [0, 1]: it is the chance each replayed "
                              "token is kept; pick a value in [0, 1] (1 = oracle)")
        self.seed = int(cfg.seed)
        self.vocab = int(runtime.vocab_size)
        if self.vocab < 2 and self.alpha < 1:
            raise QuasarError("synthetic drafter needs a vocabulary of >= 2 tokens to corrupt a token")
        self.reference = None
        # verify: real greedy verification of the replayed reference (needs the verifier's own
        # greedy output as reference). forced: speed only: the loop accepts the drafts up to the
        # first corrupted one whatever the verifier says, so tau follows the geometric law exactly
        # even where the reference cannot be replayed (random weights, where batched and single-token
        # forwards flip near-ties); the output is then not the verifier's greedy output.
        self.acceptance = cfg.acceptance
        if self.acceptance not in ("verify", "forced"):
            raise QuasarError(f"drafter.acceptance={self.acceptance!r}; choose verify or forced")
        self.forces_acceptance = self.acceptance == "forced"
        replay = cfg.replay
        if replay not in ("own", "reference"):
            raise QuasarError(f"drafter.replay={replay!r}; choose own (this verifier's greedy output) or reference")
        # What the harness passes to start(): nothing to replay when acceptance is forced.
        self.replays = None if self.forces_acceptance else replay

    def start(self, prompt_ids, reference=None):
        if reference is None and self.acceptance == "forced":
            reference = []
        if reference is None:
            raise QuasarError("the synthetic drafter replays the reference continuation, but none was given; "
                              "run it through the experiment (which computes references) or pass reference=")
        self.reference = list(reference)
        self.prompt_len = len(prompt_ids)
        self.aligned = True
        generator = getattr(self, "generator", None)
        self.base = (f"g{generator.initial_seed()}" if generator is not None
                     else f"p{zlib.crc32(' '.join(map(str, prompt_ids)).encode())}")
        self.step = 0

    def streams(self) -> tuple[random.Random, random.Random]:
        """This step's private streams: (acceptance, corrupted tokens); see the module docstring."""
        key = f"{self.base}/{self.seed}/{self.step}"
        self.step += 1
        return random.Random(f"{key}/accept"), random.Random(f"{key}/corrupt")

    def propose(self, context, k):
        accept, corrupt = self.streams()
        if self.acceptance == "forced":
            accepted = 0
            while accepted < k and accept.random() < self.alpha:
                accepted += 1
            return Draft(tokens=[corrupt.randrange(self.vocab) for _ in range(k)], forced_accept=accepted)
        pos = len(context) - self.prompt_len
        if self.aligned and context[self.prompt_len :] != self.reference[:pos]:
            self.aligned = False  # diverged: the reference no longer predicts this text
        if not self.aligned or pos >= len(self.reference):
            return Draft(tokens=[])
        tokens = []
        for ref in self.reference[pos : pos + k]:
            if accept.random() < self.alpha:
                tokens.append(ref)
            else:  # any token but the reference one, uniformly
                other = corrupt.randrange(self.vocab - 1)
                tokens.append(other + (other >= ref))
        return Draft(tokens=tokens)
