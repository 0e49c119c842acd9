"""verifier=checkpoint: GPTQ and compressed-tensors checkpoints read into the packed format.

Checkpoints are written by tests/ckpt_writers.py (GPTQ from its specification, compressed-tensors
by compressed-tensors itself); each check compares with the format's own dequantization and with a
plain transformers forward, never with quasar_bench's helpers."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ckpt_writers import linear_names, write_compressed_tensors, write_gptq
from quasar_bench.decode import generate
from quasar_bench.drafters import make_drafter
from quasar_bench.errors import QuasarError
from quasar_bench.models import TINY_CONFIGS, LoadedModel, load_model, random_hf_model
from quasar_bench.quant import Int4Linear, Int8Linear, W8A8Linear
from quasar_bench.runtime import native_from_hf
from quasar_bench.verifiers import build_verifier, precision

PROMPT = [5, 17, 99, 3, 42, 7, 5, 17, 99, 3, 8, 250, 11, 5, 17]
# tiny_qwen3's K = 64 / 128 and group 32; qwen2 adds q/k/v biases (a GPTQ checkpoint stores them)
KINDS = {
    "gptq_v1_asym": ("tiny_llama", lambda f, hf: write_gptq(f, hf, 32, "gptq", sym=False)),
    "gptq_v2_sym": ("tiny_qwen2", lambda f, hf: write_gptq(f, hf, 32, "gptq_v2", sym=True)),
    "ct_w4a16_asym": ("tiny_qwen3", lambda f, hf: write_compressed_tensors(f, hf, "W4A16", 32, symmetric=False)),
    "ct_w4a16_sym": ("tiny_llama", lambda f, hf: write_compressed_tensors(f, hf, "W4A16", 32, symmetric=True)),
    "ct_w8a8": ("tiny_llama", lambda f, hf: write_compressed_tensors(f, hf, "W8A8")),
}
CONFIGS = {**TINY_CONFIGS, "tiny_qwen2": dict(TINY_CONFIGS["tiny_llama"], model_type="qwen2",
                                               tie_word_embeddings=False, use_sliding_window=False)}


def tiny(arch):
    hf = random_hf_model(CONFIGS[arch], 512, torch.float32, "cpu", 1)
    with torch.no_grad():  # norms away from 1 and biases non-zero: taken from the checkpoint or not is visible
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return hf, LoadedModel(arch, native_from_hf(hf, 256), None, [], False, hf_model=hf)


def cfg(name, **kw):
    return OmegaConf.create({"name": name, **kw})


def dequantized_hf(hf, folder, deq):
    """A plain transformers model of the checkpoint: its stored tensors, and the format's own
    dequantization of each quantized linear."""
    from safetensors.torch import load_file

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32).eval()
    stored = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
              if not k.rsplit(".", 1)[-1].startswith(("q", "g_idx", "scales", "weight_"))}
    stored.update({f"{n}.weight": w for n, w in deq.items()})
    missing, unexpected = ref.load_state_dict(stored, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if hf.config.tie_word_embeddings:
        ref.tie_weights()
    return ref


def act_quant_hooks(model):
    """Per-token dynamic symmetric int8 activation fake-quantization on every decoder linear (the
    activation half of W8A8), written here from the scheme's definition."""
    def hook(mod, args):
        x = args[0]
        s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        return (torch.clamp(torch.round(x / s), -127, 127) * s,)
    return [model.get_submodule(n).register_forward_pre_hook(hook) for n in linear_names(model)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoint_weights_and_logits_equal_the_formats(kind, tmp_path):
    arch, write = KINDS[kind]
    hf, loaded = tiny(arch)
    deq = write(tmp_path, hf)
    rt = build_verifier(loaded, cfg("checkpoint", path=str(tmp_path)), tmp_path / "cache")
    want = W8A8Linear if kind == "ct_w8a8" else Int4Linear
    for name in linear_names(hf):
        mod = rt.get_submodule(name.removeprefix("model."))
        assert type(mod) is want
        assert torch.equal(mod.dequantize(), deq[name]), name  # bit-exact: the format's own values
    ref = dequantized_hf(hf, tmp_path, deq)
    hooks = act_quant_hooks(ref) if kind == "ct_w8a8" else []
    with torch.no_grad():
        want_logits = ref(torch.tensor([PROMPT])).logits[0]
    for h in hooks:
        h.remove()
    rt.reset(64)
    got = rt.forward(torch.tensor(PROMPT))
    loaded.runtime.reset(64)
    base = loaded.runtime.forward(torch.tensor(PROMPT))  # the reference model's own logits
    if kind != "ct_w8a8":
        assert (got - want_logits).abs().max() < 1e-4
        assert (base - got).abs().max() > 5e-2  # the verifier really runs the checkpoint's weights
        return
    # W8A8: a 1-ulp difference in attention between the two runtimes can move an activation's int8
    # code (README, "Known exception"), so only position 0 (attention over itself alone) is tight
    assert (got[0] - want_logits[0]).abs().max() < 1e-5 and (got - want_logits).abs().max() < 5e-3
    assert (base[0] - got[0]).abs().max() > 1e-3
    x = torch.randn(5, 64)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(rt.layers[0].self_attn.q_proj(x),
                          (torch.round(x / s) * s) @ deq["model.layers.0.self_attn.q_proj"].t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gptq_v1_asym", "ct_w4a16_asym"])
def test_greedy_speculative_equals_ar_on_a_checkpoint(kind, tmp_path):
    arch, write = KINDS[kind]
    hf, loaded = tiny(arch)
    write(tmp_path, hf)
    rt = build_verifier(loaded, cfg("checkpoint", path=str(tmp_path)), tmp_path / "cache")
    ar = generate(rt, make_drafter(cfg("ar"), rt), PROMPT, 24, 0).output_ids
    for d in (cfg("ngram", k=3, ngram_min=1, ngram_max=3), cfg("layerskip", mode="static", skip=[1, 2], k=3)):
        assert generate(rt, make_drafter(d, rt, loaded), PROMPT, 24, 0).output_ids == ar, d.name


def test_act_order_and_unsupported_checkpoints_are_refused(tmp_path):
    hf, loaded = tiny("tiny_llama")
    write_gptq(tmp_path / "act", hf, 32, "gptq", act_order=True)
    with pytest.raises(QuasarError, match="act-order"):
        build_verifier(loaded, cfg("checkpoint", path=str(tmp_path / "act")), None)
    q = json.loads((tmp_path / "act" / "config.json").read_text())
    for change, match in (({"bits": 3}, "bits=3"), ({"checkpoint_format": "marlin"}, "marlin"),
                          ({"quant_method": "awq"}, "'awq'")):
        folder = tmp_path / next(iter(change.values())).__str__()
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**q, "quantization_config": {**q["quantization_config"],
                                                                                      **change}}))
        reason = precision("checkpoint").unsupported(loaded, cfg("checkpoint", path=str(folder)))
        assert reason is not None and match in reason and "\n" not in reason
    assert "needs a quantized checkpoint" in precision("checkpoint").unsupported(loaded, cfg("checkpoint", path=None))
    other = random_hf_model(dict(TINY_CONFIGS["tiny_llama"], hidden_size=32), 512, torch.float32, "cpu", 0)
    write_gptq(tmp_path / "other", other, 32)
    assert "hidden_size 32 vs 64" in precision("checkpoint").unsupported(loaded, cfg("checkpoint",
                                                                                     path=str(tmp_path / "other")))


