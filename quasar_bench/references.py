"""Greedy continuations a run needs beside its timed cells, computed untimed.

- The reference verifier's continuation of every (prompt, turn): fidelity is measured on it
  (teacher-forced KL / top-1, exact match), and drafters with `replays = "reference"` replay it.
- Each verifier's own greedy AR output, for drafters with `replays = "own"`; a baseline cell at
  temperature 0 fills this in as it runs, so it is usually free.
Also the services drafters borrow from the harness (`draft_tools`).
"""
from __future__ import annotations

from tqdm.auto import tqdm

from .decode import greedy_continuation
from .drafters import DraftTools
from .encode import decode_text, encode_turn
from .fidelity import logit_fidelity, teacher_forced_logprobs


def draft_tools(loaded, cache_dir=None, fuse: bool = False) -> DraftTools:
    """What the harness lends drafters. A verifier built for a drafter (draft_model's `precision`)
    is built once per configuration and shared by every cell's drafter: the run holds every
    verifier's drafters at once (its cells interleave), and one cell runs at a time, each
    generation resetting the draft model's cache."""
    from .calibration import calibration_prompts
    from .plan import cell_hash
    from .verifiers import build_verifier

    built = {}

    def build_once(vcfg):
        key = cell_hash(vcfg)
        if key not in built:
            built[key] = build_verifier(loaded, vcfg, cache_dir, fuse)
        return built[key]

    return DraftTools(
        greedy=lambda runtime, ids, n: greedy_continuation(runtime, ids, n, loaded.eos_ids),
        build_verifier=build_once,
        calibration_prompts=lambda n, seed=0: calibration_prompts(loaded, n, seed),
        reference_runtime=loaded.runtime,
    )


class References:
    def __init__(self, loaded, prompts, max_new_tokens: int):
        self.loaded, self.prompts, self.max_new_tokens = loaded, prompts, max_new_tokens
        self.continuations: dict = {}  # (prompt_id, turn) -> (prompt ids, reference continuation)
        self.logprobs: dict = {}  # (prompt_id, turn) -> teacher-forced log-probs of the reference
        self.own: dict = {}  # (verifier key, prompt_id, turn, prompt ids) -> that verifier's greedy output

    def compute(self, with_logprobs: bool, progress: bool) -> None:
        """The reference verifier's greedy AR continuation for every (prompt, turn)."""
        rt = self.loaded.runtime
        for p in tqdm(self.prompts, desc="reference continuations", disable=not progress):
            answers = []
            for turn in range(1, len(p.turns) + 1):
                ids = encode_turn(self.loaded, p.turns[:turn], answers)
                cont = greedy_continuation(rt, ids, self.max_new_tokens, self.loaded.eos_ids)
                self.continuations[(p.prompt_id, turn)] = (ids, cont)
                answers.append(decode_text(self.loaded.tokenizer, cont))
                if with_logprobs:
                    self.logprobs[(p.prompt_id, turn)] = teacher_forced_logprobs(rt, ids, cont)

    def fidelity(self, runtime) -> dict:
        """(prompt_id, turn) -> KL / top-1 of `runtime` against the reference (teacher-forced)."""
        return {key: logit_fidelity(lp, teacher_forced_logprobs(runtime, *self.continuations[key]))
                for key, lp in self.logprobs.items()}

    def remember_own(self, verifier: str, key, ids, output_ids) -> None:
        self.own[(verifier, *key, tuple(ids))] = output_ids

    def replay(self, drafter, runtime, verifier: str, key, ids):
        """What `drafter` replays for this (prompt_id, turn), or None when it replays nothing;
        `verifier` names `runtime` (the cells of every verifier interleave)."""
        if drafter.replays is None:
            return None
        if drafter.replays == "reference":
            ref = self.continuations.get(key)
            return ref[1] if ref else None
        own = (verifier, *key, tuple(ids))  # a later turn's prompt holds this cell's own earlier answers
        if own not in self.own:
            self.own[own] = greedy_continuation(runtime, ids, self.max_new_tokens, self.loaded.eos_ids)
        return self.own[own]
