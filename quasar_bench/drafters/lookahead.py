"""Lookahead decoding (Fu et al. 2024), single-branch adaptation: Jacobi iterations on the verifier
harvest n-grams into a pool; the draft is a pool n-gram that starts with the last token.

Parameters: window W (Jacobi positions per iteration), n-gram size N (the trajectory keeps N-1
levels), guess set size G (n-grams kept per first token; the newest wins).

Per verify step, in propose():
1. Lookahead branch: one Jacobi iteration, an extra forward of the verifier past its cache over
   [last token, level[-1] (W guesses)] with the ordinary causal mask (rolled back by the loop).
   Output j is the verifier's greedy prediction after input j; these W outputs become the new
   level. The paper's diagonal n-grams are harvested: (level[-(N-1)][j-N+1], ...,
   level[-1][j-1], output[j]) for j = N-1..W; each token on it was predicted right after the
   one before it.
2. Verification branch: the pool n-grams keyed by the last token (at most G, the most recent
   first); the newest one's N-1 tokens are the draft, chained through the pool (keyed by the last
   drafted token) up to k tokens. `pool_from_context` also seeds the pool with the n-grams of the
   prompt and the generated text (as LADE's prompt-as-reference option).

Differences from the paper: the paper runs the lookahead branch ((N-1) x W tokens with a 2D
attention mask: each token sees the prefix and its own diagonal) and verifies up to G candidates
in parallel inside ONE forward with the verification branch, so on a memory-bound GPU the lookahead
is nearly free. Here the loop verifies one linear draft per step, so the lookahead branch is a
separate causal forward of W+1 tokens that only sees the newest level (plain Jacobi decoding), and
one candidate is verified. Cost accounting: that extra verifier forward is counted as draft time.
tau/alpha are comparable in spirit, wall-clock is pessimistic versus a fused implementation.
Drafts are deterministic (one-hot q), so speculative sampling stays exact at temperature > 0.
"""
from __future__ import annotations

import random
import zlib
from collections import OrderedDict

import torch

from ..errors import QuasarError
from . import Draft, Drafter


class Lookahead(Drafter):
    name = "lookahead"

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        super().__init__(cfg, runtime, loaded, tools)
        try:
            self.W, self.N, self.G = int(cfg.window), int(cfg.ngram), int(cfg.guesses)
        except (TypeError, ValueError):
            raise QuasarError("lookahead drafter: window, ngram and guesses must be integers") from None
        if self.W < 1 or self.N < 2 or self.G < 1:
            raise QuasarError(f"lookahead drafter needs window >= 1, ngram >= 2, guesses >= 1; got window={self.W}, "
                              f"ngram={self.N}, guesses={self.G}")
        self.pool_from_context = bool(cfg.pool_from_context)
        self.seed = int(cfg.seed)
        self.cache_room = self.W  # the lookahead forward writes 1 + W positions past the verified prefix
        self.forward_tokens = 1 + self.W  # that forward's width: CUDA graphs are captured up to it

    def start(self, prompt_ids, reference=None):
        self.pool: dict[int, OrderedDict] = {}
        rng = random.Random(self.seed * 1_000_003 + zlib.crc32(" ".join(map(str, prompt_ids)).encode()))
        self.levels = [[rng.choice(prompt_ids) for _ in range(self.W)]]  # the paper: random prompt tokens
        self.seen = 0  # context n-grams starting before this index are in the pool
        self.steps = 0
        self.branch_out = None  # this step's Jacobi outputs, when the loop ran the branch forward

    def add(self, gram) -> None:
        key, rest = int(gram[0]), tuple(int(t) for t in gram[1:])
        bucket = self.pool.setdefault(key, OrderedDict())
        bucket.pop(rest, None)
        bucket[rest] = None  # newest last
        while len(bucket) > self.G:
            bucket.popitem(last=False)

    def branch_tokens(self, context):
        return [context[-1]] + self.levels[-1]

    def branch_logits(self, logits):
        self.branch_out = logits.argmax(-1).tolist()

    def propose(self, context, k):
        N, W = self.N, self.W
        if self.pool_from_context:
            for i in range(self.seen, len(context) - N + 1):
                self.add(context[i : i + N])
            self.seen = max(self.seen, len(context) - N + 1)
        # Lookahead branch: one Jacobi iteration over the newest level, run by the loop (batched
        # across a batch's sequences) unless propose() is called on its own.
        out = self.branch_out
        if out is None:
            x = self.branch_tokens(context)
            out = self.runtime.forward(torch.tensor(x, device=self.runtime.device)).argmax(-1).tolist()
        self.branch_out = None
        if len(self.levels) >= N - 1:
            old = self.levels[-(N - 1):]
            for j in range(N - 1, W + 1):
                self.add([old[i][j - N + 1 + i] for i in range(N - 1)] + [out[j]])
        self.levels = (self.levels + [out[:W]])[-(N - 1):]
        self.steps += 1
        # Verification branch: the newest pool n-gram keyed by the last token, chained up to k.
        draft, tok = [], context[-1]
        while len(draft) < k:
            bucket = self.pool.get(tok)
            if not bucket:
                break
            rest = next(reversed(bucket))
            draft.extend(rest)
            tok = draft[-1]
        return Draft(tokens=draft[:k])
