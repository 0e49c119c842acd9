import pytest
import torch

from quasar_bench.calibration import CalibrationSpec, calibration_ids
from quasar_bench.gptq import HessianHook, gptq_quantize_weight, gptq_runtime
from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
from quasar_bench.packing import dequantize_int4, pack_int4, quantize_int4_rtn
from quasar_bench.quant import Int4Linear, clone_runtime
from quasar_bench.runtime import Linear, native_from_hf


@pytest.fixture(scope="module")
def tiny():
    hf = random_hf_model(TINY_CONFIGS["tiny_llama"], 1000, torch.float32, "cpu", 0)
    return LoadedModel("tiny_llama", native_from_hf(hf, 256), None, [], False)


@pytest.fixture(scope="module")
def seqs(tiny):
    return calibration_ids(tiny, CalibrationSpec(n_sequences=8, gen_tokens=8, max_tokens=64, seed=0), None)


def layer_inputs(rt, seqs, layer, parent, name):
    xs = []
    lin = getattr(getattr(rt.layers[layer], parent), name)
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone()))
    try:
        for s in seqs:
            rt.hidden_states(torch.tensor(s))
    finally:
        h.remove()
    return torch.cat(xs), lin.weight.detach()


@pytest.mark.parametrize("where", [(0, "self_attn", "q_proj"), (1, "mlp", "down_proj"), (3, "mlp", "gate_proj")])
@pytest.mark.parametrize("g", [32, 128])
def test_gptq_lowers_layer_output_error_vs_rtn(tiny, seqs, where, g):
    x, w = layer_inputs(tiny.runtime, seqs, *where)
    hook = HessianHook(w.shape[1])
    hook(None, (x,))
    codes, scales, zeros = gptq_quantize_weight(w, hook.H, g)
    w_gptq = dequantize_int4(pack_int4(codes), scales, zeros, w.shape[1], g)
    c2, s2, z2 = quantize_int4_rtn(w, g)
    w_rtn = dequantize_int4(pack_int4(c2), s2, z2, w.shape[1], g)
    y = x @ w.t()
    err_gptq = (y - x @ w_gptq.t()).pow(2).mean()
    err_rtn = (y - x @ w_rtn.t()).pow(2).mean()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # the GPTQ result is a valid packed int4 tensor of the same format
    assert codes.max() <= 15 and scales.shape == s2.shape and zeros.shape == z2.shape


def test_gptq_identity_hessian_is_close_to_rtn():
    """With H = I (no correlations) GPTQ's error propagation is a no-op up to dampening: RTN codes."""
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.02
    codes, scales, zeros = gptq_quantize_weight(w, torch.eye(64), 32)
    c2, s2, z2 = quantize_int4_rtn(w, 32)
    assert torch.equal(scales, s2) and torch.equal(zeros, z2)
    assert (codes != c2).float().mean() < 0.01


def test_gptq_runtime_replaces_every_decoder_linear(tiny, seqs):
    rt = clone_runtime(tiny.runtime)
    gptq_runtime(rt, seqs, 32)
    for layer in rt.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(m, Int4Linear) and m.group_size == 32
    assert type(tiny.runtime.layers[0].self_attn.q_proj) is Linear
    # end to end: the final hidden state is closer to fp32 than RTN's
    from quasar_bench.quant import rtn_transform

    rtn = rtn_transform(tiny.runtime, lambda lin: Int4Linear.from_linear(lin, 32))
    e_g = e_r = 0.0
    for s in seqs:
        ids = torch.tensor(s)
        ref = tiny.runtime.hidden_states(ids)[-1]
        e_g += (rt.hidden_states(ids)[-1] - ref).pow(2).sum().item()
        e_r += (rtn.hidden_states(ids)[-1] - ref).pow(2).sum().item()
    assert e_g < e_r


def test_gptq_on_the_generic_runtime_equals_the_native_one(tiny, seqs):
    """The generic driver (any family: each layer's captured call replayed, groups found by shared
    input) quantizes a Llama exactly as the native one does (named groups, native blocks): the
    same codes, but for rounding ties of float summation order."""
    from quasar_bench.generic_runtime import HFRuntime
    from quasar_bench.packing import unpack_int4

    hf = random_hf_model(TINY_CONFIGS["tiny_llama"], 1000, torch.float32, "cpu", 0)  # the fixture's weights
    native = gptq_runtime(clone_runtime(tiny.runtime), seqs, 32)
    generic = gptq_runtime(clone_runtime(HFRuntime(hf)), seqs, 32)
    same = total = 0
    for a, b in zip(native.layers, generic.layers):
        for parent, name in [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                            [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]:
            qa, qb = getattr(getattr(a, parent), name), getattr(getattr(b, parent), name)
            assert type(qb) is Int4Linear
            same += (unpack_int4(qa.qweight) == unpack_int4(qb.qweight)).sum().item()
            total += qa.qweight.numel() * 8
    assert same / total > 0.999, same / total
