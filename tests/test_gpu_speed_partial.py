"""experiments/gpu_speed.py keeps what a stopped GPU run measured: the rows its result store holds
are written as one CSV with the hardware columns (a device that returns few files, or a `timeout`,
must not lose a call's measurements). CPU: the store comes from a real tiny run."""
import importlib.util
import signal
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "experiments" / "gpu_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stopped_run_leaves_its_rows_in_one_csv(tmp_path):
    from quasar_bench.run import Experiment
    from quasar_bench.store import ResultStore

    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llama", "dataset.limit=2", "max_new_tokens=4", "progress=false",
                                           "matrix.extra=[]", "matrix.verifiers=[reference]", "matrix.drafters=[ar,ngram]",
                                           "repeats=1", "experiment_name=partial", f"out_dir={runs}"])
    Experiment(cfg).run()
    (runs / "rows.parquet").unlink()  # as if stopped before the run's own export
    gs = gpu_speed()
    meta = {"gpu": "NVIDIA H200", "driver": "580", "copy_gbps": 4246.0, "command": "python experiments/gpu_speed.py x"}
    path = gs.save_partial_rows(runs, out, "batch", meta)
    assert path == out / "batch_rows_partial.csv"
    got = pd.read_csv(path)
    stored = ResultStore(runs).load()
    assert len(got) == len(stored) > 0
    assert sorted(zip(got.cell_id, got.prompt_id, got.turn)) == sorted(zip(stored.cell_id, stored.prompt_id, stored.turn))
    assert (got.gpu == "NVIDIA H200").all() and (got.copy_gbps == 4246.0).all()
    assert not {"prompt_ids", "output_ids", "output_text"} & set(got.columns)
    # nothing stored yet: no file, no error
    assert gs.save_partial_rows(tmp_path / "empty", out, "e2e", meta) is None
    assert not (out / "e2e_rows_partial.csv").exists()


def test_run_stopped_by_sigterm_writes_its_partial_rows(tmp_path, monkeypatch):
    """main() as on the GPU, with the GPU parts replaced: the run stores rows, then `timeout`'s
    SIGTERM arrives (the installed handler is called); the exit still leaves <name>_rows_partial.csv."""
    from quasar_bench.run import Experiment

    gs = gpu_speed()
    runs, out = tmp_path / "runs", tmp_path / "out"
    meta = {"gpu": "NVIDIA H200", "copy_gbps": 4246.0, "command": "python experiments/gpu_speed.py"}

    def cells_then_sigterm(args, overrides, m):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["model=tiny_llama", "dataset.limit=1", "max_new_tokens=3",
                                               "progress=false", "matrix.extra=[]", "matrix.verifiers=[reference]",
                                               "matrix.drafters=[ar]", "repeats=1", "experiment_name=stopped",
                                               f"out_dir={args.runs}"])
        with monkeypatch.context() as m:  # the tiny run itself on the CPU
            m.setattr(gs.torch.cuda, "is_available", cpu_only)
            Experiment(cfg).run()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # what the OS would call

    cpu_only = gs.torch.cuda.is_available
    monkeypatch.setattr(gs.torch.cuda, "is_available", lambda: True)  # main()'s check: "on a GPU"
    monkeypatch.setattr(gs, "hardware_meta", lambda command: dict(meta))
    monkeypatch.setattr(gs, "run_cells", cells_then_sigterm)
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            gs.main(["--experiment", "gpu_batch", "--out", str(out), "--runs", str(runs)])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 128 + signal.SIGTERM
    rows = pd.read_csv(out / "batch_rows_partial.csv")
    from quasar_bench.store import ResultStore

    assert len(rows) == len(ResultStore(runs).load()) > 0 and (rows.gpu == "NVIDIA H200").all()
    assert not (out / "batch_rows.csv").exists()  # the complete-run file is not faked


def batch_replay_rows(**extra):
    rows = []
    for v in ("reference", "int4"):
        for d, steps, new in (("ar", 8, 8), ("ngram", 4, 10)):
            for b in (1, 2):
                for i in range(2):  # two prompts: at B = 2 one batch, at B = 1 two
                    bid = f"{v}{d}{b}{i // b}"
                    rows.append(dict(verifier=v, drafter=d, drafter_name="ar" if d == "ar" else "replay",
                                     batch_size=b, batch_id=bid, prompt_id=str(i),
                                     new_tokens=new, verify_steps=steps, batch_decode_s=0.1 * steps,
                                     batch_steps=steps, gemm_rows_per_step=b * (1 if d == "ar" else 6),
                                     batch_padding=0.0, weight_bytes=2e9 if v == "reference" else 0.6e9,
                                     baseline=d == "ar", gpu="NVIDIA H200", driver="580", torch="2.11",
                                     triton="3.6", copy_gbps=4200.0, command="python experiments/gpu_speed.py",
                                     max_new_tokens=32, **extra))
    return rows


