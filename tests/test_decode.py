"""Greedy speculative decoding is lossless: every drafter's output equals AR output, token for token."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import chat_ids, tiny_runtime
from quasar_bench.data import load_prompts
from quasar_bench.decode import generate
from quasar_bench.drafters import Draft, Drafter, make_drafter
from quasar_bench.errors import QuasarError
from quasar_bench.runtime import HFRuntime

AR = OmegaConf.create({"name": "ar"})
NGRAM = OmegaConf.create({"name": "ngram", "k": 5, "ngram_min": 1, "ngram_max": 3})


def run(runtime, cfg, ids, n, eos=()):
    d = make_drafter(cfg, runtime)
    return generate(runtime, d, ids, n, d.k, eos)


def test_ngram_equals_ar_on_smollm2(smollm2):
    rt, total_accepted = smollm2.runtime, 0
    for p in load_prompts("builtin", limit=8):
        ids = chat_ids(smollm2, p.turns[0])
        ar = run(rt, AR, ids, 24, smollm2.eos_ids)
        ng = run(rt, NGRAM, ids, 24, smollm2.eos_ids)
        assert ng.output_ids == ar.output_ids, p.prompt_id
        assert ar.verify_steps == len(ar.output_ids)  # AR: one forward per token, tau = 1
        assert ng.verify_steps <= ar.verify_steps
        total_accepted += ng.accepted
    assert total_accepted > 0  # the drafts were really used, not all rejected


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen3"])
def test_ngram_equals_ar_on_tiny_models(family):
    _, rt = tiny_runtime(family, vocab=64)
    for seed in range(4):
        ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar = run(rt, AR, ids, 48)
        ng = run(rt, NGRAM, ids, 48)
        assert ng.output_ids == ar.output_ids
        assert len(ar.output_ids) == 48


def test_ar_loop_matches_transformers_generate():
    hf, rt = tiny_runtime("tiny_qwen3", vocab=128)
    ids = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(ids[None], max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 10:].tolist()
    assert run(rt, AR, ids.tolist(), 20).output_ids == ref
    assert run(HFRuntime(hf), NGRAM, ids.tolist(), 20).output_ids == ref  # generic path too


class Scripted(Drafter):
    """Proposes a fixed list each step: lets a test build any acceptance pattern."""
    name = "scripted"

    def __init__(self, proposals):
        self.proposals, self.k = list(proposals), 5

    def propose(self, context, k):
        return Draft(tokens=self.proposals.pop(0)[:k] if self.proposals else [])


def test_eos_and_budget_truncate_output():
    _, rt = tiny_runtime("tiny_llama", vocab=64)
    ids = list(range(5, 25))
    ar = generate(rt, make_drafter(AR, rt), ids, 12, 0)
    # Stop at the 4th generated token as if it were EOS: nothing after it is kept.
    eos = ar.output_ids[3]
    stop = generate(rt, make_drafter(AR, rt), ids, 12, 0, eos_ids=[eos])
    assert stop.output_ids == ar.output_ids[: ar.output_ids.index(eos) + 1]
    assert stop.stopped_by == "eos"
    # A perfect drafter never overshoots max_new_tokens.
    perfect = Scripted([ar.output_ids[i : i + 5] for i in range(0, 12, 6)])
    res = generate(rt, perfect, ids, 12, 5)
    assert res.output_ids == ar.output_ids and len(res.output_ids) == 12
    assert res.accepted == 10 and res.verify_steps == 2


def test_rejected_drafts_do_not_leak_into_output():
    _, rt = tiny_runtime("tiny_llama", vocab=64)
    ids = list(range(3, 23))
    ar = generate(rt, make_drafter(AR, rt), ids, 10, 0)
    wrong = [(t + 1) % 64 for t in ar.output_ids]
    # first two right, then garbage; then all garbage
    res = generate(rt, Scripted([ar.output_ids[:2] + wrong[2:5], wrong[3:8]]), ids, 10, 5)
    assert res.output_ids == ar.output_ids
    assert res.attempts[:3] == [2, 1, 1] and res.accepts[:3] == [1, 1, 0]


def test_bad_generation_settings():
    _, rt = tiny_runtime("tiny_llama", vocab=64)
    with pytest.raises(QuasarError, match="max_new_tokens"):
        generate(rt, make_drafter(AR, rt), [1, 2, 3], 0, 0)
    with pytest.raises(QuasarError, match="k must be >= 1"):
        make_drafter(OmegaConf.create({"name": "ngram", "k": 0}), rt)
    with pytest.raises(QuasarError, match="unknown drafter"):
        make_drafter(OmegaConf.create({"name": "nope"}), rt)
