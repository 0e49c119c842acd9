"""The one decode loop: autoregressive and speculative decoding for every drafter.

Each verify step feeds the last accepted token plus the drafted ones through the verifier
(AR is the case of zero drafts), keeps the longest accepted prefix plus the verifier's own next
token, and rolls the KV cache back over the rejected positions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .drafters import Draft, Drafter, baseline_drafter
from .errors import QuasarError
from .sampling import verify_greedy, verify_sampling


@dataclass
class GenerationResult:
    output_ids: list[int] = field(default_factory=list)
    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    # attempts[i] / accepts[i]: draft position i+1 was verified / accepted (see metrics.py)
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    # Per verify step: drafts fed to the verifier, and how many of them it kept (the trace a
    # `replay` drafter reproduces elsewhere; sums to drafted / accepted)
    step_drafted: list[int] = field(default_factory=list)
    step_accepted: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    stopped_by: str = "max_new_tokens"


class Timer:
    """Wall-clock timer that waits for the device first, so GPU work is counted where it ran."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def record_step(res: GenerationResult, drafted: int, accepted: int) -> None:
    res.verify_steps += 1
    res.drafted += drafted
    res.accepted += accepted
    res.step_drafted.append(drafted)
    res.step_accepted.append(accepted)
    # Positions 1..min(accepted+1, drafted) were tried; the first `accepted` of them passed.
    tried = min(accepted + 1, drafted)
    while len(res.attempts) < tried:
        res.attempts.append(0)
        res.accepts.append(0)
    for i in range(tried):
        res.attempts[i] += 1
        res.accepts[i] += i < accepted


def generate(runtime, drafter: Drafter, prompt_ids: list[int], max_new_tokens: int, k: int,
             eos_ids=(), temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, reference: list[int] | None = None) -> GenerationResult:
    if max_new_tokens < 1:
        raise QuasarError(f"max_new_tokens={max_new_tokens} is impossible: it must be >= 1")
    if len(prompt_ids) < 1:
        raise QuasarError("empty prompt: every prompt needs at least one token")
    device = runtime.device
    timer = Timer(device)
    eos = set(eos_ids)
    res = GenerationResult()
    # The cache holds everything but the last token; the last one is fed by the first verify step,
    # so AR makes exactly one verifier forward per generated token (tau = 1).
    max_len = len(prompt_ids) + max_new_tokens + k + 1
    runtime.reset(max_len + drafter.cache_room)  # drafters that write past the verify window
    t0 = timer.now()
    if len(prompt_ids) > 1:
        runtime.prefill(torch.tensor(prompt_ids[:-1], device=device))
    drafter.setup(temperature, top_p, generator, max_len)
    drafter.start(prompt_ids, reference)
    t1 = timer.now()
    res.prefill_s = t1 - t0

    context = list(prompt_ids)
    while len(res.output_ids) < max_new_tokens:
        room = max_new_tokens - len(res.output_ids) - 1  # the verifier adds one token of its own
        base = runtime.cache_len
        draft = Draft(tokens=[])
        if k > 0 and room > 0:
            ta = timer.now()
            draft = drafter.propose(context, min(k, room))
            runtime.rollback(base)  # self-speculative drafters wrote past the verified prefix
            res.draft_s += timer.now() - ta
            draft.tokens = list(draft.tokens[: min(k, room)])
            if draft.probs is not None:
                draft.probs = draft.probs[: len(draft.tokens)]
        tv = timer.now()
        logits = runtime.forward(torch.tensor([context[-1]] + draft.tokens, device=device))
        if temperature > 0:
            n_acc, next_token = verify_sampling(logits, draft, temperature, top_p, generator)
        else:
            n_acc, next_token = verify_greedy(logits, draft.tokens)
            if draft.forced_accept is not None:  # a drafter that forces acceptance (speed-only runs)
                n_acc = min(draft.forced_accept, len(draft.tokens))
                next_token = int(logits[n_acc].argmax())
        res.verify_s += timer.now() - tv
        # Keep the cache for the fed last token and the accepted drafts; the rest was rejected.
        runtime.rollback(base + 1 + n_acc)
        new_tokens = draft.tokens[:n_acc] + [next_token]
        record_step(res, len(draft.tokens), n_acc)
        drafter.observe(n_acc, new_tokens)
        for tok in new_tokens:
            res.output_ids.append(tok)
            context.append(tok)
            if tok in eos:
                res.stopped_by = "eos"
                break
        if draft.last and res.stopped_by != "eos":
            res.stopped_by = draft.last
        if res.stopped_by != "max_new_tokens":
            break
    res.decode_s = timer.now() - t1
    return res


def greedy_continuation(runtime, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """The runtime's greedy AR output after `prompt_ids` (up to max_new_tokens, or EOS included)."""
    drafter = baseline_drafter(runtime)
    return generate(runtime, drafter, prompt_ids, max_new_tokens, 0, eos_ids).output_ids
