"""Repeated timings: every prompt of every cell timed `repeats` times, repeat r of every cell before
repeat r + 1 of any, batch sizes and the cells of each shuffled (seeded) within each repeat; rows keyed by (cell, prompt, turn,
repeat) so a partial run resumes with nothing lost or doubled; greedy repeats must agree."""
import random
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from quasar_bench.errors import QuasarError
from quasar_bench.plan import schedule
from quasar_bench.run import Experiment
from quasar_bench.store import ResultStore

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED = 3
# 2 verifiers x 2 batch sizes x 2 drafters = 8 cells; 3 prompts, the first with 2 turns -> 4 rows a visit
ARGS = ["model=tiny_llama", "dataset.limit=3", "max_new_tokens=4", "progress=false", "matrix.extra=[]",
        "matrix.verifiers=[reference,int8]", "matrix.drafters=[ar,ngram]", "batch_size=[1,2]", "repeats=2",
        f"seed={SEED}", "experiment_name=repeats"]
PLAN = [(v, b, d) for v in ("reference", "int8") for b in (1, 2) for d in ("ar", "ngram")]  # plan order
VISIT = ["repeat", "verifier", "batch_size", "drafter"]
KEY = ["cell_id", "prompt_id", "turn", "repeat"]


def run(out: Path) -> pd.DataFrame:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*ARGS, f"out_dir={out}"])
    Experiment(cfg).run()
    return ResultStore(out).load()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("repeats") / "full"
    return out, run(out)


def documented_order(seed: int, n_repeats: int) -> list[tuple]:
    """The order README states: per repeat, one random.Random(f"{seed}/repeat/{r}") shuffles the batch
    sizes, then the plan's cells of each size in that order."""
    visits = []
    for r in range(n_repeats):
        rng = random.Random(f"{seed}/repeat/{r}")
        sizes = [1, 2]
        rng.shuffle(sizes)
        for b in sizes:
            cells = [c for c in PLAN if c[1] == b]
            rng.shuffle(cells)
            visits += [(r, *c) for c in cells]
    return visits


def test_repeats_run_interleaved_in_the_documented_shuffled_order(full):
    _, rows = full
    assert len(rows) == 8 * 4 * 2 and rows.groupby("repeat").size().to_dict() == {0: 32, 1: 32}
    visits = rows.groupby(VISIT).timed_at.agg(["min", "max"]).reset_index().sort_values("min")
    # the rows' start times: no visit overlaps another, and every repeat-0 row precedes every repeat-1 row
    assert (visits["max"].to_numpy()[:-1] < visits["min"].to_numpy()[1:]).all()
    assert rows[rows.repeat == 0].timed_at.max() < rows[rows.repeat == 1].timed_at.min()
    observed = [(int(r), v, int(b), d) for r, v, b, d in visits[VISIT].itertuples(index=False)]
    expected = documented_order(SEED, 2)
    assert observed == expected
    # the check can fail: both repeats are shuffled, differently, so a fixed or unshuffled order is caught
    first, second = [x[1:] for x in expected[:8]], [x[1:] for x in expected[8:]]
    assert first != PLAN and second != PLAN and first != second
    # within a repeat, one batch size's visits run back to back: a stopped run leaves whole sizes
    # (every verifier x drafter pair at them), so its tables have pairs to compare
    sizes = [b for _, _, b, _ in observed]
    assert all(len(set(sizes[i:i + 4])) == 1 for i in range(0, len(sizes), 4))


def test_one_batch_size_is_the_plain_shuffle_of_the_cells():
    """README: with one batch size the order is random.Random(f"{seed}/repeat/{r}") shuffling the
    plan's cells, as before batch sizes were blocked, so single-size runs keep their visit order."""
    plan = [("reference", ["ar", "ngram", "lookahead"]), ("int8", ["ar", "ngram", "lookahead"])]
    cells = [(vi, 1, d) for vi, (_, ds) in enumerate(plan) for d in ds]
    for seed in (0, 3, 11):
        expected = []
        for r in range(3):
            order = list(range(len(cells)))
            random.Random(f"{seed}/repeat/{r}").shuffle(order)
            expected += [(r, *cells[i]) for i in order]
        assert schedule(plan, [1], 3, seed) == expected
    # and it is a shuffle: some seed's first repeat differs from plan order
    assert any([v[1:] for v in schedule(plan, [1], 1, seed)] != cells for seed in range(5))


def test_greedy_repeats_and_batches_generate_the_same_tokens(full):
    _, rows = full
    for _, g in rows.groupby(["cell_id", "prompt_id", "turn"]):
        assert len(g) == 2 and list(g.output_ids.iloc[0]) == list(g.output_ids.iloc[1])
    one = rows[(rows.batch_size == 1)].set_index(["verifier", "drafter", "prompt_id", "turn", "repeat"]).sort_index()
    two = rows[(rows.batch_size == 2)].set_index(["verifier", "drafter", "prompt_id", "turn", "repeat"]).sort_index()
    assert [list(x) for x in one.output_ids] == [list(x) for x in two.output_ids]
    # a batch is the rows that shared forwards: never rows of two repeats
    assert (rows.groupby("batch_id").repeat.nunique() == 1).all()


