"""Speculative sampling preserves the verifier's distribution (the README's correctness contract).

Method: a tiny random model with a 16-token vocabulary (weights drawn with std 0.3 so p is far
from uniform), prompt fixed. The exact p of the first token and of the first two tokens is computed
from the verifier's logits by `np_target`, written here in numpy float64 from the definition
(softmax(logits / T), then the smallest most-likely set reaching mass top_p, renormalised), not by
the decoder's own sampling.target_probs; speculative decoding through the one
decode loop (max_new_tokens=3, k=2, so both draft positions and the bonus token are exercised) is
sampled N times with one seeded generator, and a chi-square goodness-of-fit test compares the
counts with N * p (cells with expected count < 5 are pooled). Pass: p-value > 1e-3. The seeds are
fixed, so every test is deterministic; the threshold leaves room for seed changes.
Negative control: the same test rejects a broken rule (rejection resamples from p instead of the
residual norm(max(0, p - q))) with p-value < 1e-6.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

import quasar_bench.decode as decode_mod
from quasar_bench.decode import generate
from quasar_bench.drafters import Draft, Drafter, make_drafter
from quasar_bench.models import TINY_CONFIGS, random_hf_model
from quasar_bench.runtime import native_from_hf
from quasar_bench.sampling import sample, target_probs, verify_sampling

V = 16
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
P_MIN = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rt():
    hf = random_hf_model({**TINY_CONFIGS["tiny_llama"], "initializer_range": 0.3}, V, torch.float32, "cpu", 3)
    return native_from_hf(hf, 64)


def np_target(logits, temperature: float, top_p: float) -> np.ndarray:
    """The verifier's sampling distribution over one logits row, from the definition (numpy,
    float64): softmax(logits / T); with top_p < 1 only the most likely tokens are kept, the fewest
    whose probabilities sum to at least top_p (ties in file order), then renormalised."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # first prefix reaching top_p
        kept = np.zeros_like(p)
        kept[order[:n_keep]] = p[order[:n_keep]]
        p = kept / kept.sum()
    return p


def exact_two_token(rt, temperature, top_p):
    """p(x1) [V] and p(x1, x2) [V, V] of the verifier, from its logits."""
    rt.reset(16)
    p1 = np_target(rt.forward(torch.tensor(PROMPT))[-1].tolist(), temperature, top_p)
    joint = np.zeros((V, V))
    for x1 in range(V):
        rt.rollback(len(PROMPT))
        joint[x1] = p1[x1] * np_target(rt.forward(torch.tensor([x1]))[-1].tolist(), temperature, top_p)
    return torch.from_numpy(p1), torch.from_numpy(joint)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (0.8, 0.5), (1.0, 0.05)])
