"""Per-step acceptance traces and the replay drafter (drafters/replay.py)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from quasar_bench.decode import generate
from quasar_bench.drafters import Draft, Drafter, make_drafter
from quasar_bench.errors import QuasarError
from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
from quasar_bench.references import draft_tools
from quasar_bench.runtime import native_from_hf
from test_drafters import TableRuntime


class Scripted(Drafter):
    """Proposes k tokens per step whose first script[i] are the stub verifier's next tokens."""
    name = "scripted"

    def __init__(self, seq, script, k):
        super().__init__({"k": k}, None)
        self.seq, self.script, self.i = seq, script, 0

    def propose(self, context, k):
        n, good = len(context), self.script[self.i]
        self.i += 1
        right = self.seq[n : n + k]
        return Draft(tokens=[t if j < good else t + 1 for j, t in enumerate(right)])


def test_step_trace_is_what_the_verifier_kept():
    """Accepted counts per step equal a hand-made script (a stub verifier whose greedy token is
    known; the script's later drafts are wrong)."""
    seq = list(range(100, 160))
    script = [3, 0, 2, 3, 1, 0, 3, 3, 3, 3]
    rt = TableRuntime(seq, 200)
    res = generate(rt, Scripted(seq, script, 3), seq[:4], 20, 3)
    # 4+1+3+4+2+1+4 = 19 tokens in 7 steps; the 20th comes from a step with no room to draft
    assert res.step_accepted == [3, 0, 2, 3, 1, 0, 3, 0]
    assert res.step_drafted == [3] * 7 + [0]
    assert res.output_ids == seq[4:24]
    assert sum(res.step_accepted) == res.accepted and sum(res.step_drafted) == res.drafted


def tiny(seed):
    hf = random_hf_model({**TINY_CONFIGS["tiny_llama"], "initializer_range": 0.3}, 256, torch.float32, "cpu", seed)
    rt = native_from_hf(hf, 256)
    return rt, LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)


def trace_file(tmp_path, res, verifier="reference", drafter="layerskip", stopped_by="max_new_tokens", new_tokens=None):
    path = tmp_path / "rows.parquet"
    pd.DataFrame([dict(verifier=verifier, drafter=drafter, prompt_id="p1", turn=1, new_tokens=new_tokens or len(res.output_ids),
                       drafted_lengths=res.step_drafted, accepted_lengths=res.step_accepted,
                       stopped_by=stopped_by)]).to_parquet(path)
    return tmp_path


INNER = {"name": "layerskip", "mode": "static", "skip": [3], "k": 3}
PROMPT = [5, 17, 99, 3, 42, 7, 5, 17]


def replay(rt, loaded, traces, **kw):
    cfg = OmegaConf.create({"name": "replay", "inner": INNER, "traces": str(traces), **kw})
    return make_drafter(cfg, rt, loaded, draft_tools(loaded))


def test_replay_reproduces_the_recorded_steps_on_another_model(tmp_path):
    """A trace recorded with layerskip on one model, replayed on a model with other weights: the
    same verify steps, accepted and drafted counts per step and new tokens; the inner drafter ran."""
    src_rt, src = tiny(0)
    res = generate(src_rt, make_drafter(OmegaConf.create(INNER), src_rt, src, draft_tools(src)), PROMPT, 24, 3)
    assert 0 < res.accepted < res.drafted  # a trace with both outcomes, so the replay can tell
    rt, loaded = tiny(7)
    d = replay(rt, loaded, trace_file(tmp_path, res))
    d.begin("reference", "p1", 1)
    got = generate(rt, d, PROMPT, 24, d.k)
    assert (got.verify_steps, got.step_accepted, got.step_drafted, len(got.output_ids)) == \
        (res.verify_steps, res.step_accepted, res.step_drafted, len(res.output_ids))
    assert got.draft_s > 0 and d.row_fields()["draft_layers"] == [0, 1, 2]
    # the same trace on this model's own drafts differs: the replay, not chance, made them equal
    own = generate(rt, make_drafter(OmegaConf.create(INNER), rt, loaded, draft_tools(loaded)), PROMPT, 24, 3)
    assert own.step_accepted != res.step_accepted
    # the same trace from a rows.csv whose lists numpy printed ("[3 0 2]", as exports before JSON lists)
    pd.read_parquet(tmp_path / "rows.parquet").to_csv(tmp_path / "rows.csv", index=False)
    d = replay(rt, loaded, tmp_path / "rows.csv")
    d.begin("reference", "p1", 1)
    assert generate(rt, d, PROMPT, 24, d.k).step_accepted == res.step_accepted