def test_packed_rows_make_their_own_table(tmp_path, capsys):
    """Rows whose batches were packed (batch_packed) tabulate only with --packed, into
    batch_replay_packed.* with the attention padding beside the GEMM rows' padding; a table is
    never built from rows of both kinds, nor packed rows without --packed."""
    gs = gpu_speed()
    rows = pd.DataFrame(batch_replay_rows(attention_padding=0.25))
    rows["batch_packed"] = rows.batch_size > 1
    rows["batch_padding"] = 0.1 * (rows.batch_size > 1)
    packed_csv, plain_csv, out = tmp_path / "packed.csv", tmp_path / "plain.csv", tmp_path / "out"
    rows.to_csv(packed_csv, index=False)
    plain = rows.assign(batch_packed=False)
    plain["batch_id"] += "u"
    plain.to_csv(plain_csv, index=False)
    for argv, word in (([str(packed_csv)], "add --packed"), ([str(packed_csv), str(plain_csv), "--packed"], "and unpacked"),
                       ([str(plain_csv), "--packed"], "drop --packed")):
        with pytest.raises(SystemExit) as e:
            gs.main(["--experiment", "gpu_batch_replay", "--out", str(out), "--from-rows", *argv])
        assert e.value.code == 2 and word in capsys.readouterr().err
    gs.main(["--experiment", "gpu_batch_replay", "--out", str(out), "--from-rows", str(packed_csv), "--packed"])
    t = pd.read_csv(out / "batch_replay_packed.csv")
    assert len(t) == 8 and not (out / "batch_replay.csv").exists()
    assert (t.attention_padding == 0.25).all() and (t[t.batch_size == 2].padding == 0.1).all()
    assert "attention_padding" in (out / "batch_replay_packed.md").read_text()
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_batch_replay", "--out", str(out), "batch_packed=true"])
    assert "--packed" in capsys.readouterr().err


def test_batch_replay_table_from_rows_carries_the_source_tau(tmp_path, capsys):
    """--experiment gpu_batch_replay rebuilt from row files (no GPU): the batch columns per (verifier,
    drafter, B), the source run's tau beside each row (equal here, as a replay must make it: no
    warning), a title naming real acceptance; without --source (or rows) it refuses in one line."""
    gs = gpu_speed()
    rows = batch_replay_rows()
    rows_csv, src_csv, out = tmp_path / "rows.csv", tmp_path / "src.csv", tmp_path / "out"
    pd.DataFrame(rows).to_csv(rows_csv, index=False)
    src = [dict(verifier=v, drafter=d, prompt_id=str(i), turn=1, new_tokens=new, verify_steps=steps)
           for v in ("reference", "int4") for d, steps, new in (("ar", 8, 8), ("ngram", 4, 10)) for i in range(2)]
    pd.DataFrame(src).to_csv(src_csv, index=False)
    gs.main(["--experiment", "gpu_batch_replay", "--from-rows", str(rows_csv), "--source", str(src_csv),
             "--out", str(out)])
    assert "warning" not in capsys.readouterr().out
    t = pd.read_csv(out / "batch_replay.csv")
    assert len(t) == 8 and set(t.batch_size) == {1, 2}
    ngram = t[t.drafter == "ngram"]
    assert (ngram.tau == 2.5).all() and (ngram.tau_source == 2.5).all()
    assert "real acceptance" in (out / "batch_replay.md").read_text().splitlines()[0]
    # the same replayed rows without --source: the title must not call them synthetic
    gs.main(["--experiment", "gpu_batch_replay", "--from-rows", str(rows_csv), "--out", str(out / "nosrc")])
    title = (out / "nosrc" / "batch_replay.md").read_text().splitlines()[0]
    assert "replayed acceptance" in title and "synthetic" not in title
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_batch_replay", "--out", str(out)])
    assert e.value.code == 2
    assert "--source" in capsys.readouterr().err


