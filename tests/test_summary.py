import json

import numpy as np
import pandas as pd
import pytest

from quasar_bench.summary import format_table, reference_verifier, save, summarize

TAU = {"ar": 1.0, "ngram": 1.8, "layerskip": 2.4}
SPEED = {"fp32": 20.0, "bf16": 40.0, "int8": 55.0, "int4": 70.0}  # AR tokens/s
KL = {"fp32": 0.0, "bf16": 0.002, "int8": 0.01, "int4": 0.06}


def synthetic_rows(n_per_cat=4, categories=("multi_turn", "qa", "rag"), seed=0,
                   verifiers=tuple(SPEED), drafters=tuple(TAU), k=4, fidelity=True):
    """Rows shaped like the engine's, with known τ / speed / KL structure (tests only)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in drafters:
        for v in verifiers:
            cell = f"cell_{d}_{v}"
            for c in categories:
                for i in range(n_per_cat):
                    for turn in range(2 if c == "multi_turn" else 1):
                        new = int(rng.integers(20, 64))
                        tau = 1.0 if d == "ar" else TAU[d] * (1 - 2 * KL[v]) * rng.uniform(0.9, 1.1)
                        steps = max(1, round(new / tau))
                        drafted = 0 if d == "ar" else steps * k
                        acc = 0 if d == "ar" else min(drafted, new - steps)
                        tps = SPEED[v] * (new / steps) * 0.8 ** (d != "ar") * rng.uniform(0.9, 1.1)
                        curve = [] if d == "ar" else [0.8 ** (j + 1) + 0.05 * rng.random() for j in range(k)]
                        kl = KL[v] * rng.uniform(0.5, 1.5) if fidelity else np.nan
                        rows.append(dict(
                            experiment="synthetic", cell_id=cell, model="smollm2-135m", drafter=d,
                            verifier=v, k=0 if d == "ar" else k, temperature=0.0, dataset="builtin",
                            category=c, prompt_id=f"{c}-{i}", turn=turn, new_tokens=new,
                            verify_steps=steps, tau=new / steps, alpha=acc / drafted if drafted else np.nan,
                            accepted_per_position=curve, drafted=drafted, accepted=acc, prefill_s=0.01,
                            decode_s=new / tps, draft_s=0.0, verify_s=new / tps, tokens_per_s=tps,
                            peak_mem_bytes=1 << 28, output_ids=list(range(new)), output_text="x",
                            seed=0, device="cpu", torch_version="2.13", git_commit="abc",
                            kl_mean=kl, kl_p50=kl, kl_p95=2 * kl, kl_max=4 * kl,
                            top1_agree=(1 - 3 * KL[v]) if fidelity else np.nan,
                            ref_exact_match=(v in ("fp32", "bf16") or i % 2 == 0) if fidelity else None,
                            first_divergence=-1))
    return pd.DataFrame(rows)


def tiny(**over):
    base = dict(model="m", drafter="ngram", verifier="bf16", category="qa", turn=0)
    return base | over


def test_pooled_ratios_not_mean_of_ratios():
    df = pd.DataFrame([
        tiny(prompt_id="a", new_tokens=10, verify_steps=5, accepted=5, drafted=20, decode_s=1.0),
        tiny(prompt_id="b", new_tokens=30, verify_steps=10, accepted=20, drafted=40, decode_s=1.0),
    ])
    s = summarize(df)
    r = s[s.category == "qa"].iloc[0]
    assert r.n_prompts == 2
    assert r.tau == pytest.approx(40 / 15)  # mean of ratios would be 2.5
    assert r.alpha == pytest.approx(25 / 60)
    assert r.tokens_per_s == pytest.approx(20.0)
    assert r.tau_lo <= r.tau <= r.tau_hi
    assert np.isnan(r.kl_mean) and np.isnan(r.speedup_vs_ar)  # no fidelity, no AR row


def test_turns_form_one_prompt_and_exact_match_needs_every_turn():
    df = pd.DataFrame([
        tiny(category="multi_turn", prompt_id="a", turn=0, new_tokens=10, verify_steps=5,
             accepted=5, drafted=10, decode_s=1.0, kl_mean=0.1, ref_exact_match=True),
        tiny(category="multi_turn", prompt_id="a", turn=1, new_tokens=10, verify_steps=5,
             accepted=5, drafted=10, decode_s=1.0, kl_mean=0.3, ref_exact_match=False),
        tiny(category="multi_turn", prompt_id="b", turn=0, new_tokens=10, verify_steps=5,
             accepted=5, drafted=10, decode_s=1.0, kl_mean=0.5, ref_exact_match=True),
        tiny(category="multi_turn", prompt_id="b", turn=1, new_tokens=10, verify_steps=5,
             accepted=5, drafted=10, decode_s=1.0, kl_mean=0.5, ref_exact_match=True),
    ])
    r = summarize(df).iloc[0]
    assert r.n_prompts == 2
    assert r.ref_exact_match == pytest.approx(0.5)
    assert r.kl_mean == pytest.approx((0.2 + 0.5) / 2)


def test_speedups_categories_and_all():
    df = synthetic_rows()
    s = summarize(df)
    assert set(s.category) == {"multi_turn", "qa", "rag", "all"}
    assert len(s) == 3 * 4 * 4
    assert s[(s.drafter == "ar") & (s.category == "all")].n_prompts.tolist() == [12] * 4
    assert s[s.drafter == "ar"].alpha.isna().all() and s[s.drafter != "ar"].alpha.notna().all()
    ar = s[s.drafter == "ar"].set_index(["verifier", "category"])
    for _, r in s.iterrows():
        same = ar.loc[(r.verifier, r.category)]
        assert r.speedup_vs_ar == pytest.approx(r.tokens_per_s / same.tokens_per_s)
        ref = ar.loc[("fp32", r.category)]  # fp32 is the highest precision present
        assert r.speedup_vs_ref_ar == pytest.approx(r.tokens_per_s / ref.tokens_per_s)
        assert r.speedup_vs_ar_lo <= r.speedup_vs_ar <= r.speedup_vs_ar_hi
    assert (s[s.drafter == "ar"].speedup_vs_ar == 1).all()
    # AR vs itself is perfectly paired: a zero-width interval
    assert (s[s.drafter == "ar"].speedup_vs_ar_hi - s[s.drafter == "ar"].speedup_vs_ar_lo).abs().max() < 1e-12
    # `all` pools every category's prompts
    one = s[(s.drafter == "ngram") & (s.verifier == "int8")].set_index("category")
    sub = df[(df.drafter == "ngram") & (df.verifier == "int8")]
    assert one.loc["all", "tau"] == pytest.approx(sub.new_tokens.sum() / sub.verify_steps.sum())
    # rows come out ordered: ar first, precision order, `all` last within a group
    assert s.drafter.iloc[0] == "ar" and s.verifier.iloc[0] == "fp32" and s.category.iloc[3] == "all"


def test_reference_verifier_choice():
    def rows(vs, flagged=None):
        d = pd.DataFrame({"verifier": vs})
        if flagged is not None:
            d["reference_verifier"] = [v == flagged for v in vs]
        return d

    assert reference_verifier(rows(["int4", "fp16", "bf16"])) == "bf16"
    assert reference_verifier(rows(["int4", "fp16"])) == "fp16"
    assert reference_verifier(rows(["bf16", "fp32", "reference"])) == "reference"
    # the run's own flag wins over names
    assert reference_verifier(rows(["bf16", "int4", "fp32"], flagged="int4")) == "int4"
    df = synthetic_rows(verifiers=("bf16", "int4"), drafters=("ar", "ngram"))
    s = summarize(df).set_index(["drafter", "verifier", "category"])
    assert s.loc[("ngram", "int4", "all"), "speedup_vs_ref_ar"] == pytest.approx(
        s.loc[("ngram", "int4", "all"), "tokens_per_s"] / s.loc[("ar", "bf16", "all"), "tokens_per_s"])


def test_bootstrap_ci_is_deterministic_and_narrows_with_more_prompts():
    small, big = synthetic_rows(n_per_cat=3, seed=1), synthetic_rows(n_per_cat=40, seed=1)
    a, b = summarize(small), summarize(small)
    pd.testing.assert_frame_equal(a, b)
    w = lambda s: (s.tau_hi - s.tau_lo)[(s.category == "all") & (s.drafter == "layerskip")].mean()
    assert w(summarize(big)) < w(a) / 2
    assert summarize(small.iloc[:0]).empty
    one = summarize(synthetic_rows(n_per_cat=1, categories=("qa",)))
    assert one.tau_lo.isna().all() and one.tau.notna().all()


def test_acceptance_curve_and_k_in_key():
    df = pd.DataFrame([
        tiny(prompt_id="a", new_tokens=3, verify_steps=1, accepted=2, drafted=3, decode_s=1.0,
             k=3, accepted_per_position=[1.0, 0.5, 0.0]),
        tiny(prompt_id="b", new_tokens=2, verify_steps=1, accepted=1, drafted=3, decode_s=1.0,
             k=3, accepted_per_position=[0.5, np.nan, np.nan]),
        tiny(prompt_id="a", new_tokens=3, verify_steps=1, accepted=2, drafted=5, decode_s=1.0,
             k=5, accepted_per_position=[1, 1, 0, 0, 0]),
    ])
    s = summarize(df)
    assert "k" in s.columns and len(s) == 4
    r = s[(s.k == 3) & (s.category == "qa")].iloc[0]
    assert r.accept_curve == [0.75, 0.5, 0.0]


def test_format_table_and_save(tmp_path):
    s = summarize(synthetic_rows())
    text = format_table(s, categories=["all"])
    lines = text.splitlines()
    assert len(lines) == 2 + 12 + 2 and lines[-2].startswith("[a,b]: 95 % bootstrap")  # n = 12: intervals
    assert lines[-1].startswith("SB tok/s: Spec-Bench's mean ± std over repeats (R=1)")  # rows without repeats
    assert all(h in lines[0] for h in ("τ", "α", "KL", "top-1", "exact", "tok/s", "speedup"))
    ls = s[(s.drafter == "layerskip") & (s.verifier == "int4") & (s.category == "all")].iloc[0]
    assert f"{ls.tau:.2f} [{ls.tau_lo:.2f},{ls.tau_hi:.2f}]" in text
    assert "—" in text  # ar has no α
    save(s, tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv")
    assert len(back) == len(s) and back.tau.tolist() == pytest.approx(s.tau.tolist())
    assert json.loads(back.accept_curve.iloc[-1]) == s.accept_curve.iloc[-1]


def test_cells_of_other_configurations_never_pool():
    """Two ngram cells with different settings under one label, and a second context (another
    dataset) with its own AR baseline: four tables, none pooled, each speedup against its own AR."""
    rows = []
    for ctx, ar_speed in (("ctxA", 10.0), ("ctxB", 20.0)):
        for cell, drafter, k, tps in ((f"ar{ctx}", "ar", 0, ar_speed), (f"n3{ctx}", "ngram", 5, 2 * ar_speed),
                                      (f"n1{ctx}", "ngram", 5, 3 * ar_speed)):
            for i in range(3):
                rows.append(tiny(cell_id=cell, context_id=ctx, drafter=drafter, k=k, prompt_id=f"p{i}",
                                 new_tokens=30, verify_steps=10 if k else 30, accepted=0, drafted=0,
                                 decode_s=30 / tps))
    s = summarize(pd.DataFrame(rows))
    s = s[s.category == "all"]
    assert len(s) == 6  # 2 contexts x (ar + two ngram cells)
    ngram = s[s.drafter.str.startswith("ngram #")]
    assert len(ngram) == 4 and ngram.drafter.nunique() == 4
    for _, r in ngram.iterrows():  # each ngram cell against the AR of its own context: 2x or 3x, never mixed
        assert r.speedup_vs_ar == pytest.approx(2.0 if r.drafter.endswith(("n3ctxA", "n3ctxB")) else 3.0)


def test_few_prompts_get_the_per_prompt_range_not_an_interval():
    """n < MIN_CI_N prompts: _lo/_hi are the smallest and largest per-prompt value (computed here
    by hand), labelled "range" and printed as (a–b); from MIN_CI_N prompts on, a bootstrap "95% CI"."""
    from quasar_bench.summary import MIN_CI_N

    rows = [tiny(prompt_id=p, new_tokens=t, verify_steps=v, accepted=1, drafted=4, decode_s=d)
            for p, t, v, d in (("a", 12, 6, 1.0), ("b", 30, 10, 2.0), ("c", 20, 4, 1.0))]
    ar = [dict(r, drafter="ar", verifier="bf16", verify_steps=r["new_tokens"], accepted=0, drafted=0,
               decode_s=2 * r["decode_s"], k=0) for r in rows]
    s = summarize(pd.DataFrame(rows + ar))
    r = s[(s.drafter == "ngram") & (s.category == "qa")].iloc[0]
    assert r.interval == "range" and r.n_prompts == 3
    assert (r.tau_lo, r.tau_hi) == pytest.approx((2.0, 5.0))  # 12/6, 30/10, 20/4
    assert (r.tokens_per_s_lo, r.tokens_per_s_hi) == pytest.approx((12.0, 20.0))  # 12, 15, 20
    assert (r.speedup_vs_ar_lo, r.speedup_vs_ar_hi) == pytest.approx((2.0, 2.0))  # paired, each prompt 2x
    text = format_table(s, categories=["qa"])
    assert f"{r.tau:.2f} (2.00–5.00)" in text and "(a–b): range (n=3)" in text and "[a,b]" not in text
    assert "95 %" not in text
    many = summarize(pd.DataFrame([tiny(prompt_id=str(i), new_tokens=10 + i, verify_steps=5, accepted=1,
                                        drafted=4, decode_s=1.0) for i in range(MIN_CI_N)]))
    assert (many.interval == "95% CI").all()


def test_tau_tf_pooled_and_speedups_of_diverged_text_marked():
    """τ_tf pools like τ (Σ tf tokens / Σ tf steps, by hand here); a non-reference verifier whose
    exact-match share is below min_exact_match gets its speedups marked `*` with a footnote, the
    reference never (its share is set below the threshold here on purpose); the threshold is a
    parameter and the CSV columns name it."""
    rows = []
    for v, exact in (("fp32", [True, False]), ("int4", [True, False]), ("int8", [True, True])):
        for i, (new, steps, tf_new, tf_steps) in enumerate(((12, 6, 12, 8), (30, 10, 24, 12))):
            tf = {} if v == "fp32" else dict(tf_new_tokens=tf_new, tf_verify_steps=tf_steps, tau_tf=tf_new / tf_steps)
            rows.append(tiny(verifier=v, prompt_id=f"p{i}", new_tokens=new, verify_steps=steps, accepted=1, drafted=4,
                             decode_s=1.0, reference_verifier=v == "fp32", ref_exact_match=exact[i], **tf))
            rows.append(tiny(verifier=v, drafter="ar", k=0, baseline=True, prompt_id=f"p{i}", new_tokens=new,
                             verify_steps=new, accepted=0, drafted=0, decode_s=2.0, reference_verifier=v == "fp32",
                             ref_exact_match=exact[i]))
    df = pd.DataFrame(rows)
    s = summarize(df).set_index(["drafter", "verifier", "category"])
    assert s.loc[("ngram", "int4", "qa"), "tau_tf"] == pytest.approx((12 + 24) / (8 + 12))
    assert np.isnan(s.loc[("ngram", "fp32", "qa"), "tau_tf"]) and np.isnan(s.loc[("ar", "int4", "qa"), "tau_tf"])
    assert not s["below_exact_match"].any()  # int4's share 0.5 is not below the default 0.5
    assert "*" not in format_table(summarize(df))
    strict = summarize(df, min_exact_match=0.6)
    flagged = strict.loc[strict.below_exact_match, ["drafter", "verifier"]].drop_duplicates()
    assert sorted(map(tuple, flagged.to_numpy())) == [("ar", "int4"), ("ngram", "int4")]
    assert (strict.min_exact_match == 0.6).all()
    text = format_table(strict, categories=["qa"])
    line = next(x for x in text.splitlines() if x.startswith("m ") and " ngram " in x and " int4 " in x)
    assert line.count("*") == 2  # both speedups of int4/ngram
    assert next(x for x in text.splitlines() if " ngram " in x and " fp32 " in x).count("*") == 0
    ar_line = next(x for x in text.splitlines() if x.startswith("m ") and " ar " in x and " int4 " in x)
    assert ar_line.count("*") == 1  # vs the reference's AR; its speedup over itself (1.00) is not marked
    assert "*: exact match with the reference below 0.6 of prompts" in text
    assert "τ_tf" in text.splitlines()[0] and f"{(12 + 24) / (8 + 12):.2f}" in line


def test_spec_bench_mean_and_std_over_repeats_beside_prompt_intervals():
    """Repeats never count as prompts; Spec-Bench's statistic (per repeat the mean of per-prompt
    tok/s, then mean and sample std over repeats) is computed here by hand. A repeat that not every
    prompt completed (a partial run) is left out of it."""
    import statistics

    rng = np.random.default_rng(1)
    rows, rates = [], {}
    for d, speed in (("ar", 10.0), ("ngram", 25.0)):
        for i in range(4):
            for r in range(3 if not (d == "ngram" and i == 3) else 4):  # ngram prompt 3 has a 4th repeat
                for turn in (1, 2):
                    tok = int(rng.integers(8, 40))
                    sec = tok / (speed * rng.uniform(0.7, 1.3))
                    rows.append(tiny(drafter=d, k=5 if d == "ngram" else 0, cell_id=d, prompt_id=f"p{i}", turn=turn,
                                     repeat=r, new_tokens=tok, verify_steps=tok, accepted=0, drafted=1, decode_s=sec))
                    acc = rates.setdefault((d, i, r), [0, 0.0])
                    acc[0] += tok
                    acc[1] += sec
    df = pd.DataFrame(rows)
    s = summarize(df)
    row = {d: s[(s.drafter == d) & (s.category == "all")].iloc[0] for d in ("ar", "ngram")}
    per_repeat = {d: [statistics.fmean(rates[(d, i, r)][0] / rates[(d, i, r)][1] for i in range(4))
                      for r in range(3)] for d in ("ar", "ngram")}
    for d in ("ar", "ngram"):
        assert row[d].n_prompts == 4 and row[d].n_repeats == 3 and row[d].interval == "range"
        assert row[d].sb_tokens_per_s == pytest.approx(statistics.fmean(per_repeat[d]))
        assert row[d].sb_tokens_per_s_std == pytest.approx(statistics.stdev(per_repeat[d]))
        sub = df[df.drafter == d]
        assert row[d].tokens_per_s == pytest.approx(sub.new_tokens.sum() / sub.decode_s.sum())  # ours: pooled
    ratios = [n / a for n, a in zip(per_repeat["ngram"], per_repeat["ar"])]
    assert row["ngram"].sb_speedup_vs_ar == pytest.approx(statistics.fmean(ratios))
    assert row["ngram"].sb_speedup_vs_ar_std == pytest.approx(statistics.stdev(ratios))
    text = format_table(s, categories=["all"])
    assert f"{row['ngram'].sb_tokens_per_s:.1f}±{row['ngram'].sb_tokens_per_s_std:.1f}" in text
    assert "SB tok/s: Spec-Bench's mean ± std over repeats (R=3)" in text


@pytest.mark.parametrize("n", [9, 10, 24])
def test_interval_or_range_by_the_number_of_prompts(n):
    """Below MIN_CI_N prompts the summary gives the per-prompt range (by hand here) labelled
    "range (n=…)"; from MIN_CI_N on a 95 % interval, checked against scipy's percentile bootstrap
    of the same pooled statistic (Σ tokens / Σ seconds over resampled prompts)."""
    from scipy import stats

    from quasar_bench.summary import MIN_CI_N

    rng = np.random.default_rng(n)
    tok = rng.integers(10, 60, n).astype(float)
    sec = tok / rng.uniform(5, 30, n)
    s = summarize(pd.DataFrame([tiny(prompt_id=f"p{i}", new_tokens=t, verify_steps=t, accepted=0, drafted=1,
                                     decode_s=d) for i, (t, d) in enumerate(zip(tok, sec))]))
    r = s[s.category == "all"].iloc[0]
    text = format_table(s, categories=["all"])
    if n < MIN_CI_N:
        assert r.interval == "range" and f"range (n={n})" in text and "95 %" not in text
        assert (r.tokens_per_s_lo, r.tokens_per_s_hi) == pytest.approx(((tok / sec).min(), (tok / sec).max()))
        return
    assert r.interval == "95% CI" and "[a,b]: 95 % bootstrap interval over prompts" in text and "range (" not in text
    ref = stats.bootstrap((tok, sec), lambda t, d: t.sum() / d.sum(), paired=True, vectorized=False,
                          n_resamples=20000, method="percentile", rng=np.random.default_rng(99)).confidence_interval
    width = ref.high - ref.low
    assert abs(r.tokens_per_s_lo - ref.low) < 0.1 * width and abs(r.tokens_per_s_hi - ref.high) < 0.1 * width
    assert r.tokens_per_s_hi - r.tokens_per_s_lo < 0.8 * ((tok / sec).max() - (tok / sec).min())  # not the range


def test_a_draft_model_that_is_the_verifier_is_labelled_an_oracle():
    rows = [tiny(drafter=d, cell_id=f"{d}{v}", verifier=v, prompt_id="a", new_tokens=12, verify_steps=2 if d != "ar" else 12,
                 accepted=10 if d != "ar" else 0, drafted=10 if d != "ar" else 0, decode_s=1.0, k=0 if d == "ar" else 5,
                 draft_same_weights=None if d == "ar" else v == "int4")
            for d in ("ar", "draft_model") for v in ("bf16", "int4")]
    s = summarize(pd.DataFrame(rows))
    labels = set(zip(s.drafter, s.verifier))
    assert labels == {("ar", "bf16"), ("ar", "int4"), ("draft_model", "bf16"), ("draft_model (draft = verifier)", "int4")}
    oracle = s[s.drafter == "draft_model (draft = verifier)"].iloc[0]
    assert oracle.speedup_vs_ar == pytest.approx(1.0)  # still measured against its own verifier's AR


def test_run_stall_warning_names_gpu_batch_cells_dominated_by_a_stall():
    """A run's summary names a GPU batch cell whose batches spent more than STALL_SHARE of their
    decode time outside drafting and verification (each batch's median row share, averaged over
    batches: here (0.6 + 0.05) / 2 for one cell, computed by hand); the same rows timed on the CPU,
    a cell under the limit, and batch-size-1 cells are not judged."""
    from quasar_bench.summary import run_stall_warning

    def rows(device, stall):
        out = []
        for verifier in ("reference", "w8a8"):
            for batch_id, share in ((0, stall if verifier == "w8a8" else 0.05), (1, 0.05)):
                for seq in range(3):
                    out.append(dict(model="m", verifier=verifier, drafter="ngram", batch_size=3, batch_id=batch_id,
                                    device=device, decode_s=1.0, other_s=share + (0.01 * seq - 0.01)))
        out.append(dict(model="m", verifier="w8a8", drafter="ar", batch_size=1, batch_id=9, device=device,
                        decode_s=1.0, other_s=0.9))  # batch size 1: not judged
        return pd.DataFrame(out)

    line = run_stall_warning(rows("NVIDIA H200", 0.6))
    assert line is not None and "1 cell(s)" in line and f"m/w8a8/ngram/B=3 ({(0.6 + 0.05) / 2:.0%})" in line
    assert run_stall_warning(rows("cpu (x86_64, 2 cores, 2 threads)", 0.6)) is None
    assert run_stall_warning(rows("NVIDIA H200", 0.5)) is None  # (0.5 + 0.05) / 2 < 0.3


def test_crossover_verdicts_pair_repeats_and_name_ties(tmp_path):
    """Batch rows timed twice: int4 vs bf16 with the same drafter is 1.2x / 1.1x at B = 1 (pays),
    1.05x / 0.95x at B = 8 (a tie: the repeats straddle 1), 0.9x / 0.97x at B = 16 (loses in both).
    The crossover lands at B = 16, not at B = 8 where the pooled ratio (0.9995) dips below 1, and B = 8 is
    named a tie (up to B = 8 only, the line says it never loses, with the tie, not that it pays
    everywhere); per-repeat throughputs are the rows' own tokens / seconds. With the second repeat
    dropped, the single timing calls B = 8 a win (1.05x) and the line says one timing cannot tell."""
    from quasar_bench.summary import crossovers, verdict

    ratio = {1: (1.2, 1.1), 8: (1.05, 0.95), 16: (0.9, 0.97)}
    rows = []
    for b, (r0, r1) in ratio.items():
        for v in ("bf16", "int4"):
            for rep, r in ((0, r0), (1, r1)):
                for p in range(2):  # two prompts in one batch, each with half the batch's time
                    sec = 1.0 if v == "bf16" else 1.0 / r
                    rows.append(dict(model="m", drafter="ngram", verifier=v, category="qa", prompt_id=f"p{p}", turn=0,
                                     repeat=rep, batch_size=b, new_tokens=50, verify_steps=25, accepted=25, drafted=50,
                                     decode_s=sec, throughput_share_s=sec / 2, reference_verifier=v == "bf16"))
    df = pd.DataFrame(rows)
    s = summarize(df)
    int4 = s[(s.category == "all") & (s.verifier == "int4")].set_index("batch_size")
    assert int4.loc[8, "throughput_by_repeat"] == pytest.approx({0: 100 * 1.05, 1: 100 * 0.95})
    assert int4.loc[8, "throughput"] == pytest.approx(200 / (1 / 1.05 + 1 / 0.95))  # pooled over repeats
    line = next(x for x in crossovers(s) if "int4 verification" in x)
    assert "stops paying at B=16" in line and "ties (repeats on both sides of 1) at B=8" in line
    assert "B=16 0.93x (0.90-0.97 over 2 repeats)" in line
    assert [verdict(x) for x in ([1.2, 1.1], [1.05, 0.95], [0.9, 0.97], [float("nan")])] == ["pays", "tie", "loses", None]
    # without B = 16 nothing loses in every repeat: neither "stops paying" nor "pays at every batch size"
    line = next(x for x in crossovers(summarize(df[df.batch_size < 16])) if "int4 verification" in x)
    assert "never loses (up to B=8); ties (repeats on both sides of 1) at B=8" in line and "pays at every" not in line
    one = crossovers(summarize(df[df.repeat == 0]))
    line = next(x for x in one if "int4 verification" in x)
    assert "stops paying at B=16" in line and "ties" not in line and "B=8 1.05x" in line
    assert any("one timing per cell" in x for x in one)
    assert not any("one timing per cell" in x for x in crossovers(s))
    save(s, tmp_path / "summary.csv")  # per-repeat throughput kept as JSON keyed by repeat
    back = pd.read_csv(tmp_path / "summary.csv")
    got = back[(back.category == "all") & (back.verifier == "int4") & (back.batch_size == 8)].throughput_by_repeat.iloc[0]
    assert json.loads(got) == pytest.approx({"0": 105.0, "1": 95.0})


def test_tie_margin_is_a_band_of_practical_equivalence():
    """verdict with a margin m: "loses" only when every ratio is below 1 - m, "pays" only when every one is
    at least 1 + m, a tie otherwise, one ratio included; m = 0 keeps the sign rule. In a crossover line the
    margin turns a shallow loss in both repeats (0.99 / 0.995) into a tie and says so; a deeper one stays."""
    from quasar_bench.summary import crossovers, verdict

    assert [verdict(x) for x in ([0.99, 0.995], [0.995], [1.005], [0.97, 0.98])] == ["loses", "loses", "pays", "loses"]
    assert [verdict(x, 0.02) for x in ([0.99, 0.995], [0.995], [1.005], [0.96, 0.975], [1.03, 1.04], [0.97, 1.03])] == \
        ["tie", "tie", "tie", "loses", "pays", "tie"]
    assert verdict([0.98], 0.02) == "tie" and verdict([1.02], 0.02) == "pays"  # the band's edges
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        verdict([1.0], 0.5)
    rows = []
    for b, (r0, r1) in {1: (1.2, 1.1), 8: (0.99, 0.995), 16: (0.9, 0.95)}.items():
        for v in ("bf16", "int4"):
            for rep, r in ((0, r0), (1, r1)):
                sec = 1.0 if v == "bf16" else 1.0 / r
                rows.append(dict(model="m", drafter="ngram", verifier=v, category="qa", prompt_id="p", turn=0, repeat=rep,
                                 batch_size=b, new_tokens=50, verify_steps=25, accepted=25, drafted=50, decode_s=sec,
                                 throughput_share_s=sec, reference_verifier=v == "bf16"))
    s = summarize(pd.DataFrame(rows))
    plain = next(x for x in crossovers(s) if "int4 verification" in x)
    assert "stops paying at B=8" in plain and "ties" not in plain
    banded = next(x for x in crossovers(s, 0.02) if "int4 verification" in x)
    assert "stops paying at B=16" in banded and "ties (within 0.02 of 1, or repeats on both sides of it) at B=8" in banded


def test_crossover_compares_each_setting_with_its_own_baseline():
    """Greedy and sampled cells in one batch run: at B = 4 the drafter beats AR at its own temperature
    (greedy 110 vs 100, sampled 60 vs 50) but is slower than the other temperature's AR. Each curve
    is judged against AR at its own temperature, so neither loses; comparing across temperatures
    would call the sampled one a loss at B = 4 (60 vs 100)."""
    from quasar_bench.summary import crossovers

    tput = {("ar", 0.0): 100, ("ngram", 0.0): 110, ("ar", 0.7): 50, ("ngram", 0.7): 60}
    rows = []
    for (d, temp), y in tput.items():
        for b in (1, 4):
            for p in range(2):
                rows.append(dict(model="m", drafter=d, verifier="bf16", category="qa", prompt_id=f"p{p}", turn=0,
                                 temperature=temp, batch_size=b, new_tokens=y, verify_steps=y, accepted=0, drafted=0,
                                 decode_s=1.0, throughput_share_s=1.0, k=0 if d == "ar" else 4,
                                 reference_verifier=True))
    lines = [x for x in crossovers(summarize(pd.DataFrame(rows))) if "speculation" in x]
    assert len(lines) == 2 and all("pays at every batch size run" in x for x in lines)
    assert any("temperature=0.7" in x and "B=4 1.20x" in x for x in lines)
    assert any("temperature=0.0" in x and "B=4 1.10x" in x for x in lines)
    # two contexts (e.g. two datasets) in one store: one curve each, each against its own AR
    ctx = pd.DataFrame(rows).query("temperature == 0.0").drop(columns="temperature")
    other = ctx.assign(context_id="bbbbbbbb", new_tokens=ctx.new_tokens.where(ctx.drafter == "ar", 45) // 2)
    both = pd.concat([ctx.assign(context_id="aaaaaaaa"), other], ignore_index=True)
    lines = [x for x in crossovers(summarize(both)) if "speculation" in x]
    assert sorted(lines) == sorted([
        "m bf16/ngram [context aaaaaa]: speculation pays at every batch size run (up to B=4) "
        "(throughput vs bf16 AR: B=1 1.10x, B=4 1.10x)",
        "m bf16/ngram [context bbbbbb]: speculation stops paying at B=1 "
        "(throughput vs bf16 AR: B=1 0.44x, B=4 0.44x)"])
