"""Faults of the result store: concurrent runs, killed runs, damaged files, check/repair, exports.
Pure store (no model); every test runs in seconds."""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from quasar_bench import store as store_mod
from quasar_bench.errors import QuasarError
from quasar_bench.store import ResultStore, atomic_write_bytes, atomic_write_text, write_json

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# the identity the engine uses, and a cell config holding the same settings (repair infers from it)
IDENT = {"experiment": "t", "max_new_tokens": 32, "seed": 0, "device": "cpu"}
CELL = {"drafter": {"name": "ngram", "k": 5}, "max_new_tokens": 32, "seed": 0, "device": "cpu"}
IN_USE = r"is in use by pid \d+ on host \S+ since \S+.*; wait for it or pick another out_dir="


def row(cell, pid, turn, **kw):
    return {"experiment": "t", "cell_id": cell, "prompt_id": pid, "turn": turn, "new_tokens": 10,
            "accepted_per_position": [0.9, 0.5], "kl_mean": None, **kw}


def filled(root, cells=("c1", "c2"), n=3) -> ResultStore:
    st = ResultStore(root).open({"identity": IDENT})
    for c in cells:
        st.record_cell(c, CELL)
        for i in range(n):
            st.append([row(c, f"p{i}", 1), row(c, f"p{i}", 2)])
    st.close()
    return st


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line(e) -> str:
    s = str(e.value)
    assert "\n" not in s and "Traceback" not in s
    return s


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "quasar_bench.store", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# -- locks ---------------------------------------------------------------------------------------
def test_two_stores_one_process_same_cell_refused_other_cell_allowed(tmp_path):
    root = tmp_path / "r"
    st1 = ResultStore(root).open({"identity": IDENT})
    st1.record_cell("c1", CELL)
    st1.append([row("c1", "a", 1)])
    st2 = ResultStore(root).open({"identity": IDENT})
    before = snapshot(root)
    for attempt in (lambda: st2.record_cell("c1", CELL), lambda: st2.append([row("c1", "b", 1)])):
        with pytest.raises(QuasarError, match=IN_USE) as e:
            attempt()
        line = one_line(e)
        assert str(root) in line and f"pid {os.getpid()}" in line and "(cell c1)" in line
    assert snapshot(root) == before  # nothing written
    st2.record_cell("c2", CELL)  # parallel sweep jobs write other cells of one out_dir
    st2.append([row("c2", "a", 1)])
    st1.close()
    assert not (root / "cells" / "c1.lock").exists()
    st2.append([row("c1", "b", 1)])  # free once the holder closed
    st2.close()
    assert len(ResultStore(root).load()) == 3


