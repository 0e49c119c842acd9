"""The Triton verify GEMMs (quasar_kernels/) against their pure-torch references.

Without CUDA the kernels run through Triton's interpreter, which needs TRITON_INTERPRET=1 in the
environment before `triton` is first imported (triton.language's own @jit helpers are decorated
then) and before quasar_kernels/*.py are. This module sets it when it is the first to import triton.
When something imported triton earlier without it (torch._dynamo and transformers do), the
tests here are skipped and one test reruns this file in a subprocess with TRITON_INTERPRET=1.
Setting TRITON_INTERPRET=1 for the whole pytest run on a machine without CUDA avoids the
subprocess. With CUDA the compiled kernels are tested on the GPU instead (interpreted and
compiled kernels cannot share a process).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
RERUN = False
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        RERUN = True  # too late for this process: see test_rerun_in_interpreter_subprocess
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        # quasar_kernels/*.py imported earlier (without triton? impossible, but cheap to be safe)
        for _name in [m for m in sys.modules if m == "quasar_kernels" or m.startswith("quasar_kernels.")]:
            del sys.modules[_name]

import torch.nn.functional as F  # noqa: E402

from quasar_kernels import quantize_per_token, w4a16_linear, w8a8_linear, w8a16_linear  # noqa: E402
from quasar_kernels.reference import (  # noqa: E402
    quantize_per_token_ref,
    w4a16_linear_ref,
    w8a8_linear_ref,
    w8a16_linear_ref,
)
from quasar_bench.packing import (  # noqa: E402
    dequantize_int4,
    pack_int4,
    quantize_int4_rtn,
    quantize_int8_rtn,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"
# the interpreter trips numpy deprecation warnings on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
# ||out - ref|| / ||ref||: bf16 output rounding (the interpreter truncates fp32->bf16) and bf16
# weight rounding land near 5e-3; fp16 near 3e-4; fp32 (ieee dot) near 1e-7.
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# explicit configs so the split-K + reduce path and the direct path are both exercised everywhere
SPLIT = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=3)
DIRECT = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)
CONFIGS = {"default": None, "splitk": SPLIT, "direct": DIRECT}
# split-K reduced by a second kernel instead of the last split to arrive
SPLIT_REDUCE_KERNEL = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, REDUCE="kernel")
# w4a16: every MODE (0 FMA slices, 1 dot slices: BLOCK_K >= 128, 2 dot on reshaped codes)
W4_CONFIGS = {"default": None, "dot_slices_splitk": dict(MODE=1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=3),
              "reshape_direct": dict(MODE=2, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1),
              "reshape_splitk": dict(MODE=2, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2),
              "fma_splitk": dict(MODE=0, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2),
              "reshape_reduce_kernel": dict(MODE=2, **SPLIT_REDUCE_KERNEL),
              # mode 3 (weights as the dot's first operand): one group per K step, and groups
              # smaller than / not dividing BLOCK_K (per-column scales), split K
              "swapped_direct": dict(MODE=3, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
              "swapped_splitk": dict(MODE=3, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)}


@pytest.fixture(autouse=True)
def _interpreter_guard(request, monkeypatch):
    # CUDA: test the default configs without timing ~20 candidates per shape (test_autotune does that)
    if request.node.name != "test_autotune_cuda":
        monkeypatch.setenv("QUASAR_KERNEL_AUTOTUNE", "0")
    if RERUN and request.node.name != "test_rerun_in_interpreter_subprocess":
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_rerun_in_interpreter_subprocess")


@pytest.mark.skipif(not RERUN, reason="this process already runs the kernels directly")
def test_rerun_in_interpreter_subprocess():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _trim(dtype, cfg):
    """fp16 shares every code path with bf16 but the dot's input type: test it on the default
    config only, to keep the interpreted suite short."""
    if dtype == torch.float16 and cfg != "default":
        pytest.skip("fp16: default config only (paths covered by bf16)")


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _poison():
    """Leave NaN in freed allocator blocks so an unwritten output element shows up (CUDA)."""
    if HAS_CUDA:
        torch.full((1 << 22,), float("nan"), device=DEVICE)  # freed at once, memory reused by torch.empty
        torch.cuda.synchronize()


def _check(out, ref, dtype, shape):
    assert out.shape == shape and out.dtype == dtype and out.device.type == DEVICE
    assert torch.isfinite(out).all(), "unwritten or overflowed output elements"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    assert rel < TOL[dtype], f"relative error {rel:.2e} >= {TOL[dtype]:.0e}"
    # every element, not just the norm: no single column or row may be wrong
    assert ((o - r).abs() <= 20 * TOL[dtype] * r.abs().max()).all()


# (M, N, K, G): M = 1 and odd M; K over several groups; K not a multiple of G (576 = 4.5 x 128,
# padded); N not a multiple of the block; G < BLOCK_K (per-row scales) and G not a power of 2;
# M over 64 (two row tiles).
W4_SHAPES = [(1, 96, 576, 128), (3, 130, 512, 64), (7, 64, 384, 32), (5, 72, 200, 24), (70, 40, 256, 128)]


@pytest.mark.parametrize("cfg", list(W4_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,g", W4_SHAPES)
def test_w4a16(m, n, k, g, dtype, cfg):
    if cfg == "fma_splitk" and m > 8:
        pytest.skip("FMA path is for M <= 4 (interpreting 18 row tiles is slow)")
    _trim(dtype, cfg)
    r = _gen(1000 * m + n + k)
    codes, scales, zeros = quantize_int4_rtn(r(n, k), g)
    qweight = pack_int4(codes)
    x, bias = r(m, k, dtype=dtype), r(n, dtype=dtype) if m % 2 else None
    _poison()
    out = w4a16_linear(x, qweight, scales, zeros, k, g, bias=bias, config=W4_CONFIGS[cfg])
    _check(out, w4a16_linear_ref(x, qweight, scales, zeros, k, g, bias=bias), dtype, (m, n))


def test_w4a16_round_trip_from_verifier_format():
    """quantize_int4_rtn + pack_int4 (what the int4 verifier stores) -> kernel == F.linear(dequantized)."""
    r = _gen(7)
    m, n, k, g = 6, 80, 576, 128
    w = r(n, k)
    codes, scales, zeros = quantize_int4_rtn(w, g)
    qweight = pack_int4(codes)
    wq = dequantize_int4(qweight, scales, zeros, k, g)
    assert (wq - w).norm() / w.norm() < 0.15  # int4 RTN itself is sane
    x = r(2, m // 2, k, dtype=torch.float32)  # leading dims are kept
    out = w4a16_linear(x, qweight, scales, zeros, k, g)
    assert out.shape == (2, m // 2, n)
    _check(out.reshape(m, n), F.linear(x, wq).reshape(m, n), torch.float32, (m, n))


W8_SHAPES = [(1, 96, 576), (3, 130, 512), (7, 64, 200), (70, 40, 256)]


W8_CONFIGS = {**CONFIGS, "reduce_kernel": SPLIT_REDUCE_KERNEL}


@pytest.mark.parametrize("cfg", list(W8_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", W8_SHAPES)
def test_w8a16(m, n, k, dtype, cfg):
    _trim(dtype, cfg)
    r = _gen(2000 * m + n + k)
    qweight, scales = quantize_int8_rtn(r(n, k))
    x, bias = r(m, k, dtype=dtype), r(n, dtype=dtype) if m % 2 else None
    _poison()
    out = w8a16_linear(x, qweight, scales, bias=bias, config=W8_CONFIGS[cfg])
    _check(out, w8a16_linear_ref(x, qweight, scales, bias=bias), dtype, (m, n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 576), (7, 200), (70, 4100)])
def test_quantize_per_token(m, k, dtype):
    x = _gen(m + k)(m, k, dtype=dtype) * 3
    x[0, 5] = 40.0  # an outlier channel
    q, s = quantize_per_token(x)
    q_ref, s_ref = quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (m, k) and s.shape == (m,)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    # GPU fp32 division may differ from torch's by an ulp: a code at a rounding tie can move by 1
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert q.abs().max() == 127


BACKENDS = ["triton", "int_mm"] if HAS_CUDA else ["triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", W8_SHAPES)
def test_w8a8(m, n, k, dtype, cfg, backend):
    _trim(dtype, cfg)
    if backend == "int_mm" and (cfg != "default" or k % 8 or n % 8):
        pytest.skip("torch._int_mm: no configs, needs K and N multiples of 8")
    r = _gen(3000 * m + n + k)
    qweight, scales = quantize_int8_rtn(r(n, k))
    x, bias = r(m, k, dtype=dtype), r(n, dtype=dtype) if m % 2 else None
    _poison()
    out = w8a8_linear(x, qweight, scales, bias=bias, backend=backend, config=CONFIGS[cfg])
    _check(out, w8a8_linear_ref(x, qweight, scales, bias=bias), dtype, (m, n))


@pytest.mark.parametrize("kernel", ["w4a16", "w4a16_swapped", "w8a16", "w8a8"])
def test_block_m_128_tiles_for_large_m(kernel):
    """The 128-row tiles the autotuner adds past M = 64 (splitk.LARGE_M_TILES): rows of two row
    blocks, the second partial, split K, N not a multiple of the block."""
    m, n, k, g = 130, 40, 256, 128
    r = _gen(4000 + len(kernel))
    w, x, bias = r(n, k), r(m, k, dtype=torch.bfloat16), r(n, dtype=torch.bfloat16)
    cfg = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=8)
    _poison()
    if kernel.startswith("w4a16"):
        codes, scales, zeros = quantize_int4_rtn(w, g)
        qw = pack_int4(codes)
        out = w4a16_linear(x, qw, scales, zeros, k, g, bias=bias, config=dict(MODE=3 if "swapped" in kernel else 2, **cfg))
        ref = w4a16_linear_ref(x, qw, scales, zeros, k, g, bias=bias)
    else:
        qw, s8 = quantize_int8_rtn(w)
        if kernel == "w8a16":
            out, ref = w8a16_linear(x, qw, s8, bias=bias, config=cfg), w8a16_linear_ref(x, qw, s8, bias=bias)
        else:
            out = w8a8_linear(x, qw, s8, bias=bias, backend="triton", config=cfg)
            ref = w8a8_linear_ref(x, qw, s8, bias=bias)
    _check(out, ref, torch.bfloat16, (m, n))



def test_large_m_candidates_offered_past_64_rows_only(monkeypatch):
    """What the autotuner gets past M = 64: each LARGE_M_TILES tile with 128-row blocks, unsplit or
    split to ~1 wave (6 configs at most: each is a compile on first use); nothing at M <= 64."""
    import quasar_kernels.splitk as sk

    monkeypatch.setattr(sk, "autotune_enabled", lambda x: True)
    x = torch.zeros(130, 4096)
    assert sk.large_m_candidates(x[:64], 12288, 4096) == []
    cands = sk.large_m_candidates(x, 12288, 4096, extra=dict(MODE=2))
    assert 3 <= len(cands) <= 6 and all(c["BLOCK_M"] == 128 and c["MODE"] == 2 for c in cands)
    assert {(c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) for c in cands} == set(sk.LARGE_M_TILES)
    assert min(c["SPLIT_K"] for c in cands) == 1
    monkeypatch.setattr(sk, "autotune_enabled", lambda x: False)
    assert sk.large_m_candidates(x, 12288, 4096) == []  # no timing (CPU, capture, autotune off): none


def test_shape_errors():
    r = _gen(5)
    qweight, scales = quantize_int8_rtn(r(16, 64))
    with pytest.raises(ValueError):
        w8a16_linear(r(2, 32), qweight, scales)
    with pytest.raises(ValueError):
        w8a8_linear(r(2, 64), qweight, scales, backend="cutlass")


@pytest.mark.skipif(not HAS_CUDA, reason="autotuning times candidates on CUDA only")
def test_autotune_cuda():
    from quasar_kernels.splitk import TUNE_CACHE, m_bucket

    r = _gen(11)
    m, n, k, g = 5, 256, 512, 128
    w = r(n, k)
    codes, scales, zeros = quantize_int4_rtn(w, g)
    qweight = pack_int4(codes)
    q8, s8 = quantize_int8_rtn(w)
    x = r(m, k, dtype=torch.bfloat16)
    _check(w4a16_linear(x, qweight, scales, zeros, k, g), w4a16_linear_ref(x, qweight, scales, zeros, k, g),
           torch.bfloat16, (m, n))
    _check(w8a8_linear(x, q8, s8), w8a8_linear_ref(x, q8, s8), torch.bfloat16, (m, n))
    for name in ("w4a16", "w8a8-auto"):
        cfg, t = TUNE_CACHE[(name, m_bucket(m), n, k, torch.bfloat16)]
        assert t is not None and t > 0


# -- the fused attention kernels of decode / verify forwards (quasar_kernels/rope_cache.py, decode_attention.py)

def _split_heads(qkv, hq, hkv, d):
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_rope_cache_matches_unfused(qk_norm):
    """Split + per-head RMSNorm + RoPE + cache write in one kernel == the runtime's unfused ops (fp32);
    cache slots other than the written positions are left untouched."""
    from quasar_kernels.rope_cache import qkv_rope_cache
    from quasar_bench.runtime import rms_norm, rope

    g = _gen(11)
    hq, hkv, d, t, s = 6, 2, 32, 3, 40
    qkv, cos, sin = g(t, (hq + 2 * hkv) * d), g(t, d), g(t, d)
    qw, kw = (g(d), g(d)) if qk_norm else (None, None)
    kc, vc = g(hkv, s, d), g(hkv, s, d)
    k0, v0 = kc.clone(), vc.clone()
    pos = torch.tensor([17, 18, 19], device=DEVICE)
    q = qkv_rope_cache(qkv, qw, kw, 1e-6, cos, sin, kc, vc, pos)
    rq, rk, rv = _split_heads(qkv, hq, hkv, d)
    if qk_norm:
        rq, rk = rms_norm(rq, qw, 1e-6), rms_norm(rk, kw, 1e-6)
    torch.testing.assert_close(q, rope(rq, cos, sin).transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:, 17:20], rope(rk, cos, sin).transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(vc[:, 17:20], rv.transpose(0, 1))
    untouched = torch.ones(s, dtype=torch.bool)
    untouched[17:20] = False
    assert torch.equal(kc[:, untouched], k0[:, untouched]) and torch.equal(vc[:, untouched], v0[:, untouched])


@pytest.mark.parametrize("t,pos0", [(1, 0), (1, 63), (1, 64), (3, 70), (6, 129), (16, 200)])
def test_decode_attention_matches_sdpa(t, pos0):
    """Causal GQA attention of T new tokens over the filled cache == SDPA over the cache prefix with
    an explicit mask; keys past the last position (poisoned with NaN) are never read."""
    from quasar_kernels.decode_attention import decode_attention

    g = _gen(12 + t)
    hq, hkv, d, s = 8, 2, 32, 300
    q, kc, vc = g(hq, t, d), g(hkv, s, d), g(hkv, s, d)
    n = pos0 + t
    kc[:, n:], vc[:, n:] = float("nan"), float("nan")
    pos = torch.arange(pos0, n, device=DEVICE)
    out = decode_attention(q, kc, vc, pos)
    seen = torch.arange(n, device=DEVICE)[None, :] <= pos[:, None]
    ref = F.scaled_dot_product_attention(q[None], kc[None, :, :n], vc[None, :, :n], attn_mask=seen, enable_gqa=True)
    torch.testing.assert_close(out, ref[0].transpose(0, 1).reshape(t, hq * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_llama"])
def test_fused_attention_runtime_equals_unfused_and_stays_lossless(family, monkeypatch):
    """The runtime with the fused attention kernels computes the unfused runtime's logits (eager
    forwards and the static path CUDA graphs capture), and greedy speculative decoding on it still
    equals AR."""
    import quasar_kernels.decode_attention as decode_attention_module
    from quasar_bench import runtime as R
    from quasar_bench.decode import generate, greedy_continuation
    from quasar_bench.drafters import make_drafter
    from quasar_bench.models import TINY_CONFIGS, random_hf_model
    from quasar_bench.quant import fuse_projections

    # built on the CPU (the same weights as CI's, whose greedy text repeats: drafts get accepted)
    hf = random_hf_model({**TINY_CONFIGS[family], "initializer_range": 0.3}, 256, torch.float32, "cpu", 3).to(DEVICE)
    rt = fuse_projections(R.native_from_hf(hf, 256))
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], device=DEVICE)
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    n_new = 8 if family == "tiny_qwen3" else 0  # the decode loop once (interpreted kernels are slow)

    def run():
        rt.reset(64)
        steps = [rt.forward(ids[:8]), rt.forward(ids[8:9]), rt.forward(ids[9:])]
        rt.rollback(9)
        static = rt.static_forward(ids[9:], torch.arange(9, 12, device=DEVICE), span=64)
        return torch.cat(steps), static, greedy_continuation(rt, prompt, n_new) if n_new else []

    want, want_static, ar = run()
    monkeypatch.setattr(R.FusedAttention, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(decode_attention_module, "NSPLIT", 4)  # fewer interpreted programs
    R.fused_attention(True)
    try:
        assert rt.uses_fused_attention(1) and not rt.uses_fused_attention(17)
        got, got_static, fused_ar = run()
        spec = generate(rt, make_drafter({"name": "ngram", "k": 4}, rt), prompt, n_new, 4) if n_new else None
    finally:
        R.fused_attention(False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_static, want_static, rtol=1e-4, atol=1e-4)
    assert fused_ar == ar
    if spec is not None:
        assert spec.output_ids == ar and spec.accepted > 0


def test_tuned_configs_persist_on_disk_per_key(tmp_path, monkeypatch):
    """What the tuners keep on disk (the Triton kernels' pick_config and the CUDA W4A16 planner) is
    read back by key in a fresh process (the in-memory copy dropped), and a read-only cache only
    loses the saving, never the run."""
    from quasar_kernels import splitk

    path = tmp_path / "autotune" / "GPU-tritonX.json"
    monkeypatch.setattr(splitk, "_disk_path", lambda device: path)
    monkeypatch.setattr(splitk, "_DISK", {"path": None, "entries": None})
    splitk.disk_put(None, "w4a16_cuda|abc|m=6", {"WN": 2, "S": 4}, 12.5)
    splitk._disk_save(("w8a16", 16, 4096, 1024, torch.bfloat16), {"BLOCK_N": 64}, 7.0)
    monkeypatch.setattr(splitk, "_DISK", {"path": None, "entries": None})  # as a new process
    assert splitk.disk_get(None, "w4a16_cuda|abc|m=6") == {"config": {"WN": 2, "S": 4}, "us": 12.5}
    assert splitk.disk_get(None, "w8a16|16|4096|1024|bfloat16") == {"config": {"BLOCK_N": 64}, "us": 7.0}
    assert splitk.disk_get(None, "w4a16_cuda|abc|m=7") is None
    monkeypatch.setattr(splitk, "_DISK", {"path": tmp_path / "missing_dir_file" / "x" / "y.json", "entries": {}})
    monkeypatch.setattr("quasar_bench.fileio.write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("read-only")))
    splitk.disk_put(None, "k", {}, 1.0)  # no exception


def test_swapped_candidates():
    """Mode 3 (weights as the dot's first operand) tunes with every token in one row block (a power of
    two >= M, at most 256, 16 at least), never a 256 x 256 accumulator, unsplit first; the default
    autotuner never offers it (slower than mode 2 on the H200); `mode=` outside 2/3 is refused."""
    import quasar_kernels.splitk as sk
    import quasar_kernels.w4a16 as w4

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(sk, "autotune_enabled", lambda x: True)
    try:
        for m, bm in ((8, 16), (17, 32), (64, 64), (100, 128), (190, 256), (600, 256)):
            cands = w4.swapped_candidates(torch.zeros(m, 64), 24576, 4096)
            assert cands and all(c["MODE"] == 3 and c["BLOCK_M"] == bm for c in cands), m
            assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 256 for c in cands)
            assert cands[0]["SPLIT_K"] == 1
    finally:
        monkeypatch.undo()
    if not HAS_CUDA:  # no timing here: one unsplit config, and it computes the product
        assert [c["SPLIT_K"] for c in w4.swapped_candidates(torch.zeros(40, 64), 4096, 4096)] == [1]
        r = _gen(77)
        codes, scales, zeros = quantize_int4_rtn(r(48, 256), 64)
        qw, x = pack_int4(codes), r(40, 256, dtype=torch.bfloat16)
        _check(w4a16_linear(x, qw, scales, zeros, 256, 64, mode=3),
               w4a16_linear_ref(x, qw, scales, zeros, 256, 64), torch.bfloat16, (40, 48))
    x = torch.zeros(2, 64, device=DEVICE)
    qw, s16 = torch.zeros(8, 16, dtype=torch.int32, device=DEVICE), torch.ones(1, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="mode must be"):
        w4a16_linear(x, qw, s16, torch.zeros_like(s16), 64, 64, mode=1)


def test_autotune_file_pins_the_tuned_configs(tmp_path, monkeypatch):
    """$QUASAR_AUTOTUNE_FILE replaces the per-GPU file under the cache root, for reading and for
    writing: a file carried to another machine of the same kind hands its configurations back."""
    from quasar_kernels import splitk

    pinned = tmp_path / "pinned.json"
    pinned.write_text('{"w8a16|16|4096|1024|bfloat16": {"config": {"BLOCK_N": 128}, "us": 9.0}}')
    monkeypatch.setenv("QUASAR_AUTOTUNE_FILE", str(pinned))
    monkeypatch.setattr(splitk, "_DISK", {"path": None, "entries": None})
    assert splitk._disk_path(None) == pinned  # no GPU name needed: the file is named
    assert splitk.disk_get(None, "w8a16|16|4096|1024|bfloat16") == {"config": {"BLOCK_N": 128}, "us": 9.0}
    splitk.disk_put(None, "w4a16_cuda|abc|m=6", {"WN": 2}, 3.0)
    assert "w4a16_cuda|abc|m=6" in pinned.read_text() and "w8a16|16|4096" in pinned.read_text()


def test_tuned_config_reads_the_autotuners_pick_per_m_bucket(monkeypatch):
    """What the benches report as a kernel's configuration: the autotuner's entry for the M bucket
    (rows 5..8 share one), None for a bucket or a mode not tuned."""
    import quasar_kernels.splitk as sk
    from quasar_kernels.w4a16 import tune_name

    monkeypatch.setattr(sk, "TUNE_CACHE", {("w4a16_mode3", 8, 4096, 1024, torch.bfloat16): ({"BLOCK_N": 128}, 5.0)})
    assert sk.tuned_config(tune_name(3), 6, 4096, 1024, torch.bfloat16) == {"BLOCK_N": 128}
    assert sk.tuned_config(tune_name(3), 9, 4096, 1024, torch.bfloat16) is None
    assert sk.tuned_config(tune_name(None), 6, 4096, 1024, torch.bfloat16) is None
