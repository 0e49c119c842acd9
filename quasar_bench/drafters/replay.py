"""Replay drafter: real acceptance, measured elsewhere, at the speed of this run's shapes.

Random weights at a real model's shapes give honest step times but meaningless acceptance; a small
real model gives honest acceptance but the wrong step times. `replay` joins the two. A first run on a
real model records, in every row, each verify step's drafted and accepted counts
(`drafted_lengths`, `accepted_lengths`). A replay run wraps the same kind of drafter (`inner`): at
every step the inner drafter does its real work at this run's shapes (a layer subset runs k times, a
draft model runs, the n-gram table is searched, lookahead's Jacobi forward runs — also at steps that
drafted nothing: it is asked for one token more than the step drafted), its proposal is cut or padded
to the step's recorded draft count, and the loop accepts the recorded number of drafts (`forced_accept`), whatever this
run's verifier says. So the verify forward sees the same number of tokens as in the recorded run,
and `verify_steps`, τ and new tokens equal the recording's, while every time is this run's.

Traces are chosen per (verifier label, prompt id, turn): `trace_verifier` (default: the cell's own
verifier, so an int4 cell replays the τ the int4 verifier reached on the real model) and
`trace_drafter` (default: the inner drafter's label). A generation without a trace, or one that runs
past its trace, stops the run with a one-line error; a recorded generation that ended by EOS ends
here at the same step with the same token count (stopped_by `trace_end`; when the EOS came before
the end of its step's accepted drafts, that last step keeps fewer). Greedy only.
"""
from __future__ import annotations

from .. import rowfiles
from ..errors import QuasarError
from . import Draft, Drafter, make_drafter

TRACE_COLUMNS = ["verifier", "drafter", "prompt_id", "turn", "drafted_lengths", "accepted_lengths", "stopped_by",
                 "new_tokens"]


def read_rows(source):
    """The rows of a result directory (its row store, else its rows.parquet / rows.csv export) or
    of one rows .parquet / .csv file (rowfiles.read_rows); errors name drafter.traces=."""
    try:
        return rowfiles.read_rows(source)
    except QuasarError as e:
        raise QuasarError(f"drafter.traces={source}: {e}") from None


def load_traces(source) -> dict:
    """(verifier, drafter, prompt_id, turn) -> (drafted per step, accepted per step, stopped_by, new tokens)
    from a result directory or a rows file (read_rows)."""
    df, path = read_rows(source), source
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise QuasarError(f"drafter.traces={path} has no {missing} columns: rows recorded before the "
                          "harness stored per-step acceptance; re-run the source experiment")
    out = {}
    for r in df[TRACE_COLUMNS].itertuples(index=False):
        drafted, accepted = [int(x) for x in r.drafted_lengths], [int(x) for x in r.accepted_lengths]
        out[(r.verifier, r.drafter, str(r.prompt_id), int(r.turn))] = (drafted, accepted, r.stopped_by, int(r.new_tokens))
    return out


