"""The harness around the runner (issue 6): -m sweeps (basic launcher in one process, submitit_local),
the W&B logger offline, named experiments failing fast without a hub, datasets fetched once and
cached, a real CLI killed at random moments and resumed, and bad input as one line.

Every subprocess runs with no network use: QUASAR_OFFLINE=1 (datasets), an unreachable HF_ENDPOINT
and W&B base URL, a private HF_HOME / W&B folders under tmp, and Hydra's own folders under tmp.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pandas as pd
import pytest

from quasar_bench import data
from quasar_bench.errors import QuasarError
from quasar_bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama", "dataset.limit=2", "max_new_tokens=4", "progress=false", "repeats=1",
        "matrix.verifiers=[reference]", "matrix.extra=[]"]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, never the internet


def env_for(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_HUB_OFFLINE"))}
    env.update(PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0", QUASAR_OFFLINE="1", HF_ENDPOINT=UNREACHABLE,
               HF_HOME=str(tmp / "hf_home"), WANDB_DIR=str(tmp / "wandb_dir"), WANDB_CACHE_DIR=str(tmp / "wb_cache"),
               WANDB_DATA_DIR=str(tmp / "wb_data"), WANDB_CONFIG_DIR=str(tmp / "wb_config"),
               WANDB_BASE_URL=UNREACHABLE)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def cli_cmd(tmp: Path, *args) -> list[str]:
    return [sys.executable, "-m", "quasar_bench", *args, f"hydra.run.dir={tmp / 'hydra_run'}",
            f"hydra.sweep.dir={tmp / 'hydra_sweep'}"]


def cli(tmp: Path, *args, env=None, timeout=240):
    return subprocess.run(cli_cmd(tmp, *args), cwd=ROOT, env=env or env_for(tmp), capture_output=True,
                          text=True, timeout=timeout)


def one_line(r) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode != 0, r.stdout[-1500:]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("quasar_bench: error:"), lines[0]
    return lines[0]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


# -- sweeps on the basic launcher, with logger=wandb offline -------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    r = cli(tmp, "-m", *TINY, f"out_dir={out}", "drafter=ar,ngram", "logger=wandb")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out, r


def test_sweep_loads_model_once_and_shares_out_dir(sweep):
    tmp, out, r = sweep
    # run.get_model logs each load and each reuse; the basic launcher runs both jobs in this process
    assert r.stdout.count("loading model tiny_llama") == 1, r.stdout[-3000:]
    assert r.stdout.count("reusing loaded model tiny_llama") == 1
    assert "#0 : " in r.stdout and "#1 : " in r.stdout  # two jobs
    rows = ResultStore(out).load()  # raises on duplicates
    # 2 prompts (the first has 2 turns) -> 3 rows per drafter, both cells in the one out_dir
    assert sorted(rows.drafter.value_counts().items()) == [("ar", 3), ("ngram", 3)]
    assert rows.cell_id.nunique() == 2 and len(ResultStore(out).cells()) == 2
    exported = pd.read_parquet(out / "rows.parquet")  # the last job exported every row
    assert len(exported) == 6 and set(exported.drafter) == {"ar", "ngram"}


def test_wandb_offline_run_holds_config_rows_and_summary(sweep):
    tmp, out, r = sweep
    runs = sorted((tmp / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, list((tmp / "wandb_dir").rglob("*"))[:20]  # one W&B run per job
    # the job that ran last: the order the jobs printed their sync commands in (run folder names
    # carry the start time to the second only, so two jobs in one second sort by their random id)
    synced = re.findall(r"wandb sync (\S+)", r.stdout)
    assert sorted(Path(p) for p in synced) == runs, (synced, runs)
    last = Path(synced[-1])
    records = b"".join(p.read_bytes() for p in last.glob("run-*.wandb"))
    assert records and b"max_new_tokens" in records and b"tiny_llama" in records  # config in the run log
    assert b"n_rows" in records  # run summary
    config = json.loads((last / "files" / "quasar_config.json").read_text())
    assert config["model"]["name"] == "tiny_llama" and config["max_new_tokens"] == 4
    assert config["logger"]["mode"] == "offline" and config["out_dir"] == str(out)
    summary = pd.read_csv(last / "files" / "summary.csv")
    assert summary.equals(pd.read_csv(out / "summary.csv"))
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (last / "files" / "media" / "table").glob("*.json")}
    rows_t, sum_t = tables["rows"], tables["summary"]
    assert len(rows_t["data"]) == 6 and {"output_ids", "tau", "drafter"} <= set(rows_t["columns"])
    col = rows_t["columns"].index("output_ids")
    assert all(isinstance(row[col], str) and json.loads(row[col]) for row in rows_t["data"])  # lists as strings
    assert sum_t["columns"] == list(summary.columns) and len(sum_t["data"]) == len(summary)


def test_other_configuration_in_out_dir_is_refused(sweep, tmp_path):
    _, out, _ = sweep
    before = snapshot(out)
    r = cli(tmp_path, *TINY[:2], "max_new_tokens=5", "progress=false", f"out_dir={out}")
    line = one_line(r)
    assert "holds rows from a different configuration" in line and "out_dir=" in line
    assert snapshot(out) == before  # nothing written or overwritten


# -- submitit_local launcher ----------------------------------------------------------------------
def test_submitit_local_sweep(tmp_path):
    out = tmp_path / "out"
    r = cli(tmp_path, "-m", "hydra/launcher=local", "hydra.launcher.timeout_min=5", *TINY, f"out_dir={out}",
            "drafter=ar,ngram")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Submitit 'local' sweep" in r.stdout
    logs = list((tmp_path / "hydra_sweep" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # each job ran as its own submitit process
    rows = ResultStore(out).load()  # jobs run in parallel: read the store, not one job's export
    assert sorted(rows.drafter.value_counts().items()) == [("ar", 3), ("ngram", 3)]


# -- named experiments without a reachable hub -----------------------------------------------------
@pytest.mark.parametrize("offline_env", ["HF_HUB_OFFLINE=1", "no HF_HUB_OFFLINE, hub unreachable"])
def test_named_experiment_fails_fast_without_hub(offline_env, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "category": "qa", "turns": ["Hello?"]}\n')
    hf_offline = offline_env.startswith("HF_HUB")
    # without any offline variable the CLI probes HF_ENDPOINT (unreachable here) and goes offline itself
    env = env_for(tmp_path, HF_HUB_OFFLINE="1" if hf_offline else None, QUASAR_OFFLINE="1" if hf_offline else None)
    out = tmp_path / "never"
    t0 = time.monotonic()
    r = cli(tmp_path, "experiment=qwen3_int4", f"dataset.path={q}", f"out_dir={out}", env=env, timeout=120)
    elapsed = time.monotonic() - t0
    line = one_line(r)
    assert "Qwen/Qwen3-8B" in line and "model.path=" in line
    assert elapsed < 45, f"took {elapsed:.0f} s: network retries?"
    assert not out.exists()


def test_named_experiments_compose():
    from quasar_bench.cli_checks import compose_first_job

    cfg, _ = compose_first_job(["experiment=qwen3_int4"], ROOT / "conf")
    assert cfg.model.name == "qwen3_8b" and cfg.model.weights == "pretrained" and cfg.model.path == "Qwen/Qwen3-8B"
    assert [v.get("method") for v in cfg.matrix.verifiers] == [None, "gptq"]
    assert [d if isinstance(d, str) else d.name for d in cfg.matrix.drafters] == ["ar", "ngram", "lookahead", "layerskip"]
    assert cfg.dataset.name == "spec_bench" and cfg.dataset.path.endswith("spec_bench/question.jsonl")
    for ds in ("spec_bench", "mt_bench"):
        cfg, _ = compose_first_job(["experiment=quasar_repro", f"dataset={ds}"], ROOT / "conf")
        assert cfg.dataset.path == f"../shared/data/{ds}/question.jsonl"
        assert cfg.out_dir.endswith(f"/{ds}")
        ngram = [d for d in cfg.matrix.drafters if not isinstance(d, str)][0]
        assert (ngram.k, ngram.ngram_min, ngram.ngram_max) == (5, 1, 3)
        assert [v if isinstance(v, str) else v.name for v in cfg.matrix.verifiers] == ["reference", "w8a8"]


# -- datasets fetched once (the network is never touched here) ------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUASAR_CACHE", str(tmp_path))
    monkeypatch.delenv("QUASAR_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def offline(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    return tmp_path, calls


SHARED = ROOT.parent / "shared" / "data"  # the published files, read in place (never copied here)
needs_shared = pytest.mark.skipif(not (SHARED / "mt_bench" / "question.jsonl").exists(),
                                  reason="shared MT-Bench / Spec-Bench data not present")


def test_dataset_sources_are_pinned_to_a_commit_and_a_checksum():
    for name, src in data.SOURCES.items():
        assert len(src.commit) == 40 and f"/{src.commit}/" in src.url and "/main/" not in src.url
        assert len(src.sha256) == 64


def test_dataset_fetch_offline_names_dataset_path(cache):
    tmp, calls = cache
    with pytest.raises(QuasarError, match=r"dataset\.path=") as e:
        data.load_prompts("spec_bench")
    assert "\n" not in str(e.value) and calls == [data.SOURCES["spec_bench"].url]
    assert not (tmp / "data" / "spec_bench" / "question.jsonl").exists()
    assert data.FETCH_TIMEOUT_S <= 15


def test_dataset_offline_env_never_fetches(cache, monkeypatch):
    _, calls = cache
    monkeypatch.setenv("QUASAR_OFFLINE", "1")
    with pytest.raises(QuasarError, match=r"dataset\.path="):
        data.load_prompts("mt_bench")
    assert calls == []


@needs_shared
def test_dataset_cached_file_is_used_only_while_its_checksum_holds(cache):
    tmp, calls = cache
    f = tmp / "data" / "mt_bench" / "question.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes((SHARED / "mt_bench" / "question.jsonl").read_bytes())
    prompts = data.load_prompts("mt_bench", limit=1)
    assert calls == [] and prompts[0].prompt_id == "81" and len(prompts[0].turns) == 2
    f.write_bytes(f.read_bytes().replace(b"Compose", b"Write", 1))  # a changed cache is not trusted
    with pytest.raises(QuasarError, match=r"dataset\.path="):
        data.load_prompts("mt_bench")
    assert calls == [data.SOURCES["mt_bench"].url]


@needs_shared
def test_dataset_fetched_once_then_cached_and_a_changed_download_refused(cache, monkeypatch):
    tmp, _ = cache
    calls = []
    body = (SHARED / "spec_bench" / "question.jsonl").read_bytes()
    monkeypatch.setattr(data, "_download", lambda url, timeout: calls.append(url) or body)
    assert len(data.load_prompts("spec_bench")) == 480
    assert len(data.load_prompts("spec_bench", limit=2)) == 2
    assert calls == [data.SOURCES["spec_bench"].url]
    assert (tmp / "data" / "spec_bench" / "question.jsonl").read_bytes() == body
    # the same questions with one changed (a moved branch, a proxy's rewrite): refused, not cached
    changed = (SHARED / "mt_bench" / "question.jsonl").read_bytes().replace(b"Compose", b"Write", 1)
    monkeypatch.setattr(data, "_download", lambda url, timeout: changed)
    with pytest.raises(QuasarError, match=r"sha256 .*not the pinned.*dataset\.path=") as e:
        data.load_prompts("mt_bench")
    assert "\n" not in str(e.value)
    assert not (tmp / "data" / "mt_bench" / "question.jsonl").exists()


# -- the real CLI killed at random moments, then resumed ------------------------------------------
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    # 32 row files (8 prompts x 2 drafters x 2 repeats): kills land in a live run at any speed
    # two interleaved repeats: resume must fill in (cell, prompt, turn, repeat) rows, none twice
    args = ["model=tiny_llama", "dataset.limit=8", "max_new_tokens=32", "progress=false", "repeats=2",
            "matrix.verifiers=[reference]", "matrix.extra=[]"]
    env = env_for(tmp_path, OMP_NUM_THREADS="1")  # two processes share the cores: one thread each
    ref_dir, kill_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    t_start = time.monotonic()
    ref = subprocess.Popen(cli_cmd(tmp_path / "a", *args, f"out_dir={ref_dir}"), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kills = []
    for attempt in range(3):
        n_before = len(list(kill_dir.glob("rows-*.parquet")))
        p = subprocess.Popen(cli_cmd(tmp_path / "b", *args, f"out_dir={kill_dir}"), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        # every kill point is tied to the run's own progress, not to wall time alone: the whole run
        # takes ~5 s on an idle 2-core machine, so a fixed deadline could land after it finished
        if attempt == 0:  # anywhere from start-up to the first rows (at the latest when they appear)
            deadline, need = t0 + rng.uniform(1.0, 6.0), n_before + 1
        else:  # after this run has stored 1-2 new prompts, plus a random part of the next one
            deadline, need = None, n_before + rng.randint(1, 2)
        delay = 0.0 if attempt == 0 else rng.uniform(0.0, 0.3)
        while p.poll() is None and time.monotonic() - t0 < 60:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if need is not None and len(list(kill_dir.glob("rows-*.parquet"))) >= need:
                time.sleep(delay)
                break
            time.sleep(0.05)
        finished = p.poll() is not None
        if not finished:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills.append((round(time.monotonic() - t0, 2), len(list(kill_dir.glob("rows-*.parquet"))), finished))
    final = subprocess.run(cli_cmd(tmp_path / "b", *args, f"out_dir={kill_dir}"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]
    _, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err[-2000:]
    info = f"seed {seed}, kills (s after start, row files, finished early) {kills}"
    assert sum(not k[2] for k in kills) >= 2, info  # at least 2 of the 3 kills hit a live run
    key = ["cell_id", "prompt_id", "turn", "repeat"]
    a = pd.read_parquet(ref_dir / "rows.parquet").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(kill_dir / "rows.parquet").sort_values(key).reset_index(drop=True)
    assert not b.duplicated(key).any() and not a.duplicated(key).any(), info
    assert a[key].values.tolist() == b[key].values.tolist(), info  # same keys: none missing, none extra
    from quasar_bench.data import load_prompts

    assert len(a) == 2 * 2 * sum(len(p.turns) for p in load_prompts("builtin", limit=8))  # x 2 drafters x 2 repeats
    assert [list(x) for x in a.output_ids] == [list(x) for x in b.output_ids], info  # greedy: identical
    assert len(ResultStore(kill_dir).load()) == len(b)
    print(f"kill test: {time.monotonic() - t_start:.0f} s; {info}")  # ~60 s on 2 idle cores


# -- bad input: one line, non-zero exit, nothing written -------------------------------------------
BAD = {
    "unknown experiment": (["experiment=nope"], "unknown experiment 'nope'"),
    "unknown top-level key": (["foo=1"], "unknown config key 'foo'"),
    "unknown nested key": (["model.nope=1"], "+model.nope="),
    "unknown key in a sweep": (["-m", "drafter=ar,ngram", "max_new_token=3"], "unknown config key 'max_new_token'"),
    "drafter and matrix.drafters": (["drafter=ngram", "matrix.drafters=[ar,lookahead]"], "matrix.drafters="),
    "verifier and matrix.verifiers": (["verifier=int8", "matrix.verifiers=[reference]"], "matrix.verifiers="),
    "k with ar only": (["drafter=ar", "k=3"], "k=3 has no effect"),
    "k with an ar-only matrix": (["matrix.drafters=[ar]", "k=2"], "k=2 has no effect"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line(case, tmp_path):
    args, needle = BAD[case]
    out = tmp_path / "never"
    r = cli(tmp_path, *TINY, f"out_dir={out}", *args, timeout=60)
    assert needle in one_line(r)
    assert not out.exists() and not (tmp_path / "hydra_run").exists() and not (tmp_path / "hydra_sweep").exists()


def test_unwritable_out_dir_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = cli(tmp_path, *TINY, f"out_dir={blocker / 'results'}")
    line = one_line(r)
    assert "out_dir=" in line and str(blocker) in line
    assert blocker.read_text() == "not a directory" and not (tmp_path / "hydra_run").exists()
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "out_dir=" in one_line(cli(tmp_path, *TINY, f"out_dir={ro / 'x'}"))
        assert list(ro.iterdir()) == []


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    assert {"partition", "timeout_min", "cpus_per_task", "mem_gb"} <= set(slurm)
    assert local._target_.endswith("LocalLauncher")


def test_precheck_judges_the_whole_sweep():
    from quasar_bench.cli_checks import precheck

    precheck(["-m", "drafter=ar,ngram", "k=3"], ROOT / "conf")  # k applies to the ngram job: no error
    precheck(["-m", "k=1,3", "drafter=ngram", "+note=x"], ROOT / "conf")
    with pytest.raises(QuasarError, match="k=1 has no effect"):
        precheck(["-m", "k=1,3", "drafter=ar"], ROOT / "conf")


def test_cells_the_model_cannot_run_fail_before_the_wait_or_are_skipped(tmp_path):
    """On the generic transformers path the checkpoint verifier cannot run (it maps tensors onto the
    native runtime), nor can a layerskip drafter naming a layer the model lacks: the run names every
    such cell in one line and writes nothing; with skip_unsupported=true the rest runs (the reference
    verifier included, KL 0 against itself) and the skipped cells are listed at the end."""
    args = ["model=tiny_llama", "model.runtime=hf", "matrix.verifiers=[reference,checkpoint]",
            "matrix.drafters=[ar,{name:layerskip,mode:static,skip:[9]}]", "matrix.extra=[]", "max_new_tokens=4",
            "dataset.limit=1", f"out_dir={tmp_path / 'out'}", "progress=false", "repeats=1"]
    line = one_line(cli(tmp_path, *args))
    assert "3 of 4 cells cannot run on model tiny_llama" in line and "checkpoint/ar: needs the native runtime" in line
    assert "reference/layerskip: drafter.skip names layers [9]" in line and "skip_unsupported=true" in line
    assert not (tmp_path / "out").exists()
    r = cli(tmp_path, *args, "skip_unsupported=true")
    assert r.returncode == 0, r.stderr[-1500:]
    skipped = [x for x in r.stdout.splitlines() if x.startswith("skipped cell")]
    assert len(skipped) == 3 and any("checkpoint/layerskip" in x for x in skipped)
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert set(zip(rows.verifier, rows.drafter)) == {("reference", "ar")} and (rows.kl_mean == 0).all()