def test_target_probs_is_the_definition(temperature, top_p):
    """The decoder's sampling distribution (sampling.target_probs) equals np_target's."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4)) * 3
    logits[0, :5] = 2.0  # ties at the top
    got = target_probs(logits, temperature, top_p)
    want = np.stack([np_target(row.tolist(), temperature, top_p) for row in logits])
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)
    if top_p <= 0.5:  # the nucleus really cut tokens in every row
        assert ((got > 0).sum(-1) < 50).all()


def gof(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of counts against probs, pooling cells with expected count < 5."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    expected = probs / probs.sum() * n
    if (counts[expected == 0] > 0).any():
        return 0.0  # a sample the verifier can never produce
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


class RandomOneHot(Drafter):
    """Model-free drafter for the test: seeded random tokens, deterministic proposal (q one-hot)."""

    name = "test_random"

    def __init__(self, cfg, runtime, loaded=None):
        super().__init__(cfg, runtime, loaded)
        self.rng = random.Random(0)  # one stream across generations: fresh drafts every sample

    def propose(self, context, k):
        # Biased towards low ids so drafts are often accepted and often rejected.
        return Draft(tokens=[min(self.rng.randrange(V), self.rng.randrange(V)) for _ in range(k)])


def sample_counts(rt, drafter, n, temperature, top_p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    first = torch.zeros(V)
    joint = torch.zeros(V, V)
    drafted = accepted = 0
    for _ in range(n):
        res = generate(rt, drafter, PROMPT, 3, 2, (), temperature, top_p, gen)
        x1, x2 = res.output_ids[:2]
        first[x1] += 1
        joint[x1, x2] += 1
        drafted += res.drafted
        accepted += res.accepted
    assert 0 < accepted < drafted, "the test needs both accepted and rejected drafts"
    return first, joint


def early_exit(rt):
    d = make_drafter(OmegaConf.create({"name": "early_exit", "k": 2, "layers": 1}), rt)
    return d


# -- verify_sampling alone: fixed p and q, many draws (fast) ------------------------------------

@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("one_hot", [True, False])
def test_verify_sampling_first_token_matches_p(one_hot, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, V, generator=g) * 2
    p = torch.from_numpy(np_target(logits[0].tolist(), 1.0, top_p))
    q_row = torch.softmax(torch.randn(V, generator=g) * 2, -1)  # q != p, mass outside p's nucleus too
    counts = torch.zeros(V)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20000):
        if one_hot:
            draft = Draft(tokens=[min(int(torch.randint(V, (), generator=gen)), 5)])
        else:
            x = sample(q_row, gen)
            draft = Draft(tokens=[x], probs=q_row[None])
        n_acc, nxt = verify_sampling(logits, draft, 1.0, top_p, gen)
        counts[draft.tokens[0] if n_acc else nxt] += 1
    assert gof(counts, p) > P_MIN


# -- through the decode loop: first-token and two-token distributions --------------------------

N = 1500  # samples per test; p-values at these seeds: 0.78..0.97 (broken rule: < 1e-11)


@pytest.mark.parametrize("kind", ["one_hot", "early_exit"])
def test_speculative_sampling_preserves_distribution(rt, kind):
    temperature, top_p = 1.0, 1.0
    drafter = RandomOneHot({"k": 2}, rt) if kind == "one_hot" else early_exit(rt)
    p1, joint = exact_two_token(rt, temperature, top_p)
    first, pair = sample_counts(rt, drafter, N, temperature, top_p)
    assert gof(first, p1) > P_MIN
    assert gof(pair, joint) > P_MIN


def test_top_p_and_temperature_preserved_with_model_drafter(rt):
    temperature, top_p = 0.8, 0.9
    p1, joint = exact_two_token(rt, temperature, top_p)
    first, pair = sample_counts(rt, early_exit(rt), N, temperature, top_p, seed=5)
    assert gof(first, p1) > P_MIN
    assert gof(pair, joint) > P_MIN


def test_draft_probs_are_the_drafters_q(rt):
    """Model-based drafters sample from q and return it: each row sums to 1 and q[token] > 0."""
    d = early_exit(rt)
    d.setup(1.0, 1.0, torch.Generator().manual_seed(0))
    rt.reset(32)
    rt.forward(torch.tensor(PROMPT[:-1]))
    draft = d.propose(PROMPT, 2)
    assert draft.probs is not None and draft.probs.shape == (2, V)
    assert torch.allclose(draft.probs.sum(-1), torch.ones(2), atol=1e-5)
    assert all(draft.probs[i, t] > 0 for i, t in enumerate(draft.tokens))


def test_negative_control_broken_rule_is_rejected(rt, monkeypatch):
    """Resampling from p instead of the residual after a rejection biases the output: caught."""

    def broken(logits, draft, temperature, top_p, generator):
        p = target_probs(logits, temperature, top_p)
        q = draft.probs
        for i, x in enumerate(draft.tokens):
            qx = 1.0 if q is None else float(q[i, x])
            if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, x]) / qx):
                continue
            return i, sample(p[i], generator)  # BUG: should be norm(max(0, p - q))
        return len(draft.tokens), sample(p[len(draft.tokens)], generator)

    monkeypatch.setattr(decode_mod, "verify_sampling", broken)
    p1, joint = exact_two_token(rt, 1.0, 1.0)
    first, pair = sample_counts(rt, early_exit(rt), N, 1.0, 1.0)
    assert min(gof(first, p1), gof(pair, joint)) < 1e-6


def test_sampling_is_reproducible(rt):
    d = early_exit(rt)
    a = generate(rt, d, PROMPT, 12, 3, (), 1.0, 0.9, torch.Generator().manual_seed(7)).output_ids
    b = generate(rt, d, PROMPT, 12, 3, (), 1.0, 0.9, torch.Generator().manual_seed(7)).output_ids
    assert a == b
