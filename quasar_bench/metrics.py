"""Acceptance metrics, defined once (the README defines them):

- accepted length of a step = accepted drafts + 1 (the verifier's own token)
- tau   = generated tokens / verify steps
- alpha = accepted draft tokens / drafted tokens (NaN when nothing was drafted)
- p_i   = P(draft i accepted | drafts 1..i-1 accepted) = accepts[i] / attempts[i]
"""
from __future__ import annotations

import math


def tau(new_tokens: int, verify_steps: int) -> float:
    return new_tokens / verify_steps if verify_steps else math.nan


def alpha(accepted: int, drafted: int) -> float:
    return accepted / drafted if drafted else math.nan


def per_position_acceptance(attempts: list[int], accepts: list[int]) -> list[float]:
    return [a / t if t else math.nan for a, t in zip(accepts, attempts)]


def acceptance_from_trace(trace: list[tuple[int, int]]):
    """trace: (drafted, accepted) per verify step. Returns (tau, alpha, p_i) as the loop records them.
    Each step yields accepted + 1 tokens (no EOS / budget truncation in a trace)."""
    from .decode import GenerationResult, record_step

    res = GenerationResult()
    for drafted, accepted in trace:
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted={accepted} must lie in 0..drafted={drafted}")
        record_step(res, drafted, accepted)
    new_tokens = sum(a + 1 for _, a in trace)
    return (tau(new_tokens, res.verify_steps), alpha(res.accepted, res.drafted),
            per_position_acceptance(res.attempts, res.accepts))
