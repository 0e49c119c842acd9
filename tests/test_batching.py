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


def batched(rt, cfg, prompts, n, size, loaded=None, packed=False, **kw):
    batch = BatchRuntime(rt, size, packed=packed, pack_bucket=4)
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


@pytest.mark.parametrize("bucket", [1, 4, 64])
def test_packed_forward_equals_each_sequence_alone(bucket):
    """A packed forward (linears on the real tokens only) with ragged real lengths, one of them 0:
    each row's real positions get the logits that sequence gets alone, skipped padding zero logits, and
    the cache it leaves behind serves the next forward as the sequence's own cache would. Bucket 1
    packs exactly, 4 pads the packed rows with padding slots, 64 (> B x T) runs unpacked."""
    rt = tiny_runtime("tiny_qwen3")
    prompts = prompts_of((3, 9, 6, 5))
    feeds = prompts_of((5, 5, 5, 5), seed=1)
    lengths = [5, 2, 0, 3]
    batch = BatchRuntime(rt, 4, packed=True, pack_bucket=bucket)
    assert batch.gemm_rows(lengths, 5) == {1: 10, 4: 12, 64: 20}[bucket]
    batch.reset(32)
    for b, p in enumerate(prompts):
        batch.seq(b).prefill(torch.tensor(p))
    got = batch.forward(feeds, [len(p) for p in prompts], lengths).clone()
    nxt = prompts_of((2, 2, 2, 2), seed=2)
    for b, m in enumerate(lengths):
        batch.seq(b).rollback(len(prompts[b]) + m)
    after = batch.forward(nxt, [len(p) + m for p, m in zip(prompts, lengths)], [2] * 4)
    for b, (p, f, m) in enumerate(zip(prompts, feeds, lengths)):
        rt.reset(32)
        rt.prefill(torch.tensor(p))
        if m:
            torch.testing.assert_close(got[b, :m], rt.forward(torch.tensor(f[:m])), rtol=1e-4, atol=1e-4)
        if bucket == 1:  # packed exactly: every padding slot was skipped
            assert not got[b, m:].any()
        torch.testing.assert_close(after[b], rt.forward(torch.tensor(nxt[b])), rtol=1e-4, atol=1e-4)


