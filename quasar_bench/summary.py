"""Summary table: τ, α, fidelity, throughput and speedups per (model, drafter, verifier, category).

Definitions are the README's (metrics section). The unit of statistics is the prompt: the turns of a prompt are
summed (tokens, steps, time) or averaged (KL, top-1), and a prompt matches the reference only
if every turn does. Ratio metrics are pooled over prompts (τ = Σ new_tokens / Σ verify_steps,
α = Σ accepted / Σ drafted, tokens/s = Σ new_tokens / Σ decode_s), so long prompts weigh more;
KL, top-1 and exact match are means of per-prompt values.

`<metric>_lo`, `<metric>_hi` are what the number of prompts n supports, named per row in the
`interval` column:
- n >= MIN_CI_N (10): "95% CI", a percentile bootstrap over prompts (B = 2000 resamples, fixed
  seed, so a table is reproducible): each resample draws prompts with replacement and recomputes
  the pooled metric. Speedups are bootstrapped paired (the same drawn prompts for the run and its
  AR baseline) when both ran the same prompts, else independently.
- 2 <= n < MIN_CI_N: "range", the smallest and largest per-prompt value (speedups: per-prompt
  paired ratios; NaN when the prompts differ). A bootstrap over 3 prompts would only restate these
  extremes under the name of a 95 % interval; a pooled ratio can fall outside the range of its
  per-prompt ratios when prompts differ in length.
- n < 2: "none", NaN.
The prompt is the unit whatever the number of repeats: a prompt's repeats (rows with `repeat`
0, 1, ...) are summed into its per-prompt values like its turns, so repeats narrow each prompt's
timing noise but never count as more prompts.

Beside that, Spec-Bench's statistic over repeats (its evaluation/speed.py, mean report): per
repeat, the mean over prompts of each prompt's tokens/s (Σ tokens / Σ decode_s over its turns),
then the mean and the sample standard deviation (ddof = 1) of those per-repeat values over the
`n_repeats` repeats every prompt of the group completed (`sb_tokens_per_s`, `_std`); speedups
likewise, per repeat the ratio of those means to the baseline's in the same repeat
(`sb_speedup_vs_ar`, `sb_speedup_vs_ref_ar`, `_std`). It measures run-to-run timing noise, not the
uncertainty from which prompts were drawn (the intervals above).

Cells whose draft model is the verifier itself (rows' `draft_same_weights`, e.g. draft_model at
int4 on the int4 verifier: every draft accepted) keep their rows, but their drafter label gets
" (draft = verifier)": an oracle, not a drafter.

τ_tf (`tau_tf`) is pooled like τ over the teacher-forced decodes (Σ tf_new_tokens / Σ tf_verify_steps);
rows without one (reference verifier, baselines, runs without teacher forcing) leave it NaN.
`below_exact_match` flags a non-reference row whose exact-match rate with the reference is below
`min_exact_match` (a column too, so the CSV says which threshold made the flag): its speedups
were measured on text other than the reference's, and the table marks them with `*`.

The acceptance curve `accept_curve` is the mean over prompts (turns averaged first) of
p_i = P(draft i accepted | drafts 1..i-1 accepted), position by position (NaN-skipping).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

B, SEED = 2000, 0
# Prompts: fewer get the range of per-prompt values, never a "95 % interval". Why 10: for a mean,
# the percentile bootstrap behaves like mean ± 1.96·s·sqrt((n-1)/n)/sqrt(n), whose coverage with
# normal per-prompt values is P(|t_(n-1)| <= 1.96·sqrt((n-1)/n)): 75 % at n = 3, 85 % at 5, 90 %
# at 10, 93 % at 20 (its width is 0.37, 0.63, 0.82, 0.91 of the exact t interval's). Below 10 the
# label "95 %" would overstate it badly; from 10 on it is within ~5 points (and tightens with n).
MIN_CI_N = 10
MIN_EXACT_MATCH = 0.5  # the default of conf/config.yaml's min_exact_match
METRICS = ["tau", "tau_tf", "alpha", "kl_mean", "kl_p95", "top1_agree", "ref_exact_match", "tokens_per_s", "throughput",
           "speedup_vs_ar", "speedup_vs_ref_ar"]
SUMS = ["new_tokens", "verify_steps", "accepted", "drafted", "decode_s", "throughput_share_s", "tf_new_tokens",
        "tf_verify_steps"]
ORACLE = " (draft = verifier)"  # drafter label suffix of cells whose rows say draft_same_weights
SB = ["sb_tokens_per_s", "sb_speedup_vs_ar", "sb_speedup_vs_ref_ar"]  # Spec-Bench's mean ± std over repeats
MEANS = ["kl_mean", "kl_p95", "top1_agree"]
RATIOS = {"tau": ("new_tokens", "verify_steps"), "tau_tf": ("tf_new_tokens", "tf_verify_steps"), "alpha": ("accepted", "drafted"),
          "tokens_per_s": ("new_tokens", "decode_s"), "throughput": ("new_tokens", "throughput_share_s")}


def reference_verifier(df: pd.DataFrame) -> str | None:
    """The verifier the run flagged as its reference (rows' `reference_verifier`); for tables
    without that column, the verifier named `reference`, else the highest float precision present."""
    if "reference_verifier" in df and df["reference_verifier"].fillna(False).astype(bool).any():
        return df.loc[df["reference_verifier"].fillna(False).astype(bool), "verifier"].iloc[0]
    present = set(df["verifier"])
    return next((v for v in ("reference", "fp32", "bf16", "fp16") if v in present), None)


def separate_cells(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows of different cells (different full configurations: drafter settings, dataset, weights,
    code...) never pool: where one label group holds several cell ids, each cell's drafter label
    gets its id (`ngram #1a2b3c`), so the summary shows them side by side."""
    if "cell_id" not in df or df.empty:
        return df
    n_cells = df.groupby(keys, dropna=False)["cell_id"].transform("nunique")
    if (n_cells <= 1).all():
        return df
    df = df.copy()
    clash = n_cells > 1
    df.loc[clash, "drafter"] = df.loc[clash, "drafter"].astype(str) + " #" + df.loc[clash, "cell_id"].astype(str).str[:6]
    return df


def is_baseline(df: pd.DataFrame) -> pd.Series:
    """Rows of a drafter that drafts nothing (plain AR): the `baseline` column, else k == 0."""
    if "baseline" in df:
        return df["baseline"].fillna(False).astype(bool)
    if "k" in df:
        return pd.to_numeric(df["k"], errors="coerce").eq(0)
    return pd.Series(False, index=df.index)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _boot_idx(n, rng):
    return rng.integers(0, n, size=(B, n))


def interval_kind(n: int) -> str:
    return "95% CI" if n >= MIN_CI_N else "range" if n >= 2 else "none"


def _range(values):
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if len(values) >= 2 else (np.nan, np.nan)


def _ci(values):
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return np.nan, np.nan
    return tuple(np.percentile(values, [2.5, 97.5]))


def _per_prompt(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per (keys, category, prompt_id)."""
    d = df.copy()
    if "throughput_share_s" not in d:  # rows from before the batch axis: every batch was one sequence
        d["throughput_share_s"] = d["decode_s"] if "decode_s" in d else np.nan
    for c in SUMS + MEANS:
        d[c] = pd.to_numeric(d[c], errors="coerce") if c in d else np.nan
    em = d["ref_exact_match"] if "ref_exact_match" in d else pd.Series(np.nan, index=d.index)
    d["ref_exact_match"] = em.map(lambda x: np.nan if x is None or x != x else float(bool(x)))
    d["repeat"] = pd.to_numeric(d["repeat"], errors="coerce").fillna(0).astype(int) if "repeat" in d else 0
    agg = {c: "sum" for c in SUMS} | {c: "mean" for c in MEANS} | {"ref_exact_match": "min"}
    g = d.groupby(keys + ["category", "prompt_id"], dropna=False, sort=False)
    out = g.agg(agg)
    d["_timing"] = list(zip(d["repeat"], d["new_tokens"], d["decode_s"]))
    out["by_repeat"] = g["_timing"].agg(lambda s: _by_repeat(list(s)))
    d["_share"] = list(zip(d["repeat"], d["new_tokens"], d["throughput_share_s"]))
    out["share_by_repeat"] = g["_share"].agg(lambda s: _sums_by_repeat(list(s)))
    if "accepted_per_position" in d:
        out["curve"] = g["accepted_per_position"].agg(lambda s: _curve(list(s)))
    else:
        out["curve"] = [[] for _ in range(len(out))]
    # a prompt with any missing turn value has no exact-match verdict
    out["ref_exact_match"] = out["ref_exact_match"].where(
        g["ref_exact_match"].apply(lambda s: s.notna().all()))
    return out.reset_index()


def _sums_by_repeat(timings) -> dict[int, tuple[float, float]]:
    """One prompt's (repeat, new_tokens, seconds) per row -> {repeat: (Σ tokens, Σ seconds) over its
    turns in that repeat}."""
    sums: dict[int, list[float]] = {}
    for r, t, sec in timings:
        acc = sums.setdefault(int(r), [0.0, 0.0])
        acc[0] += float(t)
        acc[1] += float(sec)
    return {r: (t, sec) for r, (t, sec) in sorted(sums.items())}


def _by_repeat(timings) -> dict:
    """One prompt's (repeat, new_tokens, decode_s) per row -> {repeat: its tokens/s in that repeat
    (Σ tokens / Σ decode_s over its turns)}."""
    return {r: float(_ratio(t, sec)) for r, (t, sec) in _sums_by_repeat(timings).items()}


def throughput_by_repeat(pp: pd.DataFrame) -> dict[int, float]:
    """{repeat: the group's batch throughput in that repeat (Σ new tokens / Σ throughput_share_s
    over its prompts)}, for the repeats every prompt has: a cell's run-to-run timing spread."""
    per = list(pp["share_by_repeat"])
    common = set.intersection(*(set(r) for r in per)) if per else set()
    return {r: float(_ratio(sum(p[r][0] for p in per), sum(p[r][1] for p in per))) for r in sorted(common)}


