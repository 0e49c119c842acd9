"""Spec-Bench interop (quasar_bench/specbench.py): a real run exported as Spec-Bench answer files,
checked field by field against the run's rows (read here straight from its parquet files), Spec-Bench's
speed.py computation (written out below from its source) on those files against our summary, the
speedup table of hand-written answer files against hand-computed numbers, and bad input as one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quasar_bench.specbench import file_names, main, step_lengths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tiny_llama, one 2-turn prompt (multi_turn) and one 1-turn prompt (translation), ar and ngram,
    each at batch size 1 and 2: 4 cells."""
    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    out = tmp_path_factory.mktemp("specbench") / "out"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llama", "dataset.limit=2", "max_new_tokens=6",
                                           "progress=false", "matrix.verifiers=[reference]", "matrix.extra=[]",
                                           "matrix.drafters=[ar,ngram]", "batch_size=[1,2]", f"out_dir={out}",
                                           "repeats=1", "experiment_name=t"])
    Experiment(cfg).run()
    rows = pd.concat([pd.read_parquet(f) for f in sorted(out.glob("rows-*.parquet"))], ignore_index=True)
    return out, rows


def export(run_dir, dest, *extra):
    assert main(["export", str(run_dir), str(dest), *extra]) == 0
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(dest.glob("*.jsonl"))}


def cell_name(r) -> str:
    k = "" if r["baseline"] else f"-k{r['k']}"
    return f"tiny_llama-reference-{r['drafter']}{k}-temp-0.0" + (f"-b{r['batch_size']}" if r["batch_size"] > 1 else "")


def test_export_fields_equal_the_rows(run, tmp_path):
    out, rows = run
    files = export(out, tmp_path / "ans")
    cells = rows.groupby("cell_id")
    assert sorted(files) == sorted(cell_name(g.iloc[0]) for _, g in cells)
    assert sum(name.endswith("-b2") for name in files) == 2
    for _, g in cells:
        lines = files[cell_name(g.iloc[0])]
        assert sorted(a["question_id"] for a in lines) == sorted(set(g["prompt_id"]))
        for a in lines:
            q = g[g["prompt_id"] == a["question_id"]].sort_values("turn")
            c = a["choices"][0]
            assert a["category"] == q["category"].iloc[0] and a["model_id"] == cell_name(g.iloc[0])
            assert c["index"] == 0 and len(a["choices"]) == 1 and isinstance(a["tstamp"], float)
            assert c["turns"] == list(q["output_text"]) and len(c["turns"]) == len(q) == q["turn"].max()
            assert c["decoding_steps"] == list(q["verify_steps"]) and c["new_tokens"] == list(q["new_tokens"])
            assert c["wall_time"] == pytest.approx(list(q["prefill_s"] + q["decode_s"]), rel=1e-12)
            # tokens per verify step: accepted drafts + 1, summing to the new tokens, one per step
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"])
            assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
            if (q["stopped_by"] != "eos").all():
                assert c["accept_lengths"] == [int(x) + 1 for acc in q["accepted_lengths"] for x in acc]
            if g["baseline"].iloc[0]:
                assert set(c["accept_lengths"]) == {1}
    multi = [a for a in files[cell_name(rows[rows["drafter"] == "ngram"].iloc[0])] if a["category"] == "multi_turn"]
    assert len(multi) == 1 and len(multi[0]["choices"][0]["turns"]) == 2  # one question, both turns


def specbench_speed(answers, category):
    """evaluation/speed.py's `speed` for the method file: per question Σ new_tokens / Σ wall_time,
    averaged over the questions of `category` ("overall": all); its mean accepted length."""
    data = [a for a in answers if category == "overall" or a["category"] == category]
    speeds = [sum(a["choices"][0]["new_tokens"]) / sum(a["choices"][0]["wall_time"]) for a in data]
    return np.mean(speeds), np.mean([x for a in data for x in a["choices"][0]["accept_lengths"]])


