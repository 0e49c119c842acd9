"""Drafters plugged into the one decode loop: greedy losslessness (== ar, token for token, fp32 CPU),
oracle cases (tau = k + 1), the synthetic drafter's geometric tau, bad input."""
from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from quasar_bench.decode import generate
from quasar_bench.drafters import DraftTools, make_drafter
from quasar_bench.errors import QuasarError
from quasar_bench.models import TINY_CONFIGS, LoadedModel, load_model, random_hf_model
from quasar_bench.references import draft_tools
from quasar_bench.runtime import native_from_hf

K = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def mk(cfg: dict, rt, loaded=None):
    """A drafter as the harness makes it: with the services it lends (greedy continuations,
    calibration prompts, verifiers at other precisions) through draft_tools."""
    lent = loaded or LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)
    return make_drafter(OmegaConf.create(cfg), rt, loaded, draft_tools(lent, cfg.get("cache_dir")))


def ar_ids(rt, prompt, n, eos=()):
    return generate(rt, mk({"name": "ar"}, rt), prompt, n, 0, eos).output_ids


def tiny_runtime(shapes: str, seed: int = 0, vocab: int = 256):
    # std 0.3 weights: varied, non-degenerate greedy text (the default 0.02 repeats one token)
    hf = random_hf_model({**TINY_CONFIGS[shapes], "initializer_range": 0.3}, vocab, torch.float32, "cpu", seed)
    return native_from_hf(hf, 512)


@functools.lru_cache(maxsize=None)
def tiny_loaded(shapes="tiny_llama", seed=0, tokenizer=None) -> LoadedModel:
    cfg = {"name": shapes, "weights": "random", "shapes": shapes, "seed": seed, "max_seq_len": 512}
    if tokenizer:
        cfg["tokenizer"] = tokenizer
    return load_model(OmegaConf.create(cfg))


def drafter_cfgs(num_layers: int) -> list[dict]:
    cfgs = [
        {"name": "ngram", "k": K},
        {"name": "lookahead", "k": K},
        {"name": "lookahead", "k": K, "window": 4, "ngram": 2, "guesses": 2, "pool_from_context": False},
        {"name": "layerskip", "k": K, "mode": "static", "skip": [1, num_layers - 2]},
        {"name": "layerskip", "k": K, "mode": "static", "skip": [num_layers // 2], "threshold": 0.3},
        {"name": "early_exit", "k": K, "layers": max(1, num_layers // 3)},
        {"name": "synthetic", "k": K, "alpha": 0.7},
    ]
    return cfgs


# -- greedy lossless on tiny random models -------------------------------------------------------

@pytest.mark.parametrize("shapes", ["tiny_llama", "tiny_qwen3"])
def test_greedy_lossless_tiny(shapes, tmp_path):
    rt = tiny_runtime(shapes)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 12)]
    prompts.append([7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8])  # repetitive: n-gram drafters get accepted
    cfgs = drafter_cfgs(rt.num_layers)
    cfgs.append({"name": "layerskip", "k": K, "mode": "search", "cache_dir": str(tmp_path),
                 "search": {"prompts": 2, "gen_tokens": 16, "max_skip_ratio": 0.5}})
    accepted = [0] * len(cfgs)
    for prompt in prompts:
        ref = ar_ids(rt, prompt, 40)
        for i, cfg in enumerate(cfgs):
            res = generate(rt, mk(cfg, rt), prompt, 40, K, reference=ref)
            assert res.output_ids == ref, (cfg, prompt)
            assert res.verify_steps <= len(ref)
            accepted[i] += res.accepted
    # every drafter had drafts kept: equality with AR tested verification, not only rejection
    assert all(accepted), [c["name"] for c, a in zip(cfgs, accepted) if not a]


def test_greedy_lossless_draft_model_tiny():
    """Verifier and draft model share the SmolLM2 tokenizer (tiny random weights, other architecture)."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    d = mk({"name": "draft_model", "k": K,
            "model": {"name": "tiny_qwen3", "weights": "random", "shapes": "tiny_qwen3", "seed": 1}},
           verifier.runtime, verifier)
    assert d.row_fields() == {"draft_same_weights": False}
    for prompt in ([1, 2, 3, 4], [100, 2000, 30000, 5, 5, 5, 9]):
        ref = ar_ids(verifier.runtime, prompt, 24)
        res = generate(verifier.runtime, d, prompt, 24, K, reference=ref)
        assert res.output_ids == ref


def test_draft_model_identical_weights_accepts_everything():
    """A draft model with the verifier's weights: every draft accepted; its cache stays in sync."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    d = mk({"name": "draft_model", "k": K,
            "model": {"name": "tiny_llama", "weights": "random", "shapes": "tiny_llama", "seed": 0}},
           verifier.runtime, verifier)
    assert d.row_fields() == {"draft_same_weights": True}  # labelled in every row of the cell
    prompt = [5, 6, 7, 8]
    ref = ar_ids(verifier.runtime, prompt, 36)
    res = generate(verifier.runtime, d, prompt, 36, K)
    assert res.output_ids == ref
    assert res.accepted == res.drafted and res.verify_steps == 6  # 36 tokens = 6 steps of k + 1


