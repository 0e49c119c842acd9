import importlib.util
from pathlib import Path

import nbformat
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
    (res / "gpu").mkdir()
    tf.kernels().to_csv(res / "gpu" / "kernels.csv", index=False)
    text, images = run(res, monkeypatch)
    assert "== synthetic ==" in text and "τ" in text and "tok/s" in text
    assert "layerskip" in text and "skipped" not in text
    assert images == 6  # five per-experiment figures + the roofline


def test_notebook_runs_on_committed_reference_results(monkeypatch):
    res = ROOT / "results"
    if not any(res.glob("*/rows-*.parquet")):
        pytest.skip("no committed reference results under results/ yet")
    text, images = run(res, monkeypatch)
    assert "tok/s" in text and images >= 1