def test_exclusive_open_refuses_a_second_open_writes_nothing(tmp_path):
    root = tmp_path / "r"
    with ResultStore(root).open({"identity": IDENT}, exclusive=True) as st:
        info = json.loads((root / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        before = snapshot(root)
        for exclusive in (False, True):
            with pytest.raises(QuasarError, match=IN_USE) as e:
                ResultStore(root).open({"identity": IDENT}, exclusive=exclusive)
            assert str(root) in one_line(e)
        assert snapshot(root) == before
        st.append([row("c1", "a", 1)])
    assert not (root / ".lock").exists()  # released by the context manager
    ResultStore(root).open({"identity": IDENT}, exclusive=True).close()
    # an exclusive open is refused while another live store writes a cell
    other = ResultStore(root).open({"identity": IDENT})
    other.record_cell("c3", CELL)
    with pytest.raises(QuasarError, match=IN_USE + r".*|.*cell c3"):
        ResultStore(root).open({"identity": IDENT}, exclusive=True)
    del other  # garbage collection releases the locks too
    ResultStore(root).open({"identity": IDENT}, exclusive=True).close()


HOLDER = textwrap.dedent("""
    import sys, time
    from quasar_bench.store import ResultStore
    st = ResultStore(sys.argv[1]).open({"identity": %r}, exclusive=sys.argv[2] == "x")
    st.record_cell("c1", {"k": 1})
    st.append([{"cell_id": "c1", "prompt_id": "a", "turn": 1}])
    print("ready", flush=True)
    time.sleep(60)
""")


def start_holder(tmp_path, root, mode):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER % (IDENT,))
    p = subprocess.Popen([sys.executable, str(script), str(root), mode], stdout=subprocess.PIPE,
                         text=True, env=ENV)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("mode", ["x", "cell"])
def test_second_process_refused_then_sigkilled_holder_taken_over(tmp_path, caplog, mode):
    root = tmp_path / "r"
    p = start_holder(tmp_path, root, mode)
    try:
        before = snapshot(root)
        with pytest.raises(QuasarError, match=IN_USE) as e:
            st = ResultStore(root).open({"identity": IDENT}, exclusive=mode == "x", wait_s=0.2)
            st.record_cell("c1", {"k": 1})
        assert f"pid {p.pid} " in one_line(e)
        after = snapshot(root)
        assert after == before  # nothing written, not even a session entry in the manifest
        # the same refusal as one line from a separate process
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from quasar_bench.errors import QuasarError
            from quasar_bench.store import ResultStore
            try:
                st = ResultStore({str(root)!r}).open({{"identity": {IDENT!r}}}, wait_s=0.2)
                st.append([{{"cell_id": "c1", "prompt_id": "b", "turn": 1}}])
            except QuasarError as e:
                print(e, file=sys.stderr); sys.exit(2)
        """)], env=ENV, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"pid {p.pid} " in r.stderr
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (root / "cells" / "c1.lock").exists()  # a SIGKILLed run leaves its lock file...
    caplog.set_level(logging.WARNING, "quasar_bench.store")
    with ResultStore(root).open({"identity": IDENT}, exclusive=True) as st:  # ...which never blocks
        st.append([row("c1", "b", 1)])
    assert "taking over the stale lock" in caplog.text and f"pid {p.pid}" in caplog.text
    assert len(ResultStore(root).load()) == 2
    assert store_mod.main(["check", str(root)]) == 0


def test_lock_of_a_dead_pid_is_stale(tmp_path, caplog, capsys):
    root = tmp_path / "r"
    filled(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"pid": dead.pid, "host": store_mod._host(), "started": "2020-01-01T00:00:00"}
    (root / ".lock").write_text(json.dumps(info))
    (root / "cells" / "c1.lock").write_text(json.dumps(info))
    assert store_mod.main(["check", str(root)]) == 1
    assert "stale lock" in capsys.readouterr().out
    caplog.set_level(logging.WARNING, "quasar_bench.store")
    with ResultStore(root).open({"identity": IDENT}, exclusive=True) as st:
        st.record_cell("c1", CELL)
    assert caplog.text.count("taking over the stale lock") == 2
    assert store_mod.main(["check", str(root)]) == 0


# -- damaged files -------------------------------------------------------------------------------
def test_truncated_rows_file_moved_aside_and_rerun(tmp_path, caplog):
    root = tmp_path / "r"
    filled(root)
    f = sorted(root.glob("rows-c1-*.parquet"))[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    (tmp_path / "full.parquet").write_bytes(data)
    lost = set(zip(pd.read_parquet(tmp_path / "full.parquet").prompt_id,
                   pd.read_parquet(tmp_path / "full.parquet").turn))
    assert store_mod.main(["check", str(root)]) == 1
    caplog.set_level(logging.WARNING, "quasar_bench.store")
    st = ResultStore(root).open({"identity": IDENT})
    done = st.done_keys("c1")
    assert len(done) == 4 and not lost & {(p, t) for p, t, _ in done}  # its rows count as not done
    assert f.name in caplog.text and "re-run" in caplog.text and "damaged" in caplog.text
    assert not f.exists() and (root / "damaged" / f.name).read_bytes() == data[: len(data) // 2]
    st.append([row("c1", p, t) for p, t in sorted(lost)])  # the engine re-runs them
    st.close()
    df = ResultStore(root).load()
    assert len(df) == 12 and not df.duplicated(store_mod.KEY).any()
    assert store_mod.main(["check", str(root)]) == 0


def test_load_skips_unreadable_file_with_a_warning_not_a_traceback(tmp_path, caplog):
    root = tmp_path / "r"
    filled(root)
    f = sorted(root.glob("rows-c2-*.parquet"))[0]
    f.write_bytes(b"PAR1 not really")
    caplog.set_level(logging.WARNING, "quasar_bench.store")
    assert len(ResultStore(root).load()) == 10
    assert f.name in caplog.text and (root / "damaged" / f.name).exists()


def test_missing_manifest_with_rows_names_the_fix_and_repair_rebuilds_it(tmp_path, capsys):
    root = tmp_path / "r"
    filled(root)
    (root / "manifest.json").unlink()
    for call in (lambda: ResultStore(root).open({"identity": IDENT}),
                 lambda: ResultStore(root).check_identity(IDENT), lambda: ResultStore(root).manifest()):
        with pytest.raises(QuasarError, match="no manifest.json.*quasar_bench.store repair") as e:
            call()
        assert str(root) in one_line(e)
    assert not (root / "manifest.json").exists()
    assert store_mod.main(["check", str(root)]) == 1
    assert "manifest.json is missing" in capsys.readouterr().out
    assert store_mod.main(["repair", str(root)]) == 0
    m = json.loads((root / "manifest.json").read_text())
    assert m["rebuilt"] is True and m["identity"] == IDENT
    with ResultStore(root).open({"identity": IDENT}) as st:
        assert st.done_keys("c1") == {(f"p{i}", t, 0) for i in range(3) for t in (1, 2)}
    with pytest.raises(QuasarError, match="different configuration"):
        ResultStore(root).open({"identity": {**IDENT, "seed": 1}})


def test_truncated_manifest_is_damaged_not_another_configuration(tmp_path, capsys):
    root = tmp_path / "r"
    filled(root)
    path = root / "manifest.json"
    path.write_bytes(path.read_bytes()[:40])
    before = snapshot(root)
    for call in (lambda: ResultStore(root).open({"identity": IDENT}),
                 lambda: ResultStore(root).check_identity(IDENT)):
        with pytest.raises(QuasarError, match=r"manifest.json is damaged \(.*\).*repair") as e:
            call()
        assert str(path) in one_line(e) and "different configuration" not in one_line(e)
    assert snapshot(root) == before
    assert store_mod.main(["check", str(root)]) == 1
    assert "manifest.json is damaged" in capsys.readouterr().out
    assert store_mod.main(["repair", str(root)]) == 0
    assert (root / "damaged" / "manifest.json").read_bytes() == before["manifest.json"]
    ResultStore(root).open({"identity": IDENT}).close()


def test_truncated_cell_json_reported_then_rewritten(tmp_path, caplog, capsys):
    root = tmp_path / "r"
    filled(root)
    path = root / "cells" / "c1.json"
    path.write_text(path.read_text()[:10])
    assert store_mod.main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "damaged:" in out and "c1.json" in out
    caplog.set_level(logging.WARNING, "quasar_bench.store")
    assert set(ResultStore(root).cells()) == {"c2"}
    assert "c1.json is damaged" in caplog.text  # skipped, but never silently
    with ResultStore(root).open({"identity": IDENT}) as st:
        st.record_cell("c1", CELL)
    assert "c1.json was damaged" in caplog.text and "rewrote" in caplog.text
    assert json.loads(path.read_text()) == CELL
    assert store_mod.main(["check", str(root)]) == 0


def test_rerun_of_a_fully_stored_cell_rewrites_its_damaged_config(tmp_path, monkeypatch):
    """The damaged-cell warning says "re-run that cell's command to rewrite it": a re-run whose rows
    are all stored (nothing to generate) still rewrites the file, and check is clean after it."""
    from quasar_bench.__main__ import main

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # Hydra's outputs/
    monkeypatch.setenv("QUASAR_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["quasar_bench", "model=tiny_llama", "verifier=reference", "drafter=ngram",
                                      "dataset.limit=1", "max_new_tokens=4", "progress=false", f"out_dir={out}"])
    main()
    (path,) = (out / "cells").glob("*.json")
    good = path.read_text()
    path.write_text(good[:10])
    assert store_mod.main(["check", str(out)]) == 1
    main()
    assert json.loads(path.read_text()) == json.loads(good)
    assert store_mod.main(["check", str(out)]) == 0


# -- check / repair ------------------------------------------------------------------------------
def test_check_and_repair_exit_codes_and_output(tmp_path):
    root = tmp_path / "r"
    filled(root)
    r = cli("check", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 cells, 12 rows" in r.stdout and "cell c1: 6 rows" in r.stdout and "ok" in r.stdout
    assert cli("check").returncode == 2
    assert cli("nope", root).returncode == 2
    r = cli("check", tmp_path / "absent")
    assert r.returncode == 2 and "not a directory" in r.stderr
    # damage: a duplicated file (with one new row), an unreadable file, a torn temp of a dead
    # writer, rows of a cell without cells/<id>.json
    files = sorted(root.glob("rows-c1-*.parquet"))
    df = pd.read_parquet(files[0])
    extra = pd.concat([df, df.iloc[:1].assign(prompt_id="new")], ignore_index=True)
    time.sleep(0.01)
    extra.to_parquet(root / "rows-c1-copy.parquet", index=False)
    bad = sorted(root.glob("rows-c2-*.parquet"))[0]
    bad.write_bytes(bad.read_bytes()[:100])
    (root / ".tmp-999999999@x-abc.parquet").write_bytes(b"torn")
    os.utime(root / ".tmp-999999999@x-abc.parquet", (0, 0))  # another host's, a day old
    with ResultStore(root) as st:
        st.append([row("c9", "a", 1)])
    r = cli("check", root)
    assert r.returncode == 1
    for s in ("unreadable: ", bad.name, "duplicated: 2", "rows-c1-copy.parquet",
              "rows of cell c9 have no cells/c9.json", "stale temp file", "repair"):
        assert s in r.stdout, (s, r.stdout)
    r = cli("repair", root)
    assert r.returncode == 1, r.stdout  # the cell without a config cannot be repaired
    assert "rows of cell c9 have no cells/c9.json" in r.stdout.split("after repair:")[1]
    moved = {p.name for p in (root / "damaged").iterdir()}
    assert {bad.name, "rows-c1-copy.parquet", ".tmp-999999999@x-abc.parquet"} <= moved  # never deleted
    df = ResultStore(root).load()
    assert len(df) == 12 - 2 + 1 + 1 and "new" in set(df.prompt_id)  # the new row kept, dups gone
    with ResultStore(root) as st:
        st.record_cell("c9", CELL)
    assert cli("check", root).returncode == 0


# -- atomic helpers and exports ------------------------------------------------------------------
def test_export_is_atomic_and_writes_summary_as_json_lists(tmp_path, monkeypatch):
    root = tmp_path / "r"
    filled(root)
    st = ResultStore(root)
    df = st.load()
    summary = pd.DataFrame({"drafter": ["ngram"], "tau": [1.5], "accept_curve": [[0.9, 0.5]]})
    assert [p.name for p in st.export(df, summary)] == ["rows.parquet", "rows.csv", "summary.csv"]
    assert json.loads(pd.read_csv(root / "summary.csv").accept_curve[0]) == [0.9, 0.5]
    assert len(pd.read_parquet(root / "rows.parquet")) == 12
    old = {n: (root / n).read_bytes() for n in ("rows.parquet", "rows.csv", "summary.csv")}
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("rows.csv"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        st.export(df.iloc[:3], summary.assign(tau=9.0))
    monkeypatch.setattr(os, "replace", real)
    assert (root / "rows.csv").read_bytes() == old["rows.csv"]  # the old export is intact
    assert (root / "summary.csv").read_bytes() == old["summary.csv"]
    assert len(pd.read_parquet(root / "rows.parquet")) == 3  # (each file is replaced whole)
    assert not list(root.glob(".tmp-*"))


def test_atomic_write_helpers(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "a.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_json(tmp_path / "c.json", {"b": 1, "a": Path("x")})
    assert (tmp_path / "a.txt").read_text("utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": "x", "b": 1}
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text("utf-8") == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


# -- many processes, killed at random points, then resumed ----------------------------------------
WRITER = textwrap.dedent("""
    import random, sys, time
    from quasar_bench.errors import QuasarError
    from quasar_bench.store import ResultStore
    root, n = sys.argv[1], int(sys.argv[2])
    try:
        st = ResultStore(root).open({"identity": {"experiment": "kill"}})
        print("ready", flush=True)
        for cell in ("c1", "c2", "c3"):
            st.record_cell(cell, {"cell": cell})
            done = st.done_keys(cell)
            for i in range(n):
                if (str(i), 1, 0) in done:
                    continue
                # >= 12 ms a row: 75 appends outlast the test's 0.69 s of kill delays on any machine,
                # so every kill lands mid-run however fast the disk is (a fast CI box once finished)
                time.sleep(random.uniform(0.012, 0.02))
                st.append([{"cell_id": cell, "prompt_id": str(i), "turn": t, "value": i * 10 + t,
                            "output_text": "x" * 100_000} for t in (1, 2)])
        st.close()
    except QuasarError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
""")


def test_concurrent_and_sigkilled_writers_lose_and_duplicate_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root, n = tmp_path / "r", 25
    rng = random.Random(4321)
    cmd = [sys.executable, str(script), str(root), str(n)]
    counts = []
    for rnd in range(5):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(2 if rnd in (1, 3) else 1)]  # two runs started together, some rounds
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
            err = p.stderr.read()
            assert "Traceback" not in err, err  # a refused run says so in one line
            assert p.returncode in (-signal.SIGKILL, 2), err
            if p.returncode == 2:
                assert "is in use by pid" in err and err.count("\n") == 1
        counts.append(len(ResultStore(root).load()))  # readable (no duplicates) after every kill
    assert counts == sorted(counts), counts  # nothing stored is ever lost
    assert 0 < counts[-1] < 3 * 2 * n, f"kills should land mid-run: {counts}"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    df = ResultStore(root).load()
    got = {(c, p, t): v for c, p, t, v in zip(df.cell_id, df.prompt_id, df.turn, df.value)}
    assert got == {(c, str(i), t): i * 10 + t for c in ("c1", "c2", "c3") for i in range(n) for t in (1, 2)}
    assert len(df) == len(got)  # 0 lost, 0 duplicated
    chk = cli("check", root)
    assert chk.returncode == 0, chk.stdout
    assert not list(root.glob(".tmp-*")) and not (root / "damaged").exists()