# -- greedy lossless on SmolLM2 ------------------------------------------------------------------

# `smollm2` comes from conftest.py: loaded once per session; a missing model fails, never skips.


@pytest.mark.slow
def test_greedy_lossless_smollm2(smollm2):
    from quasar_bench.data import load_prompts

    m = smollm2
    rt, tok = m.runtime, m.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p.turns[0]}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"])
               for p in load_prompts("builtin", limit=3)]
    draft = {"name": "tiny_llama", "weights": "random", "shapes": "tiny_llama", "seed": 0}
    cfgs = [{"name": "ngram", "k": K}, {"name": "lookahead", "k": K},
            {"name": "layerskip", "k": K, "mode": "static", "skip": list(range(12, 24, 2)), "threshold": 0.2},
            {"name": "early_exit", "k": K, "layers": 20}, {"name": "synthetic", "k": K, "alpha": 0.7},
            {"name": "draft_model", "k": K, "model": draft}]
    for prompt in prompts:
        ref = ar_ids(rt, prompt, 32, m.eos_ids)
        for cfg in cfgs:
            res = generate(rt, mk(cfg, rt, m), prompt, 32, K, m.eos_ids, reference=ref)
            assert res.output_ids == ref, (cfg["name"], cfg)


# -- oracle cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [{"name": "layerskip", "mode": "static", "skip": []},
                                 {"name": "early_exit", "layers": 4},
                                 {"name": "synthetic", "alpha": 1.0}])
def test_full_model_drafts_are_all_accepted(cfg):
    rt = tiny_runtime("tiny_qwen3")
    prompt = [11, 12, 13]
    ref = ar_ids(rt, prompt, 48)
    res = generate(rt, mk({**cfg, "k": K}, rt), prompt, 48, K, reference=ref)  # no EOS
    assert res.output_ids == ref
    assert res.accepted == res.drafted
    assert len(res.output_ids) / res.verify_steps == K + 1


def test_layerskip_threshold_shortens_drafts():
    rt = tiny_runtime("tiny_llama")
    full = generate(rt, mk({"name": "layerskip", "k": K, "skip": [2]}, rt), [1, 2, 3], 30, K)
    short = generate(rt, mk({"name": "layerskip", "k": K, "skip": [2], "threshold": 0.9}, rt), [1, 2, 3], 30, K)
    assert short.output_ids == full.output_ids
    assert short.drafted / short.verify_steps < full.drafted / full.verify_steps