def test_table_from_rows_drops_unfinished_cells_and_filters_drafters(tmp_path, capsys):
    """Rows joined from a finished call and a stopped one: a cell with fewer rows than the others
    (stopped mid-way) is left out of the table and named; --drafters keeps only the drafters named,
    and a drafter the rows do not hold is refused in one line."""
    gs = gpu_speed()
    rows = []
    for d in ("ar", "ngram", "lookahead"):
        for b in (1, 2):
            for i in range(4):
                rows.append(dict(cell_id=f"{d}{b}", verifier="reference", drafter=d, batch_size=b,
                                 batch_id=f"{d}{b}{i // b}", prompt_id=str(i), new_tokens=8,
                                 verify_steps=8 if d == "ar" else 4, batch_decode_s=0.1, batch_steps=8,
                                 gemm_rows_per_step=b, batch_padding=0.0, weight_bytes=2e9, baseline=d == "ar",
                                 gpu="NVIDIA H200", driver="580", torch="2.11", triton="3.6", copy_gbps=4200.0,
                                 command="python experiments/gpu_speed.py", max_new_tokens=8))
    full = pd.DataFrame(rows)
    stopped = full[(full.cell_id == "ngram2") & (full.prompt_id != "3")]  # the stopped call: 3 of 4 rows
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out"
    full[full.cell_id != "ngram2"].to_csv(a, index=False)
    stopped.to_csv(b, index=False)
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(a), str(b), "--out", str(out)])
    err = capsys.readouterr().err
    assert "reference / ngram / B=2: 3 of 4 rows" in err
    t = pd.read_csv(out / "batch.csv")
    assert sorted(zip(t.drafter, t.batch_size)) == [("ar", 1), ("ar", 2), ("lookahead", 1), ("lookahead", 2),
                                                   ("ngram", 1)]
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(a), "--drafters", "ar,ngram", "--out", str(out)])
    assert set(pd.read_csv(out / "batch.csv").drafter) == {"ar", "ngram"}
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_batch", "--from-rows", str(a), "--drafters", "ar,eagle", "--out", str(out)])
    assert e.value.code == 2 and "eagle" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a live run does not filter: refused, not ignored
        gs.main(["--experiment", "gpu_batch", "--drafters", "ar", "--out", str(out)])
    assert e.value.code == 2 and "matrix.drafters" in capsys.readouterr().err


def _batch_rows(stall_s: float) -> pd.DataFrame:
    """Rows of two verifiers x AR x B = 2 (two batches of two sequences each), the int4 cell's second
    batch with a stall of stall_s outside drafting and verification in both of its rows."""
    rows = []
    for verifier in ("reference", "int4"):
        for batch_id in (0, 1):
            for seq in (0, 1):
                other = 0.01 + (stall_s if verifier == "int4" and batch_id == 1 else 0.0)
                draft, verify = 0.0, 0.2 + 0.01 * seq
                rows.append(dict(verifier=verifier, drafter="ar", batch_size=2, batch_id=batch_id,
                                 prompt_id=2 * batch_id + seq, new_tokens=32, verify_steps=32, weight_bytes=16e9,
                                 baseline=True, batch_decode_s=0.25 + other, batch_steps=32, gemm_rows_per_step=2.0,
                                 batch_padding=0.0, draft_s=draft, verify_s=verify, other_s=other,
                                 decode_s=draft + verify + other))
    return pd.DataFrame(rows)


def test_batch_table_reports_time_outside_draft_and_verify_and_flags_stalls(capsys):
    """other_share = each batch's median row share of decode time outside drafting and verification,
    averaged over the cell's batches (computed here by hand); a cell above 30 % is named in a
    warning, one below is not."""
    gs = gpu_speed()
    rows = _batch_rows(stall_s=0.5)
    table = gs.batch_table(rows, 4246.0, "NVIDIA H200").set_index("verifier")
    ref_share = (0.01 / 0.21 + 0.01 / 0.22) / 2  # decode 0.21 / 0.22 s: the median of two rows is their mean
    stalled = (0.51 / 0.71 + 0.51 / 0.72) / 2
    assert table.loc["reference", "other_share"] == pytest.approx(ref_share)
    assert table.loc["int4", "other_share"] == pytest.approx((ref_share + stalled) / 2)
    assert gs.flag_stalls(table.reset_index()) == [("int4", "ar", 2)]
    assert "int4/ar/B=2" in capsys.readouterr().out
    quiet = gs.batch_table(_batch_rows(stall_s=0.0), 4246.0, "NVIDIA H200")
    assert gs.flag_stalls(quiet) == [] and capsys.readouterr().out == ""
    # rows files from before the timing split: the column is empty and nothing is flagged
    old = gs.batch_table(rows.drop(columns=["other_s"]), 4246.0, "NVIDIA H200")
    assert old.other_share.isna().all() and gs.flag_stalls(old) == []


