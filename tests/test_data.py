import json
from collections import Counter
from pathlib import Path

import pytest

from quasar_bench.data import Prompt, load_prompts
from quasar_bench.errors import QuasarError

SHARED = Path("/work/shared/data")
SPEC = SHARED / "spec_bench" / "question.jsonl"
MT = SHARED / "mt_bench" / "question.jsonl"
SIX = {"multi_turn", "translation", "summarization", "qa", "math_reasoning", "rag"}
needs_shared = pytest.mark.skipif(not SPEC.exists(), reason="shared Spec-Bench data not present")


def test_builtin_covers_six_kinds_and_prefix_is_balanced():
    ps = load_prompts("builtin")
    assert len(ps) >= 24
    assert all(isinstance(p, Prompt) and p.dataset == "builtin" for p in ps)
    assert {p.category for p in ps} == SIX
    assert len({p.prompt_id for p in ps}) == len(ps)
    assert Counter(p.category for p in ps[:12]) == {c: 2 for c in SIX}
    for p in ps:
        assert all(isinstance(t, str) and t.strip() for t in p.turns)
        assert len(p.turns) == (2 if p.category == "multi_turn" else 1)
        if p.category in ("summarization", "rag"):
            assert 80 <= len(p.turns[0].split()) <= 170


def test_builtin_category_filter_and_limit():
    ps = load_prompts("builtin", categories=["rag", "qa"], limit=3)
    assert len(ps) == 3 and {p.category for p in ps} <= {"rag", "qa"}
    assert [p.prompt_id for p in load_prompts("builtin", limit=5)] == \
        [p.prompt_id for p in load_prompts("builtin")[:5]]


def test_unknown_dataset_lists_choices():
    with pytest.raises(QuasarError, match="builtin.*spec_bench.*mt_bench"):
        load_prompts("alpaca")


@needs_shared
def test_spec_bench_and_mt_bench_load():
    sb = load_prompts("spec_bench", path=str(SPEC))
    assert len(sb) == 480 and len({p.category for p in sb}) == 13
    assert sb[0].prompt_id == "81" and sb[0].dataset == "spec_bench" and len(sb[0].turns) == 2
    mt = load_prompts("mt_bench", path=str(MT))
    assert len(mt) == 80 and all(len(p.turns) == 2 for p in mt)
    rag = load_prompts("spec_bench", path=str(SPEC), categories=["rag"], limit=7)
    assert len(rag) == 7 and all(p.category == "rag" for p in rag)


def test_path_required_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QUASAR_OFFLINE", "1")  # path=None would fetch the public copy when online
    monkeypatch.setenv("QUASAR_CACHE", str(tmp_path))
    with pytest.raises(QuasarError, match=r"dataset\.path="):
        load_prompts("spec_bench")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(QuasarError, match="nope.jsonl"):
        load_prompts("mt_bench", path=str(missing))


def test_unknown_category_lists_available(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": ["hi"]})
                           for i, c in enumerate(["qa", "rag"])))
    with pytest.raises(QuasarError, match="poetry.*available: qa, rag"):
        load_prompts("spec_bench", path=str(f), categories=["poetry"])


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_limit(limit):
    with pytest.raises(QuasarError, match="limit"):
        load_prompts("builtin", limit=limit)


@pytest.mark.parametrize("bad,what", [
    ("{not json", "bad JSON"),
    ('{"question_id": 2, "turns": ["x"]}', "missing key 'category'"),
    ('{"question_id": 2, "category": "qa", "turns": []}', "non-empty list of strings"),
    ('{"question_id": 2, "category": "qa", "turns": "x"}', "non-empty list of strings"),
    ('{"question_id": 2, "category": "qa", "turns": ["a", 3]}', "non-empty list of strings"),
])
def test_malformed_line_names_file_line_and_problem(tmp_path, bad, what):
    f = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["ok"]})
    f.write_text(good + "\n" + bad + "\n")
    with pytest.raises(QuasarError) as e:
        load_prompts("spec_bench", path=str(f))
    msg = str(e.value)
    assert "q.jsonl line 2" in msg and what in msg and "\n" not in msg