def test_layerskip_search_is_cached(tmp_path):
    rt = tiny_runtime("tiny_llama")
    cfg = {"name": "layerskip", "k": K, "mode": "search", "cache_dir": str(tmp_path),
           "search": {"objective": "acceptance", "target_skip_ratio": 0.5, "prompts": 2, "gen_tokens": 12}}
    a = mk(cfg, rt)
    assert len(a.skip) == 2 and len(a.kept) == 2
    files = list((tmp_path / "layerskip").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["skip"] == a.skip
    b = mk(cfg, rt)  # served from the cache: no search
    assert b.skip == a.skip and b.search_result["evaluations"] == a.search_result["evaluations"]
    other = tiny_runtime("tiny_llama", seed=1)  # another verifier's weights: its own entry
    mk(cfg, other)
    assert len(list((tmp_path / "layerskip").glob("*.json"))) == 2


# -- synthetic: tau follows the geometric law ------------------------------------------------------

class TableRuntime:
    """Stub verifier whose greedy next token at absolute position i is seq[i + 1]."""

    is_native = False
    num_layers, device, dtype = 1, torch.device("cpu"), torch.float32

    def __init__(self, seq, vocab):
        self.seq, self.vocab_size, self.cache_len = seq, vocab, 0

    def reset(self, max_len):
        self.cache_len = 0

    def rollback(self, n):
        assert 0 <= n <= self.cache_len
        self.cache_len = n

    def forward(self, ids, layer_ids=None):
        t = ids.shape[0]
        out = torch.zeros(t, self.vocab_size)
        for i in range(t):
            out[i, self.seq[self.cache_len + i + 1]] = 1.0
        self.cache_len += t
        return out

    def prefill(self, ids):
        self.forward(ids)


def accepted_moments(alpha: float, k: int) -> tuple[float, float]:
    """Mean and variance of the tokens per step, 1 + min(Geometric(alpha), k)."""
    probs = [alpha ** a * (1 - alpha) for a in range(k)] + [alpha ** k]
    mean = sum((a + 1) * p for a, p in enumerate(probs))
    var = sum((a + 1 - mean) ** 2 * p for a, p in enumerate(probs))
    return mean, var


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_synthetic_tau_matches_geometric_formula(alpha):
    vocab, n_new = 50, 3000
    rng = random.Random(1)
    prompt = [1, 2, 3]
    reference = [rng.randrange(vocab) for _ in range(n_new + K + 2)]
    rt = TableRuntime(prompt + reference, vocab)
    d = mk({"name": "synthetic", "k": K, "alpha": alpha, "seed": 3}, rt)
    res = generate(rt, d, prompt, n_new, K, reference=reference)
    assert res.output_ids == reference[:n_new]
    mean, var = accepted_moments(alpha, K)
    assert abs(mean - (1 - alpha ** (K + 1)) / (1 - alpha)) < 1e-12
    tau = n_new / res.verify_steps
    assert abs(tau - mean) < 4 * (var / res.verify_steps) ** 0.5 + 0.01, (tau, mean)
    assert abs(res.accepted / res.drafted - (mean - 1) / K) < 0.05


def test_synthetic_stops_after_divergence():
    rt = tiny_runtime("tiny_llama")
    prompt = [4, 5, 6]
    ref = ar_ids(rt, prompt, 30)
    wrong = ref[:10] + [(t + 1) % 256 for t in ref[10:]]
    res = generate(rt, mk({"name": "synthetic", "k": K, "alpha": 1.0}, rt), prompt, 30, K, reference=wrong)
    assert res.output_ids == ref  # lossless whatever the reference
    assert res.drafted <= 10 + K and res.verify_steps > 10  # AR once the text left the reference


def test_synthetic_is_seeded():
    rt = tiny_runtime("tiny_llama")
    prompt = [4, 5, 6]
    ref = ar_ids(rt, prompt, 30)
    runs = [generate(rt, mk({"name": "synthetic", "k": K, "alpha": 0.6, "seed": 2}, rt), prompt, 30, K,
                     reference=ref) for _ in range(2)]
    assert runs[0].verify_steps == runs[1].verify_steps and runs[0].accepted == runs[1].accepted


def test_lookahead_pool_drafts_from_jacobi_ngrams():
    """With no context n-grams, every draft comes from the Jacobi trajectory; some are accepted."""
    rt = tiny_runtime("tiny_llama")
    prompt = [9, 9, 9, 9]
    d = mk({"name": "lookahead", "k": K, "window": 8, "ngram": 3, "guesses": 4, "pool_from_context": False}, rt)
    res = generate(rt, d, prompt, 60, K)
    assert res.output_ids == ar_ids(rt, prompt, 60)
    assert res.accepted > 0
    assert all(len(b) <= 4 for b in d.pool.values())


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"name": "layerskip", "mode": "static", "skip": [0, 4]},
    {"name": "layerskip", "mode": "static", "skip": [-1]},
    {"name": "layerskip", "mode": "static", "skip": [0, 1, 2, 3]},
    {"name": "layerskip", "mode": "bogus"},
    {"name": "layerskip", "mode": "static", "skip": [1], "threshold": 1.5},
    {"name": "early_exit", "layers": 0},
    {"name": "early_exit", "layers": 5},
    {"name": "early_exit"},
    {"name": "synthetic", "alpha": -0.1},
    {"name": "synthetic", "alpha": 1.5},
    {"name": "lookahead", "ngram": 1},
    {"name": "draft_model", "precision": None},  # neither a model nor a precision
])
def test_bad_input_raises(cfg):
    rt = tiny_runtime("tiny_llama")
    with pytest.raises(QuasarError):
        mk({**cfg, "k": K}, rt)


