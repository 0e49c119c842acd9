"""Every figure, redrawn from the result tables alone.

    python -m quasar_bench.figures --results results --out results/figures

reads each experiment directory `results/<experiment>/` (rows-*.parquet, via ResultStore) and
`results/gpu/kernels*.csv`, `e2e.csv`, `replay*.csv`, `batch.csv` (+ `batch_<name>.csv` per-cell
tables), `batch_replay.csv` (real acceptance) and `step_speed*.csv`, and writes PNG + PDF per figure: `<out>/<experiment>/<figure>.*`,
`<out>/kernel_roofline.*` (+ `kernel_roofline_<machine>.*` per `w4a16_cuda_<machine>.csv`),
`<out>/gpu_speedup_by_drafter.*`, `<out>/gpu_replay*.*` (one per replay
table), `<out>/gpu_batch.*` (+ `gpu_batch_<name>[_packed].*` per `gpu/batch_<name>/batch*.csv`), `<out>/gpu_batch_replay.*`, `<out>/kernel_backends_<name>.*` (per `w4a16_backends_<name>.csv`) and
`<out>/gpu_step_by_backend.*`. A figure whose inputs are absent is skipped with a note.

The plot functions take the rows table (or a `summarize` table where noted) and an optional
axes, so notebooks reuse them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # headless everywhere but in a notebook (inline backend)
    matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from quasar_bench.rowfiles import read_csv_table  # noqa: E402
from quasar_bench.store import ResultStore  # noqa: E402
from quasar_bench.summary import (STALL_SHARE, first_loss, loss_and_ties, ratio_ranges, reference_verifier,  # noqa: E402
                                  summarize)


class MissingInput(Exception):
    """The inputs a figure needs are not in the result tables."""


# -- loading -----------------------------------------------------------------------------------
def experiment_dirs(results) -> list[Path]:
    return sorted(p for p in Path(results).iterdir() if p.is_dir() and any(p.glob("rows*.parquet")))


def load_results(results) -> dict[str, pd.DataFrame]:
    """{experiment directory name: rows table} for every result set under `results`: the
    store's rows-*.parquet files, or only an exported rows.parquet when that is all there is."""
    out = {}
    for d in experiment_dirs(results):
        out[d.name] = (ResultStore(d).load() if any(d.glob("rows-*.parquet"))
                       else pd.read_parquet(d / "rows.parquet"))
    return out


def load_kernels(results) -> pd.DataFrame | None:
    """Single-GEMM benchmark rows: results/gpu/kernels*.csv (cuBLAS, Triton, torch's kernels) plus
    the CUDA kernel's own rows from results/gpu/w4a16_cuda.csv (its baselines are already in the first)."""
    gpu = Path(results) / "gpu"
    frames = [read_csv_table(f) for f in sorted(gpu.glob("kernels*.csv"))]
    cuda = gpu / "w4a16_cuda.csv"
    if cuda.exists():
        c = read_csv_table(cuda)
        frames.append(c[c["kernel"] == "w4a16_cuda"])
    return pd.concat(frames, ignore_index=True) if frames else None


# -- helpers -----------------------------------------------------------------------------------
def _summary(df):
    """The summary table, with `dlabel`: the drafter, plus k / temperature where they vary."""
    s = (df if "n_prompts" in df.columns else summarize(df)).copy()
    # the summary lists verifiers in its order (reference first, then by weight bytes) on its
    # first rows, the baseline drafter's: keep that order for every axis
    s["_vrank"] = s["verifier"].map({v: i for i, v in enumerate(dict.fromkeys(s["verifier"]))})
    s["dlabel"] = s["drafter"].astype(str)
    spec = s[~s["baseline"]]
    for col, tag in (("k", "k="), ("temperature", "T=")):
        if col in s and spec.groupby("drafter")[col].nunique().gt(1).any():
            s["dlabel"] += np.where(~s["baseline"], " " + tag + s[col].astype(str), "")
    return s


def _vorder(s):
    """The verifiers of summary rows `s`, in the summary's order (see _summary)."""
    return list(s.sort_values("_vrank")["verifier"].drop_duplicates())


_COLORS: dict[str, int] = {}


