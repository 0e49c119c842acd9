"""The one decode loop: autoregressive and speculative decoding for every drafter.

Each verify step feeds the last accepted token plus the drafted ones through the verifier
(AR is the case of zero drafts), keeps the longest accepted prefix plus the verifier's own next
token, and rolls the KV cache back over the rejected positions.

Teacher forcing (`teachers`): a sequence can instead be held to a fixed continuation (the
reference verifier's greedy output). Each step keeps only the drafts the verifier accepts *and*
that the continuation holds, then appends the continuation's next token in place of the
verifier's, so the text is the continuation's whatever the verifier would have said: the
acceptance the verifier reaches on the reference's text (τ_tf), measured by this same loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .drafters import Draft, Drafter, baseline_drafter
from .errors import QuasarError
from .sampling import accept_greedy, verify_sampling


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
    batch: "BatchStats | None" = None  # the batch it decoded in (set by generate_batch)


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


class OneSequence:
    """A runtime seen as a batch of one: the loop below serves batch_size = 1 and B > 1 alike
    (batching.BatchRuntime is the B > 1 case)."""

    size = 1

    def __init__(self, runtime):
        self.runtime = runtime
        self.device = runtime.device

    def reset(self, max_len: int) -> None:
        self.runtime.reset(max_len)

    def seq(self, b: int):
        return self.runtime

    def forward(self, rows: list[list[int]], starts: list[int], lengths: list[int] | None = None) -> torch.Tensor:
        return self.runtime.forward(torch.tensor(rows[0], device=self.device))[None]

    def gemm_rows(self, lengths: list[int] | None, t: int) -> int:
        return t


@dataclass
class BatchStats:
    """What the sequences of one batch share: the batch's wall time and how full its forwards were."""
    size: int = 1  # rows of every verify forward (batch_size)
    members: int = 1  # sequences in it (fewer than size: the rest of the rows are padding)
    steps: int = 0  # verify forwards
    fed: int = 0  # positions fed, padding included (sum over steps of size x tokens per row)
    gemm_rows: int = 0  # rows the linears ran on (= fed, or fewer in a packed forward: BatchRuntime)
    real: int = 0  # positions fed for an unfinished sequence's last token or drafts
    decode_s: float = 0.0  # first verify step to the last sequence's last token
    new_tokens: int = 0


def generate(runtime, drafter: Drafter, prompt_ids: list[int], max_new_tokens: int, k: int,
             eos_ids=(), temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, reference: list[int] | None = None,
             teacher: list[int] | None = None) -> GenerationResult:
    """One sequence (batch size 1): the decode loop of generate_batch over the runtime itself."""
    return generate_batch(OneSequence(runtime), [drafter], [prompt_ids], max_new_tokens, k, eos_ids, temperature,
                          top_p, [generator], [reference], [teacher])[0]


