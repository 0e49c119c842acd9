import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from quasar_bench.errors import QuasarError
from quasar_bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # import the checkout even if not installed
IDENT = {"experiment": "t", "dataset": "builtin", "max_new_tokens": 32, "seed": 0}


def row(cell, pid, turn, **kw):
    r = {"experiment": "t", "cell_id": cell, "prompt_id": pid, "turn": turn, "new_tokens": 10,
         "verify_steps": 4, "accepted_per_position": [0.9, 0.5], "output_ids": [1, 2, 3],
         "kl_mean": None, "ref_exact_match": None}
    r.update(kw)
    return r


def test_open_append_load_roundtrip(tmp_path):
    st = ResultStore(tmp_path / "r").open({"identity": IDENT, "config": {"k": 5}})
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["identity"] == IDENT and m["config"] == {"k": 5}
    assert "git_commit" in m["environment"] and "torch" in m["environment"]["packages"]
    st.append([row("c1", "a", 0), row("c1", "a", 1)])
    st.append([row("c1", 7, 0, kl_mean=0.25, ref_exact_match=True)])  # int id -> "7"
    st.append([row("c2", "a", 0)])
    df = ResultStore(tmp_path / "r").load()
    assert len(df) == 4 and set(df.prompt_id) == {"a", "7"}
    assert df.kl_mean.dtype == float and df.kl_mean.isna().sum() == 3
    assert list(df.accepted_per_position.iloc[0]) == [0.9, 0.5]
    assert len(list((tmp_path / "r").glob("rows-c1-*.parquet"))) == 2


def test_resume_skips_done_rows(tmp_path):
    root = tmp_path / "r"
    st = ResultStore(root).open({"identity": IDENT})
    st.append([row("c1", "p0", 0), row("c1", "p0", 1)])
    st.append([row("c1", "p1", 0)])
    st.close()  # a run's cell locks are held until close() (or exit): the next run may write c1
    st2 = ResultStore(root).open({"identity": IDENT})  # a resumed run
    assert len(st2.manifest()["sessions"]) == 1  # not logged before it locks a cell
    assert st2.done_keys("c1") == {("p0", 0, 0), ("p0", 1, 0), ("p1", 0, 0)}  # (prompt, turn, repeat)
    assert st2.done_keys("c2") == set()
    with pytest.raises(RuntimeError, match="twice"):
        st2.append([row("c1", "p1", 0)])
    todo = [(p, t) for p in ("p0", "p1", "p2") for t in (0, 1) if (p, t, 0) not in st2.done_keys("c1")]
    assert todo == [("p1", 1), ("p2", 0), ("p2", 1)]
    st2.append([row("c1", "p2", 0)])
    assert len(st2.manifest()["sessions"]) == 2  # the resumed run, logged once it wrote


def test_identity_mismatch_writes_nothing(tmp_path):
    root = tmp_path / "r"
    ResultStore(root).open({"identity": IDENT, "config": {"a": 1}})
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(QuasarError, match="different configuration.*max_new_tokens.*out_dir="):
        ResultStore(root).open({"identity": {**IDENT, "max_new_tokens": 64}})
    assert (root / "manifest.json").read_bytes() == before


def test_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(QuasarError, match="out_dir="):
        ResultStore(blocker / "sub").open({"identity": IDENT})
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(QuasarError, match="out_dir="):
            ResultStore(ro).open({"identity": IDENT})


def test_load_ignores_temp_files_and_rejects_duplicates(tmp_path):
    root = tmp_path / "r"
    st = ResultStore(root).open({"identity": IDENT})
    f = st.append([row("c1", "a", 0)])
    (root / ".tmp-abc.parquet").write_bytes(f.read_bytes()[:50])  # a torn temp file
    assert len(ResultStore(root).load()) == 1
    shutil.copy(f, root / "rows-c1-copy.parquet")
    with pytest.raises(QuasarError, match="delete the extra"):
        ResultStore(root).load()


