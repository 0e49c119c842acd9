"""Every verifier precision and every drafter on the generic transformers runtime, on families the
native runtime does not implement (Gemma-3 with sliding-window layers, Phi-3 with fused qkv /
gate_up, GPT-NeoX, Falcon with parallel attention): tiny random configs built here (no download),
fp32 on CPU.

- each verifier's logits against a plain transformers forward of a copy of the model whose decoder
  linears hold independently quantized weights (numpy RTN; GPTQ's packed codes unpacked here;
  W8A8 as numpy per-token int8 products; pruning: the model without the dropped layers, chosen by
  a block influence computed here);
- greedy speculative output equals AR of the same verifier: every verifier on every family with a
  layer-subset drafter, every drafter x every verifier on Gemma-3;
- the reference verifier's KL against the loaded model is exactly 0;
- the default experiment, pointed at a saved tiny Gemma-3 folder, runs every cell losslessly with
  rows labelled by that model.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_drafters import K, drafter_cfgs, mk
from test_verifiers import np_int4, np_int8

from quasar_bench.calibration import CalibrationSpec, calibration_ids
from quasar_bench.decode import generate
from quasar_bench.fidelity import logit_fidelity, teacher_forced_logprobs
from quasar_bench.generic_runtime import HFRuntime
from quasar_bench.models import LoadedModel, random_hf_model
from quasar_bench.quant import Int4Linear, Int8Linear, W8A8Linear
from quasar_bench.references import draft_tools
from quasar_bench.verifiers import build_verifier

SHAPES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
# family -> (config, the decoder layers' path in the transformers model). Init scales chosen so
# greedy text is varied (the default 0.02 repeats a token on several of them).
FAMILIES = {
    "gemma3_text": (dict(SHAPES, model_type="gemma3_text", intermediate_size=128, num_key_value_heads=2, head_dim=16,
                         sliding_window=8, tie_word_embeddings=False, initializer_range=0.3,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]),
                    "model.layers"),
    "phi3": (dict(SHAPES, model_type="phi3", intermediate_size=128, num_key_value_heads=2, pad_token_id=0,
                  initializer_range=0.3), "model.layers"),
    "gpt_neox": (dict(SHAPES, model_type="gpt_neox", intermediate_size=128, initializer_range=1.0), "gpt_neox.layers"),
    "falcon": (dict(SHAPES, model_type="falcon", parallel_attn=True, alibi=False, initializer_range=0.3),
               "transformer.h"),
}
VOCAB = 256
CALIB = {"n_sequences": 2, "gen_tokens": 8, "max_tokens": 40, "seed": 0}
VERIFIERS = {
    "reference": {"name": "reference"},
    "int8": {"name": "int8"},
    "w8a8": {"name": "w8a8", "calibration": CALIB},
    "int4": {"name": "int4", "group_size": 32},
    "int4_gptq": {"name": "int4", "method": "gptq", "group_size": 32, "calibration": CALIB},
    "pruned": {"name": "pruned", "criterion": "block_influence", "calibration": CALIB},
}
PROMPTS = [[5, 17, 99, 3, 42, 7, 5, 17, 99, 3, 8, 250, 11, 5, 17, 99, 3, 42, 7, 5], [1, 2, 3, 1, 2, 3, 1, 2]]
IDS = PROMPTS[0] + [61, 62, 200, 7, 9, 130, 44, 5, 17, 99, 3, 12]  # 32 positions: past the sliding window


pytestmark = pytest.mark.usefixtures("one_thread")


class Family:
    """A tiny random model of one family on the generic runtime, and its verifiers built once."""

    def __init__(self, name):
        self.name, (config, self.layers_path) = name, FAMILIES[name]
        self.hf = random_hf_model(config, VOCAB, torch.float32, "cpu", 0)
        self.loaded = LoadedModel(name, HFRuntime(self.hf), None, [], False, hf_model=self.hf)
        self.tools = draft_tools(self.loaded)
        self.verifiers = {}

    def verifier(self, label):
        if label not in self.verifiers:
            self.verifiers[label] = self.tools.build_verifier(OmegaConf.create(VERIFIERS[label]))
        return self.verifiers[label]

    def layers_of(self, model):
        return model.get_submodule(self.layers_path)


_MADE = {}


def made(name) -> Family:
    """One model per family (and its verifiers) for the whole module, however a test asks for it."""
    if name not in _MADE:
        _MADE[name] = Family(name)
    return _MADE[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return made(request.param)


@pytest.fixture(scope="module")
def gemma():
    return made("gemma3_text")


# -- independent references ------------------------------------------------------------------------

def close(got, want, tol):
    """got == want up to tol relative to the logits' scale (fp32 summation order differs)."""
    torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()