def test_synthetic_without_reference_raises():
    rt = tiny_runtime("tiny_llama")
    with pytest.raises(QuasarError):
        generate(rt, mk({"name": "synthetic", "k": K}, rt), [1, 2], 8, K)


def test_draft_model_with_other_tokenizer_raises(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(tmp_path)
    verifier = tiny_loaded("tiny_llama", seed=0)
    with pytest.raises(QuasarError, match="tokenizer"):
        mk({"name": "draft_model", "k": K, "model": {"name": "other", "weights": "random", "shapes": "tiny_llama",
                                                      "tokenizer": str(tmp_path)}}, verifier.runtime, verifier)


def test_every_drafter_samples_reproducibly():
    """temperature > 0 / top-p: every drafter runs through speculative sampling, seeded runs repeat."""
    verifier = tiny_loaded("tiny_llama", seed=0)
    rt = verifier.runtime
    prompt = [10, 20, 30, 40]
    ref = ar_ids(rt, prompt, 20)
    cfgs = drafter_cfgs(rt.num_layers) + [
        {"name": "draft_model", "k": K, "model": {"name": "tiny_qwen3", "weights": "random", "shapes": "tiny_qwen3"}}]
    for cfg in cfgs:
        d = mk(cfg, rt, verifier)
        runs = [generate(rt, d, prompt, 20, K, (), 0.8, 0.9, torch.Generator().manual_seed(1), ref).output_ids
                for _ in range(2)]
        assert runs[0] == runs[1] and len(runs[0]) == 20, cfg


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_synthetic_forced_acceptance_follows_geometric_law_whatever_the_verifier(alpha):
    """acceptance=forced (speed runs on random weights): tau follows the law even though the
    verifier (a random tiny model) never agrees with the random drafts; each step still verifies
    all k drafted tokens, so the verify cost is the real one."""
    rt = tiny_runtime("tiny_llama")
    d = mk({"name": "synthetic", "k": K, "alpha": alpha, "seed": 5, "acceptance": "forced"}, rt)
    tokens = steps = 0
    for prompt in ([4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]):
        res = generate(rt, d, prompt, 480, K)
        assert res.drafted >= K * (res.verify_steps - K)  # full drafts but in the last, budget-capped steps
        tokens, steps = tokens + len(res.output_ids), steps + res.verify_steps
    mean, var = accepted_moments(alpha, K)
    assert abs(tokens / steps - mean) < 4 * (var / steps) ** 0.5 + 0.02, (tokens / steps, mean)
    with pytest.raises(QuasarError, match="acceptance"):
        mk({"name": "synthetic", "k": K, "alpha": alpha, "acceptance": "maybe"}, rt)


# -- synthetic: paired draws across verifiers -------------------------------------------------------

def record_steps(d):
    """Wrap a drafter's propose / observe: [(drafts asked for, accepted)] per verify step."""
    steps, propose, observe = [], d.propose, d.observe
    asked = []

    def prop(context, k):
        asked.append(k)
        return propose(context, k)

    def obs(accepted, new_tokens):
        steps.append((asked[-1], accepted))
        return observe(accepted, new_tokens)
    d.propose, d.observe = prop, obs
    return steps


def test_synthetic_acceptance_is_paired_across_verifiers(tmp_path):
    """The harness seeds every generation with prompt_seed(seed, prompt id, turn), the same for every
    verifier; the acceptance draws depend on that, not on the prompt ids, so a turn-2 prompt that
    holds each verifier's own turn-1 answer still gets the same accepted count at every step."""
    from quasar_bench.cell import prompt_seed
    from quasar_bench.verifiers import build_verifier

    rt = tiny_runtime("tiny_llama")
    loaded = LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)
    verifiers = {"fp32": rt, "int8": build_verifier(loaded, OmegaConf.create({"name": "int8"}), tmp_path)}
    prompts = {"a": ([4, 5, 6], [7, 8]), "b": ([30, 31, 32, 33], [40]), "c": ([90, 2], [3, 4, 5])}
    seen = {}
    for vname, v in verifiers.items():
        d = mk({"name": "synthetic", "k": K, "alpha": 0.7, "seed": 3, "acceptance": "forced"}, v)
        steps = record_steps(d)
        for pid, (first, second) in prompts.items():
            ids, answers = first, []
            for turn in (1, 2):
                if turn == 2:
                    ids = first + answers[0] + second  # holds this verifier's own turn-1 answer
                start = len(steps)
                res = generate(v, d, ids, 40, K, generator=torch.Generator().manual_seed(prompt_seed(0, pid, turn)))
                answers.append(res.output_ids)
                seen[vname, pid, turn] = (ids, res.verify_steps, steps[start:])
    keys = [(pid, t) for pid in prompts for t in (1, 2)]
    # the verifiers really differ: their turn-2 prompts are not the same token ids
    assert any(seen["fp32", pid, 2][0] != seen["int8", pid, 2][0] for pid in prompts)
    for pid, t in keys:
        _, steps_a, acc_a = seen["fp32", pid, t]
        _, steps_b, acc_b = seen["int8", pid, t]
        assert steps_a == steps_b and acc_a == acc_b, (pid, t)
    # and the draws do differ between (prompt, turn)s
    assert len({tuple(seen["fp32", pid, t][2]) for pid, t in keys}) == len(keys)