class Replay(Drafter):
    name = "replay"
    forces_acceptance = True

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        if cfg.get("inner") is None:
            raise QuasarError("drafter=replay needs drafter.inner=<the drafter to run, e.g. layerskip or "
                              "{name: layerskip, skip: [...]}>")
        inner_cfg = {"name": cfg.inner} if isinstance(cfg.inner, str) else cfg.inner
        self.inner = make_drafter(inner_cfg, runtime, loaded, tools)
        self.inner_label = inner_cfg.get("label") or self.inner.name
        if self.inner.forces_acceptance or not self.inner.drafts:
            raise QuasarError(f"drafter.inner={self.inner.name} does not draft on its own; replay a real drafter "
                              "(ngram, lookahead, layerskip, early_exit, draft_model)")
        super().__init__(cfg, runtime, loaded, tools)
        self.replays, self.cache_room = self.inner.replays, self.inner.cache_room
        self.forward_tokens = self.inner.forward_tokens
        self.traces = load_traces(cfg["traces"]) if cfg.get("traces") else None
        if self.traces is None:
            raise QuasarError("drafter=replay needs drafter.traces=<result directory or rows file of a run "
                              "on a real model>")
        self.trace_verifier, self.trace_drafter = cfg.get("trace_verifier"), cfg.get("trace_drafter")
        self.source = str(cfg["traces"])
        self.trace = None

    def for_sequence(self, runtime):
        twin = super().for_sequence(runtime)
        twin.inner = self.inner.for_sequence(runtime)
        return twin

    def begin(self, verifier, prompt_id, turn):
        key = (self.trace_verifier or verifier, self.trace_drafter or self.inner_label, str(prompt_id), int(turn))
        if key not in self.traces:
            have = sorted({(v, d) for v, d, _, _ in self.traces})[:6]
            raise QuasarError(f"no trace for verifier={key[0]} drafter={key[1]} prompt={key[2]} turn={key[3]} in "
                              f"{self.source} (it holds verifier/drafter {have}); run that cell on the real "
                              "model, or set drafter.trace_verifier= / drafter.trace_drafter=")
        self.key, self.trace = key, self.traces[key]
        self.inner.begin(verifier, prompt_id, turn)

    def setup(self, temperature=0.0, top_p=1.0, generator=None, max_len=None):
        super().setup(temperature, top_p, generator, max_len)
        if temperature > 0:
            raise QuasarError("drafter=replay replays greedy acceptance; run it with temperature=0")
        if hasattr(self, "inner"):
            self.inner.setup(temperature, top_p, generator, max_len)

    def start(self, prompt_ids, reference=None):
        if self.trace is None:
            raise QuasarError("drafter=replay: begin(verifier, prompt_id, turn) names the trace before start(); "
                              "run it through the experiment")
        self.step = self.produced = 0
        self.inner.start(prompt_ids, reference)

    def propose(self, context, k):
        drafted, accepted, stopped_by, new_tokens = self.trace
        if self.step >= len(drafted):
            raise QuasarError(f"the trace of {self.key} ends after {len(drafted)} verify steps ({stopped_by}) but "
                              "this generation goes on: set max_new_tokens= to at most the source run's")
        want, keep = drafted[self.step], accepted[self.step]
        if want > self.k:
            raise QuasarError(f"the trace of {self.key} drafts {want} tokens at step {self.step + 1}, more than "
                              f"drafter.k={self.k}: set drafter.k= to at least the source run's k")
        # Fewer positions left than recorded: only when this generation is shorter than the source's
        # (the untimed warm-up, or a smaller max_new_tokens), near its end.
        want, keep = min(want, k), min(keep, k)
        # The inner drafter does the work the source's did at this step, drafts or not: a step that
        # drafted nothing still ran lookahead's Jacobi forward or ngram's search, and one that
        # stopped early (a confidence threshold) ran one more draft forward than it kept. Asking for
        # one token more than recorded (at most k; k = 0 where no position is left, as the source's
        # loop asked then too) and keeping the recorded count reproduces both.
        tokens = list(self.inner.propose(context, min(k, want + 1)).tokens[:want])
        tokens += [context[-1]] * (want - len(tokens))  # the verify forward sees the recorded width
        self.step += 1
        last = None
        if self.step == len(drafted) and stopped_by == "eos":
            # the recorded EOS may have cut its step short: keep exactly the recorded token count
            last, keep = "trace_end", min(keep, new_tokens - self.produced - 1)
        return Draft(tokens=tokens, forced_accept=keep, last=last)

    def branch_tokens(self, context):
        return self.inner.branch_tokens(context)  # the inner drafter's real work, as in propose()

    def branch_logits(self, logits):
        self.inner.branch_logits(logits)

    def observe(self, accepted, new_tokens):
        self.produced += len(new_tokens)
        self.inner.observe(accepted, new_tokens)

    def row_fields(self):
        return {**self.inner.row_fields(), "trace_source": self.source,
                "trace_verifier": self.trace_verifier or "", "trace_drafter": self.trace_drafter or self.inner_label}