def test_resume_after_a_partial_run_with_repeats_loses_and_doubles_nothing(full, tmp_path):
    src, rows = full
    out = tmp_path / "partial"
    shutil.copytree(src, out)
    files = {f: pq.read_table(f, columns=["repeat"])["repeat"].to_pylist() for f in sorted(out.glob("rows-*.parquet"))}
    rep0 = [f for f, r in files.items() if set(r) == {0}]
    rep1 = [f for f, r in files.items() if set(r) == {1}]
    gone = [rep0[0], *rep1[:2]]  # as if the run had been killed before writing these chunks
    lost = pd.concat([pd.read_parquet(f) for f in gone])
    for f in gone:
        f.unlink()
    # a file written before repeats existed (no `repeat` column) counts as repeat 0
    legacy = rep0[1]
    t = pq.read_table(legacy)
    pq.write_table(t.drop(["repeat"]), legacy)
    kept_times = set(t.to_pandas().timed_at)
    resumed = run(out)
    assert not resumed.duplicated(KEY).any()
    a, b = rows.sort_values(KEY).reset_index(drop=True), resumed.sort_values(KEY).reset_index(drop=True)
    assert a[KEY].values.tolist() == b[KEY].values.tolist()  # none missing, none extra
    assert [list(x) for x in a.output_ids] == [list(x) for x in b.output_ids]
    redone = b.merge(lost[KEY], on=KEY)
    assert len(redone) == len(lost) and (redone.timed_at > rows.timed_at.max()).all()  # only the lost rows re-ran
    assert kept_times <= set(b.timed_at)  # the legacy file's rows were not run again


def test_a_repeat_generating_other_tokens_stops_the_run(full, tmp_path):
    """The determinism check: a stored repeat whose tokens a new repeat does not reproduce (here
    edited by hand) ends the run with one line, and the disagreeing rows are not stored."""
    src, rows = full
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    cell = rows[(rows.verifier == "reference") & (rows.drafter == "ar") & (rows.batch_size == 1)].cell_id.iloc[0]
    files = sorted(out.glob(f"rows-{cell}-*.parquet"))
    by_repeat = {int(pq.read_table(f, columns=["repeat"])["repeat"][0].as_py()): [] for f in files}
    for f in files:
        by_repeat[int(pq.read_table(f, columns=["repeat"])["repeat"][0].as_py())].append(f)
    edited = pd.read_parquet(by_repeat[0][-1])
    pid = edited.prompt_id.iloc[0]
    edited["output_ids"] = [[int(x[0]) + 1, *x[1:]] for x in edited.output_ids]
    edited.to_parquet(by_repeat[0][-1], index=False)
    for f in by_repeat[1]:  # repeat 1 of that prompt must be generated again
        if pid in set(pd.read_parquet(f, columns=["prompt_id"]).prompt_id):
            f.unlink()
    with pytest.raises(QuasarError, match=f"prompt {pid} turn 1 generated other tokens than the cell's earlier "
                                          "repeat.*repeats=1") as e:
        run(out)
    assert "\n" not in str(e.value)
    after = ResultStore(out).load()
    assert after[(after.cell_id == cell) & (after.prompt_id == pid) & (after.repeat == 1)].empty


SPEC = CONF.parent.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


@pytest.mark.skipif(not SPEC.exists(), reason="shared Spec-Bench data not present")
def test_full_and_spec_bench_experiments_evaluate_48_prompts_or_more_timed_3_times():
    from collections import Counter

    from quasar_bench.cli_checks import compose_first_job
    from quasar_bench.data import load_prompts
    from quasar_bench.summary import MIN_CI_N

    # gpu_batch is not among them: its acceptance is synthetic and forced (prompts set only lengths),
    # and it needs every batch full up to B = 32 (checked below)
    for name in ("smollm2_full", "qwen3_int4", "quasar_repro"):
        cfg, _ = compose_first_job([f"experiment={name}", f"dataset.path={SPEC}"], CONF)
        ds = cfg.dataset
        prompts = load_prompts(ds.name, ds.path, ds.categories, ds.limit, ds.per_category, int(ds.seed))
        assert len(prompts) >= 48 and cfg.repeats >= 3, name
        if name == "smollm2_full":  # every category reaches an interval, not only `all`
            assert min(Counter(p.category for p in prompts).values()) >= MIN_CI_N
    cfg, _ = compose_first_job(["experiment=replay_source"], CONF)
    assert cfg.repeats == 1  # acceptance traces only: identical in every repeat
    cfg, _ = compose_first_job(["experiment=gpu_batch", f"dataset.path={SPEC}"], CONF)
    ds = cfg.dataset
    prompts = load_prompts(ds.name, ds.path, ds.categories, ds.limit, ds.per_category, int(ds.seed))
    assert all(len(prompts) % b == 0 for b in cfg.batch_size) and len({p.category for p in prompts}) > 1


def test_spec_bench_export_writes_one_answer_set_per_repeat(full, tmp_path):
    """Several repeats export as Spec-Bench's run_1, run_2, ... folders (what speed.py --mean-report
    reads), each holding that repeat's rows."""
    import json

    from quasar_bench.specbench import main

    src, rows = full
    assert main(["export", str(src), str(tmp_path / "ans"), "--wall-time", "decode"]) == 0
    assert sorted(p.name for p in (tmp_path / "ans").iterdir()) == ["run_1", "run_2"]
    for r in (0, 1):
        files = sorted((tmp_path / "ans" / f"run_{r + 1}").glob("*.jsonl"))
        assert len(files) == 8
        got = {(a["answer_id"], t): (w, n) for f in files for line in f.read_text().splitlines()
               for a in [json.loads(line)]
               for t, (w, n) in enumerate(zip(a["choices"][0]["wall_time"], a["choices"][0]["new_tokens"]), 1)}
        mine = rows[rows.repeat == r]
        assert got == {(f"{c}/{p}", t): (pytest.approx(d, rel=1e-12), n)
                       for c, p, t, d, n in mine[["cell_id", "prompt_id", "turn", "decode_s", "new_tokens"]].itertuples(index=False)}
