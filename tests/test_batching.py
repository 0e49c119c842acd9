"""Batch size > 1 (issue 13): B sequences share each verify forward, each keeps its own accepted
prefix. References: every sequence's own batch-1 output (itself tested against AR and against
transformers elsewhere), the single-sequence forward's logits, and hand-counted padding."""
import random

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from test_drafters import K, ar_ids, drafter_cfgs, mk, tiny_loaded, tiny_runtime
from quasar_bench.batching import BatchRuntime
from quasar_bench.decode import generate, generate_batch
from quasar_bench.drafters import Draft, Drafter
from quasar_bench.errors import QuasarError


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts_of(lengths, seed=0, vocab=256):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def batched(rt, cfg, prompts, n, size, loaded=None, **kw):
    batch = BatchRuntime(rt, size)
    d = mk(cfg, rt, loaded)
    return generate_batch(batch, [d.for_sequence(batch.seq(b)) for b in range(len(prompts))], prompts, n, d.k, **kw)


def test_forward_batch_equals_each_sequence_alone():
    """Rows at different positions (different prompt lengths) give the logits each sequence gets alone."""
    rt = tiny_runtime("tiny_qwen3")
    prompts = prompts_of((3, 9, 6))
    feeds = prompts_of((4, 4, 4), seed=1)
    batch = BatchRuntime(rt, 3)
    batch.reset(32)
    for b, p in enumerate(prompts):
        batch.seq(b).prefill(torch.tensor(p))
    got = batch.forward(feeds, [len(p) for p in prompts])
    for b, (p, f) in enumerate(zip(prompts, feeds)):
        rt.reset(32)
        rt.prefill(torch.tensor(p))
        want = rt.forward(torch.tensor(f))
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)  # fp32, GEMMs of other M
        assert batch.seq(b).cache_len == len(p) + 4


@pytest.mark.parametrize("shapes", ["tiny_llama", "tiny_qwen3"])
def test_greedy_batch_equals_each_sequences_ar(shapes):
    """Every drafter, prompts of different lengths, one sequence stopped early by EOS, one batch
    row left empty (3 sequences in a batch of 4): each output is that sequence's own AR output."""
    rt = tiny_runtime(shapes)
    prompts = prompts_of((3, 12, 7))
    prompts[2] = [7, 8, 9, 7, 8, 9, 7]  # repetitive: n-gram drafts get accepted
    refs = [ar_ids(rt, p, 30) for p in prompts]
    eos = refs[1][5]  # the second sequence stops at its 6th token (others may too, where it occurs)
    refs_eos = [ar_ids(rt, p, 30, [eos]) for p in prompts]
    assert len(refs_eos[1]) <= 6 < len(refs_eos[0]) or len(refs_eos[1]) <= 6 < len(refs_eos[2])
    for cfg in [{"name": "ar"}] + drafter_cfgs(rt.num_layers):
        out = batched(rt, cfg, prompts, 30, 4, references=refs)
        assert [r.output_ids for r in out] == refs, cfg
        out = batched(rt, cfg, prompts, 30, 4, eos_ids=[eos], references=refs_eos)
        assert [r.output_ids for r in out] == refs_eos, cfg
        assert [r.stopped_by for r in out] == ["eos" if eos in r else "max_new_tokens" for r in refs_eos]


class NoForward:
    """A drafter's own runtime that must not be used: lookahead's Jacobi forward belongs to the loop."""

    def __init__(self, view):
        self.view = view

    def __getattr__(self, name):
        return getattr(self.view, name)

    def forward(self, *a, **kw):
        raise AssertionError("the drafter ran its own per-sequence forward")


