"""The GPU replay experiments and the committed real-model runs they replay fit together: every
cell of gpu_replay / gpu_batch_replay finds, for every prompt and turn it will run, the trace of its
own verifier and drafter in the source, within the source's token budget and draft length. A GPU
call that hits a missing trace stops with an error minutes in; this catches it on the CPU first."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from quasar_bench.cli_checks import compose_first_job
from quasar_bench.data import load_prompts
from quasar_bench.rowfiles import read_rows

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SPEC = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


@pytest.mark.parametrize("experiment,source", [("gpu_replay", "replay_source"),
                                               ("gpu_batch_replay", "batch_replay_source")])
def test_every_replay_cell_has_its_traces_in_the_committed_source(experiment, source):
    src_dir = ROOT / "results" / source
    if not src_dir.exists():
        pytest.fail(f"results/{source} is not committed: run experiment={source} (its config says how)")
    args = [f"experiment={experiment}", f"traces={src_dir}"]
    if experiment == "gpu_batch_replay":
        if not SPEC.exists():
            pytest.skip("shared Spec-Bench data not present")
        args.append(f"dataset.path={SPEC}")
    cfg, _ = compose_first_job(args, CONF)
    ds = cfg.dataset
    prompts = load_prompts(ds.name, ds.path, ds.categories, ds.limit, ds.per_category, int(ds.seed))
    rows = read_rows(src_dir)
    traces = {(r.verifier, r.drafter, str(r.prompt_id), int(r.turn)): r for r in rows.itertuples(index=False)}
    src_cfg, _ = compose_first_job([f"experiment={source}"], CONF)
    assert cfg.max_new_tokens <= src_cfg.max_new_tokens
    verifiers = [v if isinstance(v, str) else v.get("label", v["name"]) for v in cfg.matrix.verifiers]
    replays = [d for d in cfg.matrix.drafters if not isinstance(d, str) and d["name"] == "replay"]
    assert replays and verifiers
    default_k = OmegaConf.load(CONF / "drafter" / "replay.yaml").k  # what a matrix entry without k gets
    for d in replays:
        inner = d["inner"] if isinstance(d["inner"], str) else d["inner"].get("label", d["inner"]["name"])
        assert str(d["traces"]) == str(src_dir)
        for v in verifiers:
            for p in prompts:
                for turn in range(1, len(p.turns) + 1):
                    r = traces.get((v, inner, str(p.prompt_id), turn))
                    assert r is not None, f"{experiment}: no trace for {v}/{inner} prompt {p.prompt_id} turn {turn}"
                    # a replayed step may not draft more than the replaying drafter's k
                    assert max(list(r.drafted_lengths) or [0]) <= d.get("k", default_k)
    sizes = [cfg.batch_size] if isinstance(cfg.batch_size, int) else list(cfg.batch_size)
    assert all(len(prompts) % b == 0 for b in sizes)  # every batch full: B divides the prompt count