def test_specbench_speed_of_the_export_equals_our_summary(run, tmp_path, capsys):
    out, rows = run
    files = export(out, tmp_path / "ans", "--wall-time", "decode")
    summary = pd.read_csv(out / "summary.csv")
    for name, answers in files.items():
        drafter, b = ("ar" if "-ar-" in name else "ngram"), (2 if name.endswith("-b2") else 1)
        s = summary[(summary["drafter"] == drafter) & (summary["batch_size"] == b)].set_index("category")
        # one prompt per category: speed.py's mean over questions is that prompt's pooled rate
        for cat in ("multi_turn", "translation"):
            tps, acc = specbench_speed(answers, cat)
            assert tps == pytest.approx(s.loc[cat, "tokens_per_s"], rel=1e-9)
            assert acc == pytest.approx(s.loc[cat, "tau"], rel=1e-9)  # every step kept: mean length = τ
        # overall: speed.py averages the two prompts' rates, where our summary pools tokens over time
        tps, _ = specbench_speed(answers, "overall")
        assert tps == pytest.approx(np.mean([s.loc[c, "tokens_per_s"] for c in ("multi_turn", "translation")]), rel=1e-9)
    # import of our own files: the same tokens/s, and at B = 1 the summary's speedup over AR
    base, ngram = tmp_path / "ans" / f"{cell_name(dict(drafter='ar', baseline=True, k=0, batch_size=1))}.jsonl", \
        tmp_path / "ans" / f"{cell_name(dict(drafter='ngram', baseline=False, k=5, batch_size=1))}.jsonl"
    capsys.readouterr()
    assert main(["import", "--base", str(base), str(ngram), "--out", str(tmp_path / "t.csv")]) == 0
    assert "paired on 2 question_ids" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "t.csv").set_index("category")
    assert list(table.index) == ["multi_turn", "translation", "overall"]
    s = summary[(summary["drafter"] == "ngram") & (summary["batch_size"] == 1)].set_index("category")
    for cat in ("multi_turn", "translation", "overall"):
        assert table.loc[cat, "tokens_per_s"] == pytest.approx(specbench_speed(files[ngram.stem], cat)[0], rel=1e-9)
        assert table.loc[cat, "base_tokens_per_s"] == pytest.approx(specbench_speed(files[base.stem], cat)[0], rel=1e-9)
    for cat in ("multi_turn", "translation"):  # the summary times throughput from the batch's end: ~1e-4 apart
        assert table.loc[cat, "speedup"] == pytest.approx(s.loc[cat, "speedup_vs_ar"], rel=2e-3)


def test_tokenizer_counts_the_baseline_as_speed_py_does(run, tmp_path):
    """--tokenizer re-counts the baseline's tokens from its text, len(ids) - 1 per turn (speed.py)."""
    from transformers import AutoTokenizer

    from quasar_bench.fileio import cache_root
    from quasar_bench.models import smollm2_folder

    out, _ = run
    files = export(out, tmp_path / "ans")
    tok_dir = smollm2_folder(cache_root())  # tiny_llama's tokenizer: the run above made it
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    base = tmp_path / "ans" / "tiny_llama-reference-ar-temp-0.0.jsonl"
    method = tmp_path / "ans" / "tiny_llama-reference-ngram-k5-temp-0.0.jsonl"
    assert main(["import", "--base", str(base), str(method), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "t.csv")]) == 0
    table = pd.read_csv(tmp_path / "t.csv").set_index("category")
    speeds0 = [sum(len(tok(t).input_ids) - 1 for t in a["choices"][0]["turns"]) / sum(a["choices"][0]["wall_time"])
               for a in files[base.stem]]
    assert table.loc["overall", "base_tokens_per_s"] == pytest.approx(np.mean(speeds0), rel=1e-9)


def test_rows_csv_exports_the_same_answers(run, tmp_path):
    """A run directory holding only rows.csv (lists as JSON) or an older rows.csv (numpy's print form)
    exports what the row store does."""
    out, rows = run
    want = export(out, tmp_path / "store")
    for form in ("json", "numpy"):
        d = tmp_path / form
        d.mkdir()
        if form == "json":
            shutil.copy(out / "rows.csv", d / "rows.csv")
        else:
            rows.to_csv(d / "rows.csv", index=False)  # list cells printed by numpy: "[0 1 1 0]"
        got = export(d, tmp_path / f"ans-{form}")
        strip = lambda files: {n: [{**a, "tstamp": 0} for a in v] for n, v in files.items()}  # noqa: E731
        assert strip(got) == strip(want)