def _timed_twice_rows(ratio_by_repeat: dict) -> list[pd.DataFrame]:
    """Two rows files of the same cells (bf16 and int4 x AR x B = 2, two batches of two prompts):
    file r is repeat r, int4's batches taking 1 / ratio_by_repeat[r] of bf16's time."""
    files = []
    for rep, ratio in ratio_by_repeat.items():
        rows = []
        for v in ("reference", "int4"):
            for i in range(4):
                rows.append(dict(cell_id=f"{v}-ar-2", repeat=0, timed_at=1000.0 * rep + (v == "int4"), verifier=v,
                                 drafter="ar", batch_size=2, batch_id=f"{2 * (i // 2)}/1/0", prompt_id=str(i), turn=1,
                                 new_tokens=16, verify_steps=16, batch_decode_s=0.1 if v == "reference" else 0.1 / ratio,
                                 batch_steps=16, gemm_rows_per_step=2.0, batch_padding=0.0, weight_bytes=16e9,
                                 baseline=True, gpu="NVIDIA H100 80GB HBM3", driver="580", torch="2.11", triton="3.6",
                                 copy_gbps=3000.0, command="python experiments/gpu_speed.py", max_new_tokens=16))
        files.append(pd.DataFrame(rows))
    return files


def test_rows_files_of_the_same_cells_are_repeats_paired_in_the_table(tmp_path, capsys):
    """Two calls' rows of the same cells join as repeats 0 and 1 (not pooled as one timing): the table
    gives n_repeats 2, the per-repeat throughput range and int4's per-repeat ratio range (1.04 / 0.98:
    a tie, named in the .md's crossovers, where the pooled ratio alone would call it a win); the
    same file given twice is refused in one line."""
    gs = gpu_speed()
    paths = []
    for i, f in enumerate(_timed_twice_rows({0: 1.04, 1: 0.98})):
        paths.append(tmp_path / f"call{i}.csv")
        f.to_csv(paths[-1], index=False)
    out = tmp_path / "out"
    gs.main(["--experiment", "gpu_batch", "--from-rows", *map(str, paths), "--out", str(out)])
    t = pd.read_csv(out / "batch.csv").set_index("verifier")
    assert (t.n_repeats == 2).all()
    assert t.loc["reference", "throughput"] == pytest.approx(128 / 0.4)  # 2 repeats x 2 batches of 2 x 16 tokens
    assert (t.loc["int4", "throughput_lo"], t.loc["int4", "throughput_hi"]) == pytest.approx((320 * 0.98, 320 * 1.04))
    lo, hi = t.loc["int4", "speedup_vs_ref_same_drafter_lo"], t.loc["int4", "speedup_vs_ref_same_drafter_hi"]
    assert (lo, hi) == pytest.approx((0.98, 1.04))
    assert t.loc["int4", "speedup_vs_ref_same_drafter"] > 1  # pooled: 0.4 s against 0.1 / 1.04 + 0.1 / 0.98
    md = (out / "batch.md").read_text()
    assert "- int4 vs bf16 with ar: never loses (up to B=2); ties at B=2" in md
    assert "1.01 (0.98-1.04)" in md
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_batch", "--from-rows", str(paths[0]), str(paths[0]), "--out", str(out)])
    assert e.value.code == 2 and "pass each rows file once" in capsys.readouterr().err
    # one file alone: timed once, and the .md says a ratio's sign alone decides
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(paths[0]), "--out", str(out / "one")])
    md = (out / "one" / "batch.md").read_text()
    assert "Every cell was timed once" in md and "- int4 vs bf16 with ar: never loses (up to B=2)" in md