def generate_batch(batch, drafters: list[Drafter], prompts: list[list[int]], max_new_tokens: int, k: int,
                   eos_ids=(), temperature: float = 0.0, top_p: float = 1.0, generators=None,
                   references=None, teachers=None) -> list[GenerationResult]:
    """Decode len(prompts) <= batch.size sequences together: sequence b drafts with drafters[b]
    (bound to its own view of the cache, batch.seq(b)), samples with generators[b], and keeps its
    own accepted prefix. Rows of absent or finished sequences, and the tail of a row whose draft
    is shorter than the longest, are padding: fed (their cache writes land past the row's kept
    prefix, which the next forward overwrites; a packed batch skips them in its linears) and
    counted in BatchStats. teachers[b], when given,
    holds sequence b to that continuation (teacher forcing, greedy only: see the module doc); it
    then ends where the continuation does."""
    n = len(prompts)
    if not 1 <= n <= batch.size:
        raise QuasarError(f"{n} prompts for a batch of {batch.size}")
    if max_new_tokens < 1:
        raise QuasarError(f"max_new_tokens={max_new_tokens} is impossible: it must be >= 1")
    if any(len(p) < 1 for p in prompts):
        raise QuasarError("empty prompt: every prompt needs at least one token")
    generators = list(generators or [None] * n)
    references = list(references or [None] * n)
    teachers = list(teachers or [None] * n)
    if temperature > 0 and any(t is not None for t in teachers):
        raise QuasarError("teacher-forced decoding follows a greedy continuation: use temperature=0")
    if any(t is not None and len(t) < 1 for t in teachers):
        raise QuasarError("empty teacher continuation: teacher forcing needs at least one token to follow")
    # where each sequence ends: its teacher's length, else the token budget
    limits = [max_new_tokens if t is None else len(t) for t in teachers]
    timer = Timer(batch.device)
    eos = set(eos_ids)
    results = [GenerationResult() for _ in range(n)]
    stats = BatchStats(size=batch.size, members=n)
    # The cache holds everything but the last token; the last one is fed by the first verify step,
    # so AR makes exactly one verifier forward per generated token (tau = 1).
    max_len = max(map(len, prompts)) + max_new_tokens + k + 1
    room = max(d.cache_room for d in drafters)  # drafters that write past the verify window
    model = batch.model if hasattr(batch, "model") else batch.seq(0)
    capacity = getattr(model, "max_len", None)  # the native runtime's RoPE table (None: a cache that grows)
    if capacity is not None and max_len + room > capacity:
        raise QuasarError(f"the longest prompt ({max(map(len, prompts))} tokens) + max_new_tokens={max_new_tokens} + "
                          f"k={k} + 1{f' + {room} (drafter)' if room else ''} = {max_len + room} positions exceed "
                          f"model.max_seq_len={capacity}; lower max_new_tokens= or k=, or raise model.max_seq_len=")
    batch.reset(max_len + room)
    views = [batch.seq(b) for b in range(batch.size)]
    t0 = timer.now()
    for b, ids in enumerate(prompts):
        if len(ids) > 1:
            views[b].prefill(torch.tensor(ids[:-1], device=batch.device))
        drafters[b].setup(temperature, top_p, generators[b], max_len)
        drafters[b].start(ids, references[b])
    t1 = timer.now()
    contexts = [list(ids) for ids in prompts]
    active = list(range(n))
    while active:
        base = [v.cache_len for v in views]
        drafts = {}
        # positions each sequence may still draft (the verifier adds one token of its own)
        rooms = {b: limits[b] - len(results[b].output_ids) - 1 for b in active}
        proposing = [b for b in active if k > 0 and rooms[b] > 0]
        run_branches(batch, views, drafters, contexts, proposing, base, results, timer)
        for b in active:
            room = rooms[b]
            draft = Draft(tokens=[])
            if b in proposing:
                ta = timer.now()
                draft = drafters[b].propose(contexts[b], min(k, room))
                views[b].rollback(base[b])  # self-speculative drafters wrote past the verified prefix
                results[b].draft_s += timer.now() - ta
                draft.tokens = list(draft.tokens[: min(k, room)])
                if draft.probs is not None:
                    draft.probs = draft.probs[: len(draft.tokens)]
            drafts[b] = draft
        width = 1 + max(len(d.tokens) for d in drafts.values())
        rows = []
        for b in range(batch.size):
            fed = [contexts[b][-1]] + drafts[b].tokens if b in drafts else [contexts[b][-1] if b < n else 0]
            rows.append(fed + [fed[-1]] * (width - len(fed)))
        lengths = [1 + len(drafts[b].tokens) if b in drafts else 0 for b in range(batch.size)]
        tv = timer.now()
        logits = batch.forward(rows, base, lengths)
        targets = logits.argmax(-1).tolist() if temperature <= 0 else None
        verdicts = {}
        for b in active:
            draft = drafts[b]
            if temperature > 0:
                verdicts[b] = verify_sampling(logits[b, : 1 + len(draft.tokens)], draft, temperature, top_p,
                                              generators[b])
            elif draft.forced_accept is not None:  # a drafter that forces acceptance (speed-only runs)
                n_acc = min(draft.forced_accept, len(draft.tokens))
                verdicts[b] = n_acc, targets[b][n_acc]
            else:
                verdicts[b] = accept_greedy(targets[b], draft.tokens)
            if teachers[b] is not None:
                verdicts[b] = follow_teacher(verdicts[b][0], draft.tokens, teachers[b], len(results[b].output_ids))
        dt = timer.now() - tv
        for b in range(batch.size):
            if b not in drafts:  # padding rows: absent or finished sequences keep their length
                views[b].rollback(base[b])
        stats.steps += 1
        stats.fed += batch.size * width
        stats.gemm_rows += batch.gemm_rows(lengths, width)
        stats.real += sum(lengths)
        for b in list(active):
            res, draft, (n_acc, next_token) = results[b], drafts[b], verdicts[b]
            res.verify_s += dt
            # Keep the cache for the fed last token and the accepted drafts; the rest was rejected.
            views[b].rollback(base[b] + 1 + n_acc)
            new_tokens = draft.tokens[:n_acc] + [next_token]
            record_step(res, len(draft.tokens), n_acc)
            drafters[b].observe(n_acc, new_tokens)
            for tok in new_tokens:
                res.output_ids.append(tok)
                contexts[b].append(tok)
                if tok in eos:
                    res.stopped_by = "eos"
                    break
            if draft.last and res.stopped_by != "eos":
                res.stopped_by = draft.last
            if res.stopped_by != "max_new_tokens" or len(res.output_ids) >= limits[b]:
                res.decode_s = timer.now() - t1
                active.remove(b)
    stats.decode_s = timer.now() - t1
    stats.new_tokens = sum(len(r.output_ids) for r in results)
    for res in results:
        res.prefill_s = t1 - t0
        res.batch = stats
    return results