@pytest.mark.parametrize("window", [7, 3])
def test_lookahead_jacobi_forwards_are_one_batched_forward_per_step(window):
    """At B = 3 the lookahead branch is one batched forward per step (width 1 + W) beside the verify
    forward, never a forward per sequence; each sequence drafts what it drafts alone (same
    per-step drafted / accepted counts) and outputs its own AR output. Reference: generate() per
    sequence, whose Jacobi forward runs on the single-sequence runtime."""
    rt = tiny_runtime("tiny_qwen3")
    prompts = prompts_of((5, 11, 8))
    prompts[2] = [7, 8, 9, 7, 8, 9, 7, 8]
    cfg = {"name": "lookahead", "k": K, "window": window}
    alone = [generate(rt, mk(cfg, rt), p, 24, K) for p in prompts]
    batch = BatchRuntime(rt, 3)
    widths, forward = [], batch.forward
    batch.forward = lambda rows, starts: widths.append(len(rows[0])) or forward(rows, starts)
    d = mk(cfg, rt)
    seqs = [d.for_sequence(NoForward(batch.seq(b))) for b in range(3)]
    out = generate_batch(batch, seqs, prompts, 24, d.k)
    assert [r.output_ids for r in out] == [ar_ids(rt, p, 24) for p in prompts]
    assert [r.step_drafted for r in out] == [a.step_drafted for a in alone]
    assert [r.step_accepted for r in out] == [a.step_accepted for a in alone]
    steps = out[0].batch.steps
    branch = len(widths) - steps  # every other forward verified
    assert steps - 1 <= branch <= steps  # one per step (none where no sequence had room left)
    if 1 + window > K + 1:  # wider than any verify forward: each such forward is a branch
        assert widths.count(1 + window) == branch
    assert all(r.draft_s > 0 for r in out)


def test_greedy_batch_with_a_draft_model_and_a_replay(tmp_path):
    """Drafters with a cache of their own (draft_model: one per sequence) or an inner drafter (replay)."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    rt = verifier.runtime
    prompts = [[1, 2, 3, 4], [100, 2000, 30000, 5, 5, 5, 9], [42]]
    refs = [ar_ids(rt, p, 20) for p in prompts]
    cfg = {"name": "draft_model", "k": K, "model": {"name": "tiny_qwen3", "weights": "random", "shapes": "tiny_qwen3",
                                                     "seed": 1}}
    assert [r.output_ids for r in batched(rt, cfg, prompts, 20, 3, verifier)] == refs
    inner = {"name": "layerskip", "mode": "static", "skip": [1], "k": 3}
    src = [generate(rt, mk(inner, rt), p, 20, 3) for p in prompts]
    pd.DataFrame([dict(verifier="v", drafter="layerskip", prompt_id=str(i), turn=1, new_tokens=len(s.output_ids),
                       drafted_lengths=s.step_drafted, accepted_lengths=s.step_accepted, stopped_by=s.stopped_by)
                  for i, s in enumerate(src)]).to_parquet(tmp_path / "rows.parquet")
    batch = BatchRuntime(rt, 3)
    d = mk({"name": "replay", "inner": inner, "traces": str(tmp_path), "k": 3}, rt)
    seqs = [d.for_sequence(batch.seq(b)) for b in range(3)]
    for i, s in enumerate(seqs):
        s.begin("v", str(i), 1)
    out = generate_batch(batch, seqs, prompts, 20, 3)
    assert [r.output_ids for r in out] == refs
    assert [r.step_accepted for r in out] == [s.step_accepted for s in src]  # each replayed its own trace


def test_sampling_in_a_batch_draws_what_each_sequence_draws_alone():
    """temperature > 0: with the same seed per sequence, a batched sequence samples exactly the
    tokens it samples alone (its own generator, the same p and q), for a model-free and a
    model-based drafter: the batch leaves each sequence's sampling law untouched."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    rt = verifier.runtime
    prompts = prompts_of((4, 9, 6), seed=3, vocab=1000)
    for cfg in ({"name": "ngram", "k": K}, {"name": "layerskip", "k": K, "mode": "static", "skip": [1]}):
        alone = [generate(rt, mk(cfg, rt, verifier), p, 20, K, (), 0.8, 0.9, torch.Generator().manual_seed(i)).output_ids
                 for i, p in enumerate(prompts)]
        out = batched(rt, cfg, prompts, 20, 3, verifier, temperature=0.8, top_p=0.9,
                      generators=[torch.Generator().manual_seed(i) for i in range(3)])
        assert [r.output_ids for r in out] == alone, cfg
        assert len({tuple(a) for a in alone}) == 3


class Scripted(Drafter):
    """Proposes fixed drafts per step (an empty list: no draft)."""
    name = "scripted"

    def __init__(self, proposals):
        self.proposals, self.k = list(proposals), 3

    def propose(self, context, k):
        return Draft(tokens=self.proposals.pop(0)[:k] if self.proposals else [])


