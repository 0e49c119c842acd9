import pytest
import torch
import torch.nn as nn

from quasar_bench.errors import QuasarError
from quasar_bench.packing import dequantize_int4, pack_int4, quantize_int4_rtn, quantize_int8_rtn, unpack_int4
import numpy as np

from quasar_bench.quant import Int4Linear, Int8Linear, W8A8Linear


@pytest.mark.parametrize("n,k,g", [(48, 128, 128), (40, 576, 128), (33, 200, 64), (17, 72, 8), (8, 24, 32)])
def test_int4_roundtrip_exact_codes_and_rtn_bound(n, k, g):
    torch.manual_seed(n * k)
    w = torch.randn(n, k) * 0.05
    codes, scales, zeros = quantize_int4_rtn(w, g)
    kp = -(-k // g) * g
    assert codes.shape == (n, kp) and scales.shape == zeros.shape == (kp // g, n)
    q = pack_int4(codes)
    assert q.dtype == torch.int32 and q.shape == (kp // 8, n)
    assert torch.equal(unpack_int4(q), codes)  # exact codes
    assert codes.max() <= 15 and zeros.float().max() <= 15
    # padded columns hold the zero point: they dequantize to exactly 0
    if kp > k:
        assert torch.equal(codes[:, k:].float(), zeros.float().t()[:, -1:].expand(n, kp - k))
    w_hat = dequantize_int4(q, scales, zeros, k, g)
    assert w_hat.shape == (n, k)
    s = scales.float().t().repeat_interleave(g, 1)[:, :k]
    # RTN bound: half a step per element; the zero point is rounded too (another half step at the
    # group's extremes) and the scale is stored in fp16 (relative 2^-11 of the range)
    err = (w - w_hat).abs()
    assert (err <= s * 0.5 + 1e-6).float().mean() > 0.97
    assert (err <= s * 1.0 + 1e-6).all()


def test_int4_invalid_group_refused():
    w = torch.randn(8, 64)
    for g in (0, 4, 12, 100):
        with pytest.raises(QuasarError, match="multiple of 8"):
            quantize_int4_rtn(w, g)
        with pytest.raises(QuasarError, match="multiple of 8"):
            Int4Linear.from_linear(nn.Linear(64, 8), g)


def test_int8_roundtrip_bound():
    torch.manual_seed(0)
    w = torch.randn(24, 72)
    q, s = quantize_int8_rtn(w)
    assert q.dtype == torch.int8 and s.shape == (24,)
    err = (w - q.float() * s.float()[:, None]).abs()
    assert (err <= s.float()[:, None] * 0.5 * (1 + 1e-3) + 1e-7).all()


@pytest.mark.parametrize("g", [32, 128])
def test_int4_linear_matches_reference_math(g):
    torch.manual_seed(1)
    lin = nn.Linear(200, 48, bias=True)
    q = Int4Linear.from_linear(lin, g)
    x = torch.randn(5, 200)
    w = dequantize_int4(q.qweight, q.scales, q.zeros, 200, g)
    torch.testing.assert_close(q(x), x @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert "reference" in q.prepared  # the CPU path keeps the dequantized weight once computed
    q.set_kernel("auto")
    assert q.prepared == {}
    torch.testing.assert_close(q(x), x @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    # the error stays in the RTN range
    assert (q(x) - lin(x)).abs().max() < 0.5


def test_int8_and_w8a8_linear():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(7, 64)
    i8 = Int8Linear.from_linear(lin)
    torch.testing.assert_close(i8(x), lin(x), rtol=0.02, atol=0.02)
    smooth = torch.rand(64) + 0.5
    a8 = W8A8Linear.from_linear(lin, smooth=smooth)
    y = a8(x)
    # per-token activation quantization, computed directly
    # independent of the package's quantizer: numpy, float64, round half away from zero
    xs = (x / smooth).double().numpy()
    sx = np.maximum(np.abs(xs).max(-1) / 127.0, 1e-10)
    v = xs / sx[:, None]
    xq = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127)
    ref = (xq @ a8.qweight.double().numpy().T) * a8.scales.double().numpy()[None, :] * sx[:, None]
    torch.testing.assert_close(y.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, lin(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("precision", ["reference", "int8", "w8a8", "int4"])
def test_fused_projections_compute_the_unfused_verifier(precision):
    """q/k/v and gate/up as one GEMM each (quant.fuse_projections) give the unfused verifier's logits
    (fp32, CPU, up to summation order) at 1 and several tokens, and greedy speculative decoding on
    the fused verifier equals AR on the unfused one."""
    from omegaconf import OmegaConf

    from quasar_bench.decode import generate, greedy_continuation
    from quasar_bench.drafters import make_drafter
    from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
    from quasar_bench.runtime import native_from_hf
    from quasar_bench.verifiers import build_verifier

    hf = random_hf_model({**TINY_CONFIGS["tiny_qwen3"], "initializer_range": 0.3}, 256, torch.float32, "cpu", 3)
    loaded = LoadedModel(name="tiny", runtime=native_from_hf(hf, 256), tokenizer=None, eos_ids=[], chat=False)
    vcfg = OmegaConf.create({"name": precision, **({"calibration": {"n_sequences": 2, "gen_tokens": 4}}
                                                   if precision == "w8a8" else {})})
    plain, fused = build_verifier(loaded, vcfg, None, False), build_verifier(loaded, vcfg, None, True)
    assert hasattr(fused.layers[0].self_attn, "qkv_proj") and hasattr(fused.layers[0].mlp, "gate_up_proj")
    assert not hasattr(plain.layers[0].self_attn, "qkv_proj")
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    for rt in (plain, fused):
        rt.reset(32)
    for chunk in (ids[:7], ids[7:8], ids[8:]):
        torch.testing.assert_close(fused.forward(chunk), plain.forward(chunk), rtol=1e-5, atol=1e-5)
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    ar = greedy_continuation(plain, prompt, 12)
    spec = generate(fused, make_drafter({"name": "ngram", "k": 4}, fused), prompt, 12, 4)
    assert spec.output_ids == ar and spec.accepted > 0