def repeat_means(pp: pd.DataFrame) -> dict[int, float]:
    """{repeat: mean over the group's prompts of their tokens/s}, for the repeats every prompt has."""
    per = list(pp["by_repeat"])
    common = set.intersection(*(set(r) for r in per)) if per else set()
    return {r: float(np.mean([p[r] for p in per])) for r in sorted(common)}


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(list(values), float)
    if len(v) == 0:
        return np.nan, np.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) >= 2 else np.nan


def _stats(pp: pd.DataFrame, rng) -> dict:
    """Point estimates and bootstrap CIs of one group's per-prompt table."""
    n = len(pp)
    kind = interval_kind(n)
    idx = _boot_idx(n, rng) if kind == "95% CI" else None
    out = {"n_prompts": n, "interval": kind, "accept_curve": _curve(list(pp["curve"]))}
    means = repeat_means(pp)
    out["n_repeats"] = len(means)
    out["sb_tokens_per_s"], out["sb_tokens_per_s_std"] = _mean_std(means.values())
    out["throughput_by_repeat"] = throughput_by_repeat(pp)
    for m, (a, b) in RATIOS.items():
        num, den = pp[a].to_numpy(float), pp[b].to_numpy(float)
        out[m] = float(_ratio(num.sum(), den.sum()))
        lo, hi = _ci(_ratio(num[idx].sum(1), den[idx].sum(1))) if idx is not None else _range(_ratio(num, den))
        out[m + "_lo"], out[m + "_hi"] = lo, hi
    for m in MEANS + ["ref_exact_match"]:
        v = pp[m].to_numpy(float)
        ok = np.isfinite(v)
        out[m] = float(v[ok].mean()) if ok.any() else np.nan
        if idx is not None and ok.sum() >= 2:
            vv = v[ok]
            out[m + "_lo"], out[m + "_hi"] = _ci(vv[_boot_idx(len(vv), rng)].mean(1))
        else:
            out[m + "_lo"], out[m + "_hi"] = _range(v)
    return out