def _vcolor(v):
    """One colour per verifier name, stable within a process (every figure agrees): tab10's ten, then
    their light shades (tab20's odd entries), so up to 20 names never share a colour."""
    i = _COLORS.setdefault(v, len(_COLORS)) % 20
    return plt.get_cmap("tab20")(2 * (i % 10) + i // 10)


def _ax(ax, size=(7, 4.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=size, layout="constrained")
    return ax


def _err(s, m):
    lo, hi = s[m + "_lo"].to_numpy(float), s[m + "_hi"].to_numpy(float)
    v = s[m].to_numpy(float)
    e = np.vstack([v - lo, hi - v])
    return np.where(np.isfinite(e), np.clip(e, 0, None), 0)


def run_caption(df) -> str:
    """What a per-experiment figure was measured on: `model · device · n prompts, ≤ T new tokens
    per turn`, from the rows table (a summary table holds no device or token counts: it says so)."""
    models = ", ".join(map(str, sorted(df["model"].unique()))) if "model" in df else "model not recorded"
    if "prompt_id" in df:  # rows: prompts counted per dataset (ids repeat across datasets)
        keys = ["dataset", "prompt_id"] if "dataset" in df else ["prompt_id"]
        n = len(df[keys].drop_duplicates())
        device = ", ".join(map(str, sorted(df["device"].dropna().unique()))) if "device" in df else "device not recorded"
        tokens = f"≤ {int(df['new_tokens'].max())} new tokens per turn" if "new_tokens" in df else ""
    else:  # a summary table
        n = int(df.loc[df["category"] == "all", "n_prompts"].max()) if "n_prompts" in df else 0
        device, tokens = "device and tokens not in a summary table", ""
    return " · ".join(x for x in (models, device, f"{n} prompts" + (f", {tokens}" if tokens else "")) if x)


def _caption(ax, caption: str) -> None:
    """The figure's title, then what it was measured on (wrapped to the axes' width)."""
    import textwrap

    ax.set_title(ax.get_title() + "\n" + "\n".join(textwrap.wrap(caption, 90)), fontsize=9)


# -- figures -----------------------------------------------------------------------------------
def plot_speedup_by_category(df, ax=None, caption=None):
    """Grouped bars: speedup over AR at the reference precision, per task category, one bar
    per (drafter, verifier); error bars are 95% bootstrap CIs over prompts."""
    s = _summary(df)
    s = s[s["speedup_vs_ref_ar"].notna()]
    s = s[~(s["baseline"] & s["reference_verifier"])]
    if s.empty:
        raise MissingInput("no AR run at the reference precision to compare against")
    cats = [c for c in s["category"].unique() if c != "all"] + ["all"]
    combos = s[["model", "dlabel", "verifier"]].drop_duplicates()
    combos = combos.assign(_v=combos["verifier"].map(_vorder(s).index))
    combos = combos.sort_values(["model", "dlabel", "_v"])
    multi_model = s["model"].nunique() > 1
    ax = _ax(ax, (max(7, 1.1 * len(cats) * max(1, len(combos)) ** 0.5), 4.5))
    width = 0.8 / len(combos)
    hatches = dict(zip(sorted(s["dlabel"].unique()), ["", "//", "..", "xx", "\\\\", "oo", "++"] * 3))
    for j, (_, c) in enumerate(combos.iterrows()):
        sub = s[(s["model"] == c.model) & (s["dlabel"] == c.dlabel) & (s["verifier"] == c.verifier)]
        sub = sub.set_index("category").reindex(cats)
        x = np.arange(len(cats)) - 0.4 + width * (j + 0.5)
        label = f"{c.dlabel} · {c.verifier}" + (f" ({c.model})" if multi_model else "")
        ax.bar(x, sub["speedup_vs_ref_ar"], width, yerr=_err(sub.reset_index(), "speedup_vs_ref_ar"),
               color=_vcolor(c.verifier), hatch=hatches[c.dlabel], edgecolor="black",
               linewidth=0.4, capsize=2, label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cats)), cats, rotation=20)
    ax.set_xlabel("task category")
    ref = reference_verifier(_summary(df)) or "reference"
    ax.set_ylabel(f"speedup over AR {ref} (× tokens/s)")
    ax.set_title("Speedup by task category")
    _caption(ax, caption or run_caption(df))
    ax.legend(fontsize=7, title="drafter · verifier", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return ax


def plot_tau_vs_precision(df, ax=None, caption=None):
    """τ (generated tokens per verify step, all categories) against verifier precision."""
    s = _summary(df)
    s = s[(s["category"] == "all") & ~s["baseline"]]
    if s.empty:
        raise MissingInput("no speculative (non-AR) runs")
    order = _vorder(s)
    ax = _ax(ax)
    for (model, d), g in s.groupby(["model", "dlabel"]):
        # every precision of the axis, NaN where this drafter did not run: the line breaks there
        # instead of joining two precisions across one that was not measured
        g = g.set_index("verifier").reindex(order)
        label = d if s["model"].nunique() == 1 else f"{d} ({model})"
        ax.errorbar(range(len(order)), g["tau"], yerr=_err(g, "tau"), marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("verifier precision")
    ax.set_ylabel("τ (tokens / verify step)")
    ax.set_title("Acceptance length vs verifier precision")
    _caption(ax, caption or run_caption(df))
    ax.legend(title="drafter", fontsize=8)
    return ax


def plot_kl_distribution(df, ax=None, caption=None):
    """Box plot of per-prompt mean logit KL(p_ref ‖ p_ver) per verifier precision."""
    if "kl_mean" not in df or df["kl_mean"].notna().sum() == 0:
        raise MissingInput("no fidelity columns (kl_mean)")
    d = df[df["kl_mean"].notna()]
    # KL depends on the verifier only: one value per (model, verifier, prompt)
    pp = d.groupby(["model", "verifier", "category", "prompt_id"])["kl_mean"].mean().reset_index()
    order = [v for v in _vorder(_summary(df)) if v in set(pp["verifier"])]
    ax = _ax(ax)
    data = [pp.loc[pp["verifier"] == v, "kl_mean"].to_numpy(float) for v in order]
    box = ax.boxplot(data, patch_artist=True, showfliers=True)
    ax.set_xticks(range(1, len(order) + 1), order)
    for patch, v in zip(box["boxes"], order):
        patch.set_facecolor(_vcolor(v))
        patch.set_alpha(0.7)
    pos = pp["kl_mean"][pp["kl_mean"] > 0]
    if len(pos) and pos.max() / pos.min() > 100:
        ax.set_yscale("symlog", linthresh=float(pos.min()))
    ax.set_xlabel("verifier precision")
    ax.set_ylabel("per-prompt mean KL(p_ref ‖ p_ver) (nats)")
    ax.set_title("Logit KL per verifier precision")
    _caption(ax, caption or run_caption(df))
    return ax


def plot_pareto(df, ax=None, fidelity=None, caption=None):
    """Speed–fidelity plane: tokens/s against mean KL (or top-1 agreement), all categories;
    the Pareto front (faster and more faithful) is drawn as a step line."""
    s = _summary(df)
    s = s[s["category"] == "all"]
    fidelity = fidelity or next((m for m in ("kl_mean", "top1_agree") if s[m].notna().any()), None)
    if fidelity is None or s[fidelity].notna().sum() == 0:
        raise MissingInput("no fidelity columns (kl_mean / top1_agree)")
    s = s[s[fidelity].notna() & s["tokens_per_s"].notna()]
    ax = _ax(ax)
    markers = dict(zip(sorted(s["dlabel"].unique()), "osD^vP*X<>" * 3))
    for _, r in s.iterrows():
        ax.errorbar(r.tokens_per_s, r[fidelity], xerr=_err(s.loc[[r.name]], "tokens_per_s"),
                    marker=markers[r.dlabel], color=_vcolor(r.verifier), ms=7, capsize=2, ls="none")
    lower_better = fidelity == "kl_mean"
    pts = s.sort_values("tokens_per_s", ascending=False)[["tokens_per_s", fidelity]].to_numpy(float)
    front, best = [], np.inf if lower_better else -np.inf
    for x, y in pts:
        if (y < best) if lower_better else (y > best):
            front.append((x, y))
            best = y
    if len(front) > 1:
        fx, fy = zip(*sorted(front))
        ax.step(fx, fy, where="post", color="gray", lw=1, ls="--", label="Pareto front")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker=m, ls="none", color="black", label=d) for d, m in markers.items()]
    handles += [Line2D([], [], marker="s", ls="none", color=_vcolor(v), label=v)
                for v in _vorder(s)]
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_xlabel("throughput (tokens/s)")
    if lower_better:
        ax.set_ylabel("mean KL(p_ref ‖ p_ver) (nats, lower is better)")
        if (s[fidelity] > 0).any():
            ax.set_yscale("symlog", linthresh=float(s.loc[s[fidelity] > 0, fidelity].min()))
    else:
        ax.set_ylabel("top-1 agreement with reference (share of positions)")
    ax.set_title("Speed vs fidelity")
    _caption(ax, caption or run_caption(df))
    return ax


