import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ckpt_writers import write_gptq

from quasar_bench.decode import generate
from quasar_bench.drafters import make_drafter
from quasar_bench.errors import QuasarError
from quasar_bench.fidelity import logit_fidelity, teacher_forced_logprobs
from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
from quasar_bench.quant import Int4Linear, Int8Linear, W8A8Linear
from quasar_bench.runtime import Linear, native_from_hf
from quasar_bench.verifiers import build_verifier, verifier_names

CALIB = {"n_sequences": 4, "gen_tokens": 8, "max_tokens": 64, "seed": 0}


def cfg(name, **kw):
    return OmegaConf.create({"name": name, **kw})


@pytest.fixture(scope="module")
def tiny_hf():
    return random_hf_model(TINY_CONFIGS["tiny_llama"], 1000, torch.float32, "cpu", 0)


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return LoadedModel("tiny_llama", native_from_hf(tiny_hf, 256), None, [], False)


PROMPT = [5, 17, 99, 3, 42, 7, 5, 17, 99, 3, 8, 250, 11, 5, 17]


def snapshot(rt):
    return {k: (v.data_ptr(), v.clone()) for k, v in rt.state_dict().items()}


def same_snapshot(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)


def test_names_and_configs_agree():
    from pathlib import Path

    conf = {p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "verifier").glob("*.yaml")}
    assert set(verifier_names()) == conf
    for name in conf:
        assert OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "verifier" / f"{name}.yaml").name == name