def test_step_lengths_cut_at_eos():
    """A step whose accepted drafts held the EOS keeps only the tokens up to it: 3 drafts accepted
    (4 tokens) but the EOS was the second, so that step made 2; the row's 5 new tokens say so."""
    row = {"cell_id": "c", "prompt_id": "p", "turn": 1, "accepted_lengths": [2, 3], "verify_steps": 2,
           "new_tokens": 5}
    assert step_lengths(row) == [3, 2]
    assert step_lengths({**row, "new_tokens": 7}) == [3, 4]


def test_cells_sharing_a_name_get_their_id():
    """Two cells with the same labels (other drafter settings): each name gets its cell id, before
    the batch suffix; a cell of its own keeps the plain name."""
    df = pd.DataFrame([dict(cell_id=c, model="Qwen/Qwen3 8B", verifier="int4", drafter="ngram", baseline=False, k=5,
                            temperature=0.0, batch_size=b) for c, b in (("aa", 4), ("bb", 4), ("cc", 1))])
    assert file_names(df) == {"aa": "Qwen_Qwen3_8B-int4-ngram-k5-temp-0.0-aa-b4",
                              "bb": "Qwen_Qwen3_8B-int4-ngram-k5-temp-0.0-bb-b4",
                              "cc": "Qwen_Qwen3_8B-int4-ngram-k5-temp-0.0"}