def run_branches(batch, views, drafters, contexts, proposing, base, results, timer) -> None:
    """The verifier forwards drafters ask for before drafting (Drafter.branch_tokens: lookahead's
    Jacobi window), every proposing sequence's in ONE batched forward at its own verified length,
    so a batch pays one forward per step for them, as for verification, not one per sequence.
    Rows without a branch are padding (their last token). Each drafter gets its rows' logits; the
    cache is rolled back to the verified prefixes; the forward's time is every branching sequence's
    draft time (as a verify forward is every sequence's verify time)."""
    branches = {b: t for b in proposing if (t := drafters[b].branch_tokens(contexts[b]))}
    if not branches:
        return
    ta = timer.now()
    width = max(map(len, branches.values()))
    rows = []
    for b in range(batch.size):
        fed = branches.get(b) or [contexts[b][-1] if b < len(contexts) else 0]
        rows.append(fed + [fed[-1]] * (width - len(fed)))
    logits = batch.forward(rows, base, [len(branches.get(b, ())) for b in range(batch.size)])
    for b, fed in branches.items():
        drafters[b].branch_logits(logits[b, : len(fed)])
    for b, view in enumerate(views):
        view.rollback(base[b])
    dt = timer.now() - ta
    for b in branches:
        results[b].draft_s += dt


def follow_teacher(n_acc: int, draft: list[int], teacher: list[int], pos: int) -> tuple[int, int]:
    """Teacher forcing: of the n_acc drafts the verifier accepted, keep those the teacher
    continuation also holds (from position pos), and continue with the teacher's next token. The
    kept drafts are the teacher's tokens, so the KV cache stays the teacher's text."""
    kept = 0
    while kept < n_acc and draft[kept] == teacher[pos + kept]:
        kept += 1
    return kept, teacher[pos + kept]


def greedy_continuation(runtime, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """The runtime's greedy AR output after `prompt_ids` (up to max_new_tokens, or EOS included)."""
    drafter = baseline_drafter(runtime)
    return generate(runtime, drafter, prompt_ids, max_new_tokens, 0, eos_ids).output_ids