def test_load_model_with_a_quantized_path_loads_the_reference(tmp_path):
    from quasar_bench.fileio import cache_root
    from quasar_bench.models import smollm2_folder

    hf, _ = tiny("tiny_llama")
    hf.save_pretrained(tmp_path / "ref")
    deq = write_gptq(tmp_path / "gptq", hf, 32, "gptq")
    base = {"name": "hf", "weights": "pretrained", "device": "cpu", "dtype": "fp32", "max_seq_len": 256,
            "tokenizer": str(smollm2_folder(cache_root(None)))}
    with pytest.raises(QuasarError, match="model.reference_path"):
        load_model(OmegaConf.create({**base, "path": str(tmp_path / "gptq")}))
    with pytest.raises(QuasarError, match="not a quantized checkpoint"):
        load_model(OmegaConf.create({**base, "path": str(tmp_path / "ref"), "reference_path": str(tmp_path / "ref")}))
    loaded = load_model(OmegaConf.create({**base, "path": str(tmp_path / "gptq"), "reference_path": str(tmp_path / "ref")}))
    assert loaded.checkpoint_path == (tmp_path / "gptq").resolve() and loaded.name == "gptq (llama)"
    # loaded through device_map= (straight onto model.device): the reference's own weights, as saved
    assert torch.equal(loaded.runtime.layers[0].mlp.down_proj.weight, hf.model.layers[0].mlp.down_proj.weight)
    rt = build_verifier(loaded, cfg("checkpoint"), None)  # the checkpoint given as model.path
    assert torch.equal(rt.layers[1].self_attn.o_proj.dequantize(), deq["model.layers.1.self_attn.o_proj"])


def test_int8_weights_without_activation_quantization_are_w8a16(tmp_path):
    hf, loaded = tiny("tiny_llama")
    deq = write_compressed_tensors(tmp_path, hf, "W8A8")
    c = json.loads((tmp_path / "config.json").read_text())
    for g in c["quantization_config"]["config_groups"].values():
        g["input_activations"] = None
    (tmp_path / "config.json").write_text(json.dumps(c))
    rt = build_verifier(loaded, cfg("checkpoint", path=str(tmp_path)), None)
    mod = rt.layers[0].mlp.up_proj
    assert type(mod) is Int8Linear and torch.equal(mod.dequantize(), deq["model.layers.0.mlp.up_proj"])