# -- dataset.per_category: N of each category, seeded, in file order -------------------------------

def spec_records() -> list[dict]:
    """The Spec-Bench file read independently of data.py."""
    return [json.loads(line) for line in SPEC.read_text("utf-8").splitlines() if line.strip()]


@needs_shared
def test_per_category_takes_n_of_each_category_in_file_order():
    recs = spec_records()
    position = {str(r["question_id"]): i for i, r in enumerate(recs)}
    category = {str(r["question_id"]): r["category"] for r in recs}
    cats = ["translation", "math_reasoning"]
    # limit keeps its meaning: the first N after the filter (Spec-Bench lists translation first)
    first = load_prompts("spec_bench", path=str(SPEC), categories=cats, limit=20)
    assert [p.prompt_id for p in first] == [str(r["question_id"]) for r in recs if r["category"] in cats][:20]
    assert {p.category for p in first} == {"translation"}
    ps = load_prompts("spec_bench", path=str(SPEC), categories=cats, per_category=10)
    assert Counter(category[p.prompt_id] for p in ps) == {"translation": 10, "math_reasoning": 10}
    assert all(p.category == category[p.prompt_id] for p in ps)
    assert [position[p.prompt_id] for p in ps] == sorted(position[p.prompt_id] for p in ps)  # file order
    # a seeded draw, not the head of each category; the same seed gives the same draw, another seed another
    for c in cats:
        head = [str(r["question_id"]) for r in recs if r["category"] == c][:10]
        assert [p.prompt_id for p in ps if p.category == c] != head
    again = load_prompts("spec_bench", path=str(SPEC), categories=cats, per_category=10, seed=0)
    other = load_prompts("spec_bench", path=str(SPEC), categories=cats, per_category=10, seed=1)
    assert [p.prompt_id for p in again] == [p.prompt_id for p in ps] != [p.prompt_id for p in other]
    # every category when none is named; a category with fewer than N gives all it has
    every = load_prompts("spec_bench", path=str(SPEC), per_category=12)
    sizes = Counter(r["category"] for r in recs)
    assert Counter(p.category for p in every) == {c: min(12, n) for c, n in sizes.items()}


@needs_shared
def test_per_category_draw_is_uniform_over_a_category():
    """Over seeds, each translation prompt is drawn with chance N / 80 (binomial, 5 sigma)."""
    seeds, n = 200, 10
    hits = Counter()
    for seed in range(seeds):
        hits.update(p.prompt_id for p in load_prompts("spec_bench", path=str(SPEC), categories=["translation"],
                                                      per_category=n, seed=seed))
    total = sum(1 for r in spec_records() if r["category"] == "translation")
    p = n / total
    sd = (seeds * p * (1 - p)) ** 0.5
    assert len(hits) == total and all(abs(h - seeds * p) < 5 * sd for h in hits.values()), hits


@pytest.mark.parametrize("kw,what", [({"per_category": 0}, "per_category"), ({"per_category": True}, "per_category"),
                                     ({"limit": 5, "per_category": 2}, "contradict")])
def test_bad_per_category(kw, what):
    with pytest.raises(QuasarError, match=what) as e:
        load_prompts("builtin", **kw)
    assert "\n" not in str(e.value)


@needs_shared
def test_run_logs_per_category_counts(tmp_path, caplog):
    import logging
    from pathlib import Path as P

    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    conf = P(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llama", "dataset=spec_bench", f"dataset.path={SPEC}",
                                           "dataset.categories=[translation,math_reasoning]",
                                           "dataset.limit=null", "dataset.per_category=3", f"out_dir={tmp_path / 'out'}",
                                           "experiment_name=t"])
    with caplog.at_level(logging.INFO, logger="quasar_bench.run"):
        exp = Experiment(cfg)
    assert len(exp.prompts) == 6
    assert "prompts: 6 from spec_bench (translation 3, math_reasoning 3)" in caplog.text
    assert "fewer prompts" not in caplog.text