def test_pack_index_covers_real_slots_then_distinct_padding():
    batch = BatchRuntime(tiny_runtime("tiny_llama"), 3, packed=True, pack_bucket=4)
    assert batch.pack_index([2, 0, 3], 3) == [0, 1, 6, 7, 8, 2, 3, 4]  # 5 real -> 8 rows
    assert batch.pack_index([3, 3, 3], 3) is None  # nothing to skip: the unpacked forward
    assert BatchRuntime(batch.model, 3).gemm_rows([1, 0, 0], 3) == 9  # unpacked: B x T
    assert batch.row_counts(3) == [4, 8, 9] and BatchRuntime(batch.model, 3).row_counts(3) == [9]
    assert BatchRuntime(batch.model, 32, packed=True).row_counts(6) == [32, 64, 96, 128, 160, 192]
    batch.reset(8)
    with pytest.raises(ValueError, match="one per row"):
        batch.forward([[1, 2]] * 3, [0, 0, 0], [1, 3, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_packed_cuda_graphs_equal_the_eager_packed_forward():
    """On a GPU the batch replays one graph per (width, span, GEMM rows), all writing one logits
    buffer: each replay's real positions equal the eager packed forward's (bf16, same kernels)."""
    from quasar_bench.models import TINY_CONFIGS, random_hf_model
    from quasar_bench.runtime import native_from_hf

    hf = random_hf_model({**TINY_CONFIGS["tiny_qwen3"], "initializer_range": 0.3}, 256, torch.bfloat16, "cuda", 0)
    rt = native_from_hf(hf, 512)
    prompts = prompts_of((3, 9, 6, 5))
    feeds = prompts_of((4, 4, 4, 4), seed=1)
    got = {}
    for graphs in (False, True):
        batch = BatchRuntime(rt, 4, packed=True, pack_bucket=4)
        if graphs:
            batch.enable_cuda_graphs(4, 64, bucket=32)
            batch.reset(64)
            batch.graphs.capture_all([4])
            assert set(batch.graphs.graphs) == {(4, s, n) for n in (4, 8, 12, 16) for s in (32, 64)}
        else:
            batch.reset(64)
        for lengths in ([4, 1, 0, 2], [1, 1, 1, 1], [4, 4, 4, 4]):
            for b, p in enumerate(prompts):
                batch.seq(b).rollback(0)
                batch.seq(b).prefill(torch.tensor(p, device="cuda"))
            got[graphs, tuple(lengths)] = batch.forward(feeds, [len(p) for p in prompts], lengths).clone()
    for lengths in ([4, 1, 0, 2], [1, 1, 1, 1], [4, 4, 4, 4]):
        for b, m in enumerate(lengths):
            torch.testing.assert_close(got[True, tuple(lengths)][b, :m], got[False, tuple(lengths)][b, :m])


@pytest.mark.parametrize("shapes,packed", [("tiny_llama", False), ("tiny_qwen3", False), ("tiny_qwen3", True)])
def test_greedy_batch_equals_each_sequences_ar(shapes, packed):
    """Every drafter, prompts of different lengths, one sequence stopped early by EOS, one batch
    row left empty (3 sequences in a batch of 4): each output is that sequence's own AR output,
    with the batch's linears on every row or packed to the real tokens."""
    rt = tiny_runtime(shapes)
    prompts = prompts_of((3, 12, 7))
    prompts[2] = [7, 8, 9, 7, 8, 9, 7]  # repetitive: n-gram drafts get accepted
    refs = [ar_ids(rt, p, 30) for p in prompts]
    eos = refs[1][5]  # the second sequence stops at its 6th token (others may too, where it occurs)
    refs_eos = [ar_ids(rt, p, 30, [eos]) for p in prompts]
    assert len(refs_eos[1]) <= 6 < len(refs_eos[0]) or len(refs_eos[1]) <= 6 < len(refs_eos[2])
    for cfg in [{"name": "ar"}] + drafter_cfgs(rt.num_layers):
        out = batched(rt, cfg, prompts, 30, 4, packed=packed, references=refs)
        assert [r.output_ids for r in out] == refs, cfg
        out = batched(rt, cfg, prompts, 30, 4, packed=packed, eos_ids=[eos], references=refs_eos)
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
    batch.forward = lambda rows, starts, lengths=None: widths.append(len(rows[0])) or forward(rows, starts, lengths)
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


@pytest.mark.parametrize("packed", [False, True])
def test_sampling_in_a_batch_draws_what_each_sequence_draws_alone(packed):
    """temperature > 0: with the same seed per sequence, a batched sequence samples exactly the
    tokens it samples alone (its own generator, the same p and q), for a model-free and a
    model-based drafter, with the batch's linears on every row or packed: the batch leaves each
    sequence's sampling law untouched."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    rt = verifier.runtime
    prompts = prompts_of((4, 9, 6), seed=3, vocab=1000)
    for cfg in ({"name": "ngram", "k": K}, {"name": "layerskip", "k": K, "mode": "static", "skip": [1]}):
        alone = [generate(rt, mk(cfg, rt, verifier), p, 20, K, (), 0.8, 0.9, torch.Generator().manual_seed(i)).output_ids
                 for i, p in enumerate(prompts)]
        out = batched(rt, cfg, prompts, 20, 3, verifier, packed=packed, temperature=0.8, top_p=0.9,
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
    assert s.gemm_rows == s.fed  # unpacked: the linears see every fed position
    assert s.new_tokens == sum(len(r.output_ids) for r in out) == 16


def test_packed_gemm_rows_are_counted():
    """The same script packed in buckets of 4: per step the real tokens rounded up to 4, at most
    3 x the width; the outputs are the unpacked batch's."""
    rt = tiny_runtime("tiny_llama")
    prompts = prompts_of((5, 5), seed=4)
    script = ([[1, 2, 3], [], [], []], [[4], [5, 6], [], []])
    plain = generate_batch(BatchRuntime(rt, 3), [Scripted(p) for p in script], prompts, 8, 3)
    out = generate_batch(BatchRuntime(rt, 3, packed=True, pack_bucket=4), [Scripted(p) for p in script],
                         prompts, 8, 3)
    assert [r.output_ids for r in out] == [r.output_ids for r in plain]
    s, steps = out[0].batch, out[0].batch.steps
    drafted = list(zip(*[r.step_drafted + [None] * (steps - r.verify_steps) for r in out]))
    want = 0
    for step in drafted:
        real = sum(1 + d for d in step if d is not None)
        width = 1 + max(d for d in step if d is not None)
        want += min(-(-real // 4) * 4, 3 * width)
    assert s.gemm_rows == want < s.fed == plain[0].batch.fed
    assert drafted[0] == (3, 1)  # step 1: 4 + 2 = 6 real tokens -> 8 GEMM rows of 12 fed


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


def test_harness_packed_batches_are_their_own_cells(tmp_path):
    """`batch_packed=true batch_pack_bucket=1` after an unpacked run in the same store: the B = 2
    cells are new cells (B = 1 has nothing to pack and is not re-run), with the unpacked outputs;
    their GEMM rows are the real tokens counted from the rows' own drafted lengths, the attention
    padding the unpacked run's; the summary keeps the two kinds apart."""
    from test_harness import TINY, cli
    from quasar_bench.store import ResultStore

    out = tmp_path / "out"
    args = [a for a in TINY if not a.startswith(("dataset.limit", "max_new_tokens"))]
    args += ["dataset.limit=2", "max_new_tokens=8", "matrix.drafters=[ar,ngram]", "batch_size=[1,2]", f"out_dir={out}"]
    assert cli(tmp_path, *args).returncode == 0
    r = cli(tmp_path, *args, "batch_packed=true", "batch_pack_bucket=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = ResultStore(out).load()
    assert len(rows[rows.batch_size == 1]) == 2 * 3  # 2 drafters x (2 prompts, one with 2 turns), once
    two = rows[rows.batch_size == 2]
    plain, packed = two[~two.batch_packed.astype(bool)], two[two.batch_packed.astype(bool)]
    assert len(plain) == len(packed) == 2 * 3 and set(plain.cell_id).isdisjoint(packed.cell_id)
    key = ["drafter", "prompt_id", "turn"]
    p, q = plain.set_index(key).sort_index(), packed.set_index(key).sort_index()
    assert [list(x) for x in p.output_ids] == [list(x) for x in q.output_ids]
    assert np.allclose(p.attention_padding, q.attention_padding)
    for _, g in packed.groupby(["drafter", "batch_id"]):  # bucket 1: the linears saw exactly the real tokens
        lengths = [list(x) for x in g.drafted_lengths]
        real = sum(1 + d for x in lengths for d in x)
        assert np.isclose(g.gemm_rows_per_step.iloc[0] * g.batch_steps.iloc[0], real)
        assert g.batch_padding.iloc[0] == pytest.approx(0, abs=1e-12)
    ngram = packed[packed.drafter == "ngram"]
    assert (ngram.gemm_rows_per_step < p.loc["ngram"].gemm_rows_per_step.to_numpy()).any()
    summary = pd.read_csv(out / "summary.csv")
    both = summary[(summary.category == "all") & (summary.batch_size == 2)]
    assert sorted(both.batch_packed) == [False, False, True, True]
    assert "ngram (packed): speculation" in r.stdout