@pytest.mark.parametrize("acceptance", ["verify", "forced"])
def test_synthetic_accepted_length_follows_truncated_geometric_law(acceptance):
    """Per full-k step, the accepted count is min(Geometric(alpha), k): P(a) = alpha^a (1 - alpha) for
    a < k, alpha^k for a = k. Pearson chi-square over the k + 1 bins, df = k, at p = 0.001."""
    alpha, vocab, n_new = 0.6, 50, 2000
    rng = random.Random(7)
    prompt = [1, 2, 3]
    reference = [rng.randrange(vocab) for _ in range(n_new + K + 2)]
    counts = [0] * (K + 1)
    for g in range(4):
        rt = TableRuntime(prompt + reference, vocab)
        d = mk({"name": "synthetic", "k": K, "alpha": alpha, "seed": 1, "acceptance": acceptance}, rt)
        steps = record_steps(d)
        generate(rt, d, prompt, n_new, K, generator=torch.Generator().manual_seed(1000 + g), reference=reference)
        for asked, accepted in steps:
            if asked == K:
                counts[accepted] += 1
    n = sum(counts)
    probs = [alpha ** a * (1 - alpha) for a in range(K)] + [alpha ** K]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    assert n > 2500 and chi2 < 20.52, (counts, [round(n * p) for p in probs], chi2)  # chi2(5) 0.999 quantile


# -- layerskip: one search, on the reference model, for every verifier -----------------------------

def test_layerskip_search_runs_once_on_the_reference_for_every_verifier(tmp_path, monkeypatch):
    from quasar_bench.drafters.layerskip import SkipSearch

    searches = []  # the runtime of every search, recorded where it happens (not inferred from the cache files)
    search_init = SkipSearch.__init__
    monkeypatch.setattr(SkipSearch, "__init__", lambda self, runtime, *a: searches.append(runtime)
                        or search_init(self, runtime, *a))
    from quasar_bench.verifiers import build_verifier

    rt = tiny_runtime("tiny_llama", seed=2)
    loaded = LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)
    tools = draft_tools(loaded, tmp_path)
    assert tools.reference_runtime is rt
    calib = {"n_sequences": 4, "gen_tokens": 8, "max_tokens": 64, "seed": 0}
    verifiers = {"reference": rt, "int4": build_verifier(loaded, OmegaConf.create({"name": "int4", "group_size": 32}),
                                                         tmp_path),
                 "pruned": build_verifier(loaded, OmegaConf.create({"name": "pruned", "criterion": "last",
                                                                    "calibration": calib}), tmp_path)}
    cfg = OmegaConf.create({"name": "layerskip", "k": K, "mode": "search", "cache_dir": str(tmp_path / "ls"),
                            "search": {"objective": "acceptance", "target_skip_ratio": 0.5, "candidates": 0,
                                       "prompts": 3, "gen_tokens": 16}})
    made = {name: make_drafter(cfg, v, loaded, tools) for name, v in verifiers.items()}
    assert searches == [rt]  # once for three verifiers, on the reference model
    assert len(list((tmp_path / "ls" / "layerskip").glob("*.json"))) == 1  # searched once, then cached
    # the independent reference: the same search run by hand on the reference model
    prompts = tools.calibration_prompts(3, 0)
    seqs = [(ids, ar_ids(rt, ids, 16)) for ids in prompts]
    expected = SkipSearch(rt, seqs, K).run("acceptance", 0.5, 0.6, 0)["skip"]
    assert made["reference"].skip == made["int4"].skip == expected and len(expected) == 2
    # a search on the int4 verifier alone (no reference lent) is keyed on its own weights
    own = make_drafter(cfg, verifiers["int4"], loaded,
                       DraftTools(greedy=tools.greedy, calibration_prompts=tools.calibration_prompts))
    assert own.layers_source == "search:verifier"
    assert len(list((tmp_path / "ls" / "layerskip").glob("*.json"))) == 2
    # rows: the same layers (loaded model's numbering) for every verifier; the pruned one (layer 3
    # dropped by criterion=last) drafts with the same layers less the one it lacks
    fields = {name: d.row_fields() for name, d in made.items()}
    kept = [i for i in range(4) if i not in expected]
    assert fields["reference"] == fields["int4"] == {"draft_layers": kept, "draft_layers_source": "search:reference"}
    assert verifiers["pruned"].kept_layers == [0, 1, 2]
    assert fields["pruned"] == {"draft_layers": [i for i in kept if i < 3], "draft_layers_source": "search:reference"}
    assert make_drafter(OmegaConf.create({"name": "early_exit", "k": K, "layers": 2}), rt, loaded,
                        tools).row_fields() == {"draft_layers": [0, 1], "draft_layers_source": "static"}
    assert make_drafter(OmegaConf.create({"name": "ngram", "k": K}), rt, loaded, tools).row_fields() == {}


