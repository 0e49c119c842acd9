import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from quasar_bench import figures
from quasar_bench.store import ResultStore
from quasar_bench.summary import summarize

_spec = importlib.util.spec_from_file_location("qb_synth", Path(__file__).with_name("test_summary.py"))
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

EXP_FIGS = ["speedup_by_category", "tau_vs_precision", "kl_distribution",
            "speed_fidelity_pareto", "acceptance_curves"]


def write_results(root: Path, name: str, df: pd.DataFrame):
    st = ResultStore(root / name).open({"identity": {"experiment": name}})
    for _, g in df.groupby(["cell_id", "prompt_id"]):
        st.append(g.to_dict("records"))


def kernels(copy=True):
    rows = [dict(kernel=k, shape=s, M=m, gbps=b * f / (1 + m / 8 * (f - 1)))
            for k, f in [("cublas_bf16", 1.0), ("int4pack", 2.2)]
            for s, b in [("4096x4096", 1400), ("12288x4096", 2000)] for m in (1, 4, 16, 64)]
    df = pd.DataFrame(rows)
    return df.assign(copy_gbps=3017.0) if copy else df


def test_make_figures_draws_everything(tmp_path):
    res = tmp_path / "results"
    write_results(res, "default", synth.synthetic_rows(n_per_cat=3))
    (res / "gpu").mkdir()
    kernels().to_csv(res / "gpu" / "kernels_h100.csv", index=False)
    out = tmp_path / "figs"
    assert figures.main(["--results", str(res), "--out", str(out)]) == 0
    for stem in [out / "default" / f for f in EXP_FIGS] + [out / "kernel_roofline"]:
        assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stem.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert not list((out / "default").glob("figures*"))  # the output dir is not read as results


def test_gpu_tables_give_speedup_and_backend_figures(tmp_path):
    """results/gpu/e2e.csv -> bars whose heights are the table's speedups; step_speed*.csv -> one bar
    per (precision, backend, engine), the newest row winning; absent tables are skipped notes."""
    res = tmp_path / "results"
    (res / "gpu").mkdir(parents=True)
    e2e = pd.DataFrame([dict(verifier=v, drafter=d, speedup_vs_ref_same_drafter=x, gpu="H100")
                        for d, xs in (("ar", (1.0, 1.6)), ("synthetic_a0.8", (1.0, 1.5)))
                        for v, x in zip(("reference", "int4"), xs)])
    ax = figures.plot_gpu_speedup_by_drafter(e2e)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [1.0, 1.0, 1.5, 1.6]
    steps = pd.DataFrame([dict(precision=p, kernel=k, fused=True, compiled=True, attention=a, measure=m, ms=ms)
                          for p, k, a, ms in (("reference", "-", False, 7.3), ("int4", "cuda", True, 4.3),
                                              ("int4", "cuda", True, 4.1))
                          for m in ("step_T1", "step_T6")])
    ax = figures.plot_step_speed_by_backend(steps)
    assert sorted(round(p.get_width(), 2) for p in ax.patches) == [4.1, 7.3]  # newest int4 row, T6 only
    out = tmp_path / "figs"
    figures.make_figures(res, out)
    assert not (out / "gpu_speedup_by_drafter.png").exists()  # no tables yet: skipped
    e2e.to_csv(res / "gpu" / "e2e.csv", index=False)
    steps.to_csv(res / "gpu" / "step_speed.csv", index=False)
    written, problems = figures.make_figures(res, out)
    assert not problems
    assert (out / "gpu_speedup_by_drafter.png").exists() and (out / "gpu_step_by_backend.png").exists()


def test_gpu_replay_figure_bars_and_tau_labels(tmp_path):
    """results/gpu/replay.csv -> one bar per (drafter, verifier) that ran, height = speedup over
    bf16 AR, label = the source model's tau; a drafter run for one verifier gets one bar."""
    replay = pd.DataFrame([dict(verifier=v, drafter=d, speedup_vs_ref_ar=x, tau_source=t, gpu="H100")
                           for v, d, x, t in (("reference", "ar", 1.0, 1.0), ("int4", "ar", 1.6, 1.0),
                                              ("reference", "ngram", 1.3, 1.53), ("int4", "ngram", 2.1, 1.86),
                                              ("reference", "draft_model", 0.6, 2.97))])
    ax = figures.plot_gpu_replay(replay)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches if p.get_height() > 0)  # NaN: no bar
    assert heights == [0.6, 1.0, 1.3, 1.6, 2.1]
    labels = sorted(t.get_text() for t in ax.texts if t.get_text())
    assert labels == ["1.00", "1.00", "1.53", "1.86", "2.97"]
    res = tmp_path / "results"
    (res / "gpu").mkdir(parents=True)
    replay.to_csv(res / "gpu" / "replay.csv", index=False)
    written, problems = figures.make_figures(res, tmp_path / "figs")
    assert not problems and (tmp_path / "figs" / "gpu_replay.png").exists()