def test_rows_of_different_machines_are_not_joined(tmp_path, capsys):
    """Rows files from an H100 and an H200 (or two torch versions) are refused in one line naming the
    column, both values and their files, and no table is written: a ratio paired across two GPUs
    would be quoted as one machine's. Files of one machine kind with slightly different copy
    bandwidths join, and the table's copy bandwidth is their median."""
    gs = gpu_speed()
    first, second = _timed_twice_rows({0: 1.04, 1: 0.98})
    out = tmp_path / "out"
    for col, value in (("gpu", "NVIDIA H200"), ("torch", "2.12")):
        a, b = tmp_path / "a.csv", tmp_path / f"{col}.csv"
        first.to_csv(a, index=False)
        second.assign(**{col: value}).to_csv(b, index=False)
        with pytest.raises(SystemExit) as e:
            gs.main(["--experiment", "gpu_batch", "--from-rows", str(a), str(b), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{col} " in err and repr(value) in err and str(b) in err and str(a) in err
        assert not (out / "batch.csv").exists()
    first.assign(copy_gbps=3000.0).to_csv(tmp_path / "a.csv", index=False)
    second.assign(copy_gbps=3010.0).to_csv(tmp_path / "b.csv", index=False)
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
             "--out", str(out)])
    t = pd.read_csv(out / "batch.csv")
    assert (t.copy_gbps == 3005.0).all() and (t.gpu == "NVIDIA H100 80GB HBM3").all()


def test_two_cells_under_one_label_are_refused_not_pooled(tmp_path, capsys):
    """The same labels (int4 / ar / B=2) run under another context (code version, prompts, settings)
    are another cell: their batch ids coincide with the first cell's, and pooling them on one line
    doubled the tokens against one cell's time (a 2x throughput). Joining them is refused in one
    line naming the line of the table and both contexts; no table is written."""
    gs = gpu_speed()
    first, second = _timed_twice_rows({0: 1.0, 1: 1.0})
    first["context_id"] = "aaaaaa11"
    second["context_id"] = "bbbbbb22"
    second.loc[second.verifier == "int4", "cell_id"] = "int4-ar-2-other-code"
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out"
    first.to_csv(a, index=False)
    second[second.verifier == "int4"].to_csv(b, index=False)
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_batch", "--from-rows", str(a), str(b), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "2 different cells for int4 / ar / 2" in err and "aaaaaa, bbbbbb" in err
    assert not (out / "batch.csv").exists()
    # the second file alone with the first's reference rows is one cell per line: tabulated
    pd.concat([first[first.verifier == "reference"], second[second.verifier == "int4"]]).to_csv(b, index=False)
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(b), "--out", str(out)])
    t = pd.read_csv(out / "batch.csv").set_index("verifier")
    assert t.loc["int4", "throughput"] == pytest.approx(t.loc["reference", "throughput"])