def test_run_warns_when_a_category_is_too_small(tmp_path, caplog):
    """A category holding fewer than per_category prompts breaks the balance asked for: the run says so."""
    import logging
    from pathlib import Path as P

    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    counts = Counter(p.category for p in load_prompts("builtin"))
    n = max(counts.values()) + 1  # more than any builtin category holds
    conf = P(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llama", "dataset.limit=null", f"dataset.per_category={n}",
                                           f"out_dir={tmp_path / 'out'}", "experiment_name=t"])
    with caplog.at_level(logging.INFO, logger="quasar_bench.run"):
        exp = Experiment(cfg)
    assert len(exp.prompts) == sum(counts.values())
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "fewer prompts" in r.getMessage()]
    assert len(warned) == 1 and all(f"{c} {k}" in warned[0].getMessage() for c, k in counts.items())


# -- calibration prompts: their own file, disjoint from every evaluated prompt ---------------------

CALIB_FILE = Path(__file__).resolve().parent.parent / "quasar_bench" / "prompts" / "calibration.jsonl"


def calib_texts() -> list[str]:
    recs = [json.loads(line) for line in CALIB_FILE.read_text("utf-8").splitlines() if line.strip()]
    assert [r["prompt_id"] for r in recs] == [f"calib-{i}" for i in range(1, 25)]
    assert all(r["category"] == "calibration" and len(r["turns"]) == 1 for r in recs)
    return [r["turns"][0] for r in recs]


def test_calibration_prompts_come_from_their_own_file():
    from types import SimpleNamespace

    from quasar_bench.calibration import calibration_prompts

    class CharTokenizer:  # one id per character: the ids spell the text back
        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    loaded = SimpleNamespace(tokenizer=CharTokenizer(), chat=False, runtime=None)
    got = calibration_prompts(loaded, 24)
    assert ["".join(map(chr, ids)) for ids in got] == [t + "\n" for t in calib_texts()]
    with pytest.raises(QuasarError, match="25 calibration prompts"):
        calibration_prompts(loaded, 25)
    assert all(p.category != "calibration" for p in load_prompts("builtin"))


def test_evaluated_sets_are_disjoint_from_calibration():
    from quasar_bench.calibration import check_disjoint

    check_disjoint(load_prompts("builtin"))
    if SPEC.exists():
        check_disjoint(load_prompts("spec_bench", path=str(SPEC)))
        check_disjoint(load_prompts("mt_bench", path=str(MT)))
    # an independent check of the same rule on the raw files
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    firsts = [p.turns[0] for p in load_prompts("builtin")]
    assert not any(norm(a) in norm(b) or norm(b) in norm(a) for a in calib_texts() for b in firsts)


@pytest.mark.parametrize("make", [
    lambda t: t,                                    # the same text
    lambda t: "  " + t.upper().replace(" ", "\n"),  # the same up to whitespace and case
    lambda t: "Context: " + t + " Answer briefly.",  # an evaluated prompt that contains it
    lambda t: t[: len(t) // 2],                     # one contained in it
])
def test_overlap_with_calibration_is_refused(make):
    from quasar_bench.calibration import check_disjoint

    text = calib_texts()[6]
    bad = [Prompt("builtin", "qa", "qa-1", ["What is a river?"]), Prompt("spec_bench", "qa", "77", [make(text), "x"])]
    with pytest.raises(QuasarError) as e:
        check_disjoint(bad)
    msg = str(e.value)
    assert "spec_bench/77" in msg and "calib-7" in msg and "\n" not in msg
    check_disjoint(bad[:1])


def test_run_refuses_evaluated_prompts_that_overlap_calibration(tmp_path):
    from hydra import compose, initialize_config_dir

    from quasar_bench.run import Experiment

    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]})
                           for i, t in enumerate(["What is a river?", calib_texts()[0]], 1)))
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llama", "dataset=spec_bench", f"dataset.path={f}",
                                           "dataset.limit=null", f"out_dir={tmp_path / 'out'}", "experiment_name=t"])
    with pytest.raises(QuasarError, match="spec_bench/2 overlaps calibration prompt calib-1"):
        Experiment(cfg)