def cached_logits(rt, ids, split=12):
    """The runtime's logits over ids, fed in two chunks through its cache."""
    rt.reset(len(ids))
    return torch.cat([rt.forward(torch.tensor(ids[:split])), rt.forward(torch.tensor(ids[split:]))])


def decoder_linear_names(fam, model):
    return [(i, name) for i, layer in enumerate(fam.layers_of(model)) for name, mod in layer.named_modules()
            if isinstance(mod, torch.nn.Linear)]


def unpack_int4(mod) -> np.ndarray:
    """Int4Linear's packed tensors -> float weight [N, K], unpacked here (nibble j of qweight[i, n]
    is the code of W[n, 8i + j])."""
    q = mod.qweight.numpy().astype(np.int64) & 0xFFFFFFFF
    codes = np.stack([(q >> (4 * j)) & 0xF for j in range(8)], 1).reshape(-1, q.shape[1]).T  # [N, Kp]
    g = mod.group_size
    s = np.repeat(mod.scales.float().numpy().T, g, axis=1)
    z = np.repeat(mod.zeros.float().numpy().T, g, axis=1)
    return ((codes - z) * s)[:, :mod.in_features].astype(np.float32)


class NumpyW8A8(torch.nn.Module):
    """y = round(x / smooth / sx) . codes(W * smooth)^T * scale * sx, per token, in numpy float64."""

    def __init__(self, weight, bias, smooth):
        super().__init__()
        self.smooth = np.ones(weight.shape[1]) if smooth is None else smooth.double().numpy()
        w = weight.detach().double().numpy() * self.smooth[None, :]
        self.scale = (np.abs(w).max(1) / 127.0).clip(1e-8).astype(np.float16).astype(np.float64)
        self.codes = np.clip(np.round(w / self.scale[:, None]), -127, 127)
        self.bias = None if bias is None else bias.detach().double().numpy()

    def forward(self, x):
        xs = x.detach().double().numpy().reshape(-1, x.shape[-1]) / self.smooth
        sx = np.maximum(np.abs(xs).max(-1) / 127.0, 1e-10)
        v = xs / sx[:, None]
        xq = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127)
        y = (xq @ self.codes.T) * self.scale[None, :] * sx[:, None]
        y = y if self.bias is None else y + self.bias
        return torch.from_numpy(y).to(x.dtype).reshape(*x.shape[:-1], -1)


def block_influence_here(fam, seqs) -> list[float]:
    """1 - cos(h_in, h_out) of each decoder layer of the plain model, averaged over every token."""
    layers, total, count = fam.layers_of(fam.hf), np.zeros(len(fam.layers_of(fam.hf))), 0
    cur = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: cur.__setitem__(i, (
        a[0][0], (out[0] if isinstance(out, tuple) else out)[0]))) for i, layer in enumerate(layers)]
    try:
        for s in seqs:
            plain_logits(fam.hf, s)
            for i, (h_in, h_out) in cur.items():
                total[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).double().sum().item()
            count += len(s)
    finally:
        for h in hooks:
            h.remove()
    return list(total / count)


def activation_absmax_here(fam, seqs) -> dict:
    stats, hooks = {}, []
    layers = fam.layers_of(fam.hf)
    for i, name in decoder_linear_names(fam, fam.hf):
        mod = layers[i].get_submodule(name)

        def hook(m, a, key=(i, name)):
            x = a[0].detach().abs().reshape(-1, a[0].shape[-1]).amax(0)
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for s in seqs:
            plain_logits(fam.hf, s)
    finally:
        for h in hooks:
            h.remove()
    return stats


# -- logits of every verifier against transformers -------------------------------------------------