def test_missing_inputs_are_skipped_with_notes(tmp_path):
    res = tmp_path / "results"
    no_fid = synth.synthetic_rows(n_per_cat=2, categories=("qa",), fidelity=False)
    write_results(res, "nofid", no_fid)
    ar_only = synth.synthetic_rows(n_per_cat=2, categories=("qa",), drafters=("ar",))
    write_results(res, "aronly", ar_only)
    (res / "empty").mkdir()
    out = tmp_path / "figs"
    p = subprocess.run([sys.executable, "-m", "quasar_bench.figures", "--results", str(res),
                        "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 0, p.stderr
    notes = [l for l in p.stdout.splitlines() if l.startswith("skipped")]
    assert any("nofid/kl_distribution" in l and "kl_mean" in l for l in notes)
    assert any("nofid/speed_fidelity_pareto" in l for l in notes)
    assert any("aronly/tau_vs_precision" in l for l in notes)
    assert any("aronly/acceptance_curves" in l for l in notes)
    assert any("kernel_roofline" in l and "gpu" in l for l in notes)
    assert (out / "nofid" / "speedup_by_category.png").exists()
    assert (out / "aronly" / "speedup_by_category.png").exists()  # int8/int4 AR vs fp32 AR
    assert not (out / "nofid" / "kl_distribution.png").exists()
    assert not (out / "empty").exists()
    # a results dir that does not exist is a note, not a crash
    assert figures.main(["--results", str(tmp_path / "nope"), "--out", str(out)]) == 0


def test_speedup_bars_match_summary_and_are_labelled():
    s = summarize(synth.synthetic_rows(n_per_cat=2, categories=("qa", "rag")))
    ax = figures.plot_speedup_by_category(s)
    want = s[(s.drafter != "ar") | (s.verifier != "fp32")]
    heights = sorted(round(p.get_height(), 9) for p in ax.patches)
    assert heights == sorted(round(v, 9) for v in want.speedup_vs_ref_ar)
    assert "speedup" in ax.get_ylabel() and "tokens/s" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["qa", "rag", "all"]
    assert ax.get_legend() is not None and ax.get_title()
    plt.close("all")


def test_plot_functions_accept_rows_and_axes():
    df = synth.synthetic_rows(n_per_cat=2, categories=("qa",))
    fig, axes = plt.subplots(1, 4)
    assert figures.plot_tau_vs_precision(df, ax=axes[0]) is axes[0]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["fp32", "bf16", "int8", "int4"]
    figures.plot_kl_distribution(df, ax=axes[1])
    assert "KL" in axes[1].get_ylabel() and "nats" in axes[1].get_ylabel()
    figures.plot_pareto(df, ax=axes[2])
    assert "tokens/s" in axes[2].get_xlabel()
    figures.plot_acceptance_curves(df, ax=axes[3])
    ys = axes[3].get_lines()[0].get_ydata()
    assert len(ys) == 4 and np.all(np.diff(ys) < 0)  # synthetic p_i decays with position
    with pytest.raises(figures.MissingInput):
        figures.plot_kl_distribution(df.drop(columns="kl_mean"))
    plt.close("all")


@pytest.mark.parametrize("copy", [True, False])
def test_roofline_copy_line_only_when_measured(copy):
    ax = figures.plot_roofline(kernels(copy), shape="4096x4096")
    labels = ax.get_legend_handles_labels()[1]
    assert ("device copy bandwidth" in labels) == copy
    assert sorted(labels[:2]) == ["cublas_bf16", "int4pack"]
    assert "GB/s" in ax.get_ylabel() and "M" in ax.get_xlabel()
    with pytest.raises(figures.MissingInput):
        figures.plot_roofline(kernels().drop(columns="gbps"))
    plt.close("all")


def test_varying_k_gets_its_own_series_and_exported_rows_are_read(tmp_path):
    df = synth.synthetic_rows(n_per_cat=2, categories=("qa",), drafters=("ar", "ngram"),
                              verifiers=("fp32", "int4"))
    k8 = synth.synthetic_rows(n_per_cat=2, categories=("qa",), drafters=("ngram",),
                              verifiers=("fp32", "int4"), k=8, seed=5)
    both = pd.concat([df, k8.assign(cell_id=k8.cell_id + "_k8")], ignore_index=True)
    ax = figures.plot_tau_vs_precision(both)
    assert sorted(ax.get_legend_handles_labels()[1]) == ["ngram k=4", "ngram k=8"]
    ax = figures.plot_acceptance_curves(both)
    assert sorted(len(l.get_ydata()) for l in ax.get_lines()) == [4, 8]
    plt.close("all")
    # a result set holding only the engine's exported rows.parquet still loads
    (tmp_path / "exp").mkdir()
    both.to_parquet(tmp_path / "exp" / "rows.parquet")
    write_results(tmp_path, "store", df)
    both.to_parquet(tmp_path / "store" / "rows.parquet")  # export beside the store files
    got = figures.load_results(tmp_path)
    assert len(got["exp"]) == len(both) and len(got["store"]) == len(df)


def test_gpu_batch_figure_marks_crossovers_where_they_fall(tmp_path):
    """results/gpu/batch.csv -> one panel per drafter, one line per verifier through the measured
    batch sizes only; a cross at the first B where int4 falls below bf16 with the same drafter
    (here B = 8 for the drafter, never for AR), and a dotted line where the drafter falls below AR on
    bf16 (B = 16). The expected B are read off the hand-written throughputs, not recomputed."""
    tput = {  # (verifier, drafter) -> throughput at B = 1, 2, 4, 8, 16
        ("reference", "ar"): [150, 290, 560, 1100, 2100],
        ("int4", "ar"): [220, 420, 800, 1500, 2600],
        ("reference", "spec"): [400, 760, 1300, 1900, 2000],
        ("int4", "spec"): [520, 900, 1350, 1700, 1800],
    }
    rows = []
    for (v, d), ys in tput.items():
        for b, y in zip((1, 2, 4, 8, 16), ys):
            ar = tput[(v, "ar")][(1, 2, 4, 8, 16).index(b)]
            rows.append(dict(verifier=v, drafter=d, batch_size=b, throughput=y, speedup_vs_ar=y / ar,
                             baseline=d == "ar", gpu="H200", n_prompts=32, max_new_tokens=32))
    batch = pd.DataFrame(rows).query("not (verifier == 'int4' and drafter == 'ar' and batch_size == 4)")
    fig = figures.plot_gpu_batch(batch)
    ar_ax, spec_ax = [a for a in fig.axes if a.get_visible()]
    assert (ar_ax.get_title(), spec_ax.get_title()) == ("ar", "spec")
    crosses = lambda ax: [tuple(l.get_xydata()[0]) for l in ax.lines if l.get_marker() == "X"]
    assert crosses(ar_ax) == [] and crosses(spec_ax) == [(8.0, 1700.0)]
    int4_ar = next(l for l in ar_ax.lines if l.get_label() == "int4")
    assert list(int4_ar.get_xdata()) == [1, 2, 8, 16]  # B = 4 not run: no point invented there
    vlines = [l.get_xdata()[0] for l in spec_ax.lines if l.get_linestyle() == ":"]
    assert vlines == [16] and not [l for l in ar_ax.lines if l.get_linestyle() == ":"]
    assert "H200" in fig._suptitle.get_text() and "32 prompts" in fig._suptitle.get_text()
    # a table judged with a tie margin of 0.15 (gpu_speed.py --tie-margin, recorded per row): int4 with the drafter
    # at B = 4, 8, 16 (1.04x, 0.89x, 0.90x) and the drafter against AR (0.95x at B = 16) are within it: ties, no cross,
    # no dotted line
    banded = figures.plot_gpu_batch(batch.assign(tie_margin=0.15))
    spec_b = [a for a in banded.axes if a.get_visible()][1]
    diamonds = [tuple(xy) for l in spec_b.lines if l.get_marker() == "D" for xy in l.get_xydata()]
    assert crosses(spec_b) == [] and diamonds == [(4.0, 1350.0), (8.0, 1700.0), (16.0, 1800.0)]
    assert not [l for l in spec_b.lines if l.get_linestyle() == ":"] and "within 0.15 of it" in banded._suptitle.get_text()
    res = tmp_path / "results"
    (res / "gpu").mkdir(parents=True)
    batch.to_csv(res / "gpu" / "batch.csv", index=False)
    written, problems = figures.make_figures(res, tmp_path / "figs")
    assert not problems and (tmp_path / "figs" / "gpu_batch.png").exists()


def test_packed_batch_table_without_max_new_tokens_still_draws(tmp_path):
    """A batch table rebuilt from rows files (gpu_speed.py --from-rows) has an empty max_new_tokens
    column: `make figures` draws it anyway and its title names the prompts, not an invented length
    (it used to fail the whole figure with 'cannot convert float NaN to integer')."""
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    packed = pd.DataFrame([dict(verifier=v, drafter=d, batch_size=b, throughput=100.0 * b, speedup_vs_ar=1.0,
                                baseline=d == "ar", gpu="H200", n_prompts=32, max_new_tokens=float("nan"))
                           for v in ("reference", "int4") for d in ("ar", "ngram") for b in (1, 16)])
    packed.to_csv(gpu / "batch_replay_packed.csv", index=False)
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert not problems and "gpu_batch_replay_packed.png" in {p.name for p in written}
    title = figures.plot_gpu_batch(packed, acceptance=figures.REAL_ACCEPTANCE)._suptitle.get_text()
    assert "32 prompts" in title and "new tokens" not in title


def test_real_acceptance_batch_table_is_its_own_figure(tmp_path):
    """batch_replay.csv (real acceptance) never joins the synthetic batch figure; it is drawn as
    gpu_batch_replay, whose title says the acceptance is real."""
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    base = dict(throughput=100.0, speedup_vs_ar=1.0, gpu="H200")
    synth = pd.DataFrame([dict(base, verifier=v, drafter=d, batch_size=b, baseline=d == "ar")
                          for v in ("reference", "int4") for d in ("ar", "synthetic_a0.8_k5") for b in (1, 4)])
    real = pd.DataFrame([dict(base, verifier=v, drafter=d, batch_size=b, baseline=d == "ar")
                         for v in ("reference", "int4") for d in ("ar", "ngram", "draft_model") for b in (1, 4)])
    synth.to_csv(gpu / "batch.csv", index=False)
    real.to_csv(gpu / "batch_replay.csv", index=False)
    assert set(figures.load_batch_tables(gpu)["drafter"]) == {"ar", "synthetic_a0.8_k5"}
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert not problems
    assert {"gpu_batch.png", "gpu_batch_replay.png"} <= {p.name for p in written}
    fig = figures.plot_gpu_batch(real, acceptance=figures.REAL_ACCEPTANCE)
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["ar", "ngram", "draft_model"]
    assert "real acceptance" in fig._suptitle.get_text()
    assert "synthetic" in figures.plot_gpu_batch(synth)._suptitle.get_text()


def test_a_batch_grid_in_its_own_folder_is_its_own_figure(tmp_path, monkeypatch):
    """gpu/batch_<name>/batch.csv (a whole grid measured apart, e.g. on another machine) is drawn as
    gpu_batch_<name> with its own machine in the title, and none of its cells leaks into gpu_batch
    (batch.csv and the per-cell batch_*.csv tables beside it), nor theirs into it."""
    gpu = tmp_path / "results" / "gpu"
    (gpu / "batch_h100").mkdir(parents=True)
    cell = lambda gpu_name, v, d, b, y: dict(verifier=v, drafter=d, batch_size=b, throughput=y, speedup_vs_ar=1.0,
                                              baseline=d == "ar", gpu=gpu_name)
    h200 = pd.DataFrame([cell("H200", v, "ar", b, 100.0 * b) for v in ("reference", "int4") for b in (1, 4)])
    h100 = pd.DataFrame([cell("H100", v, d, b, 50.0 * b) for v in ("reference", "int8")
                         for d in ("ar", "synthetic_a0.6_k3") for b in (1, 2, 32)])
    h200.to_csv(gpu / "batch.csv", index=False)
    h100.to_csv(gpu / "batch_h100" / "batch.csv", index=False)
    assert set(figures.load_batch_tables(gpu)["gpu"]) == {"H200"}
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert not problems and {"gpu_batch.png", "gpu_batch_h100.png"} <= {p.name for p in written}
    fig = figures.plot_gpu_batch(pd.read_csv(gpu / "batch_h100" / "batch.csv"))
    assert [a.get_title() for a in fig.axes if a.get_visible() and a.get_title()] == ["ar", "synthetic_a0.6_k3"]
    assert "H100" in fig._suptitle.get_text() and "H200" not in fig._suptitle.get_text()
    # a real-acceptance packed grid in such a folder: its own figure, titled as what it is
    (gpu / "batch_replay_h100").mkdir()
    h100.assign(gpu="H100 real").to_csv(gpu / "batch_replay_h100" / "batch_replay_packed.csv", index=False)
    h100.to_csv(gpu / "batch_replay_h100" / "batch_replay_packed_rows.csv", index=False)
    titles = {}  # machine in the table -> its figure's title
    draw = figures.plot_gpu_batch

    def recording(batch, **kw):
        fig = draw(batch, **kw)
        titles[batch["gpu"].iloc[0]] = fig._suptitle.get_text()
        return fig

    monkeypatch.setattr(figures, "plot_gpu_batch", recording)
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs2")
    names = {p.name for p in written}
    assert not problems and "gpu_batch_replay_h100_packed.png" in names
    assert not [n for n in names if "_rows" in n]
    assert "real acceptance" in titles["H100 real"] and "packed forwards" in titles["H100 real"]
    assert "synthetic" in titles["H100"] and "packed" not in titles["H100"]


def test_packed_batch_tables_are_figures_of_their_own(tmp_path):
    """batch_packed.csv / batch_replay_packed.csv (gpu_speed.py --packed) never join the unpacked
    figures' cells; each is drawn as its own figure, titled as packed."""
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    base = dict(throughput=100.0, speedup_vs_ar=1.0, gpu="H200")
    table = lambda drafters: pd.DataFrame([dict(base, verifier=v, drafter=d, batch_size=b, baseline=d == "ar")
                                           for v in ("reference", "int4") for d in drafters for b in (1, 4)])
    table(("ar", "synthetic_a0.8_k5")).to_csv(gpu / "batch.csv", index=False)
    table(("ar", "packed_only")).to_csv(gpu / "batch_packed.csv", index=False)
    table(("ar", "ngram")).to_csv(gpu / "batch_replay_packed.csv", index=False)
    assert set(figures.load_batch_tables(gpu)["drafter"]) == {"ar", "synthetic_a0.8_k5"}
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    names = {p.name for p in written}
    assert {"gpu_batch.png", "gpu_batch_packed.png", "gpu_batch_replay_packed.png"} <= names
    assert "gpu_batch_replay.png" not in names and not problems  # no unpacked replay table: skipped


def test_batch_tables_of_other_gpu_calls_join_the_figure(tmp_path):
    """batch_<name>.csv tables (per-cell, no rows) add their cells to batch.csv's; row files and a
    cell (verifier, drafter, B) batch.csv already has do not."""
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    base = dict(batch_size=1, throughput=100.0, speedup_vs_ar=1.0, gpu="H200")
    pd.DataFrame([dict(base, verifier="reference", drafter="ar", baseline=True),
                  dict(base, verifier="int8", drafter="spec2", baseline=False, throughput=250.0)]
                 ).to_csv(gpu / "batch.csv", index=False)
    pd.DataFrame([dict(base, verifier="int8", drafter="ar", throughput=130.0),
                  dict(base, verifier="int8", drafter="spec", throughput=300.0, speedup_vs_ar=2.3),
                  dict(base, verifier="int8", drafter="spec2", throughput=1.0),
                  dict(base, verifier="reference", drafter="ar", throughput=1.0)]).to_csv(gpu / "batch_int8.csv", index=False)
    pd.DataFrame([dict(base, verifier="w8a8", drafter="ar")]).to_csv(gpu / "batch_w8a8_rows.csv", index=False)
    got = figures.load_batch_tables(gpu)
    assert sorted(zip(got.verifier, got.drafter, got.throughput, got.baseline)) == [
        ("int8", "ar", 130.0, True), ("int8", "spec", 300.0, False), ("int8", "spec2", 250.0, False),
        ("reference", "ar", 100.0, True)]
    assert figures.load_batch_tables(tmp_path / "nothing") is None


def test_every_figure_says_model_device_prompts_and_tokens(tmp_path, monkeypatch):
    """Each figure make_figures writes names what it was measured on: the per-experiment ones the
    model, the device, the number of prompts and the new-token budget (from the rows), the GPU
    ones the GPU, the model shapes, and prompts and tokens (or that a single step / GEMM has none)."""
    rows = synth.synthetic_rows(n_per_cat=3, categories=("qa", "rag")).assign(device="cpu (testbox, 2 cores)")
    longest = int(rows.new_tokens.max())  # the synthetic generator draws 20..63 tokens a turn
    res = tmp_path / "results"
    write_results(res, "default", rows)
    (res / "gpu").mkdir()
    kernels().assign(gpu_name="H100").to_csv(res / "gpu" / "kernels.csv", index=False)
    pd.DataFrame([dict(verifier=v, drafter="ar", speedup_vs_ref_same_drafter=x, gpu="H100", n_prompts=4,
                       new_tokens=640) for v, x in (("reference", 1.0), ("int4", 1.6))]
                 ).to_csv(res / "gpu" / "e2e.csv", index=False)
    pd.DataFrame([dict(precision="reference", kernel="-", measure="step_T6", ms=6.5, gpu="H100")]
                 ).to_csv(res / "gpu" / "step_speed.csv", index=False)
    texts = {}
    save = figures._save

    def record(fig, stem):
        texts[stem.name] = " ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                                    + [ax.get_title() for ax in fig.axes]).replace("\n", " ")
        return save(fig, stem)

    monkeypatch.setattr(figures, "_save", record)
    written, problems = figures.make_figures(res, tmp_path / "figs")
    assert not problems
    assert set(texts) == set(EXP_FIGS) | {"kernel_roofline", "gpu_speedup_by_drafter", "gpu_step_by_backend"}
    for name in EXP_FIGS:  # 3 prompts in each of 2 categories
        assert all(s in texts[name] for s in ("smollm2-135m", "cpu (testbox, 2 cores)", "6 prompts",
                                              f"≤ {longest} new tokens")), (name, texts[name])
    assert all(s in texts["gpu_speedup_by_drafter"] for s in ("H100", "Qwen3-8B", "4 prompts", "640 new tokens"))
    assert all(s in texts["gpu_step_by_backend"] for s in ("H100", "Qwen3-8B", "6 tokens", "no prompts"))
    assert all(s in texts["kernel_roofline"] for s in ("H100", "Qwen3-8B", "no prompts"))


def test_tau_lines_never_join_precisions_not_run():
    """A drafter run on fp32 and int4 only: its points sit at fp32 and int4 and nothing is drawn
    through bf16 and int8 (run for another drafter), where it has no value."""
    both = synth.synthetic_rows(n_per_cat=2, categories=("qa",), drafters=("ar", "ngram"))
    some = synth.synthetic_rows(n_per_cat=2, categories=("qa",), drafters=("layerskip",), verifiers=("fp32", "int4"))
    ax = figures.plot_tau_vs_precision(pd.concat([both, some], ignore_index=True))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "bf16", "int8", "int4"]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: (data line, caps, bars)
    y = np.asarray(lines["layerskip"].get_ydata(), float)
    assert np.isfinite(y[[0, 3]]).all() and np.isnan(y[[1, 2]]).all()  # a NaN breaks a Line2D
    assert np.isfinite(np.asarray(lines["ngram"].get_ydata(), float)).all()
    plt.close("all")


def test_each_machine_gets_its_own_kernel_roofline(tmp_path):
    """w4a16_cuda_<machine>.csv (a benchmark of every kernel on one machine) draws
    kernel_roofline_<machine>, titled with that GPU only; its sweep table draws nothing."""
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    rows = [dict(kernel=k, shape="q/o", M=m, gbps=g * m ** -0.1, copy_gbps=4200.0, gpu_name="NVIDIA H200")
            for k, g in (("bf16_cublas", 2500.0), ("w4a16_cuda", 900.0)) for m in (1, 6, 16)]
    pd.DataFrame(rows).to_csv(gpu / "w4a16_cuda_h200.csv", index=False)
    pd.DataFrame([dict(shape="q/o", M=1, time_us=1.0)]).to_csv(gpu / "w4a16_cuda_h200_sweep.csv", index=False)
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert (tmp_path / "figs" / "kernel_roofline_h200.png").exists()
    assert not (tmp_path / "figs" / "kernel_roofline_h200_sweep.png").exists()
    assert not [p for p in problems if "h200" in str(p)]
    fig = figures.roofline_figure(pd.DataFrame(rows))
    assert "NVIDIA H200" in fig._suptitle.get_text() and "H100" not in fig._suptitle.get_text()


def test_kernel_backends_vs_rows_figure(tmp_path):
    """w4a16_backends_<name>.csv -> kernel_backends_<name>: a panel per shape, a line per int4 backend
    through its measured M only (cuBLAS is the dashed 1x line, not a series), titled with the GPU."""
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    shapes = (("gate+up", 24576), ("down", 4096), ("qkv", 6144), ("lm_head", 151936))
    rows = [dict(kernel=k, shape=sh, N=n, K=4096, M=m, speedup_vs_bf16=sp / m ** 0.3, gpu_name="NVIDIA H200")
            for sh, n in shapes for k, sp in (("w4a16_cuda", 2.0), ("w4a16_triton", 1.5)) for m in (16, 32, 64)]
    rows += [dict(kernel="bf16_cublas", shape=sh, N=1, K=1, M=m, speedup_vs_bf16="", gpu_name="NVIDIA H200")
             for sh, _ in shapes for m in (16, 32, 64)]
    rows = [r for r in rows if not (r["kernel"] == "w4a16_triton" and r["shape"] == "down" and r["M"] == 32)]
    rows = [r for r in rows if not (r["shape"] == "down" and r["M"] == 64)]  # a shape measured at fewer M
    pd.DataFrame(rows).to_csv(gpu / "w4a16_backends_large_m_h200.csv", index=False)
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert not problems and (tmp_path / "figs" / "kernel_backends_large_m_h200.png").exists()
    fig = figures.plot_kernel_backends_vs_m(pd.read_csv(gpu / "w4a16_backends_large_m_h200.csv"))
    panels = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["gate+up (24576×4096)", "down (4096×4096)", "qkv (6144×4096)",
                                               "lm_head (151936×4096)"]
    series = {l.get_label(): l for l in panels[1].lines if not l.get_label().startswith("_")}
    assert set(series) == {"w4a16_cuda", "w4a16_triton"}
    assert list(series["w4a16_triton"].get_xdata()) == [16]
    assert np.allclose(series["w4a16_cuda"].get_ydata(), [2.0 / m ** 0.3 for m in (16, 32)])
    # every panel is ticked at all M of the table (the axis is shared), not the last panel's M only;
    # labels and the axis title sit on the lowest visible panel of each column (2 x 3 grid, 4 panels:
    # gate+up / down / qkv above, lm_head below gate+up, so down and qkv carry their own)
    fig.canvas.draw()
    for ax in panels:
        assert list(ax.get_xticks()) == [16, 32, 64]
    labelled = [ax.get_title().split()[0] for ax in panels
                if [t.get_text() for t in ax.get_xticklabels() if t.get_visible()] == ["16", "32", "64"]]
    assert labelled == ["down", "qkv", "lm_head"]
    assert [ax.get_title().split()[0] for ax in panels if ax.get_xlabel()] == ["down", "qkv", "lm_head"]
    assert "NVIDIA H200" in fig._suptitle.get_text()
    plt.close("all")


def test_twenty_verifier_names_get_twenty_colours(monkeypatch):
    """make_figures sees more than ten verifier labels in one process (int4_auto variants, pruned,
    ...): they must not wrap onto the first ten colours; the first ten keep tab10's."""
    import matplotlib.pyplot as plt

    monkeypatch.setattr(figures, "_COLORS", {})
    got = [figures._vcolor(f"v{i}") for i in range(20)]
    assert len(set(got)) == 20
    assert got[:10] == [plt.get_cmap("tab10")(i) for i in range(10)]
    assert figures._vcolor("v3") == got[3]  # stable


def test_batch_figure_rings_cells_a_stall_dominated():
    """A cell whose other_share (decode time outside drafting and verification) exceeds the stall
    limit is ringed in red at its point and the title says what the ring means; without one, no
    ring and no mention."""
    rows = [dict(verifier=v, drafter=d, batch_size=b, throughput=100.0 * b, speedup_vs_ar=1.0, baseline=d == "ar",
                 other_share=0.51 if (v, d, b) == ("w8a8", "ngram", 4) else 0.05, gpu="H200")
            for v in ("reference", "w8a8") for d in ("ar", "ngram") for b in (1, 4)]
    fig = figures.plot_gpu_batch(pd.DataFrame(rows), acceptance=figures.REAL_ACCEPTANCE)
    assert "red ring" in fig._suptitle.get_text()
    rings = [(ax.get_title(), list(line.get_xdata()), list(line.get_ydata())) for ax in fig.axes for line in ax.lines
             if line.get_markeredgecolor() == "red" and len(line.get_xdata())]
    assert rings == [("ngram", [4], [400.0])]
    for r in rows:
        r["other_share"] = 0.05
    quiet = figures.plot_gpu_batch(pd.DataFrame(rows), acceptance=figures.REAL_ACCEPTANCE)
    assert "red ring" not in quiet._suptitle.get_text()


def test_gpu_batch_figure_crosses_only_where_every_repeat_loses(tmp_path):
    """A batch table with per-repeat ranges (gpu_speed.py, cells timed twice): int4 / bf16 with the
    drafter is 1.02x pooled at B = 4 (pays), 0.99x pooled at B = 8 but 0.96-1.02 over the repeats
    (a tie: hollow diamond, no cross), 0.95x at B = 16 with both repeats below (the cross)."""
    rows = []
    ref = {4: 1000, 8: 1900, 16: 2000}
    int4 = {4: (1020, 1.01, 1.03), 8: (1881, 0.96, 1.02), 16: (1900, 0.93, 0.97)}
    for b in (4, 8, 16):
        for v, y, lo, hi in (("reference", ref[b], 1.0, 1.0), ("int4", *int4[b])):
            for d in ("ar", "spec"):
                rows.append(dict(verifier=v, drafter=d, batch_size=b, throughput=y, speedup_vs_ar=1.0, speedup_vs_ar_lo=1.0,
                                 speedup_vs_ar_hi=1.0, speedup_vs_ref_same_drafter=y / ref[b],
                                 speedup_vs_ref_same_drafter_lo=lo, speedup_vs_ref_same_drafter_hi=hi,
                                 baseline=d == "ar", n_repeats=2, gpu="H100"))
    fig = figures.plot_gpu_batch(pd.DataFrame(rows))
    ax = [a for a in fig.axes if a.get_visible()][0]
    marks = lambda m: [tuple(p) for l in ax.lines if l.get_marker() == m for p in l.get_xydata()]
    assert marks("X") == [(16.0, 1900.0)] and marks("D") == [(8.0, 1881.0)]
    title = fig._suptitle.get_text()
    assert "in every repeat" in title and "a tie" in title
    # the same table timed once (no ranges): the pooled 0.99x at B = 8 is the first loss
    once = pd.DataFrame(rows).drop(columns=[c for c in rows[0] if c.endswith(("_lo", "_hi"))]).assign(n_repeats=1)
    fig = figures.plot_gpu_batch(once)
    ax = [a for a in fig.axes if a.get_visible()][0]
    assert marks("X") == [(8.0, 1881.0)] and marks("D") == []
    assert "one timing per cell" in fig._suptitle.get_text()
    plt.close("all")


def test_a_damaged_table_fails_its_figure_by_name_and_the_rest_are_drawn(tmp_path, capsys):
    """A result table that is not CSV any more (a torn copy, binary bytes): its figure is reported
    failed in one line naming the file and the fix, make_figures lists it in its problems (so `make
    figures` exits non-zero), and every other figure is still drawn."""
    gpu = tmp_path / "results" / "gpu"
    (gpu / "batch_h100").mkdir(parents=True)
    pd.DataFrame([dict(verifier=v, drafter="ar", batch_size=b, throughput=100.0 * b, speedup_vs_ar=1.0,
                       baseline=True, gpu="H200") for v in ("reference", "int4") for b in (1, 4)]).to_csv(
        gpu / "batch.csv", index=False)
    damaged = gpu / "batch_h100" / "batch.csv"
    damaged.write_bytes(b"verifier,drafter\n\xff\xfe\x00garbage")
    written, problems = figures.make_figures(tmp_path / "results", tmp_path / "figs")
    assert problems == ["gpu_batch_h100"]
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FAILED")]
    assert len(line) == 1 and str(damaged) in line[0] and "not a readable CSV" in line[0] and "git checkout" in line[0]
    assert "gpu_batch.png" in {p.name for p in written}
    assert figures.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "figs")]) == 1