def test_replay_stops_where_the_recording_ended_by_eos(tmp_path):
    src_rt, src = tiny(0)
    res = generate(src_rt, make_drafter(OmegaConf.create(INNER), src_rt, src, draft_tools(src)), PROMPT, 10, 3)
    rt, loaded = tiny(7)
    d = replay(rt, loaded, trace_file(tmp_path, res, stopped_by="eos"))
    d.begin("reference", "p1", 1)
    got = generate(rt, d, PROMPT, 40, d.k)
    assert got.stopped_by == "trace_end" and got.step_accepted == res.step_accepted
    assert len(got.output_ids) == len(res.output_ids)
    # an EOS in the middle of the last step's accepted drafts: the same token count, cut there
    last = res.step_accepted[-1]
    assert last > 0  # this seed's last step accepted a draft: an EOS can come before its end
    d = replay(rt, loaded, trace_file(tmp_path, res, stopped_by="eos", new_tokens=len(res.output_ids) - last))
    d.begin("reference", "p1", 1)
    got = generate(rt, d, PROMPT, 40, d.k)
    assert len(got.output_ids) == len(res.output_ids) - last and got.verify_steps == res.verify_steps


def test_replay_refuses_missing_or_short_traces(tmp_path):
    src_rt, src = tiny(0)
    res = generate(src_rt, make_drafter(OmegaConf.create(INNER), src_rt, src, draft_tools(src)), PROMPT, 10, 3)
    rt, loaded = tiny(7)
    d = replay(rt, loaded, trace_file(tmp_path, res))
    with pytest.raises(QuasarError, match="no trace for verifier=int4 drafter=layerskip prompt=p1 turn=1"):
        d.begin("int4", "p1", 1)
    d.begin("reference", "p1", 1)
    with pytest.raises(QuasarError, match="ends after .* verify steps"):
        generate(rt, d, PROMPT, 30, d.k)
    with pytest.raises(QuasarError, match="drafter.traces=.*no such"):
        replay(rt, loaded, tmp_path / "nowhere")
    pd.DataFrame([{"verifier": "reference"}]).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(QuasarError, match="re-run the source experiment"):
        replay(rt, loaded, tmp_path / "old.parquet")
    # an int4 cell replays the reference's trace when told to
    d = replay(rt, loaded, tmp_path, trace_verifier="reference")
    d.begin("int4", "p1", 1)
    assert generate(rt, d, PROMPT, 10, d.k).step_accepted == res.step_accepted


def test_replay_on_a_quantized_verifier_keeps_the_recorded_steps(tmp_path):
    """The pairing the GPU table relies on: the reference's trace replayed on the same model's int8
    verifier (quantized linears, its own verdicts ignored) gives the recorded steps exactly."""
    from quasar_bench.quant import Int8Linear
    from quasar_bench.verifiers import build_verifier

    src_rt, src = tiny(0)
    res = generate(src_rt, make_drafter(OmegaConf.create(INNER), src_rt, src, draft_tools(src)), PROMPT, 24, 3)
    q = build_verifier(src, OmegaConf.create({"name": "int8"}))
    d = replay(q, src, trace_file(tmp_path, res), trace_verifier="reference")
    d.begin("int8", "p1", 1)
    got = generate(q, d, PROMPT, 24, d.k)
    assert (got.verify_steps, got.step_accepted, got.step_drafted) == \
        (res.verify_steps, res.step_accepted, res.step_drafted)
    assert any(isinstance(m, Int8Linear) for m in q.modules())


def test_replay_runs_the_inner_drafter_at_steps_that_drafted_nothing(tmp_path, monkeypatch):
    """Lookahead runs its Jacobi forward every step, finding a draft or not. The replay must do the
    same (else its draft time counts only the steps that drafted): its forward count equals the
    recording's, including the steps whose recorded draft count is 0."""
    from quasar_bench.drafters.lookahead import Lookahead

    inner = {"name": "lookahead", "k": 3, "window": 4, "ngram": 3, "guesses": 2, "pool_from_context": False}
    calls = []
    real = Lookahead.propose
    monkeypatch.setattr(Lookahead, "propose", lambda self, context, k: calls.append(k) or real(self, context, k))
    src_rt, src = tiny(0)
    res = generate(src_rt, make_drafter(OmegaConf.create(inner), src_rt, src, draft_tools(src)), PROMPT, 24, 3)
    asked = list(calls)  # k per step in the source run (fewer near the end: positions left)
    assert 0 in res.step_drafted and any(res.step_drafted)  # steps with and without a draft
    calls.clear()
    rt, loaded = tiny(7)
    d = make_drafter(OmegaConf.create({"name": "replay", "inner": inner, "traces": str(trace_file(
        tmp_path, res, drafter="lookahead"))}), rt, loaded, draft_tools(loaded))
    d.begin("reference", "p1", 1)
    got = generate(rt, d, PROMPT, 24, d.k)
    assert got.step_drafted == res.step_drafted and got.step_accepted == res.step_accepted
    # one Jacobi forward wherever the source ran one (every step with a position left to draft),
    # asked for one token more than that step drafted, at most what the source was asked for
    assert len(calls) == len(asked) >= res.verify_steps - 1
    assert calls == [min(k, n + 1) for k, n in zip(asked, res.step_drafted)]