def test_every_verifier_computes_its_definition(family):
    fam, hf = family, family.hf
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    fp32 = plain_logits(hf, IDS)
    close(cached_logits(fam.verifier("reference"), IDS), fp32, 1e-5)
    names = decoder_linear_names(fam, hf)
    assert names  # every family here keeps its decoder projections in nn.Linear
    seqs = calibration_ids(fam.loaded, CalibrationSpec(**CALIB), None)

    def quantized_copy(weight_of):
        other = copy.deepcopy(hf)
        layers = fam.layers_of(other)
        for i, name in names:
            lin = layers[i].get_submodule(name)
            lin.weight.data = torch.from_numpy(weight_of(i, name, lin))
        return other

    def verifier_module(rt, i, name):
        return rt.layers[i].get_submodule(name)

    rt = fam.verifier("int8")
    assert all(type(verifier_module(rt, i, n)) is Int8Linear for i, n in names)
    assert type(rt.lm_head) is torch.nn.Linear  # the head stays in high precision
    want = plain_logits(quantized_copy(lambda i, n, lin: np_int8(lin.weight.detach().numpy())), IDS)
    close(cached_logits(rt, IDS), want, 1e-5)
    assert (want - fp32).abs().max() > 1e-3

    rt = fam.verifier("int4")
    want = plain_logits(quantized_copy(lambda i, n, lin: np_int4(lin.weight.detach().numpy(), 32)), IDS)
    close(cached_logits(rt, IDS), want, 1e-5)
    assert (want - fp32).abs().max() > 1e-2

    rt, rtn = fam.verifier("int4_gptq"), fam.verifier("int4")
    assert all(type(verifier_module(rt, i, n)) is Int4Linear for i, n in names)
    want = plain_logits(quantized_copy(lambda i, n, lin: unpack_int4(verifier_module(rt, i, n))), IDS)
    close(cached_logits(rt, IDS), want, 1e-5)
    assert any(not torch.equal(verifier_module(rt, i, n).qweight, verifier_module(rtn, i, n).qweight) for i, n in names)

    rt = fam.verifier("w8a8")
    stats = activation_absmax_here(fam, seqs)
    other = copy.deepcopy(hf)
    for i, name in names:
        mod, lin = verifier_module(rt, i, name), fam.layers_of(other)[i].get_submodule(name)
        assert type(mod) is W8A8Linear
        w_max = lin.weight.detach().abs().amax(0)  # SmoothQuant, alpha 0.5: sqrt(max|X_j| / max|W_j|)
        torch.testing.assert_close(mod.smooth, (stats[(i, name)].clamp(min=1e-5) / w_max.clamp(min=1e-5)).sqrt())
        parent, _, attr = name.rpartition(".")
        setattr(fam.layers_of(other)[i].get_submodule(parent) if parent else fam.layers_of(other)[i], attr,
                NumpyW8A8(lin.weight, lin.bias, mod.smooth))
    want = plain_logits(other, IDS)
    close(cached_logits(rt, IDS), want, 1e-5)

    rt = fam.verifier("pruned")
    bi = block_influence_here(fam, seqs)
    dropped = min(range(len(bi)), key=lambda i: bi[i])  # round(0.25 * 4) = 1 layer, the least influential
    assert rt.kept_layers == [i for i in range(4) if i != dropped] and rt.num_layers == 3
    other = copy.deepcopy(hf)
    layers = fam.layers_of(other)
    parent, _, attr = fam.layers_path.rpartition(".")
    setattr(other.get_submodule(parent), attr, torch.nn.ModuleList(layers[i] for i in rt.kept_layers))
    other.config.num_hidden_layers = 3
    if getattr(other.config, "layer_types", None):
        other.config.layer_types = [other.config.layer_types[i] for i in rt.kept_layers]
    close(cached_logits(rt, IDS), plain_logits(other, IDS), 1e-5)

    after = hf.state_dict()  # no build touched the loaded model
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_reference_kl_is_zero_and_a_quantized_one_is_not(family):
    cont = [7, 9, 130, 44, 5, 17, 99, 3, 12, 61]
    ref = teacher_forced_logprobs(family.loaded.runtime, PROMPTS[0], cont)
    assert logit_fidelity(ref, teacher_forced_logprobs(family.verifier("reference"), PROMPTS[0], cont))["kl_max"] == 0
    assert logit_fidelity(ref, teacher_forced_logprobs(family.verifier("int4"), PROMPTS[0], cont))["kl_mean"] > 0


# -- greedy lossless -------------------------------------------------------------------------------

def lossless(fam, verifier_label, cfgs, n=32):
    """Every drafter config's greedy output equals AR of the same verifier; returns per config
    (drafts accepted, drafts rejected)."""
    rt = fam.verifier(verifier_label)
    counts = [[0, 0] for _ in cfgs]
    for prompt in PROMPTS:
        ref = generate(rt, mk({"name": "ar"}, rt, fam.loaded), prompt, n, 0).output_ids
        for j, cfg in enumerate(cfgs):
            res = generate(rt, mk(cfg, rt, fam.loaded), prompt, n, K, reference=ref)
            assert res.output_ids == ref, (fam.name, verifier_label, cfg, prompt)
            counts[j][0] += res.accepted
            counts[j][1] += res.drafted - res.accepted
    return counts


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3_text"], indirect=True)  # gemma: below
@pytest.mark.parametrize("label", list(VERIFIERS))
def test_every_verifier_lossless_with_a_layer_subset_drafter(family, label):
    cfgs = [{"name": "layerskip", "k": K, "mode": "static", "skip": [1]}, {"name": "ngram", "k": K}]
    (acc, rej), _ = lossless(family, label, cfgs)
    assert acc > 0 and rej > 0  # drafts were both kept and rejected: equality tested both ways