def test_bad_rows_files_are_refused_in_one_line(tmp_path, capsys):
    """--from-rows with a missing file, a file that is not CSV, an empty file, a CSV that is not a
    rows file, a rows file with a damaged number, or batched rows given to the end-to-end table:
    exit 2 with one line naming the file and the fix (no traceback, no table)."""
    gs = gpu_speed()
    out = tmp_path / "out"
    binary, empty, other, rows = (tmp_path / n for n in ("binary.csv", "empty.csv", "other.csv", "rows.csv"))
    binary.write_bytes(bytes(range(128, 256)) * 4)
    empty.write_text("")
    other.write_text("a,b\n1,2\n")
    _timed_twice_rows({0: 1.0})[0].to_csv(rows, index=False)
    damaged = tmp_path / "damaged.csv"
    d = _timed_twice_rows({0: 1.0})[0].astype({"batch_decode_s": object})
    d.loc[3, "batch_decode_s"] = "0.1x"
    d.to_csv(damaged, index=False)
    cases = [(["--experiment", "gpu_batch"], damaged, "column batch_decode_s holds a non-number ('0.1x' on data line 4)"),
             (["--experiment", "gpu_batch"], tmp_path / "absent.csv", "no such file"),
             (["--experiment", "gpu_batch"], binary, "not a readable CSV"),
             (["--experiment", "gpu_batch"], empty, "not a readable CSV"),
             (["--experiment", "gpu_batch"], other, "not a batch experiment's rows file (no column baseline"),
             ([], rows, "holds batched rows (B up to 2): tabulate them with --experiment gpu_batch")]
    for argv, path, words in cases:
        with pytest.raises(SystemExit) as e:
            gs.main([*argv, "--from-rows", str(path), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and str(path) in err and words in err, err
    assert not any(out.glob("*.csv"))


def test_a_reused_store_tabulates_only_this_runs_cells(tmp_path, monkeypatch, capsys):
    """Two GPU-speed runs into one --runs store whose cells differ in context (here the prompt set;
    in practice a code version): the second run's rows file and table hold its own cell only, the
    earlier one is counted on stderr. Before, the store's export held both, and the table pooled (or
    now refused) two cells on one line."""
    gs = gpu_speed()
    runs = tmp_path / "runs"
    meta = {"gpu": "NVIDIA H200", "driver": "580", "torch": "2.11", "triton": "3.6", "copy_gbps": 4246.0}
    cpu_only, real_run_cells = gs.torch.cuda.is_available, gs.run_cells

    def on_cpu(*args):
        with monkeypatch.context() as m:
            m.setattr(gs.torch.cuda, "is_available", cpu_only)
            return real_run_cells(*args)

    monkeypatch.setattr(gs.torch.cuda, "is_available", lambda: True)  # main()'s check: "on a GPU"
    monkeypatch.setattr(gs, "hardware_meta", lambda command: {**meta, "command": command})
    monkeypatch.setattr(gs, "run_cells", on_cpu)
    common = ["model=tiny_llama", "max_new_tokens=3", "progress=false", "matrix.extra=[]", "fidelity=false",
              "matrix.verifiers=[reference]", "matrix.drafters=[ar]", "repeats=1", "model.max_seq_len=256"]
    for limit in (1, 2):
        gs.main(["--runs", str(runs), "--out", str(tmp_path / f"out{limit}"), *common, f"dataset.limit={limit}"])
    first = pd.read_csv(tmp_path / "out1" / "e2e_rows.csv")
    second = pd.read_csv(tmp_path / "out2" / "e2e_rows.csv")
    assert first.cell_id.nunique() == second.cell_id.nunique() == 1 and set(first.cell_id) != set(second.cell_id)
    assert second.prompt_id.nunique() == 2 and len(pd.read_csv(tmp_path / "out2" / "e2e.csv")) == 1
    assert "1 cell(s) of earlier runs in the store left out" in capsys.readouterr().err


def test_tie_margin_turns_a_loss_within_it_into_a_tie(tmp_path, capsys):
    """One timing per cell: int4 against bf16 (reference) with AR pays 1.25x at B = 1 and is 0.99x at B = 2.
    Without a margin the crossover line says it loses from B = 2 (by its sign alone); with --tie-margin 0.02
    B = 2 is a tie and nothing loses, the table records the margin and says how it judged. A margin outside
    [0, 0.5), or one given to a table that has no crossovers, is refused in one line."""
    gs = gpu_speed()
    rows = []
    for v, speed in (("reference", {1: 1.0, 2: 1.0}), ("int4", {1: 1.25, 2: 0.99})):
        for b in (1, 2):
            for i in range(2):
                rows.append(dict(cell_id=f"{v}{b}", verifier=v, drafter="ar", batch_size=b, batch_id=f"{v}{b}{i // b}",
                                 prompt_id=str(i), new_tokens=8, verify_steps=8, batch_decode_s=0.1 / speed[b],
                                 batch_steps=8, gemm_rows_per_step=b, batch_padding=0.0, weight_bytes=2e9, baseline=True,
                                 gpu="NVIDIA H200", driver="580", torch="2.11", triton="3.6", copy_gbps=4200.0,
                                 command="python experiments/gpu_speed.py", max_new_tokens=8))
    src, out = tmp_path / "rows.csv", tmp_path / "out"
    pd.DataFrame(rows).to_csv(src, index=False)
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(src), "--out", str(out)])
    t = pd.read_csv(out / "batch.csv")
    int4 = t[t.verifier == "int4"].set_index("batch_size")
    assert int4.loc[2, "speedup_vs_ref_same_drafter"] == pytest.approx(0.99, abs=1e-3)
    assert "tie_margin" not in t
    md = (out / "batch.md").read_text()
    assert "- int4 vs bf16 with ar: loses from B=2" in md
    gs.main(["--experiment", "gpu_batch", "--from-rows", str(src), "--out", str(out), "--tie-margin", "0.02"])
    md = (out / "batch.md").read_text()
    assert "- int4 vs bf16 with ar: never loses (up to B=2); ties at B=2" in md and "Tie margin 0.02" in md
    assert (pd.read_csv(out / "batch.csv").tie_margin == 0.02).all()
    for bad in (["--tie-margin", "0.5"], ["--tie-margin", "-0.01"]):
        with pytest.raises(SystemExit) as e:
            gs.main(["--experiment", "gpu_batch", "--from-rows", str(src), "--out", str(out), *bad])
        assert e.value.code == 2 and "--tie-margin must be in [0, 0.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gs.main(["--experiment", "gpu_speed", "--from-rows", str(src), "--out", str(out), "--tie-margin", "0.02"])
    assert e.value.code == 2 and "gpu_batch" in capsys.readouterr().err