def test_padding_and_gemm_rows_are_counted():
    """Two sequences in a batch of 3, drafts of 3 and 1 tokens then 0 and 2: counted by hand."""
    rt = tiny_runtime("tiny_llama")
    prompts = prompts_of((5, 5), seed=4)
    batch = BatchRuntime(rt, 3)
    a = Scripted([[1, 2, 3], [], [], []])
    b = Scripted([[4], [5, 6], [], []])
    out = generate_batch(batch, [a, b], prompts, 8, 3)
    s = out[0].batch
    assert out[0].batch is out[1].batch and s.size == 3 and s.members == 2
    steps = s.steps
    assert steps == max(r.verify_steps for r in out)
    # step 1: widths 4 and 2 -> 3 rows x 4; step 2: 1 and 3 -> 3 x 3 (when both are still running)
    assert out[0].step_drafted[:2] == [3, 0] and out[1].step_drafted[:2] == [1, 2]
    assert s.fed >= 3 * 4 + 3 * 3 and s.real >= (4 + 2) + (1 + 3)
    widths = [1 + max(x) for x in zip(*[r.step_drafted + [0] * (steps - r.verify_steps) for r in out])]
    real = sum(1 + d for r in out for d in r.step_drafted)
    assert s.fed == 3 * sum(widths) and s.real == real
    assert s.new_tokens == sum(len(r.output_ids) for r in out) == 16


def test_batch_needs_the_native_runtime():
    from quasar_bench.runtime import HFRuntime

    hf = tiny_loaded("tiny_llama").hf_model
    with pytest.raises(QuasarError, match="batch_size=2 needs the native runtime"):
        BatchRuntime(HFRuntime(hf), 2)


def test_harness_batch_axis_rows_throughput_and_crossover(tmp_path):
    """`batch_size=[1,2]` through the CLI: 3 prompts (one with 2 turns) -> batches of 2 and a padded
    batch of 1; every (prompt, turn) output equals its batch-1 output; the batch columns add up;
    the summary's batch throughput and speedup are recomputed here from the rows."""
    from test_harness import TINY, cli
    from quasar_bench.store import ResultStore

    out = tmp_path / "out"
    args = [a for a in TINY if not a.startswith(("dataset.limit", "max_new_tokens"))]
    r = cli(tmp_path, *args, "dataset.limit=3", "max_new_tokens=8", "matrix.drafters=[ar,ngram]",
            "batch_size=[1,2]", f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = ResultStore(out).load()
    key = ["drafter", "prompt_id", "turn"]
    one = rows[rows.batch_size == 1].set_index(key).sort_index()
    two = rows[rows.batch_size == 2].set_index(key).sort_index()
    assert len(one) == len(two) == 2 * 4
    assert [list(x) for x in one.output_ids] == [list(x) for x in two.output_ids]
    for _, g in rows[rows.batch_size == 2].groupby(["drafter", "batch_id"]):
        assert len(g) == g.batch_members.iloc[0] <= 2
        assert g.batch_new_tokens.iloc[0] == g.new_tokens.sum()
        assert np.isclose(g.throughput_share_s.sum(), g.batch_decode_s.iloc[0])
        assert (g.decode_s <= g.batch_decode_s + 1e-9).all()
    assert rows[rows.batch_size == 2].batch_members.min() == 1  # the last batch: one prompt, one padded row
    summary = pd.read_csv(out / "summary.csv")
    s = summary[summary.category == "all"].set_index(["drafter", "batch_size"])

    def throughput(drafter, size):
        g = rows[(rows.drafter == drafter) & (rows.batch_size == size)]
        walls = g.groupby("batch_id").batch_decode_s.first()
        return g.new_tokens.sum() / walls.sum()

    for size in (1, 2):
        assert np.isclose(s.loc[("ngram", size), "throughput"], throughput("ngram", size))
        assert np.isclose(s.loc[("ngram", size), "speedup_vs_ar"], throughput("ngram", size) / throughput("ar", size))
    assert "reference/ngram: speculation" in r.stdout and "B=1" in r.stdout and "B=2" in r.stdout