def _speedup(pp: pd.DataFrame, base: pd.DataFrame, rng):
    """Throughput ratio of a run over its baseline (tokens/s; at batch size 1 the same as the
    sequence's own rate), with a (paired when possible) bootstrap CI."""
    def tps(x):
        return x["new_tokens"].to_numpy(float), x["throughput_share_s"].to_numpy(float)
    (n1, d1), (n0, d0) = tps(pp), tps(base)
    point = float(_ratio(n1.sum(), d1.sum()) / _ratio(n0.sum(), d0.sum()))
    if len(pp) < 2 or len(base) < 2:
        return point, np.nan, np.nan
    k1 = list(zip(pp["category"], pp["prompt_id"]))
    k0 = list(zip(base["category"], base["prompt_id"]))
    paired = sorted(k1) == sorted(k0)
    if paired:  # align base to pp's prompt order
        pos = {k: i for i, k in enumerate(k0)}
        order = [pos[k] for k in k1]
        n0, d0 = n0[order], d0[order]
    if interval_kind(len(pp)) != "95% CI":
        return (point, *_range(_ratio(n1, d1) / _ratio(n0, d0))) if paired else (point, np.nan, np.nan)
    if paired:
        i1 = i0 = _boot_idx(len(pp), rng)
    else:
        i1, i0 = _boot_idx(len(pp), rng), _boot_idx(len(base), rng)
    r = _ratio(n1[i1].sum(1), d1[i1].sum(1)) / _ratio(n0[i0].sum(1), d0[i0].sum(1))
    return (point, *_ci(r))