def write(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def answer(qid, cat, tokens, wall, accept=None, turns=None):
    c = {"index": 0, "turns": turns or ["x"] * len(tokens), "decoding_steps": [1] * len(tokens),
         "new_tokens": tokens, "wall_time": wall}
    if accept is not None:
        c["accept_lengths"] = accept
    return {"question_id": qid, "category": cat, "answer_id": "a", "model_id": "m", "choices": [c], "tstamp": 0.0}


def test_import_of_hand_written_answers(tmp_path, capsys):
    base = write(tmp_path / "base.jsonl", [answer(1, "translation", [10], [1.0], [1] * 10),
                                           answer(2, "translation", [20], [4.0]),
                                           answer(3, "writing", [5, 5], [0.5, 0.5])])
    method = write(tmp_path / "eagle.jsonl", [answer(3, "writing", [5, 5], [0.25, 0.25], [2, 3, 1, 4]),
                                              answer(1, "translation", [10], [0.5], [2, 2, 2, 4]),
                                              answer(2, "translation", [20], [1.0], [4, 4, 4, 4, 4]),
                                              answer(9, "qa", [7], [1.0], [7])])  # no base answer: left out
    assert main(["import", "--base", str(base), str(method), "--out", str(tmp_path / "t.csv")]) == 0
    printed = capsys.readouterr().out
    assert "paired on 3 question_ids; left out 1 only in it and 0 only in the base" in printed
    t = pd.read_csv(tmp_path / "t.csv").set_index("category")
    assert list(t.index) == ["writing", "translation", "mt_bench", "overall"]
    # translation: method speeds 10/0.5 = 20 and 20/1 = 20; base 10/1 = 10 and 20/4 = 5
    assert t.loc["translation", ["n", "tokens_per_s", "base_tokens_per_s", "speedup"]].tolist() == \
        pytest.approx([2, 20.0, 7.5, 20 / 7.5])
    assert t.loc["translation", "accept_length"] == pytest.approx(30 / 9)  # (2+2+2+4 + 5*4) / 9 steps
    # writing (speed.py's mt_bench group holds it): 10 tokens in 0.5 s vs in 1 s
    for cat in ("writing", "mt_bench"):
        assert t.loc[cat, ["n", "tokens_per_s", "base_tokens_per_s", "speedup", "accept_length"]].tolist() == \
            pytest.approx([1, 20.0, 10.0, 2.0, 2.5])
    # overall: mean of per-question speeds (20, 20, 20) over (10, 5, 10)
    assert t.loc["overall", ["n", "tokens_per_s", "base_tokens_per_s", "speedup"]].tolist() == \
        pytest.approx([3, 20.0, 25 / 3, 2.4])
    assert "eagle" in printed and "2.40" in printed


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("quasar_bench.specbench: error: "), err
    return err


def test_bad_answer_files_give_one_line(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", [answer(1, "qa", [4], [1.0], [2, 2])])
    cases = {
        "bad JSON": ([json.dumps(answer(1, "qa", [4], [1.0], [2, 2])), "{not json"], "bad.jsonl line 2: bad JSON"),
        "no wall_time": ([{"question_id": 1, "category": "qa", "choices": [{"turns": ["x"], "new_tokens": [4]}]}],
                         "bad.jsonl line 1: choices[0].wall_time"),
        "twice": ([answer(1, "qa", [4], [1.0], [4]), "", answer(1, "qa", [4], [1.0], [4])],
                  "bad.jsonl line 3: question_id 1 again (first at"),
        "no accept lengths": ([answer(1, "qa", [4], [1.0])], "bad.jsonl line 1: choices[0].accept_lengths"),
        "zero time": ([answer(1, "qa", [4], [0.0], [4])], "wall_time sums to 0"),
        "other question": ([answer(2, "qa", [4], [1.0], [4])], "share no question_id"),
        "other category": ([answer(1, "rag", [4], [1.0], [4])], "not the same question set"),
        "empty": ([], "holds no answers"),
    }
    for what, (lines, message) in cases.items():
        bad = write(tmp_path / "bad.jsonl", lines)
        assert message in one_line_error(capsys, ["import", "--base", str(good), str(bad)]), what
    assert "short.jsonl line 1: choices[0].new_tokens" in one_line_error(
        capsys, ["import", "--base", str(write(tmp_path / "short.jsonl", [answer(1, "qa", [], [1.0], turns=["x"])])), str(good)])
    assert "no such folder" in one_line_error(capsys, ["import", "--base", str(good), str(good),
                                                       "--tokenizer", str(tmp_path / "nope")])


def test_bad_run_dirs_give_one_line_and_write_nothing(run, tmp_path, capsys):
    out, rows = run
    dest = tmp_path / "ans"
    (tmp_path / "empty").mkdir()
    assert "holds no rows" in one_line_error(capsys, ["export", str(tmp_path / "empty"), str(dest)])
    # rows recorded before per-step acceptance was stored (like results/gpu/e2e_rows.csv)
    old = tmp_path / "old"
    old.mkdir()
    rows.drop(columns=["accepted_lengths"]).to_csv(old / "rows.csv", index=False)
    assert "no accepted_lengths column" in one_line_error(capsys, ["export", str(old), str(dest)])
    # an elided numpy list in an old rows.csv
    elided = tmp_path / "elided"
    elided.mkdir()
    rows.assign(output_ids="[1 2 ... 9]").to_csv(elided / "rows.csv", index=False)
    assert "column output_ids holds '[1 2 ... 9]'" in one_line_error(capsys, ["export", str(elided), str(dest)])
    # a damaged row file: named, and left where it is
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    victim = sorted(broken.glob("rows-*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:200])
    err = one_line_error(capsys, ["export", str(broken), str(dest)])
    assert victim.name in err and "quasar_bench.store repair" in err and victim.exists()
    # an interrupted cell: one whose 2-turn prompt lacks its second turn
    cut = tmp_path / "cut"
    cut.mkdir()
    keep = ~((rows["drafter"] == "ngram") & (rows["batch_size"] == 1) & (rows["turn"] == 2))
    rows[keep].to_parquet(cut / "rows.parquet")
    assert "lacks later turns of prompt multi_turn-1" in one_line_error(capsys, ["export", str(cut), str(dest)])
    # a row whose steps disagree with its new tokens
    bad = tmp_path / "bad"
    bad.mkdir()
    rows.assign(new_tokens=rows["new_tokens"] + 50).to_parquet(bad / "rows.parquet")
    assert "a damaged row" in one_line_error(capsys, ["export", str(bad), str(dest)])
    assert not dest.exists()  # nothing half-written


def test_module_runs_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quasar_bench.specbench", "export", str(tmp_path / "none"),
                        str(tmp_path / "ans"), "--wall-time", "all"], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--wall-time: invalid choice: 'all'" in r.stderr