def np_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel int8 RTN, dequantized (numpy, fp32 arithmetic, scale stored fp16)."""
    s = (np.abs(w).max(1) / np.float32(127)).clip(1e-8).astype(np.float16).astype(np.float32)
    return np.clip(np.round(w / s[:, None]), -127, 127) * s[:, None]


def np_int4(w: np.ndarray, g: int) -> np.ndarray:
    """Asymmetric int4 RTN in groups of g input channels (the range always holds 0, integer zero
    point, scale stored fp16), dequantized (numpy, fp32 arithmetic)."""
    out = np.empty_like(w)
    for a in range(0, w.shape[1], g):
        blk = w[:, a:a + g]
        lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        s = ((hi - lo) / np.float32(15)).clip(1e-8).astype(np.float16).astype(np.float32)
        z = np.clip(np.round(-lo / s), 0, 15)
        out[:, a:a + g] = (np.clip(np.round(blk / s[:, None] + z[:, None]), 0, 15) - z[:, None]) * s[:, None]
    return out


def hf_logits(hf, edit, ids):
    """Logits of a copy of the transformers model after edit(copy): the independent reference."""
    other = copy.deepcopy(hf)
    edit(other)
    with torch.no_grad():
        return other(torch.tensor([ids])).logits[0].float()


def quantized_linears(quantize):
    def edit(model):
        for layer in model.model.layers:
            for mod in [*layer.self_attn.children(), *layer.mlp.children()]:
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.data = torch.from_numpy(quantize(mod.weight.detach().float().numpy()))
    return edit


def without_last_layer(model):
    model.model.layers = model.model.layers[:-1]
    model.config.num_hidden_layers -= 1


def test_every_precision_computes_its_definition(tmp_path):
    """Each verifier against an independent definition: `reference` and `fp32` give the
    transformers model's logits, int8 / int4 RTN those of the transformers model whose decoder
    linears hold numpy-quantized weights (LM head, embeddings and
    norms untouched), pruned `last` those of the model without its last layer, bf16 / fp16 run in
    their dtype, w8a8 / block-influence pruning have their module kinds and layer count (their
    arithmetic: test_quant, test_pruning). Each reference differs from the fp32 model by far more
    than the tolerance, and no build touches the loaded model."""
    hf = random_hf_model({**TINY_CONFIGS["tiny_llama"], "initializer_range": 0.1}, 300, torch.float32, "cpu", 1)
    loaded = LoadedModel("tiny", native_from_hf(hf, 128), None, [], False)
    before = snapshot(loaded.runtime)
    fp32 = hf_logits(hf, lambda m: None, PROMPT)
    unchanged = lambda m: None  # noqa: E731
    expect = {"reference": (cfg("reference"), unchanged), "fp32": (cfg("fp32"), unchanged),
              "int8": (cfg("int8"), quantized_linears(np_int8)),
              "int4": (cfg("int4", group_size=32), quantized_linears(lambda w: np_int4(w, 32))),
              "pruned": (cfg("pruned", criterion="last"), without_last_layer)}
    # "checkpoint" reads a GPTQ checkpoint of this model (its own tests: tests/test_checkpoints.py)
    write_gptq(tmp_path / "gptq", hf, 32)
    for name in verifier_names():
        extra = {"calibration": CALIB} if name in ("w8a8", "pruned") else {}
        extra = {"path": str(tmp_path / "gptq")} if name == "checkpoint" else extra
        vc = expect[name][0] if name in expect else cfg(name, **extra)
        rt = build_verifier(loaded, vc, tmp_path)
        assert rt is not loaded.runtime
        rt.reset(32)
        got = rt.forward(torch.tensor(PROMPT))
        if name in expect:
            want = hf_logits(hf, expect[name][1], PROMPT)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            if expect[name][1] is not unchanged:  # the check can tell the precision from fp32
                assert (want - fp32).abs().max() > 1e-2, name
        if name in ("int8", "w8a8", "int4", "checkpoint"):
            kind = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear, "checkpoint": Int4Linear}[name]
            assert all(type(rt.layers[i].mlp.down_proj) is kind for i in range(4))
            assert type(rt.lm_head) is Linear  # the LM head stays in high precision
        if name in ("bf16", "fp16"):
            assert rt.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
            assert {p.dtype for p in rt.parameters()} == {rt.dtype}
        if name == "pruned":
            assert rt.num_layers == 3  # round(0.25 * 4) dropped
    assert same_snapshot(before, snapshot(loaded.runtime))
    assert loaded.runtime.dtype == torch.float32


@pytest.mark.parametrize("vc", [dict(name="int4", method="rtn", group_size=32),
                                dict(name="int4", method="gptq", group_size=32, calibration=CALIB),
                                dict(name="w8a8", calibration=CALIB),
                                dict(name="pruned", calibration=CALIB),
                                dict(name="pruned", criterion="last")])
def test_speculative_equals_ar_of_the_same_verifier(tiny, tmp_path, vc):
    rt = build_verifier(tiny, OmegaConf.create(vc), tmp_path)
    prompts = [PROMPT, [1, 2, 3, 1, 2, 3, 1, 2], list(range(40, 60)) * 2]
    accepted = 0
    for p in prompts:
        ar = generate(rt, make_drafter(cfg("ar"), rt), p, 40, 0)
        spec = generate(rt, make_drafter(cfg("ngram", k=5), rt), p, 40, 5)
        assert spec.output_ids == ar.output_ids
        accepted += spec.accepted
    assert accepted > 0  # drafts were kept, so equality says something about verification


def test_bad_input(tiny, tmp_path):
    with pytest.raises(QuasarError, match="unknown verifier 'int3'.*int4.*pruned"):
        build_verifier(tiny, cfg("int3"), tmp_path)
    for g in (12, 4, 0, 100):
        with pytest.raises(QuasarError, match="multiple of 8"):
            build_verifier(tiny, cfg("int4", group_size=g), tmp_path)
    with pytest.raises(QuasarError, match="group_size"):
        build_verifier(tiny, cfg("int4", group_size="big"), tmp_path)
    with pytest.raises(QuasarError, match="bits=3"):
        build_verifier(tiny, cfg("int4", bits=3), tmp_path)
    with pytest.raises(QuasarError, match="bits=4"):
        build_verifier(tiny, cfg("int8", bits=4), tmp_path)
    with pytest.raises(QuasarError, match="method"):
        build_verifier(tiny, cfg("int4", method="awq"), tmp_path)
    with pytest.raises(QuasarError, match="alpha"):
        build_verifier(tiny, cfg("w8a8", alpha=1.5), tmp_path)
    for share in (0, 1, 1.5, -0.1, "lots"):
        with pytest.raises(QuasarError, match="share"):
            build_verifier(tiny, cfg("pruned", share=share, criterion="last"), tmp_path)
    with pytest.raises(QuasarError, match="share"):  # rounds to zero layers of 4
        build_verifier(tiny, cfg("pruned", share=0.1, criterion="last"), tmp_path)
    with pytest.raises(QuasarError, match="criterion"):
        build_verifier(tiny, cfg("pruned", criterion="random"), tmp_path)


def test_second_build_loads_from_cache(tiny, tmp_path, monkeypatch):
    vc = cfg("int4", method="gptq", group_size=32, calibration=CALIB)
    first = build_verifier(tiny, vc, tmp_path)
    files = sorted(p.name for p in (tmp_path / "verifiers").rglob("int4-*"))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    import quasar_bench.calibration as calibration
    import quasar_bench.gptq as gptq

    def boom(*a, **k):
        raise AssertionError("quantized twice")

    monkeypatch.setattr(gptq, "gptq_runtime", boom)
    monkeypatch.setattr(calibration, "calibration_ids", boom)
    second = build_verifier(tiny, vc, tmp_path)
    for a, b in zip(first.state_dict().items(), second.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    for rt in (first, second):
        rt.reset(32)
    torch.testing.assert_close(first.forward(torch.tensor(PROMPT)), second.forward(torch.tensor(PROMPT)), rtol=0, atol=0)
    monkeypatch.undo()
    build_verifier(tiny, cfg("pruned", calibration=CALIB), tmp_path)
    monkeypatch.setattr(calibration, "calibration_ids", boom)
    assert build_verifier(tiny, cfg("pruned", calibration=CALIB), tmp_path).num_layers == 3


# `smollm2` comes from conftest.py: loaded once per session; a missing model fails, never skips.


# KL(p_ref || p_ver) mean on SmolLM2 over the first 2 builtin prompts x 24 teacher-forced tokens.
# Measured: bf16 0.0015, int8 0.0055, int4 RTN g128 0.64 (int8 with one linear's scales off by 10 %:
# 0.021; int4 with every zero point off by one code: see the test). Bounds leave ~3x room either way.
KL_BOUNDS = {"bf16": (0.0, 0.005), "int8": (5e-4, 0.015), "int4": (0.2, 1.2)}


@pytest.fixture(scope="module")
def smollm2_teacher(smollm2):
    """Prompts, reference continuations and reference log-probs, computed once for the module."""
    from conftest import chat_ids
    from quasar_bench.data import load_prompts
    from quasar_bench.decode import greedy_continuation

    prompts = [chat_ids(smollm2, p.turns[0]) for p in load_prompts("builtin", limit=2)]
    conts = [greedy_continuation(smollm2.runtime, ids, 24, smollm2.eos_ids) for ids in prompts]
    return prompts, conts, torch.cat([teacher_forced_logprobs(smollm2.runtime, i, c) for i, c in zip(prompts, conts)])


def smollm2_kl(rt, teacher) -> float:
    prompts, conts, ref = teacher
    return logit_fidelity(ref, torch.cat([teacher_forced_logprobs(rt, i, c) for i, c in zip(prompts, conts)]))["kl_mean"]


def corrupt(mod, scales=1.0, zeros=0.0):
    """A broken quantizer's output: a quantized linear's scales scaled, zero points shifted."""
    with torch.no_grad():
        mod.scales.mul_(scales)
        if zeros:
            mod.zeros.add_(zeros)
    mod.prepared.clear()  # the reference backend's cached dequantized weight


def test_smollm2_kl_within_each_precisions_bounds_and_broken_quantizers_leave_them(smollm2, smollm2_teacher):
    """SmolLM2's weights come from GGUF Q4_1 (blocks of 32): int4 uses groups of 128."""
    kl = {}
    for name in KL_BOUNDS:
        rt = build_verifier(smollm2, cfg(name), None)
        kl[name] = smollm2_kl(rt, smollm2_teacher)
        lo, hi = KL_BOUNDS[name]
        assert lo <= kl[name] <= hi, (name, kl[name])
        if name == "int8":  # one linear's scales 10 % off: out of int8's bound
            corrupt(rt.layers[0].mlp.down_proj, scales=1.1)
            assert smollm2_kl(rt, smollm2_teacher) > hi
        if name == "int4":  # every zero point of one layer one code off: out of int4's bound
            for mod in [rt.layers[0].self_attn.q_proj, rt.layers[0].self_attn.k_proj, rt.layers[0].self_attn.v_proj,
                        rt.layers[0].self_attn.o_proj, rt.layers[0].mlp.gate_proj, rt.layers[0].mlp.up_proj,
                        rt.layers[0].mlp.down_proj]:
                corrupt(mod, zeros=1.0)
            assert smollm2_kl(rt, smollm2_teacher) > hi
        del rt
    assert kl["bf16"] < kl["int8"] < kl["int4"]