def plot_acceptance_curves(df, ax=None, caption=None):
    """Mean per-position acceptance p_i per drafter, at the reference verifier when it ran."""
    s = _summary(df)
    s = s[(s["category"] == "all") & ~s["baseline"]]
    s = s[s["accept_curve"].map(lambda c: isinstance(c, (list, np.ndarray)) and len(c) > 0)]
    if s.empty:
        raise MissingInput("no per-position acceptance (accepted_per_position)")
    ref = reference_verifier(s)
    ax = _ax(ax)
    for (model, d), g in s.groupby(["model", "dlabel"]):
        r = g[g["verifier"] == ref].iloc[0] if ref in set(g["verifier"]) else g.iloc[0]
        curve = np.asarray(r.accept_curve, float)
        label = f"{d} ({r.verifier})" + (f" {model}" if s["model"].nunique() > 1 else "")
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=label)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("draft position i")
    ax.set_ylabel("p_i = P(draft i accepted | 1..i−1 accepted)")
    ax.set_title("Per-position acceptance")
    _caption(ax, caption or run_caption(df))
    ax.legend(title="drafter (verifier)", fontsize=8)
    return ax


def plot_roofline(kernels: pd.DataFrame | None, ax=None, shape=None):
    """Achieved GB/s against M (rows of the activation) per kernel, for one weight shape
    (or every shape, labelled) from results/gpu/kernels*.csv; device copy bandwidth dashed."""
    need = {"kernel", "shape", "M", "gbps"}
    if kernels is None or kernels.empty or not need <= set(kernels.columns):
        raise MissingInput("no results/gpu/kernels*.csv with columns kernel, shape, M, gbps")
    k = kernels if shape is None else kernels[kernels["shape"] == shape]
    ax = _ax(ax)
    for (kern, shp), g in k.groupby(["kernel", "shape"]):
        g = g.groupby("M", as_index=False)["gbps"].median().sort_values("M")
        ax.plot(g["M"], g["gbps"], marker="o", label=kern if shape else f"{kern} · {shp}")
    if "copy_gbps" in k and k["copy_gbps"].notna().any():
        ax.axhline(float(k["copy_gbps"].max()), color="black", ls="--", lw=1,
                   label="device copy bandwidth")
    ax.set_xscale("log", base=2)
    ms = sorted(k["M"].unique())
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("M (tokens per matmul)")
    ax.set_ylabel("achieved bandwidth (GB/s)")
    ax.set_title(f"Kernel bandwidth vs M{f' — {shape}' if shape else ''}", fontsize=10)
    ax.legend(fontsize=7)
    return ax


