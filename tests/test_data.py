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