def _curve(curves) -> list[float]:
    """Position-wise NaN-skipping mean of acceptance curves of different lengths."""
    curves = [np.asarray(c, float) for c in curves
              if isinstance(c, (list, tuple, np.ndarray)) and len(c)]
    if not curves:
        return []
    m = np.full((len(curves), max(len(c) for c in curves)), np.nan)
    for i, c in enumerate(curves):
        m[i, :len(c)] = c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [round(float(x), 6) for x in np.nanmean(m, 0)]


def _same(a, b):
    return a == b or (a != a and b != b)


def summarize(df: pd.DataFrame, min_exact_match: float = MIN_EXACT_MATCH) -> pd.DataFrame:
    """One row per (model, drafter, verifier[, k, temperature], category) plus category `all`.

    `k` and `temperature` join the key only when they vary across the rows.
    """
    keys = ["model", "drafter", "verifier"]
    if "batch_size" in df:  # rows from before the batch axis ran one sequence at a time
        df = df.assign(batch_size=pd.to_numeric(df["batch_size"], errors="coerce").fillna(1).astype(int))
    if "batch_packed" in df:  # rows from before packing ran unpacked
        df = df.assign(batch_packed=df["batch_packed"].fillna(False).astype(bool))
    keys += [c for c in ("k", "temperature", "batch_size", "batch_packed") if c in df and df[c].nunique(dropna=False) > 1]
    # Cells of other contexts (dataset, weights, code, decoding settings) are other tables:
    # never pooled, and each speedup's baseline comes from its own context.
    if "context_id" in df and df["context_id"].nunique(dropna=False) > 1:
        keys.append("context_id")
    df = separate_cells(df, keys)
    if "draft_same_weights" in df:  # a draft model that is the verifier itself: an oracle, labelled as one
        same = df["draft_same_weights"].eq(True)
        if same.any():
            df = df.copy()
            df.loc[same, "drafter"] = df.loc[same, "drafter"].astype(str) + ORACLE
    baseline_drafters = set(df.loc[is_baseline(df), "drafter"])
    pp = _per_prompt(df, keys)
    groups = []
    for pcat in (pp, pp.assign(category="all")):
        for gkey, g in pcat.groupby(keys + ["category"], dropna=False, sort=False):
            rec = dict(zip(keys + ["category"], gkey)) | _stats(g, np.random.default_rng(SEED))
            groups.append(rec | {"_pp": g})
    ref = reference_verifier(df)
    matched = [c for c in ("temperature", "batch_size", "batch_packed") if c in keys]  # speedups at the same setting
    for rec in groups:
        for col, verifier in (("speedup_vs_ar", rec["verifier"]), ("speedup_vs_ref_ar", ref)):
            base = [b for b in groups if b["drafter"] in baseline_drafters and b["model"] == rec["model"]
                    and b["verifier"] == verifier and b["category"] == rec["category"]
                    and all(_same(b[c], rec[c]) for c in matched)
                    and b.get("context_id") == rec.get("context_id")]
            if base:
                rec[col], rec[col + "_lo"], rec[col + "_hi"] = _speedup(
                    rec["_pp"], base[0]["_pp"], np.random.default_rng(SEED))
                run, ref_run = repeat_means(rec["_pp"]), repeat_means(base[0]["_pp"])
                rec["sb_" + col], rec["sb_" + col + "_std"] = _mean_std(
                    run[r] / ref_run[r] for r in sorted(set(run) & set(ref_run)))
            else:
                rec[col] = rec[col + "_lo"] = rec[col + "_hi"] = np.nan
                rec["sb_" + col] = rec["sb_" + col + "_std"] = np.nan
    cols = keys + ["category", "n_prompts", "interval"]
    cols += [c for m in METRICS for c in (m, m + "_lo", m + "_hi")]
    cols += ["n_repeats"] + [c for m in SB for c in (m, m + "_std")] + ["throughput_by_repeat", "accept_curve"]
    out = pd.DataFrame([{k: v for k, v in r.items() if k != "_pp"} for r in groups], columns=cols)
    if out.empty:
        return out
    # Baseline drafters first; verifiers from the reference down by the weight bytes a step reads
    # (the most precise first), else in order of appearance.
    order = list(dict.fromkeys(df["verifier"]))
    if "weight_bytes" in df:
        size = pd.to_numeric(df["weight_bytes"], errors="coerce").groupby(df["verifier"]).mean()
        order.sort(key=lambda v: -size.get(v, 0) if size.get(v, 0) == size.get(v, 0) else 0)
    rank = {v: i for i, v in enumerate(dict.fromkeys([ref] + order))}
    out["baseline"] = out["drafter"].isin(baseline_drafters)
    out["reference_verifier"] = out["verifier"].eq(ref)
    out["min_exact_match"] = float(min_exact_match)
    out["below_exact_match"] = ~out["reference_verifier"] & (out["ref_exact_match"] < min_exact_match).fillna(False)
    out["_d"] = ~out["baseline"]
    out["_v"] = out["verifier"].map(lambda v: rank.get(v, len(rank)))
    out["_c"] = out["category"].eq("all")
    out = out.sort_values(["model", "_d", "drafter", "_v", "verifier"] + keys[3:] + ["_c", "category"])
    return out.drop(columns=["_d", "_v", "_c"]).reset_index(drop=True)