def roofline_figure(kernels):
    """One panel per weight shape."""
    if kernels is None or "shape" not in kernels:
        plot_roofline(kernels)  # raises MissingInput
    shapes = list(dict.fromkeys(kernels["shape"]))
    cols = min(3, len(shapes))
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False,
                             layout="constrained")
    for ax, shp in zip(axes.flat, shapes):
        plot_roofline(kernels, ax=ax, shape=shp)
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    device = ", ".join(sorted(kernels["gpu_name"].dropna().unique())) if "gpu_name" in kernels else ""
    fig.suptitle(f"Kernel roofline: achieved GB/s per weight shape, Qwen3-8B linear shapes, {device or 'GPU not recorded'}\n"
                 "single GEMMs of M activation rows (tokens), no prompts", fontsize=10)
    return fig


def plot_gpu_speedup_by_drafter(e2e: pd.DataFrame | None, ax=None):
    """End-to-end tokens/s of each verifier over the bf16 reference with the same drafter (paired:
    identical acceptance sequences), one group of bars per drafter, from results/gpu/e2e.csv."""
    need = {"verifier", "drafter", "speedup_vs_ref_same_drafter"}
    if e2e is None or e2e.empty or not need <= set(e2e.columns):
        raise MissingInput("no results/gpu/e2e.csv (python experiments/gpu_speed.py)")
    t = e2e.pivot_table(index="drafter", columns="verifier", values="speedup_vs_ref_same_drafter", sort=False)
    baseline = e2e.groupby("drafter")["baseline"].first() if "baseline" in e2e else pd.Series(dtype=bool)
    t = t.dropna(thresh=2)  # drafters with something to compare; the baseline (AR) first
    t = t.sort_index(key=lambda d: d.map(lambda x: (not bool(baseline.get(x, False)), x)))
    ax = _ax(ax, (8, 4.5))
    t.plot.bar(ax=ax, rot=15, width=0.8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("tokens/s ÷ bf16 verifier, same drafter")
    ax.set_title("Verifier precision speedup per drafter")
    _caption(ax, f"Qwen3-8B shapes (random weights) · {_gpu_and_size(e2e)}")
    ax.legend(title="verifier", fontsize=8)
    return ax


def _gpu_and_size(table: pd.DataFrame) -> str:
    """A GPU table's caption tail: the board, and the prompts and new tokens per cell where it says."""
    gpu = table["gpu"].iloc[0] if "gpu" in table else "GPU"
    size = (f" · {int(table['n_prompts'].max())} prompts, {int(table['new_tokens'].max())} new tokens per cell"
            if {"n_prompts", "new_tokens"} <= set(table.columns) else " · prompts and tokens not in the table")
    return gpu + size


def plot_gpu_replay(replay: pd.DataFrame | None, ax=None):
    """Real acceptance at Qwen3-8B speed (results/gpu/replay.csv): tokens/s over the bf16 verifier's
    AR, one group of bars per drafter, each bar labelled with the tau its verifier reached on the
    source model; drafters that ran for only some verifiers show only those bars."""
    need = {"verifier", "drafter", "speedup_vs_ref_ar", "tau_source"}
    if replay is None or replay.empty or not need <= set(replay.columns):
        raise MissingInput("no results/gpu/replay.csv (python experiments/gpu_speed.py --experiment gpu_replay "
                           "--source results/default)")
    t = replay.pivot_table(index="drafter", columns="verifier", values="speedup_vs_ref_ar", sort=False)
    tau = replay.pivot_table(index="drafter", columns="verifier", values="tau_source", sort=False)
    order = ["reference", "int8", "w8a8", "int4", "int4_gptq", "pruned"]  # by bytes per weight, the lossy one last
    baseline = replay.groupby("drafter")["baseline"].first() if "baseline" in replay else pd.Series(dtype=bool)
    t = t.loc[sorted(t.index, key=lambda d: not bool(baseline.get(d, False)))]  # the baseline (AR) first
    tau = tau.loc[t.index]
    t = t[sorted(t.columns, key=lambda v: (order.index(v) if v in order else len(order), v))]
    ax = _ax(ax, (9, 4.8))
    t.plot.bar(ax=ax, rot=15, width=0.8, color=[_vcolor(v) for v in t.columns])
    for container, verifier in zip(ax.containers, t.columns):
        labels = [f"{tau.at[d, verifier]:.2f}" if pd.notna(tau.at[d, verifier]) else "" for d in t.index]
        ax.bar_label(container, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("tokens/s ÷ bf16 AR (bar labels: τ on the source model)")
    ax.set_title("Real τ at Qwen3-8B step times")
    _caption(ax, f"τ of SmolLM2-135M (CPU) · Qwen3-8B shapes · {_gpu_and_size(replay)}")
    ax.legend(title="verifier", fontsize=8)
    return ax


def load_batch_tables(gpu_dir: Path) -> pd.DataFrame | None:
    """batch.csv (the table gpu_speed.py builds from rows), joined with per-cell tables of other GPU
    calls, `batch_<name>.csv` (one row per verifier x drafter x B with at least throughput and
    speedup_vs_ar: e.g. cells read off a run log when its rows did not come back). A cell (verifier,
    drafter, batch size) already in batch.csv is never replaced by another table's."""
    main = gpu_dir / "batch.csv"
    if not main.exists():
        return None
    batch = read_csv_table(main)
    need = {"verifier", "drafter", "batch_size", "throughput", "speedup_vs_ar"}
    for extra in sorted(gpu_dir.glob("batch_*.csv")):
        # row files, the real-acceptance tables and packed tables (figures of their own)
        if "_rows" in extra.stem or extra.stem.startswith("batch_replay") or extra.stem.endswith("_packed"):
            continue
        t = read_csv_table(extra)
        if not need <= set(t.columns):
            continue
        have = set(zip(batch["verifier"], batch["drafter"], batch["batch_size"]))
        t = t[[c not in have for c in zip(t["verifier"], t["drafter"], t["batch_size"])]]
        if "baseline" not in t:  # the baseline drafters are the ones batch.csv marks so
            t = t.assign(baseline=t["drafter"].isin(set(batch.loc[batch["baseline"].astype(bool), "drafter"])))
        batch = pd.concat([batch, t[[c for c in t.columns if c in batch.columns]]], ignore_index=True)
    return batch


def _panels(n: int, width: float, height: float):
    """A figure of n panels, 3 per row, shared axes; the unused ones hidden, and the panel above each
    hidden one keeps its x tick labels (shared axes label only the bottom row)."""
    cols = min(3, n)
    rows_n = -(-n // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(width * cols, height * rows_n), layout="constrained",
                             sharex=True, sharey=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            axes.flat[i - cols].xaxis.set_tick_params(labelbottom=True)
    return fig, axes


def _bottom_panels(axes) -> list:
    """The lowest visible panel of each column (where the x label goes)."""
    return [next(ax for ax in reversed(axes[:, c]) if ax.get_visible()) for c in range(axes.shape[1])]


def _log2_ticks(ax, values) -> None:
    """A base-2 log x axis labelled at exactly these values (batch sizes, row counts)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(values))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(int(v)) for v in values]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


REAL_ACCEPTANCE = "real acceptance: each sequence replays SmolLM2-135M's (CPU) acceptance trace"


def batch_acceptance(stem: str) -> str:
    """What a batch table's figure title says of its acceptance, from the table's file name as
    gpu_speed.py writes it: `batch_replay*` replays real traces, `*_packed` ran packed forwards."""
    acceptance = REAL_ACCEPTANCE if stem.startswith("batch_replay") else "synthetic forced acceptance"
    return acceptance + (", packed forwards" if stem.endswith("_packed") else "")


def plot_gpu_batch(batch: pd.DataFrame | None, acceptance: str = "synthetic forced acceptance",
                   missing: str = "no results/gpu/batch.csv (python experiments/gpu_speed.py --experiment gpu_batch)"):
    """Batch throughput vs batch size per verifier precision, one panel per drafter, from
    results/gpu/batch.csv (experiments/gpu_speed.py --experiment gpu_batch), or with real acceptance
    from batch_replay.csv (--experiment gpu_batch_replay; `acceptance` names it in the title). Crossovers are marked
    where they fall inside the batch sizes run: a cross on a verifier's line at the first B where it
    falls below the bf16 reference with the same drafter, and a dotted vertical line at the first B
    where the drafter falls below AR on the reference verifier. Lines join only measured points."""
    need = {"verifier", "drafter", "batch_size", "throughput", "speedup_vs_ar", "baseline"}
    if batch is None or batch.empty or not need <= set(batch.columns):
        raise MissingInput(missing)
    drafters = list(dict.fromkeys(batch.sort_values("baseline", ascending=False, kind="stable")["drafter"]))
    order = ["reference", "int8", "w8a8", "int4", "int4_gptq", "pruned"]  # by bytes per weight
    verifiers = sorted(batch["verifier"].unique(), key=lambda v: (order.index(v) if v in order else len(order), v))
    # the tie margin the table's crossovers were judged with (gpu_speed.py --tie-margin; absent: 0)
    margin = float(batch["tie_margin"].dropna().iloc[0]) if "tie_margin" in batch and batch["tie_margin"].notna().any() else 0.0
    fig, axes = _panels(len(drafters), 4.2, 3.4)
    stalled = 0  # cells whose decode time was mostly a stall (red rings)
    ties = 0  # cells whose repeats fall on both sides of bf16 (hollow diamonds)
    for ax, drafter in zip(axes.flat, drafters):
        d = batch[batch["drafter"] == drafter]
        ref = d[d["verifier"] == "reference"].set_index("batch_size")["throughput"]
        for v in verifiers:
            g = d[d["verifier"] == v].sort_values("batch_size")
            if g.empty:
                continue
            name = "bf16" if v == "reference" else v
            kernel = g["kernel"].iloc[0] if "kernel" in g and pd.notna(g["kernel"].iloc[0]) else ""
            ax.plot(g["batch_size"], g["throughput"], marker="o", ms=3, color=_vcolor(v),
                    label=f"{name} ({kernel})" if kernel else name)
            if "other_share" in g:
                bad = g[g["other_share"] > STALL_SHARE]
                stalled += len(bad)
                ax.plot(bad["batch_size"], bad["throughput"], ls="none", marker="o", ms=11, mfc="none",
                        mec="red", mew=1.2)
            if v != "reference" and len(ref):
                ratios = _repeat_ratios(g, "speedup_vs_ref_same_drafter", g["throughput"] / g["batch_size"].map(ref))
                lost, tied = loss_and_ties(list(g["batch_size"]), ratios, margin)
                y = g.set_index("batch_size")["throughput"]
                if lost is not None:
                    ax.plot([lost], [y[lost]], marker="X", ms=10, color=_vcolor(v), mec="black", mew=0.6)
                ties += len(tied)
                if tied:
                    ax.plot(tied, list(y[tied]), ls="none", marker="D", ms=8, mfc="none", mec=_vcolor(v), mew=1.2)
        spec = d[d["verifier"] == "reference"]
        if len(spec) and not spec["baseline"].iloc[0]:
            lost = first_loss(spec["batch_size"], _repeat_ratios(spec, "speedup_vs_ar", spec["speedup_vs_ar"]), margin)
            if lost is not None:
                ax.axvline(lost, color="grey", ls=":", lw=1)
                ax.annotate(f"< AR from B={lost}", (lost, 0.02), xycoords=("data", "axes fraction"),
                            fontsize=7, color="grey", rotation=90, ha="right", va="bottom")
        ax.set_title(drafter, fontsize=9)
        _log2_ticks(ax, sorted(batch["batch_size"].unique()))
        ax.set_yscale("log")
        ax.grid(True, which="major", lw=0.3)
    for ax in _bottom_panels(axes):
        ax.set_xlabel("batch size B")
    for ax in axes[:, 0]:
        ax.set_ylabel("batch tokens/s")
    spare = [a for a in axes.flat if not a.get_visible()]
    if spare:  # the legend in an unused panel, off the lines
        handles, labels = axes.flat[0].get_legend_handles_labels()
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, title="verifier", fontsize=7, title_fontsize=7, loc="center")
    else:
        axes.flat[0].legend(title="verifier", fontsize=7, title_fontsize=7)
    gpu = batch["gpu"].iloc[0] if "gpu" in batch else "GPU"
    size = ""  # a table rebuilt from rows files may not know the run's max_new_tokens: say only what it knows
    if "n_prompts" in batch and batch["n_prompts"].notna().any():
        size = f", {int(batch['n_prompts'].max())} prompts"
        if "max_new_tokens" in batch and batch["max_new_tokens"].notna().any():
            size += f" × {int(batch['max_new_tokens'].max())} new tokens"
    rings = (f"; red ring: a stall took > {STALL_SHARE:.0%} of the cell's decode time (re-run it)"
             if stalled else "")
    reps = batch["n_repeats"].dropna() if "n_repeats" in batch else pd.Series(dtype=float)
    every = (" (one timing per cell)" if reps.empty or reps.max() < 2 else " in every repeat" if reps.min() >= 2
             else " in every repeat (some cells timed once)")
    diamonds = ("" if not ties else "; ◇: repeats on both sides of bf16 (a tie)" if not margin
                else f"; ◇: a tie with bf16 (within {margin:g} of it, or repeats on both sides)")
    fig.suptitle(f"Throughput vs batch size, Qwen3-8B shapes (random weights), {gpu}{size},\n{acceptance}\n"
                 f"X: first B where the verifier falls below bf16 with the same drafter{every}{diamonds}{rings}",
                 fontsize=9)
    return fig


def _repeat_ratios(g: pd.DataFrame, metric: str, pooled) -> list[list[float]]:
    """Per row of a batch table: [lo, hi] of `metric`'s per-repeat ratios where the table has them
    (gpu_speed.py: cells timed more than once), else the pooled ratio alone (`verdict` reads both)."""
    missing = np.full(len(g), np.nan)
    return ratio_ranges(pooled, g[metric + "_lo"] if metric + "_lo" in g else missing,
                        g[metric + "_hi"] if metric + "_hi" in g else missing)


def plot_kernel_backends_vs_m(table: pd.DataFrame | None):
    """Speedup over cuBLAS bf16 vs rows M, one line per int4 kernel backend, one panel per shape, from
    one machine's bench_w4a16_cuda table (e.g. results/gpu/w4a16_backends_large_m_h200.csv): where
    each backend wins as the verify GEMM grows. The 1x line is cuBLAS; points only where measured."""
    need = {"kernel", "shape", "M", "speedup_vs_bf16"}
    if table is None or table.empty or not need <= set(table.columns):
        raise MissingInput("no int4 backend table (python -m quasar_kernels.bench_w4a16_cuda --ms 16,32,64,128,192)")
    t = table[table["kernel"] != "bf16_cublas"].copy()
    t["speedup_vs_bf16"] = pd.to_numeric(t["speedup_vs_bf16"], errors="coerce")
    t = t.dropna(subset=["speedup_vs_bf16"])
    shapes = list(dict.fromkeys(t["shape"]))
    ms = sorted(t["M"].unique())  # one set of ticks for the shared axis, even where a shape has fewer M
    fig, axes = _panels(len(shapes), 4.0, 3.2)
    for ax, shape in zip(axes.flat, shapes):
        d = t[t["shape"] == shape]
        for kernel, g in d.groupby("kernel", sort=False):
            g = g.sort_values("M")
            ax.plot(g["M"], g["speedup_vs_bf16"], marker="o", ms=3, label=kernel)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        n, k = int(d["N"].iloc[0]), int(d["K"].iloc[0])
        ax.set_title(f"{shape} ({n}×{k})", fontsize=9)
        _log2_ticks(ax, ms)
        ax.grid(True, lw=0.3)
    for ax in _bottom_panels(axes):
        ax.set_xlabel("rows M = B (k + 1)")
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over cuBLAS bf16")
    axes.flat[0].legend(fontsize=7)
    gpu = table["gpu_name"].iloc[0] if "gpu_name" in table else "GPU"
    fig.suptitle(f"int4 (W4A16, group 128) GEMM backends vs rows, Qwen3-8B shapes, {gpu}; "
                 "single GEMMs, weights from HBM, no prompts", fontsize=9)
    return fig


def load_step_speed(results) -> pd.DataFrame | None:
    """results/gpu/step_speed*.csv (experiments/step_speed.py), one row per engine and measure."""
    frames = [read_csv_table(f).assign(table=f.stem) for f in sorted((Path(results) / "gpu").glob("step_speed*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else None


def plot_step_speed_by_backend(steps: pd.DataFrame | None, ax=None):
    """Verify-step time (T = k + 1) per precision x kernel backend x engine switches, newest table
    per configuration, with the bf16 reference of the same engine for scale."""
    need = {"precision", "kernel", "measure", "ms"}
    if steps is None or steps.empty or not need <= set(steps.columns):
        raise MissingInput("no results/gpu/step_speed*.csv (python experiments/step_speed.py)")
    v = steps[steps["measure"].str.fullmatch(r"step_T\d+") & (steps["measure"] != "step_T1")].copy()
    flags = [c for c in ("fused", "compiled", "attention") if c in v]
    v["engine"] = v[flags].fillna(False).astype(bool).apply(
        lambda r: "+".join(c for c in flags if r[c]) or "eager", axis=1) if flags else "eager"
    v["config"] = v["precision"] + " · " + v["kernel"].fillna("-") + " · " + v["engine"]
    v = v.drop_duplicates("config", keep="last").sort_values("ms")
    ax = _ax(ax, (8, 0.35 * len(v) + 1.5))
    colors = [_vcolor("reference" if p == "reference" else p) for p in v["precision"]]
    ax.barh(v["config"].str.replace("reference", "bf16"), v["ms"], color=colors)
    for y, ms in enumerate(v["ms"]):
        ax.annotate(f"{ms:.2f}", (ms, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")  # torch's int8 kernel is 20x slower than the rest
    ax.set_xlabel(f"verify step ms ({v['measure'].iloc[0].removeprefix('step_')}, log scale)")
    gpu = v["gpu"].iloc[0] if "gpu" in v else "GPU"
    tokens = v["measure"].iloc[0].removeprefix("step_T")
    ax.set_title("Verify step per precision · kernel backend · engine")
    _caption(ax, f"Qwen3-8B shapes (random weights) · {gpu} · one step of {tokens} tokens, no prompts "
                 "(a CUDA-graph replay timed alone)")
    return ax


PER_EXPERIMENT = {
    "speedup_by_category": plot_speedup_by_category,
    "tau_vs_precision": plot_tau_vs_precision,
    "kl_distribution": plot_kl_distribution,
    "speed_fidelity_pareto": plot_pareto,
    "acceptance_curves": plot_acceptance_curves,
}


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def _draw(name, make, stem, written, problems):
    try:
        out = make()
        fig = out.figure if hasattr(out, "figure") and not isinstance(out, plt.Figure) else out
        written += _save(fig, stem)
    except MissingInput as e:
        print(f"skipped {name}: {e}")
    except Exception as e:  # one broken figure must not stop the others
        problems.append(name)
        print(f"FAILED {name}: {type(e).__name__}: {e}")
    finally:
        plt.close("all")


def make_figures(results="results", out="results/figures") -> tuple[list[Path], list[str]]:
    """Draw every figure; returns (files written, names of figures that failed)."""
    results, out = Path(results), Path(out)
    written, problems = [], []
    if not results.is_dir():
        print(f"skipped all figures: no results directory {results}")
        return written, problems
    for exp, df in load_results(results).items():
        s = summarize(df) if len(df) else df
        caption = run_caption(df)  # the rows know the device and tokens; the summary does not
        for name, fn in PER_EXPERIMENT.items():
            data = df if name == "kl_distribution" else s
            _draw(f"{exp}/{name}", lambda: fn(data, caption=caption), out / exp / name, written, problems)
    _draw("kernel_roofline", lambda: roofline_figure(load_kernels(results)),
          out / "kernel_roofline", written, problems)
    # the CUDA kernel's benchmarks on other machines (w4a16_cuda_<machine>.csv: all its kernels and
    # baselines measured side by side there), one roofline each: never mixed with another GPU's
    for table in sorted((Path(results) / "gpu").glob("w4a16_cuda_*.csv")):
        if table.stem.endswith(("_sweep", "_log")):
            continue
        name = "kernel_roofline_" + table.stem.removeprefix("w4a16_cuda_")
        _draw(name, lambda t=table: roofline_figure(read_csv_table(t)), out / name, written, problems)
    e2e = Path(results) / "gpu" / "e2e.csv"
    _draw("gpu_speedup_by_drafter", lambda: plot_gpu_speedup_by_drafter(read_csv_table(e2e) if e2e.exists() else None),
          out / "gpu_speedup_by_drafter", written, problems)
    # one figure per replay table (replay.csv, replay_<machine>.csv: the same source re-measured)
    for replay in sorted((Path(results) / "gpu").glob("replay*.csv")) or [Path(results) / "gpu" / "replay.csv"]:
        if "_rows" in replay.stem:
            continue
        name = "gpu_" + replay.stem
        _draw(name, lambda r=replay: plot_gpu_replay(read_csv_table(r) if r.exists() else None), out / name,
              written, problems)
    _draw("gpu_batch", lambda: plot_gpu_batch(load_batch_tables(Path(results) / "gpu")),
          out / "gpu_batch", written, problems)
    # a whole grid measured apart (another machine, today's kernels), kept in its own folder with its
    # calls' raw outputs: drawn on its own, never joined with batch.csv
    for table in sorted((Path(results) / "gpu").glob("batch_*/batch*.csv")):
        if "_rows" in table.stem:
            continue
        name = "gpu_" + table.parent.name + ("_packed" if table.stem.endswith("_packed") else "")
        _draw(name, lambda t=table: plot_gpu_batch(read_csv_table(t), acceptance=batch_acceptance(t.stem)), out / name,
              written, problems)
    real = Path(results) / "gpu" / "batch_replay.csv"
    _draw("gpu_batch_replay", lambda: plot_gpu_batch(
        read_csv_table(real) if real.exists() else None, acceptance=REAL_ACCEPTANCE,
        missing="no results/gpu/batch_replay.csv (python experiments/gpu_speed.py --experiment gpu_batch_replay "
                "--source results/batch_replay_source)"), out / "gpu_batch_replay", written, problems)
    # packed forwards (gpu_speed.py --packed): drawn where measured, beside the unpacked figure
    for packed in sorted((Path(results) / "gpu").glob("batch*_packed.csv")):
        name = "gpu_" + packed.stem
        _draw(name, lambda t=packed: plot_gpu_batch(read_csv_table(t), acceptance=batch_acceptance(t.stem)),
              out / name, written, problems)
    # int4 backends as M grows (w4a16_backends_<what>_<machine>.csv), one figure per table
    for table in sorted((Path(results) / "gpu").glob("w4a16_backends_*.csv")):
        name = "kernel_backends_" + table.stem.removeprefix("w4a16_backends_")
        _draw(name, lambda t=table: plot_kernel_backends_vs_m(read_csv_table(t)), out / name, written, problems)
    _draw("gpu_step_by_backend", lambda: plot_step_speed_by_backend(load_step_speed(results)),
          out / "gpu_step_by_backend", written, problems)
    return written, problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="results/figures")
    args = ap.parse_args(argv)
    written, problems = make_figures(args.results, args.out)
    for p in written:
        print(f"wrote {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