FOUR = ["multi_turn-1", "translation-1", "summarization-1", "qa-1"]  # the first four builtin prompts
TWO = ["summarization-1", "rag-1"]  # prompts whose text the n-gram drafter finds repeats in, on every verifier


@pytest.mark.parametrize("vc,prompt_ids", [
    (dict(name="w8a8", calibration=CALIB), FOUR), (dict(name="int4", group_size=128), FOUR),
    (dict(name="int8"), TWO), (dict(name="int4", method="gptq", calibration=CALIB), TWO),
    (dict(name="pruned", calibration=CALIB), TWO)], ids=["w8a8", "int4", "int8", "int4_gptq", "pruned"])
def test_smollm2_speculative_equals_ar_of_quantized_model(smollm2, tmp_path, vc, prompt_ids):
    """Lossless w.r.t. the served model on the real model: int4 RTN, int8, int4 GPTQ and pruned must
    match exactly (24 tokens), with drafts accepted. W8A8 quantizes activations per token: a 1-ulp
    difference between the T=1 and T=k+1 forwards (CPU attention blocking) can move an int8 code,
    and 30 layers amplify it (measured on SmolLM2: KL 4e-3 and top-1 0.90 between T=1 and
    whole-sequence forwards of the same W8A8 model, against 7e-8 and 1.0 in fp32), so how many
    prompts match exactly is a property of the machine's fp32 rounding (0 to 2 of these 4 across
    code versions), not of the loop. W8A8 is held instead to what a correct loop guarantees: the
    outputs agree up to a first divergence where both tokens are near-ties of the W8A8 model's best
    (each within 1 nat of its top log-prob in a whole-prefix forward; gaps measured 0.01-0.28 on 7
    divergences, one a 3-way tie). A loop that accepted a wrong draft emits a token the model ranks
    far lower. The README reports this; runs report the match rate (ref_exact_match).
    GPTQ (~30 s on 2 cores) is built once into the project's verifier cache, the one the runs use
    (its key holds the quantization code's hash), and loaded from there after."""
    from conftest import chat_ids
    from quasar_bench.data import load_prompts
    from quasar_bench.fileio import cache_root

    cache = cache_root(None) if vc.get("method") == "gptq" else tmp_path
    rt = build_verifier(smollm2, OmegaConf.create(vc), cache)
    accepted, exact = 0, 0
    prompts = {p.prompt_id: p for p in load_prompts("builtin")}
    for pid in prompt_ids:
        ids = chat_ids(smollm2, prompts[pid].turns[0])
        ar = generate(rt, make_drafter(cfg("ar"), rt), ids, 24, 0, smollm2.eos_ids)
        spec = generate(rt, make_drafter(cfg("ngram", k=5), rt), ids, 24, 5, smollm2.eos_ids)
        accepted += spec.accepted
        a, b = list(ar.output_ids), list(spec.output_ids)
        if a == b:
            exact += 1
            continue
        assert vc["name"] == "w8a8", pid
        j = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
        assert j is not None, (pid, "one output is a prefix of the other: a stop that differs")
        prefix = ids + a[:j]
        rt.reset(len(prefix) + 8)
        logp = torch.log_softmax(rt.forward(torch.tensor(prefix))[-1].float(), -1)
        top = float(logp.max())  # both tokens within 1 nat of the model's best there (3-way ties occur)
        assert top - float(logp[a[j]]) < 1.0 and top - float(logp[b[j]]) < 1.0, (pid, j, top, float(logp[a[j]]),
                                                                                float(logp[b[j]]))
    assert accepted > 0 and exact >= (0 if vc["name"] == "w8a8" else len(prompt_ids))


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_lm_head_quantized_on_request(tiny, tmp_path, name):
    """verifier.lm_head=true: the LM head is quantized too, and the logits are those of the same
    verifier with its head replaced by the dequantized RTN weight (packing's functions, not the
    module's); embeddings untouched; fewer weight bytes; the verifier cache reproduces it."""
    from quasar_bench.packing import dequantize_int4, dequantize_int8, pack_int4, quantize_int4_rtn, quantize_int8_rtn
    from quasar_bench.rows import weight_bytes

    embed = tiny.runtime.embed_tokens.weight.detach().clone()
    plain = build_verifier(tiny, cfg(name), None)
    headq = build_verifier(tiny, cfg(name, lm_head=True), None)
    assert isinstance(headq.lm_head, Int4Linear if name == "int4" else Int8Linear)
    assert type(plain.lm_head) is Linear and torch.equal(headq.embed_tokens.weight, embed)
    w = tiny.runtime.lm_head.weight.detach().float()
    if name == "int4":
        q, s, z = quantize_int4_rtn(w, 128)
        deq = dequantize_int4(pack_int4(q), s, z, w.shape[1], 128)
    else:
        q, s = quantize_int8_rtn(w)
        deq = dequantize_int8(q, s)
    plain.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    plain.lm_head.weight = torch.nn.Parameter(deq.to(w.dtype), requires_grad=False)
    ids = torch.tensor([5, 3, 9, 2, 7, 7, 1])
    for rt in (plain, headq):
        rt.reset(16)
    torch.testing.assert_close(headq.forward(ids), plain.forward(ids), rtol=1e-5, atol=1e-5)
    assert weight_bytes(headq) < weight_bytes(build_verifier(tiny, cfg(name), None))
    first = build_verifier(tiny, cfg(name, lm_head=True), tmp_path)
    again = build_verifier(tiny, cfg(name, lm_head=True), tmp_path)  # from the cache
    assert isinstance(again.lm_head, type(headq.lm_head))
    for rt in (first, again):
        rt.reset(16)
    assert torch.equal(first.forward(ids), again.forward(ids))
    with pytest.raises(QuasarError, match="verifier.lm_head"):
        build_verifier(tiny, cfg(name, lm_head="yes"), None)


