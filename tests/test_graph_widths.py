"""Which forward widths the harness captures CUDA graphs for (CPU: the capture itself is recorded,
not run). A drafter that runs a wider forward on the verifier than a verify step (lookahead's
Jacobi window) must get a graph for that width too, or its forwards run eagerly on the GPU."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "conf"


def captured_widths(tmp_path, monkeypatch, drafters: str, batch: str = "[1]"):
    # imported here, not at collection: quasar_bench.run imports triton, and test_kernels.py must be
    # the first to import it (it sets TRITON_INTERPRET=1 on CPU)
    import quasar_bench.run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "capture_graphs", lambda runtime, cfg, widths: seen.append(list(widths)))
    built = []
    real = run_mod.Experiment.build_live

    def build_live(self, vcfg, widths):
        live = real(self, vcfg, widths)
        built.append(live.widths)
        return live

    monkeypatch.setattr(run_mod.Experiment, "build_live", build_live)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny_llama", "dataset.limit=1", "max_new_tokens=3", "progress=false", "matrix.extra=[]",
            "matrix.verifiers=[reference,int8]", f"matrix.drafters={drafters}", f"batch_size={batch}",
            "experiment_name=widths", f"out_dir={tmp_path / 'out'}"])
    run_mod.Experiment(cfg).run()
    return seen, built


def test_verify_widths_only_without_wider_drafter(tmp_path, monkeypatch):
    seen, built = captured_widths(tmp_path, monkeypatch, "[ar,{name:ngram,k:3}]")
    assert seen == [[1, 2, 3, 4]] * 2  # one capture per verifier: AR (1) and verify (k + 1 = 4)
    assert built == [(1, 2, 3, 4)] * 2  # what batched graphs capture: the same widths


def test_lookahead_window_gets_its_own_graph_width(tmp_path, monkeypatch):
    seen, built = captured_widths(
        tmp_path, monkeypatch, "[{name:ngram,k:2},{name:lookahead,k:3,window:6}]", batch="[1,2]")
    # verify widths 1..4 (k = 3 is the largest) plus the Jacobi forward: last token + 6 guesses
    assert seen == [[1, 2, 3, 4, 7]] * 2
    # batched graphs capture the Jacobi width too: the loop batches that forward across sequences
    assert built == [(1, 2, 3, 4, 7)] * 2


def test_batch_graphs_capture_exactly_the_cells_widths(monkeypatch):
    """A batch runtime (B > 1) made for a verifier captures graphs for its widths — verify steps and
    lookahead's Jacobi window, which the loop batches — and no others (CUDA-free: the capture is
    recorded)."""
    import types

    import quasar_bench.batching as batching
    from quasar_bench.run import LiveVerifier

    made = {}

    class Graphs:
        def __init__(self, batch, max_tokens, max_len, bucket=256):
            made["max_tokens"], self.max_len = max_tokens, max_len

        def capture_all(self, widths):
            made["widths"] = list(widths)

    monkeypatch.setattr(batching, "BatchGraphs", Graphs)
    monkeypatch.setattr(batching.BatchRuntime, "reset", lambda self, n: None)
    runtime = types.SimpleNamespace(is_native=True, device="cpu", graphs=types.SimpleNamespace(max_tokens=16, max_len=512))
    live = LiveVerifier(vcfg=None, runtime=runtime, fidelity={}, is_reference=True, widths=(1, 2, 3, 4, 7))
    live.batch_runtime(4)
    assert made == {"max_tokens": 7, "widths": [1, 2, 3, 4, 7]}