def test_cells_recorded_once(tmp_path):
    st = ResultStore(tmp_path).open({"identity": IDENT})
    st.record_cell("c1", {"drafter": "ngram", "k": 5})
    st.record_cell("c1", {"drafter": "ngram", "k": 5})
    assert st.cells() == {"c1": {"drafter": "ngram", "k": 5}}
    with pytest.raises(RuntimeError):
        st.record_cell("c1", {"drafter": "ngram", "k": 6})


WRITER = textwrap.dedent("""
    import random, sys, time
    from quasar_bench.store import ResultStore
    root, n = sys.argv[1], int(sys.argv[2])
    st = ResultStore(root).open({"identity": {"experiment": "kill"}})
    print("ready", flush=True)
    for cell in ("c1", "c2"):
        done = st.done_keys(cell)
        for i in range(n):
            if (str(i), 0, 0) in done:
                continue
            rows = [{"cell_id": cell, "prompt_id": str(i), "turn": t, "value": i * 10 + t,
                     "output_text": "x" * 200_000} for t in (0, 1)]
            # >= 15 ms a prompt: 80 appends outlast the test's 1.0 s of kill delays on any machine,
            # so every kill lands mid-run however fast the disk is
            time.sleep(random.uniform(0.015, 0.025))
            st.append(rows)
""")


def test_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root, n = tmp_path / "r", 40
    rng = random.Random(1234)
    counts = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(n)],
                                stdout=subprocess.PIPE, text=True, env=ENV)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(len(ResultStore(root).load()))  # readable after every kill
    assert counts == sorted(counts)  # nothing already stored is ever lost
    assert 0 < counts[-1] < 2 * 2 * n, "kills should land mid-run"
    subprocess.run([sys.executable, str(script), str(root), str(n)], check=True,
                   stdout=subprocess.DEVNULL, timeout=120, env=ENV)
    df = ResultStore(root).load()  # raises on duplicates
    assert len(df) == 2 * 2 * n
    assert not list(root.glob(".tmp-*"))  # torn temp files of killed runs are cleaned on open
    got = {(c, p, t): v for c, p, t, v in zip(df.cell_id, df.prompt_id, df.turn, df.value)}
    assert got == {(c, str(i), t): i * 10 + t for c in ("c1", "c2") for i in range(n) for t in (0, 1)}
    # every stored file holds a whole prompt (both turns), never half of one
    assert (df.groupby(["cell_id", "prompt_id"]).size() == 2).all()


def test_row_files_are_lean_and_load_beside_old_ones(tmp_path):
    """A row file is written without pandas' schema metadata and column statistics: under half the
    size of the same rows written with pyarrow's defaults (the format before); a store holding one
    file of each format loads every row with the same values and types, whichever file comes first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wide = {f"metric_{i}": float(i) for i in range(60)}  # a run's ~70 columns
    for old_cell in ("c0", "c9"):  # the old-format file sorts before / after the new one
        root = tmp_path / old_cell
        st = ResultStore(root).open({"identity": IDENT, "config": {}})
        new = st.append([row("c1", "a", 0, **wide)])
        meta = pq.read_metadata(new)
        assert b"pandas" not in (meta.schema.to_arrow_schema().metadata or {})
        assert not meta.row_group(0).column(0).is_stats_set
        old_df = pd.DataFrame([row(old_cell, "b", 0, repeat=0, **wide)])
        old_df["prompt_id"] = old_df["prompt_id"].astype(str)
        old = root / f"rows-{old_cell}-0000.parquet"
        pq.write_table(pa.Table.from_pandas(old_df, preserve_index=False), old)  # pyarrow's defaults
        assert new.stat().st_size < old.stat().st_size / 2
        df = ResultStore(root).load().sort_values("prompt_id").reset_index(drop=True)
        assert list(df.cell_id) == ["c1", old_cell] and list(df.prompt_id) == ["a", "b"]
        assert df.prompt_id.map(type).eq(str).all() and df.turn.dtype == "int64"
        assert df.metric_59.tolist() == [59.0, 59.0] and df.kl_mean.dtype == float
        assert [list(x) for x in df.output_ids] == [[1, 2, 3], [1, 2, 3]]