@pytest.mark.parametrize("label", list(VERIFIERS))
def test_every_drafter_lossless_on_gemma3(gemma, label, tmp_path):
    cfgs = drafter_cfgs(4) + [
        {"name": "layerskip", "k": K, "mode": "search", "cache_dir": str(tmp_path),
         "search": {"prompts": 2, "gen_tokens": 8, "max_skip_ratio": 0.5, "candidates": 2}},
        {"name": "draft_model", "k": K, "precision": "int4", "verifier": {"group_size": 32}},
    ]
    counts = lossless(gemma, label, cfgs)
    accepting = {c["name"] for c, (acc, _) in zip(cfgs, counts) if acc}
    assert {"layerskip", "early_exit", "draft_model"} <= accepting, counts
    assert sum(rej for _, rej in counts) > 0


def test_layer_subset_keeps_the_cache_consistent(gemma):
    """Drafting forwards over a layer subset, rolled back, then a full forward: the logits of a
    forward that never drafted, past the sliding window (whose cropped layers record their past)."""
    rt = gemma.verifier("reference")
    rng = random.Random(1)
    ids = [rng.randrange(VOCAB) for _ in range(40)]
    want = plain_logits(gemma.hf, ids)
    rt.reset(len(ids))
    rt.prefill(torch.tensor(ids[:20]))
    for start in range(20, 40, 5):
        for j in range(3):  # three drafting steps through layers 0 and 2 only
            rt.forward(torch.tensor(ids[start + j: start + j + 1]), layer_ids=[0, 2])
        rt.rollback(start)
        close(rt.forward(torch.tensor(ids[start:start + 5])), want[start:start + 5], 1e-5)


# -- the default experiment on a saved model of another family ---------------------------------------

def test_default_experiment_on_a_saved_gemma3_folder(tmp_path):
    """`python -m quasar_bench model=hf model.path=<tiny Gemma-3 folder>`: the default matrix (every
    verifier precision, every drafter of conf/experiment/default.yaml) runs every cell, each
    drafter's output equals AR of the same verifier, the reference's KL is 0, and the rows name
    the loaded model. Shortened: one prompt, 12 tokens, one repeat."""
    import pandas as pd
    from test_harness import cli, env_for
    from transformers import AutoTokenizer

    from quasar_bench.fileio import cache_root
    from quasar_bench.models import smollm2_folder

    tok = AutoTokenizer.from_pretrained(smollm2_folder(cache_root(None)))
    config = dict(FAMILIES["gemma3_text"][0], num_hidden_layers=6, initializer_range=0.2, layer_types=None,
                  sliding_window=16, max_position_embeddings=4096)  # layerskip's default skips layer 5
    hf = random_hf_model(config, len(tok), torch.float32, "cpu", 0)
    hf.generation_config.eos_token_id = tok.eos_token_id
    folder = tmp_path / "tiny_gemma3"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    r = cli(tmp_path, "model=hf", f"model.path={folder}", f"out_dir={tmp_path / 'out'}", "repeats=1",
            "dataset.limit=1", "max_new_tokens=12", "progress=false",
            env=env_for(tmp_path, QUASAR_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    cells = set(zip(rows.verifier, rows.drafter))
    assert cells == {(v, d) for v in ("reference", "int8", "w8a8", "int4", "pruned") for d in ("ar", "ngram")} | \
        {(v, d) for v in ("reference", "int4") for d in ("lookahead", "layerskip", "synthetic")} | \
        {("reference", "draft_model")}
    assert set(rows.model) == {"tiny_gemma3 (gemma3_text)"} and set(rows.runtime) == {"generic"}
    ar = {(r.verifier, r.prompt_id, r.turn): list(r.output_ids) for r in rows[rows.drafter == "ar"].itertuples()}
    for row in rows.itertuples():
        assert list(row.output_ids) == ar[(row.verifier, row.prompt_id, row.turn)], (row.verifier, row.drafter)
    assert (rows[rows.verifier == "reference"].kl_max == 0).all()
    assert rows[rows.drafter != "ar"].accepted.sum() > 0


def test_a_layer_with_matrices_outside_nn_linear_is_refused():
    """GPT-2 keeps its projections in Conv1D: quantizing none (or only some) of a layer's matrices
    would silently be another precision, so the quantized verifiers refuse in one line."""
    from quasar_bench.errors import QuasarError

    hf = random_hf_model(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64), VOCAB,
                         torch.float32, "cpu", 0)
    loaded = LoadedModel("gpt2", HFRuntime(hf), None, [], False, hf_model=hf)
    with pytest.raises(QuasarError, match=r"outside nn\.Linear \(attn\.c_attn\.weight.*Conv1D"):
        build_verifier(loaded, OmegaConf.create({"name": "int8"}))
    pruned = build_verifier(loaded, OmegaConf.create({"name": "pruned", "criterion": "last"}))
    assert pruned.num_layers == 1  # a layer subset needs no nn.Linear