def test_layerskip_warns_when_even_perfect_acceptance_could_not_pay(caplog):
    """Cost model: k drafts at kept/L of a forward each plus one verify forward; at acceptance 1 a
    step yields k + 1 tokens, so the best case is (k + 1) / (1 + k·kept/L) of AR. Below 1.2 the cell
    is degenerate (e.g. 29 of 30 layers kept) and the run says so."""
    import logging

    rt = tiny_runtime("tiny_llama")
    assert rt.num_layers == 4
    for skip, warned in (([], True), ([0], False), ([0, 1], False)):  # best cases 1.00, 1.26, 1.71
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="quasar_bench.drafters.layerskip"):
            mk({"name": "layerskip", "k": K, "mode": "static", "skip": skip}, rt)
        best = (K + 1) / (1 + K * (4 - len(skip)) / 4)
        assert ("keeps" in caplog.text) == warned, (skip, caplog.text)
        if warned:
            assert f"keeps {4 - len(skip)} of 4 layers" in caplog.text and f"{best:.2f}x AR" in caplog.text


def test_draft_model_at_the_verifiers_own_precision_is_labelled(tmp_path):
    """drafter=draft_model precision=int4 on the int4 verifier drafts with the verifier's own weights:
    its rows say so (draft_same_weights), while int8 drafts for the int4 verifier are a real drafter."""
    from quasar_bench.verifiers import build_verifier

    loaded = tiny_loaded("tiny_llama", seed=0)
    tools = draft_tools(loaded, tmp_path, True)
    int4 = build_verifier(loaded, OmegaConf.create({"name": "int4"}), tmp_path, True)
    other = make_drafter(OmegaConf.create({"name": "draft_model", "k": K, "precision": "int8"}), int4, loaded, tools)
    same = make_drafter(OmegaConf.create({"name": "draft_model", "k": K, "precision": "int4"}), int4, loaded, tools)
    assert same.row_fields() == {"draft_same_weights": True}
    assert other.row_fields() == {"draft_same_weights": False}


def test_replay_of_its_own_trace_is_lossless(tmp_path):
    """drafter "replay" forces acceptance; replaying a trace the same verifier and drafter recorded
    forces exactly the verdicts greedy verification gives, so the output is the AR output."""
    import pandas as pd

    rt = tiny_runtime("tiny_llama", seed=1)
    prompt = [4, 5, 6, 4, 5, 6, 9]
    inner = {"name": "layerskip", "mode": "static", "skip": [3], "k": 3}
    src = generate(rt, mk(inner, rt), prompt, 24, 3)
    pd.DataFrame([dict(verifier="v", drafter="layerskip", prompt_id="p", turn=1, new_tokens=len(src.output_ids),
                       drafted_lengths=src.step_drafted, accepted_lengths=src.step_accepted,
                       stopped_by=src.stopped_by)]).to_parquet(tmp_path / "rows.parquet")
    d = mk({"name": "replay", "inner": inner, "traces": str(tmp_path), "k": 3}, rt)
    d.begin("v", "p", 1)
    out = generate(rt, d, prompt, 24, 3)
    assert out.output_ids == ar_ids(rt, prompt, 24) and out.step_accepted == src.step_accepted