def test_batched_calibration_continuations_equal_one_at_a_time():
    """calibration.batched_greedy (left-padded batches through transformers) gives each prompt the
    greedy continuation the decode loop gives it alone: prompts of different lengths, a batch
    smaller than the prompt count, per-prompt lengths (one of them 0) and an EOS stop."""
    from quasar_bench.calibration import batched_greedy
    from quasar_bench.decode import greedy_continuation

    hf = random_hf_model(TINY_CONFIGS["tiny_qwen3"], 300, torch.float32, "cpu", 3)
    rt = native_from_hf(hf, 128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 19, 11, 2, 30)]
    lengths = [12, 12, 7, 0, 12]
    alone = [greedy_continuation(rt, p, n) if n else [] for p, n in zip(prompts, lengths)]
    eos = alone[1][4]  # a token the second prompt emits: it must stop there, EOS included
    alone[1] = greedy_continuation(rt, prompts[1], 12, [eos])
    assert alone[1][-1] == eos and len(alone[1]) < 12
    assert batched_greedy(hf, prompts, lengths, [eos], batch=3) == [
        a if i == 1 or eos not in a else a[: a.index(eos) + 1] for i, a in enumerate(alone)]


def test_teacher_forced_logprobs_equal_transformers_full_forward():
    """The KL's log-probs (prompt prefilled, then one forward over the predicting positions) equal
    transformers' log-softmax over one forward of prompt + continuation at those positions."""
    hf = random_hf_model(TINY_CONFIGS["tiny_qwen3"], 300, torch.float32, "cpu", 4)
    rt = native_from_hf(hf, 128)
    cont = [7, 250, 3, 99, 14]
    got = teacher_forced_logprobs(rt, PROMPT, cont)
    with torch.no_grad():
        full = hf(torch.tensor([PROMPT + cont])).logits[0].float()
    want = torch.log_softmax(full[len(PROMPT) - 1 : -1], dim=-1)
    assert got.shape == (len(cont), 300)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert teacher_forced_logprobs(rt, PROMPT, []).shape == (0, 300)