def _fmt(x, spec):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def format_table(summary: pd.DataFrame, categories: list[str] | None = None) -> str:
    """Fixed-width table for the terminal; `categories` limits the rows (e.g. ["all"])."""
    s = summary if categories is None else summary[summary["category"].isin(categories)]
    extra = [c for c in ("k", "temperature", "batch_size", "batch_packed") if c in s]
    cols = [("model", "model", None), ("drafter", "drafter", None), ("verifier", "verifier", None)]
    cols += [(c, c, None) for c in extra] + [("category", "category", None), ("n", "n_prompts", "d")]
    cols += [("τ", "tau", ".2f")] + ([("τ_tf", "tau_tf", ".2f")] if "tau_tf" in s and s["tau_tf"].notna().any() else [])
    cols += [("α", "alpha", ".2f"), ("KL", "kl_mean", ".4f"),
             ("top-1", "top1_agree", ".3f"), ("exact", "ref_exact_match", ".2f"),
             ("tok/s", "tokens_per_s", ".1f"), ("SB tok/s", "sb_tokens_per_s", "±")]
    if "batch_size" in s:  # batches: the per-sequence rate and the batch's throughput differ
        cols += [("batch tok/s", "throughput", ".1f")]
    cols += [("speedup", "speedup_vs_ar", ".2f"),
             ("vs ref AR", "speedup_vs_ref_ar", ".2f")]
    ci = {"tau", "tokens_per_s", "throughput", "speedup_vs_ar", "speedup_vs_ref_ar"}
    speedups = {"speedup_vs_ar", "speedup_vs_ref_ar"}
    table = [[h for h, _, _ in cols]]
    marked = False
    for _, r in s.iterrows():
        line = []
        diverged = bool(r.get("below_exact_match", False))
        for _, c, spec in cols:
            # a baseline's speedup over itself is 1 by definition: nothing to mark
            mark = "*" if diverged and c in speedups and np.isfinite(r[c]) and not (
                c == "speedup_vs_ar" and bool(r.get("baseline", False))) else ""
            marked |= bool(mark)
            if spec is None:
                line.append(str(r[c]))
            elif spec == "±":  # Spec-Bench's mean ± std over repeats (std needs two)
                line.append(_fmt(r.get(c, np.nan), ".1f") + ("±" + _fmt(r[c + "_std"], ".1f")
                                                             if np.isfinite(r.get(c + "_std", np.nan)) else ""))
            elif c in ci and np.isfinite(r.get(c + "_lo", np.nan)):
                ci_row = r.get("interval", "95% CI") == "95% CI"
                lo, hi = _fmt(r[c + "_lo"], spec), _fmt(r[c + "_hi"], spec)
                line.append(f"{_fmt(r[c], spec)}{mark} " + (f"[{lo},{hi}]" if ci_row else f"({lo}–{hi})"))
            else:
                line.append(_fmt(r[c], spec) + mark)
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    text = ["  ".join(v.ljust(w) if i < len(extra) + 4 else v.rjust(w)
                      for i, (v, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    text.insert(1, "-" * len(text[0]))
    if marked:
        text.append(f"*: exact match with the reference below {s['min_exact_match'].iloc[0]:g} of prompts: the speedup "
                    "was measured on other text than the reference's (τ_tf: the acceptance on the reference's text)")
    kinds = set(s["interval"]) if "interval" in s else set()
    if "95% CI" in kinds:
        text.append(f"[a,b]: 95 % bootstrap interval over prompts (n >= {MIN_CI_N})")
    if "range" in kinds:
        ns = "/".join(map(str, sorted(set(s.loc[s["interval"] == "range", "n_prompts"]))))
        text.append(f"(a–b): range (n={ns}): smallest and largest per-prompt value, not an interval "
                    f"(an interval needs n >= {MIN_CI_N} prompts)")
    if "n_repeats" in s and len(s):
        reps = "/".join(map(str, sorted(set(s["n_repeats"].fillna(0).astype(int)))))
        text.append(f"SB tok/s: Spec-Bench's mean ± std over repeats (R={reps}) of the mean per-prompt tok/s: "
                    "timing noise between repeats, not prompt sampling")
    return "\n".join(text)


# A batch cell that spent more than this share of its decode time outside drafting and verification
# (rows' other_s: a graph captured or a kernel tuned mid-run, the host) measured a stall, not the
# method: the run's summary and experiments/gpu_speed.py warn, the batch figures mark it
# (committed GPU runs: 0.01-0.2).
STALL_SHARE = 0.3


def other_share(rows: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Per cell (the `keys` columns): the share of decode time spent outside drafting and
    verification, as each batch's median row share (a batch's rows share its stalls) averaged over
    the cell's batches. Empty when the rows lack the timing split (files from before it)."""
    if not {"other_s", "decode_s", "batch_id", *keys} <= set(rows.columns):
        return pd.Series(dtype=float)
    share = rows["other_s"] / rows["decode_s"].where(rows["decode_s"] > 0)
    per_batch = share.groupby([rows[k] for k in keys] + [rows["batch_id"]], sort=False).median()
    return per_batch.groupby(level=list(range(len(keys))), sort=False).mean()


def stall_warning(shares: pd.Series, limit: float = STALL_SHARE) -> str | None:
    """One warning line naming the cells of `shares` (indexed by cell keys, batch size last) above
    `limit`, or None."""
    bad = shares[shares > limit]
    if bad.empty:
        return None
    names = ", ".join("/".join(map(str, key[:-1])) + f"/B={key[-1]} ({v:.0%})" for key, v in bad.items())
    return (f"warning: {len(bad)} cell(s) spent more than {limit:.0%} of decode time outside drafting and "
            f"verification (a stall: re-run them): {names}")


def run_stall_warning(rows: pd.DataFrame) -> str | None:
    """stall_warning over a run's GPU batch cells (batch size > 1, timed on CUDA). On the CPU the
    share outside drafting and verification is the loop's own overhead against small forwards, not
    a stall, so CPU rows are not judged."""
    if "batch_size" not in rows or "device" not in rows:
        return None
    gpu = rows[(rows["batch_size"] > 1) & ~rows["device"].astype(str).str.startswith("cpu")]
    return stall_warning(other_share(gpu, ["model", "verifier", "drafter", "batch_size"])) if len(gpu) else None


def verdict(ratios, margin: float = 0.0) -> str | None:
    """Whether a method pays at one batch size, from its throughput ratio(s) against what it is
    compared with: one pooled ratio, or one ratio per repeat (each repeat's throughput over the
    comparator's in the same repeat). "loses" when every ratio is below 1, "pays" when none is,
    "tie" when the repeats fall on both sides of 1 (the difference is within the run's timing
    noise); None when nothing finite was measured. With margin 0 one ratio can only pay or lose:
    whether it is outside the noise needs repeats.

    `margin` (the run's `tie_margin`) is a band of practical equivalence around 1, set by the user from
    what they know of the timing's spread: then "loses" needs every ratio below 1 - margin, "pays"
    every ratio at or above 1 + margin, and anything else (a ratio within the band included) is a tie."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"tie margin must be in [0, 0.5), got {margin}")
    r = np.asarray(ratios, float).ravel()
    r = r[np.isfinite(r)]
    if not len(r):
        return None
    return "loses" if (r < 1 - margin).all() else "pays" if (r >= 1 + margin).all() else "tie"


def tie_text(margin: float = 0.0) -> str:
    """How a crossover line, table or figure says what a tie is under `margin`."""
    return ("repeats on both sides of 1" if not margin else
            f"within {margin:.3g} of 1, or repeats on both sides of it")


def ratio_ranges(pooled, lo, hi) -> list[list[float]]:
    """Per batch size of a batch table: [lo, hi] of its per-repeat ratios where the table has them
    (cells timed more than once), else the pooled ratio alone; what `verdict` reads (every repeat
    below 1 iff hi < 1, repeats on both sides iff lo < 1 <= hi)."""
    return [[a, b] if np.isfinite(a) and np.isfinite(b) else [p]
            for a, b, p in zip(np.asarray(lo, float), np.asarray(hi, float), np.asarray(pooled, float))]


def first_loss(sizes, ratios, margin: float = 0.0):
    """The smallest batch size that loses (`verdict`: every ratio given for it below 1 - margin; None
    if none does): where, along the batch sizes run, a method stops paying. `ratios` holds one value
    or one sequence of per-repeat values per size; unmeasured (non-finite) ones are passed over."""
    return next((b for b, r in sorted(zip(sizes, ratios), key=lambda x: x[0]) if verdict(r, margin) == "loses"), None)


def loss_and_ties(sizes, ratios, margin: float = 0.0) -> tuple[int | None, list[int]]:
    """(`first_loss`, the batch sizes before it that tie (`verdict`)): what a crossover line, table or
    figure says of one curve."""
    lost = first_loss(sizes, ratios, margin)
    ties = [b for b, r in sorted(zip(sizes, ratios), key=lambda x: x[0])
            if verdict(r, margin) == "tie" and (lost is None or b < lost)]
    return lost, ties


def repeat_ratios(run: dict, base: dict, pooled: float) -> list[float]:
    """Per-repeat ratios of two cells' throughputs ({repeat: throughput}), paired by repeat (the
    harness times every cell once per repeat, all of repeat r before any of r + 1); the pooled
    ratio alone when they share fewer than two repeats."""
    common = sorted(set(run or {}) & set(base or {}))
    if len(common) < 2:
        return [pooled]
    return [float(_ratio(run[r], base[r])) for r in common]


def crossovers(summary: pd.DataFrame, margin: float = 0.0) -> list[str]:
    """Where, along the batch sizes run, speculation stops paying (a drafter's throughput falls
    below its verifier's AR at the same batch size) and where a verifier stops beating the
    reference verifier with the same drafter: one line per (model, verifier, drafter), from the
    `all` rows of a summary that has a batch_size column. With repeats, a batch size loses only
    where every repeat loses (`verdict`), and sizes whose repeats straddle 1 are named as ties;
    `margin` (the run's `tie_margin`) widens "a tie" to every ratio within it of 1."""
    if "batch_size" not in summary:
        return []
    s = summary[summary["category"] == "all"].sort_values("batch_size")
    packed = s["batch_packed"] if "batch_packed" in s else pd.Series(False, index=s.index)
    lines = []
    # packed and unpacked batches are two curves; batch size 1 (nothing to pack) starts both
    for mode in sorted(set(packed[s["batch_size"] > 1])) or [False]:
        curve = s[(s["batch_size"] == 1) | (packed == mode)]
        lines += _crossover_lines(curve, " (packed)" if mode else "", margin)
    if lines and any(len(_by_rep(r)) < 2 for r in s.itertuples()):
        lines.append("(one timing per cell: a ratio a few % from 1 is within timing noise and is called a win or a "
                     + ("loss only by its sign; run with repeats>=2 to tell them apart, or set tie_margin)" if not margin else
                        f"loss by its sign outside tie_margin={margin:g}; run with repeats>=2 to see the spread)"))
    return lines


def _by_rep(r) -> dict:
    d = getattr(r, "throughput_by_repeat", None)
    return d if isinstance(d, dict) else {}


def _crossover_lines(s: pd.DataFrame, tag: str, margin: float = 0.0) -> list[str]:
    # A curve is one drafter setting (k, temperature) across batch sizes. Each point is compared as
    # the summary's own speedups are: with AR at the same temperature and context, and with the
    # reference verifier at the same drafter, k, temperature and context (packed batches are a
    # context of their own, so a packed curve's B = 1 point keeps the unpacked one's). Several
    # contexts at one batch size (two datasets in one store) make several curves.
    setting = [c for c in ("k", "temperature") if c in s]
    match = [c for c in ("temperature", "context_id") if c in s]  # what AR shares; the reference also k
    s = s.assign(**{c: s[c].astype(object).where(s[c].notna(), "") for c in {*setting, *match}})
    ref = {(r.model, r.drafter, r.batch_size, *(getattr(r, c) for c in ["k", *match] if c in s)): r
           for r in s[s["reference_verifier"]].itertuples()}
    ar = {(r.model, r.verifier, r.batch_size, *(getattr(r, c) for c in match)): r for r in s[s["baseline"]].itertuples()}
    # the line names a setting only where one drafter ran with several (two k, two temperatures)
    named = [c for c in setting if s.groupby(["model", "verifier", "drafter"])[c].nunique().max() > 1]
    curves = []
    for (model, verifier, drafter, *values), g in s.groupby(["model", "verifier", "drafter", *setting], sort=False):
        label = "".join(f" {c}={v}" for c, v in zip(setting, values) if c in named)
        if "context_id" in g and g["batch_size"].duplicated().any():
            curves += [(model, verifier, drafter, f"{label} [context {str(c)[:6]}]", h) for c, h in g.groupby("context_id")]
        else:
            curves.append((model, verifier, drafter, label, g))
    lines = []
    for model, verifier, drafter, label, g in curves:
        tests = []
        if not g["baseline"].iloc[0]:
            tests.append(("speculation", {r.batch_size: ar.get((model, verifier, r.batch_size, *(getattr(r, c) for c in match)))
                                          for r in g.itertuples()}, f"{verifier} AR"))
        if not g["reference_verifier"].iloc[0]:
            tests.append((f"{verifier} verification",
                          {r.batch_size: ref.get((model, drafter, r.batch_size, *(getattr(r, c) for c in ["k", *match] if c in s)))
                           for r in g.itertuples()}, f"the reference verifier with {drafter}"))
        for what, base, against in tests:
            known = []  # (B, per-repeat ratios) where the comparator ran
            for r in g.itertuples():
                b = base.get(r.batch_size)
                if b is None:
                    continue
                pooled = float(_ratio(r.throughput, b.throughput))
                ratios = repeat_ratios(_by_rep(r), _by_rep(b), pooled)
                if np.isfinite(pooled):
                    known.append((r.batch_size, pooled, ratios))
            if not known:
                continue
            lost, ties = loss_and_ties([b for b, _, _ in known], [x for _, _, x in known], margin)
            ratio_text = ", ".join(f"B={b} {p:.2f}x" + (f" ({min(x):.2f}-{max(x):.2f} over {len(x)} repeats)"
                                                       if len(x) > 1 else "") for b, p, x in known)
            verdict_text = (f"stops paying at B={lost}" if lost is not None
                            else f"pays at every batch size run (up to B={known[-1][0]})" if not ties
                            else f"never loses (up to B={known[-1][0]})")
            if ties:
                verdict_text += f"; ties ({tie_text(margin)}) at B={', '.join(map(str, ties))}"
            lines.append(f"{model} {verifier}/{drafter}{label}{tag}: {what} {verdict_text} (throughput vs {against}: "
                         f"{ratio_text})")
    return lines


def save(summary: pd.DataFrame, path) -> None:
    """Write the summary as CSV, atomically: the one writer of summary.csv (the run's export and the
    W&B run's copy), list- and dict-valued cells (the acceptance curve, the throughput per repeat,
    keyed by repeat) as JSON."""
    from .fileio import atomic_write_text, json_cell

    out = summary.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(json_cell)
    atomic_write_text(path, out.to_csv(index=False))
