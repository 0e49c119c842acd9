"""Verification rules: greedy (exact match with the verifier's argmax) and speculative sampling
(accept with min(1, p/q), resample from norm(max(0, p - q))), which preserves the verifier's
distribution for any draft distribution q. Model-free drafters have a one-hot q."""
from __future__ import annotations

import torch


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """logits [d+1, V] for (last token, draft...). Returns (accepted drafts, verifier's next token)."""
    return accept_greedy(logits.argmax(-1).tolist(), draft)


def accept_greedy(target: list[int], draft: list[int]) -> tuple[int, int]:
    """The same from the verifier's argmax per position (a batch takes every row's in one transfer)."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n, target[n]


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The verifier's sampling distribution per row: softmax(logits / T), then nucleus top-p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_sampling(logits, draft, temperature: float, top_p: float, generator) -> tuple[int, int]:
    p = target_probs(logits, temperature, top_p).cpu()
    tokens = draft.tokens
    q = draft.probs.float().cpu() if draft.probs is not None else None
    gen_device_rand = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    for i, x in enumerate(tokens):
        qx = 1.0 if q is None else float(q[i, x])
        px = float(p[i, x])
        if qx > 0 and gen_device_rand() < min(1.0, px / qx):
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp(min=0.0)
        if residual.sum() <= 0:  # p == q exactly: any rejection is measure-zero; fall back to p
            residual = p[i]
        return i, sample(residual / residual.sum(), generator)
    return len(tokens), sample(p[len(tokens)], generator)