def test_resident_weight_bytes_count_every_copy(monkeypatch):
    """An int4 verifier on CPU: before a forward it holds its parameters and buffers (embedding
    included, RoPE tables not); after one, also the reference backend's dequantized fp32 weight per
    int4 module (out x in x 4 bytes, counted here from the modules' shapes) and, with oneDNN
    packing on, a packed copy of every fp32 weight a product used (at least its own size)."""
    from quasar_bench.rows import resident_weight_bytes, weight_bytes
    from quasar_kernels import reference as R

    monkeypatch.setattr(R, "CPU_PACKED", False)
    # a model of its own: the shared fixture's weights may carry packed copies from earlier tests
    tiny = LoadedModel("tiny_llama", native_from_hf(random_hf_model(TINY_CONFIGS["tiny_llama"], 1000, torch.float32,
                                                                    "cpu", 5), 256), None, [], False)
    rt = build_verifier(tiny, cfg("int4"), None)
    own = sum(t.numel() * t.element_size() for n, t in list(rt.named_parameters()) + list(rt.named_buffers())
              if "rope" not in n)
    assert resident_weight_bytes(rt) == own >= weight_bytes(rt)  # an untied embedding is resident, not read whole
    rt.reset(16)
    rt.forward(torch.tensor([5, 3, 9, 2]))
    int4 = [m for m in rt.modules() if isinstance(m, Int4Linear)]
    assert int4 and resident_weight_bytes(rt) == own + sum(4 * m.in_features * m.out_features for m in int4)
    monkeypatch.setattr(R, "CPU_PACKED", True)
    before = resident_weight_bytes(rt)
    rt.forward(torch.tensor([1, 2, 3, 4]))
    fp32 = sum(4 * m.in_features * m.out_features for m in int4)
    fp32 += sum(m.weight.numel() * 4 for m in rt.modules() if type(m) is Linear)
    assert resident_weight_bytes(rt) >= before + fp32
