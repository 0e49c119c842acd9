"""`python -m quasar_bench` end to end on a tiny model, and every bad-input case of the core issue:
one line naming the problem and the fix, a non-zero exit, and no result written."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["model=tiny_llama", "dataset.limit=3", "max_new_tokens=6", "progress=false", "repeats=1",
        "matrix.verifiers=[reference]", "matrix.extra=[]"]  # the default matrix, narrowed to the core, timed once


def cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "QUASAR_OFFLINE": "1"}  # no dataset fetch
    return subprocess.run([sys.executable, "-m", "quasar_bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    r = cli(*TINY, f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_parquet(out / "rows.parquet")
    required = ["model", "drafter", "verifier", "k", "dataset", "category", "prompt_id", "turn", "new_tokens",
                "verify_steps", "tau", "alpha", "accepted_per_position", "prefill_s", "decode_s", "draft_s",
                "verify_s", "tokens_per_s", "peak_mem_bytes", "output_ids", "output_text", "seed", "device",
                "runtime", "torch_version", "git_commit"]
    assert not set(required) - set(rows.columns)
    assert set(rows.runtime) == {"native"}  # tiny_llama: a native family
    # 3 prompts, the first is 2-turn (multi_turn) -> 4 rows per drafter, drafters ar and ngram
    assert len(rows) == 8 and set(rows.drafter) == {"ar", "ngram"}
    assert (rows[rows.drafter == "ar"].tau == 1.0).all()
    ar = rows[rows.drafter == "ar"].sort_values(["prompt_id", "turn"])
    ng = rows[rows.drafter == "ngram"].sort_values(["prompt_id", "turn"])
    assert [list(x) for x in ar.output_ids] == [list(x) for x in ng.output_ids]  # lossless
    summary = pd.read_csv(out / "summary.csv")
    assert {"tau", "tokens_per_s", "speedup_vs_ar"} <= set(summary.columns)
    assert "results:" in r.stdout and (out / "rows.csv").exists()
    # the same command again: every row is already stored, nothing is added or duplicated
    parts = sorted(out.glob("rows-*.parquet"))
    r2 = cli(*TINY, f"out_dir={out}")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert sorted(out.glob("rows-*.parquet")) == parts
    assert len(pd.read_parquet(out / "rows.parquet")) == 8


BAD = {  # command line -> what the one line must say (the setting, the value, what it must be)
    "unknown model": (["model=nope"], "unknown model 'nope'"),
    "unknown drafter": (["drafter=nope"], "unknown drafter 'nope'"),
    "unknown verifier": (["verifier=nope"], "unknown verifier 'nope'"),
    "unknown dataset": (["dataset=nope"], "unknown dataset 'nope'"),
    "unknown drafter in matrix": (["matrix.drafters=[ar,nope]"], "unknown drafter 'nope'"),
    "missing dataset file": (["dataset=spec_bench", "dataset.path=/nonexistent/q.jsonl"], "/nonexistent/q.jsonl"),
    "dataset without path": (["dataset=mt_bench"], "dataset.path="),
    "k < 1": (["k=0"], "k=0 must be an integer >= 1 or null"),
    "k not a number": (["k=abc"], "k='abc' must be an integer >= 1 or null"),
    "k fractional": (["k=2.5"], "k=2.5 must be an integer >= 1 or null"),
    "k past the cache": (["k=10000"], "k=10000 + max_new_tokens=6 + 1 = 10007 positions exceed model.max_seq_len=2048"),
    "max_new_tokens not a number": (["max_new_tokens=abc"], "max_new_tokens='abc' must be an integer >= 1"),
    "max_new_tokens fractional": (["max_new_tokens=2.5"], "max_new_tokens=2.5 must be an integer >= 1"),
    "max_new_tokens < 1": (["max_new_tokens=0"], "max_new_tokens=0 must be an integer >= 1"),
    "max_new_tokens null": (["max_new_tokens=null"], "max_new_tokens=null must be an integer >= 1"),
    "temperature not a number": (["temperature=abc"], "temperature='abc' must be a number >= 0"),
    "temperature negative": (["temperature=-0.5"], "temperature=-0.5 must be a number >= 0"),
    "top_p out of range": (["top_p=1.5"], "top_p=1.5 must be a number > 0 and <= 1"),
    "tie_margin out of range": (["tie_margin=0.5"], "tie_margin=0.5 must be a number >= 0 and < 0.5"),
    "batch_size not a number": (["batch_size=x"], "batch_size='x' must be an integer >= 1 or a list, each an integer"),
    "batch_size list item": (["batch_size=[1,x]"], "batch_size=[1, 'x'] must be an integer >= 1 or a list"),
    "seed fractional": (["seed=1.5"], "seed=1.5 must be an integer"),
    "switch not a switch": (["fidelity=maybe"], "fidelity='maybe' must be true or false or auto"),
    "bool not a bool": (["warmup=1"], "warmup=1 must be true or false"),
    "model setting type": (["model.max_seq_len=abc"], "model.max_seq_len='abc' must be an integer >= 1"),
    "model enum": (["model.dtype=int3"], "model.dtype='int3' must be one of auto, fp32"),
    "dataset setting type": (["dataset.limit=2.5"], "dataset.limit=2.5 must be an integer >= 1 or null"),
    "drafter setting type": (["matrix.drafters=[{name:ngram,ngram_max:2.5}]"],
                             "drafter.ngram_max=2.5 must be an integer (drafter ngram; its default is 3)"),
    "verifier setting type": (["matrix.verifiers=[{name:int4,lm_head:1}]"],
                              "verifier.lm_head=1 must be true or false (verifier int4; its default is false)"),
    "path ignored by builtin": (["dataset.path=/missing.jsonl"], "is not read by the builtin prompt set"),
    "missing model folder": (["model=hf", "model.path=/no/such/model"], "model.path=/no/such/model: no such file"),
    "missing relative model folder": (["model=hf", "model.path=./no_such_model"], "model.path=./no_such_model: no such"),
    "missing tokenizer folder": (["model.tokenizer=no/such/tokenizer"], "model.tokenizer=no/such/tokenizer: no such"),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: bad input is judged without the network."""
    import socket

    def refuse(*a, **k):
        raise AssertionError(f"network access: {a[:2]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_no_results(case, tmp_path, monkeypatch, capsys, no_network):
    """The real entry point, in process: one line on stderr, exit 2, nothing written, no network."""
    from quasar_bench.__main__ import main

    args, needle = BAD[case]
    out = tmp_path / "never"
    for var in ("QUASAR_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # the model-path cases must fail before any probe
    if case.startswith("dataset without"):
        monkeypatch.setenv("QUASAR_OFFLINE", "1")  # the dataset fetch is tested with a mock in test_harness
    monkeypatch.setenv("QUASAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # Hydra's outputs/ folder
    monkeypatch.setattr(sys, "argv", ["quasar_bench", *TINY, f"out_dir={out}", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert needle in err[0] and err[0].startswith("quasar_bench: error:")
    assert not out.exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id": 2, "turns": \n')
    out = tmp_path / "never"
    r = cli(*TINY, f"out_dir={out}", "dataset=spec_bench", f"dataset.path={bad}")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "line 2" in err[0]
    assert not out.exists()


def test_shared_spec_bench_runs(tmp_path):
    path = SHARED / "spec_bench" / "question.jsonl"
    if not path.exists():
        pytest.skip("shared Spec-Bench data not present")
    out = tmp_path / "sb"
    r = cli("model=tiny_qwen3", "dataset=spec_bench", f"dataset.path={path}", "dataset.categories=[translation]",
            "dataset.limit=2", "max_new_tokens=4", "drafter=ngram", "verifier=reference", "progress=false",
            "repeats=1", f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_parquet(out / "rows.parquet")
    assert set(rows.category) == {"translation"} and len(rows) == 2 and set(rows.drafter) == {"ngram"}


def test_matrix_extra_cells_and_narrowing():
    from omegaconf import OmegaConf

    from quasar_bench.plan import plan_cells

    cfg = OmegaConf.create({"drafter": None, "verifier": None, "k": None, "matrix": {
        "drafters": ["ngram", "ar"], "verifiers": ["int4", "reference"],
        "extra": [{"verifiers": ["reference", "int8"], "drafters": ["ngram", {"name": "early_exit", "layers": 2}]}]}})
    plan = {v.name: [d.name for d in ds] for v, ds in plan_cells(cfg)}
    assert list(plan) == ["reference", "int4", "int8"]  # reference first: it makes the reference outputs
    assert plan == {"reference": ["ar", "ngram", "early_exit"], "int4": ["ar", "ngram"], "int8": ["ngram", "early_exit"]}
    cfg.drafter = {"name": "ngram"}  # drafter= on the command line: the product alone, narrowed
    assert {v.name: [d.name for d in ds] for v, ds in plan_cells(cfg)} == {"reference": ["ngram"], "int4": ["ngram"]}


def test_layerskip_rows_carry_the_one_searched_layer_set(tmp_path):
    """mode=search runs once on the reference model, for every verifier and every repeat; every
    verifier's rows carry the same layers."""
    out = tmp_path / "ls"
    drafter = (f"{{name:layerskip,mode:search,cache_dir:'{tmp_path}',"
               "search:{objective:acceptance,candidates:0,prompts:2,gen_tokens:8}}")
    r = cli("model=tiny_llama", "dataset.limit=2", "max_new_tokens=6", "progress=false", "matrix.extra=[]",
            "repeats=2", "matrix.verifiers=[reference,int8]", f"matrix.drafters=[ar,{drafter}]", f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prompts: 2 from builtin (multi_turn 1, translation 1)" in r.stdout + r.stderr  # printed before the run
    assert (r.stdout + r.stderr).count("layerskip: searching a skip set") == 1  # one search, not one per verifier
    rows = pd.read_parquet(out / "rows.parquet")
    ls = rows[rows.drafter == "layerskip"]
    assert set(ls.verifier) == {"reference", "int8"} and len(ls) == 2 * 3 * 2  # 2 prompts (the first 2-turn), 2 repeats
    layers = {tuple(x) for x in ls.draft_layers}
    assert len(layers) == 1 and len(next(iter(layers))) == 2 and set(ls.draft_layers_source) == {"search:reference"}
    assert rows[rows.drafter == "ar"].draft_layers.isna().all()
    assert len(list((tmp_path / "layerskip").glob("*.json"))) == 1


def test_other_settings_in_one_out_dir_are_other_cells_not_pooled(tmp_path):
    """Two runs into one out_dir that differ only in a drafter setting: the rows sit side by side
    as two cells and the summary shows both, never their average."""
    out = tmp_path / "shared"
    base = ["model=tiny_llama", "verifier=reference", "drafter=ngram", "dataset.limit=1", "max_new_tokens=8",
            "progress=false", "repeats=1", f"out_dir={out}"]
    for extra in ([], ["drafter.ngram_max=1"]):
        r = cli(*base, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_parquet(out / "rows.parquet")
    assert rows.cell_id.nunique() == 2 and rows.context_id.nunique() == 1
    summary = pd.read_csv(out / "summary.csv")
    labels = set(summary[summary.category == "all"].drafter)
    assert len(labels) == 2 and all(label.startswith("ngram #") for label in labels)
    for cell, g in rows.groupby("cell_id"):  # each labelled row holds exactly its own cell's numbers
        s = summary[(summary.category == "all") & (summary.drafter == f"ngram #{cell[:6]}")].iloc[0]
        assert s.tau == pytest.approx(g.new_tokens.sum() / g.verify_steps.sum())
