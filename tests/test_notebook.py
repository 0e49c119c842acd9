import importlib.util
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "analysis.ipynb"

_spec = importlib.util.spec_from_file_location("qb_figs", Path(__file__).with_name("test_figures.py"))
tf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf)


def run(results: Path, monkeypatch):
    monkeypatch.setenv("QUASAR_RESULTS", str(results))
    nb = nbformat.read(NB, as_version=4)
    # kernel "python3" launches sys.executable, i.e. this venv's interpreter and ipykernel
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NB.parent)}}).execute()
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error"
            text.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
            images += "image/png" in out.get("data", {})
    return "\n".join(text), images


def test_notebook_runs_on_synthetic_results(tmp_path, monkeypatch):
    res = tmp_path / "results"
    tf.write_results(res, "synthetic", tf.synth.synthetic_rows(n_per_cat=2))
    gpu = res / "gpu"
    gpu.mkdir()
    tf.kernels().to_csv(gpu / "kernels.csv", index=False)
    cells = [dict(verifier=v, drafter=d, baseline=d == "ar", gpu="H200", n_prompts=4, new_tokens=256, tau=t,
                  tokens_per_s=x * 150, speedup_vs_ref_ar=x * t, speedup_vs_ref_same_drafter=x, tau_source=t)
             for d, t in (("ar", 1.0), ("ngram", 1.5)) for v, x in (("reference", 1.0), ("int4", 1.5))]
    pd.DataFrame(cells).to_csv(gpu / "e2e.csv", index=False)
    pd.DataFrame(cells).to_csv(gpu / "replay.csv", index=False)
    batch = pd.DataFrame([dict(c, batch_size=b, throughput=c["tokens_per_s"] * b, speedup_vs_ar=c["tau"],
                               max_new_tokens=32) for c in cells for b in (1, 4)])
    batch.to_csv(gpu / "batch.csv", index=False)
    for grid in ("batch_h100/batch.csv", "batch_replay_h100/batch_replay_packed.csv"):  # grids measured apart
        (gpu / grid).parent.mkdir()
        batch.assign(gpu="H100", mean_m=batch["batch_size"] * batch["tau"]).to_csv(gpu / grid, index=False)
    pd.DataFrame([dict(precision="reference", kernel="-", measure="step_T6", ms=6.5, gpu="H200")]).to_csv(
        gpu / "step_speed.csv", index=False)
    text, images = run(res, monkeypatch)
    assert "== synthetic ==" in text and "τ" in text and "tok/s" in text
    assert "layerskip" in text and "skipped" not in text
    for table in ("e2e.csv: 4 rows, H200", "replay.csv: 4 rows, H200", "batch.csv: 8 rows, H200",
                  "batch_h100/batch.csv: 8 rows, H100", "batch_replay_h100/batch_replay_packed.csv: 8 rows, H100"):
        assert f"== gpu/{table} ==" in text
    # five per-experiment figures, one per GPU table (e2e, replay, batch, the two H100 grids), step times,
    # the roofline
    assert images == 5 + 5 + 1 + 1


def test_notebook_runs_on_committed_reference_results(monkeypatch):
    res = ROOT / "results"
    if not any(res.glob("*/rows-*.parquet")):
        pytest.skip("no committed reference results under results/ yet")
    text, images = run(res, monkeypatch)
    assert "tok/s" in text and images >= 1
    for table in ("e2e", "replay", "batch", "batch_h100/batch", "batch_replay_h100/batch_replay_packed"):
        if (res / "gpu" / f"{table}.csv").exists():  # the committed GPU tables are drawn too
            assert f"== gpu/{table}.csv:" in text
