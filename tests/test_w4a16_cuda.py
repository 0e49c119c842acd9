"""The CUDA W4A16 kernel's offline re-layout (CPU) and the kernel itself (CUDA only).

CPU: prepack_w4a16 -> unpack_prepacked gives back the original codes, scales and zeros exactly,
and the packed words hold, lane by lane, the mma.m16n8k16 B-fragment elements the kernel assumes
(checked against an independent element-by-element statement of that mapping).
CUDA: the kernel against the pure-torch reference on fresh random inputs, output poisoned first.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quasar_kernels.w4a16_cuda import packed_dims, prepack_w4a16, unpack_prepacked
from quasar_bench.packing import dequantize_int4, pack_int4, quantize_int4_rtn

SHAPES = [  # (N, K, G)
    (64, 128, 128),
    (130, 576, 128),   # K padded (Kp = 640), N not a multiple of the 64-column tile
    (72, 200, 24),     # G not a multiple of 16: groups padded to 32 channels
    (40, 256, 64),
    (200, 384, 32),
]


def _weights(n, k, g, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    codes, scales, zeros = quantize_int4_rtn(w.to(device), g)
    return pack_int4(codes), scales, zeros


@pytest.mark.parametrize("n,k,g", SHAPES)
def test_prepack_roundtrip(n, k, g):
    qweight, scales, zeros = _weights(n, k, g, seed=n + k + g)
    packed = prepack_w4a16(qweight, scales, zeros, k, g)
    nt = -(-n // 64)
    gp = -(-g // 16) * 16
    ng = scales.shape[0]
    assert packed["qpk"].shape == (nt, ng * gp // 16, 32, 4) and packed["qpk"].dtype == torch.int32
    assert packed["scales_fp16"].shape == (nt, ng, 8, 8) and packed["zeros"].dtype == torch.uint8
    assert packed["scales_bf16"].dtype == torch.bfloat16
    q2, s2, z2 = unpack_prepacked(packed)
    assert torch.equal(q2, qweight)
    assert torch.equal(s2, scales)
    assert torch.equal(z2, zeros)


def _fragment_weights(packed, dtype=torch.float32):
    """Dequantized W'[Np, K'] read the way the kernel reads it: lane l = 4 g + t, word j, and
    lop3(q >> 4 i, 0x000f000f) -> (lo, hi) = nibbles (i, i + 4) = fragment register i of the
    quad (sub-tile 2j: i = 0 -> b0, 1 -> b1; sub-tile 2j + 1: i = 2 -> b0, 3 -> b1);
    b0 = {B[k=2t], B[k=2t+1]}, b1 = {B[k=2t+8], B[k=2t+9]}, column n = 8 * subtile + g."""
    qpk = packed["qpk"].to(torch.int64) & 0xFFFFFFFF
    nt, kt = qpk.shape[:2]
    ng = packed["scales_fp16"].shape[1]
    gp = kt * 16 // ng
    w = torch.full((nt * 64, kt * 16), float("nan"), dtype=dtype)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            q = qpk[:, :, lane, j]  # [nt, kt]
            for i in range(4):
                sub = 2 * j + i // 2
                kofs = 8 * (i % 2)
                lo = (q >> (4 * i)) & 0xF
                hi = (q >> (4 * i + 16)) & 0xF
                n_idx = torch.arange(nt) * 64 + 8 * sub + g
                for half, code in ((0, lo), (1, hi)):
                    k_idx = torch.arange(kt) * 16 + 2 * t + kofs + half
                    grp = k_idx // gp
                    sc = packed["scales_fp16"][:, :, g, sub].float()[:, grp]  # [nt, kt]
                    zp = packed["zeros"][:, :, g, sub].float()[:, grp]
                    w[n_idx[:, None], k_idx[None, :]] = (code.float() - zp) * sc
    return w


@pytest.mark.parametrize("n,k,g", [(130, 576, 128), (72, 200, 24)])
def test_fragment_mapping(n, k, g):
    qweight, scales, zeros = _weights(n, k, g, seed=7)
    packed = prepack_w4a16(qweight, scales, zeros, k, g)
    wf = _fragment_weights(packed)
    ref = dequantize_int4(qweight, scales, zeros, k, g)  # [N, K]
    ng = scales.shape[0]
    gp = -(-g // 16) * 16
    # K' -> K: group gi, channel r < G
    kq = torch.arange(ng * gp)
    keep = (kq % gp) < g
    kk = (kq // gp) * g + kq % gp
    wk = wf[:n][:, keep]
    kk = kk[keep]
    assert not torch.isnan(wk).any()
    full = dequantize_int4(qweight, scales, zeros, ng * g, g)  # includes padded channels (weight 0)
    assert torch.equal(wk, full[:, kk])
    assert torch.equal(full[:, :k], ref)
    # padded columns (n >= N) and padded group channels dequantize to 0
    assert (wf[n:] == 0).all()
    assert (wf[:n][:, ~keep] == 0).all()


def _swapped_codes(packed):
    """Codes W'[Np, K'] (and per-column scale / zero index) read the way the swapped kernel (swap=1)
    reads the same words: word j of lane l = 4 g + t is the A fragment of n16-tile j, registers in
    the order (q, q >> 8, q >> 4, q >> 12) -> a0 = {A[g][2t], A[g][2t+1]}, a1 = {A[g+8][2t], ..},
    a2 = {A[g][2t+8], ..}, a3 = {A[g+8][2t+8], ..} (mma.m16n8k16 A, row-major), A[r][c] the code of
    W'[64 nt + 16 j + r][16 kt + c]; the scale of column 16 j + 8 h + g is scales[.., g, 2 j + h]."""
    qpk = packed["qpk"].to(torch.int64) & 0xFFFFFFFF
    nt, kt = qpk.shape[:2]
    codes = torch.full((nt * 64, kt * 16), -1, dtype=torch.int64)
    sub = torch.full((nt * 64,), -1, dtype=torch.int64)  # which [g, s] scale slot each column uses
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            q = qpk[:, :, lane, j]
            for reg, shift in enumerate((0, 8, 4, 12)):
                row = g + 8 * (reg % 2)
                col = 2 * t + 8 * (reg // 2)
                n_idx = torch.arange(nt) * 64 + 16 * j + row
                for half in (0, 1):
                    k_idx = torch.arange(kt) * 16 + col + half
                    codes[n_idx[:, None], k_idx[None, :]] = (q >> (shift + 16 * half)) & 0xF
                sub[n_idx] = (g * 8 + 2 * j + reg % 2)
    return codes, sub


@pytest.mark.parametrize("n,k,g", [(130, 576, 128), (72, 200, 24), (200, 384, 32)])
def test_swapped_operands_fold_the_zero_point_after_the_mma(n, k, g):
    """The swapped kernel's arithmetic, emulated in float64 from the packed tensors: codes read as
    A fragments, 128 + code accumulated per group over whatever K slices the warps take (a slice may
    start or end inside a group), then s * (acc - (128 + z) * sum x) per group — equals x @ W^T."""
    qweight, scales, zeros = _weights(n, k, g, seed=11)
    packed = prepack_w4a16(qweight, scales, zeros, k, g)
    codes, slot = _swapped_codes(packed)
    assert (codes >= 0).all() and (slot >= 0).all()  # every element read exactly where expected
    ng = scales.shape[0]
    gp = -(-g // 16) * 16
    nt, kt = packed["qpk"].shape[:2]
    # the same codes the (already verified) B-order reading gives
    wf = _fragment_weights(packed)
    sc = packed["scales_fp16"].double().reshape(nt, ng, 64)  # [nt, gi, 8 g + s]
    zp = packed["zeros"].double().reshape(nt, ng, 64)
    col_tile = torch.arange(nt * 64) // 64
    s_col = sc[col_tile, :, slot]  # [Np, NG]
    z_col = zp[col_tile, :, slot]
    grp = torch.arange(kt * 16) // gp
    assert torch.equal((codes.float() - z_col[:, grp].float()) * s_col[:, grp].float(), wf)
    # fold-zero over random warp slices of the K' steps
    gen = torch.Generator().manual_seed(3)
    m = 5
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    xs = torch.zeros(m, kt * 16, dtype=torch.float64)  # staged: group channels >= G are zero
    kq = torch.arange(kt * 16)
    keep = (kq % gp) < g
    src = (kq // gp) * g + kq % gp
    keep &= src < k
    xs[:, keep] = x[:, src[keep]]
    cuts = sorted(set(torch.randint(1, kt, (3,), generator=gen).tolist())) if kt > 1 else []
    y = torch.zeros(m, nt * 64, dtype=torch.float64)
    for a, b in zip([0] + cuts, cuts + [kt]):  # one warp's K slice: steps a..b-1
        acc_g = torch.zeros_like(y)
        sx = torch.zeros(m, 1, dtype=torch.float64)
        for step in range(a, b):
            ks = slice(16 * step, 16 * step + 16)
            acc_g += xs[:, ks] @ (128.0 + codes[:, ks].double()).t()
            sx += xs[:, ks].sum(1, keepdim=True)
            gi = step * 16 // gp
            if (step + 1) * 16 % gp == 0 or step == b - 1:  # the group's end or the slice's: flush
                y += s_col[:, gi] * (acc_g - (128.0 + z_col[:, gi]) * sx)
                acc_g.zero_()
                sx.zero_()
    ref = x @ dequantize_int4(qweight, scales, zeros, k, g).double().t()
    assert torch.allclose(y[:, :n], ref, rtol=1e-9, atol=1e-9)


def test_cpu_raises():
    from quasar_kernels.w4a16_cuda import w4a16_cuda_linear

    qweight, scales, zeros = _weights(64, 128, 128)
    packed = prepack_w4a16(qweight, scales, zeros, 128, 128)
    with pytest.raises(RuntimeError):
        w4a16_cuda_linear(torch.randn(2, 128, dtype=torch.bfloat16), packed)


def _gpu_case(n, k, g, m, dtype, seed):
    """Packed random int4 weights, x, a bias on odd m, and the fp32 reference x @ W^T (+ bias), on CUDA."""
    qweight, scales, zeros = _weights(n, k, g, seed=seed, device="cuda")
    packed = prepack_w4a16(qweight, scales, zeros, k, g)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if m % 2 else None
    ref = x.float() @ dequantize_int4(qweight, scales, zeros, k, g).t()
    if bias is not None:
        ref = ref + bias.float()
    return packed, x, bias, ref


def _check_configs(linear, packed, x, bias, ref, configs):
    """Each configuration's output (written over a freed NaN block, so unwritten elements show) is finite
    and within bf16 / fp16 rounding of the reference."""
    m, n = ref.shape
    for cfg in configs:
        torch.full((m * n + 4096,), float("nan"), device="cuda", dtype=x.dtype)  # freed: poisons the next block
        out = linear(x, packed, bias, config=cfg)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), cfg
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < (1e-2 if x.dtype == torch.bfloat16 else 2e-3), (cfg, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,g", SHAPES + [(1024, 4096, 128), (4096, 1536, 128)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 37])
def test_kernel_vs_reference(n, k, g, m, dtype):
    from quasar_kernels.w4a16_cuda import available, candidate_configs, w4a16_cuda_linear

    ok, why = available()
    if not ok:
        pytest.skip(why)
    packed, x, bias, ref = _gpu_case(n, k, g, m, dtype, seed=m * 31 + n)
    # the planner's pick, and a spread of configurations of both weight rings (register / cp.async)
    # and both operand orders (weights as B with the dequantization per weight; as A with the zero
    # point and scale after the MMA, M <= 8)
    configs = [None] + ([c for p in (0, 1) for sw in (0, 1)
                         for c in candidate_configs(min(m, 16), packed, x.device, pipe=p, swap=sw)[::9]]
                        if m <= 16 else [])
    assert m > 8 or any(c and c["swap"] for c in configs)
    _check_configs(w4a16_cuda_linear, packed, x, bias, ref, configs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,g", [(64, 128, 128), (130, 576, 128), (200, 384, 32), (40, 256, 64),
                                   (1024, 4096, 128), (4096, 1536, 128)])
@pytest.mark.parametrize("m", [1, 17, 37, 64, 100, 130, 256])
def test_wgmma_kernel_vs_reference(n, k, g, m, dtype):
    """The Hopper wgmma kernel against the fp32 reference: every tokens-per-CTA size and tile count with
    the planner's pick and CTA counts from one CTA for the whole GEMM to more CTAs than column blocks
    (partial token blocks, N not a multiple of 128, a K padded past the last group, groups smaller
    than a pipeline stage), output poisoned first."""
    from quasar_kernels.w4a16_cuda import WGMMA_SHAPES, w4a16_wgmma_linear, wgmma_available, wgmma_blocks_stages

    ok, why = wgmma_available()
    if not ok:
        pytest.skip(why)
    packed, x, bias, ref = _gpu_case(n, k, g, m, dtype, seed=m * 17 + n)
    configs = []
    for tb in (32, 64, 128):
        for wg, nw in WGMMA_SHAPES:
            blocks, stages = wgmma_blocks_stages(packed, nw, wg)
            # whole blocks per CTA, one CTA for everything, and even splits that cut blocks at odd points
            for ctas in sorted({blocks, 1, min(blocks * stages, 2 * blocks + 1), min(blocks * stages, 264)}):
                configs.append(dict(ctas=ctas, tb=tb, nw=nw, wg=wg))
    _check_configs(w4a16_wgmma_linear, packed, x, bias, ref, [None] + configs)


def test_wgmma_refuses_cta_shapes_it_is_not_built_for():
    """(warpgroups, tiles per warpgroup) outside the built set is refused in one line naming the set,
    before any device work (3 x 2 would need 4 stages of 260 KB at 128 tokens)."""
    from quasar_kernels.w4a16_cuda import w4a16_wgmma_linear

    qweight, scales, zeros = _weights(64, 128, 128, seed=3)
    packed = prepack_w4a16(qweight, scales, zeros, 128, 128)
    for bad in (dict(ctas=1, tb=64, nw=2, wg=3), dict(ctas=1, tb=64, nw=1, wg=4)):
        with pytest.raises(ValueError, match=r"must be one of \(\(2, 1\), \(2, 2\), \(3, 1\)\)"):
            w4a16_wgmma_linear(torch.randn(2, 128, dtype=torch.bfloat16), packed, config=bad)


def test_wgmma_refuses_groups_it_cannot_stage():
    """Groups that are not a multiple of 16 channels are refused with the alternative named."""
    from quasar_kernels.w4a16_cuda import w4a16_wgmma_linear

    qweight, scales, zeros = _weights(72, 200, 24)
    packed = prepack_w4a16(qweight, scales, zeros, 200, 24)
    with pytest.raises(ValueError, match="group_size % 16 == 0.*power of two.*use w4a16_cuda_linear"):
        w4a16_wgmma_linear(torch.randn(2, 200, dtype=torch.bfloat16), packed)
    qweight, scales, zeros = _weights(72, 192, 48)  # 3 k16 steps per group: a stage would straddle groups
    with pytest.raises(ValueError, match="power of two.*use w4a16_cuda_linear"):
        w4a16_wgmma_linear(torch.randn(2, 192, dtype=torch.bfloat16), prepack_w4a16(qweight, scales, zeros, 192, 48))
    qweight, scales, zeros = _weights(64, 128, 128)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        w4a16_wgmma_linear(torch.randn(2, 128, dtype=torch.bfloat16), prepack_w4a16(qweight, scales, zeros, 128, 128))


def _emulate_partial_sum(y, ws, blk, tok0, m, n_out, TB, ct, wsn, threads=256):
    """The last CTA's sum of a shared block's partials as finish_block indexes it: 16-byte (4-float)
    pieces, RQ per thread per pass, a load only inside the token rows and the workspace row (wsn
    floats), a store only below m and n_out; every output of the block must be written exactly once."""
    c4 = ct * 16
    rq = min(8, TB * c4 // threads)
    n0 = blk * ct * 64
    flat = ws.reshape(ws.shape[0], -1)  # [parts][TB * wsn]: the workspace rows of this token block
    written = np.zeros((TB, ct * 64), dtype=int)
    for base in range(0, TB * c4, threads * rq):
        for r in range(rq):
            for tid in range(threads):
                idx = base + r * threads + tid
                tok, n = idx // c4, n0 + 4 * (idx % c4)
                if idx >= TB * c4 or tok0 + tok >= m:
                    continue
                v = np.zeros(4)
                if n < wsn:
                    assert n + 4 <= wsn, "a 16-byte load straddles the workspace row"
                    for q in range(ws.shape[0]):
                        v = v + flat[q, tok * wsn + n:tok * wsn + n + 4]
                for c in range(4):
                    if n + c < n_out:
                        y[tok0 + tok, n + c] = v[c]
                        written[tok, n + c - n0] += 1
    rows = min(m - tok0, TB)
    cols = min(n_out - n0, ct * 64)
    assert (written[:rows, :cols] == 1).all() and written.sum() == rows * cols


def _emulate_wgmma(x, packed, ctas, TB, NTW, NWG=2):
    """The wgmma kernel's index arithmetic in float64, step by step as csrc/w4a16_wgmma.cu writes it:
    the even split of the (column block, stage) units over `ctas` CTAs per token block, the loader
    entering a new block, the cp.async staging offsets (the wgmma layout's 4 KB per tile and stage,
    the scale / zero slots of the groups a stage touches, swizzled activations), the descriptor
    addressing of B (128-byte swizzle, SBO 1024 B), each warp's A fragments read as two 16-byte runs
    per lane and dequantized with the staged scales of rows 16 wq + g and 16 wq + 8 + g, the epilogue's
    (row, token) of each accumulator, whole blocks written directly and shared ones through workspace
    slots by rank, summed when the block's last CTA arrives (the count the kernel derives from the
    owner of the block's first and last unit). Weights and activations are staged by each of the
    NWG x 128 threads' own copies, as the kernel assigns them (every byte of the stage written
    exactly once, nothing outside it). The hardware's semantics are the assumption; the kernel's own
    offsets are what this checks."""
    from quasar_kernels.w4a16_cuda import wgmma_blocks_stages, wgmma_pack, wgmma_parts

    m, k = x.shape
    n_out = packed_dims(packed)[0]
    words = wgmma_pack(packed).numpy().view(np.uint32).reshape(-1, 4)  # uint4 units
    nt_all, kt_all = packed["qpk"].shape[:2]
    ng = packed["scales_fp16"].shape[1]
    lg = (kt_all // ng).bit_length() - 1  # the kernel needs k16 steps per group a power of two
    ksteps = 8
    slot_shift = min(lg, 3)  # k16 step i of a stage reads group slot i >> slot_shift
    scl = packed["scales_fp16"].double().numpy().reshape(-1)
    zp = packed["zeros"].numpy().astype(np.int64).reshape(-1)
    ct = NWG * NTW
    threads = NWG * 128
    nb, ks = wgmma_blocks_stages(packed, NTW, NWG)
    units = nb * ks
    max_parts = wgmma_parts(nb, ks, ctas)
    y = np.full((m, nt_all * 64), np.nan)

    def owner(u):
        return ((u + 1) * ctas - 1) // units

    for tok0 in range(0, m, TB):
        ws = np.full((max_parts, TB, nt_all * 64), np.nan)
        arrived = np.zeros(nb, dtype=int)
        for c in range(ctas):
            u0, u1 = c * units // ctas, (c + 1) * units // ctas
            acc = np.zeros((ct, 64, TB))
            first_st = u0 % ks
            for u in range(u0, u1):
                blk, st = divmod(u, ks)
                wbuf = np.zeros((ct * 256, 4), dtype=np.uint32)
                wcount = np.zeros(ct * 256, dtype=int)
                for tid in range(threads):  # load_next: chunk tid + threads r of the stage's ct x 256
                    for r in range(ct * 256 // threads):
                        wc_ = tid + r * threads
                        row = min(blk * ct + (wc_ >> 8), nt_all - 1) * ks * 256 + (wc_ & 255)
                        wbuf[r * threads + tid] = words[row + st * 256]
                        wcount[r * threads + tid] += 1
                assert (wcount == 1).all(), "a weight chunk staged twice or never"
                wflat = wbuf.reshape(-1)
                sslot = np.full((ct, ksteps, 64), np.nan)  # unused slots stay NaN
                zslot = np.zeros((ct, ksteps, 64), dtype=np.int64)
                slots = ksteps >> slot_shift  # groups a stage touches per tile
                szn = ct * slots * 12  # scale / zero chunks of the stage, numbered densely over the threads
                szcount = np.zeros((ct, ksteps, 12), dtype=int)
                for cc in (tid + r * threads for tid in range(threads) for r in range(-(-ct * ksteps * 12 // threads))):
                    if cc >= szn:  # the kernel issues no copy for it
                        continue
                    v, slot, ch = cc // (slots * 12), (cc // 12) % slots, cc % 12
                    szcount[v, slot, ch] += 1
                    gi = min(((st << 3) >> lg) + slot, ng - 1)
                    base = min(blk * ct + v, nt_all - 1) * ng + gi
                    if ch < 8:
                        sslot[v, slot, ch * 8:ch * 8 + 8] = scl[base * 64 + ch * 8:base * 64 + ch * 8 + 8]
                    else:
                        o = (ch - 8) * 16
                        zslot[v, slot, o:o + 16] = zp[base * 64 + o:base * 64 + o + 16]
                assert (szcount[:, :slots] == 1).all(), "a scale / zero chunk staged twice or never"
                xbuf = np.full(TB * ksteps * 16, np.nan)  # bf16 elements, indexed by byte offset / 2
                xcount = np.zeros(TB * ksteps * 2, dtype=int)
                xrows = threads // 8
                for tid in range(threads):  # thread tid: channels 8 q and 64 + 8 q (q = tid & 7), rows (tid >> 3) + xrows r
                    q, xtok = tid & 7, tid >> 3
                    for r in range(-(-TB // xrows)):
                        tok = xtok + xrows * r
                        if tok >= TB:  # past the block's rows: the kernel skips the copy
                            continue
                        for kc in (q, q + 8):
                            dst = (kc >> 3) * (TB * 128) + xtok * 128 + (((kc & 7) ^ (xtok & 7)) << 4) + r * xrows * 128
                            assert 0 <= dst < TB * ksteps * 32
                            kk = st * 128 + kc * 8
                            ok = tok0 + tok < m and kk < k  # zero-filled otherwise
                            xbuf[dst // 2:dst // 2 + 8] = x[tok0 + tok, kk:kk + 8] if ok else 0.0
                            xcount[dst // 16] += 1
                assert (xcount == 1).all(), "an activation chunk staged twice or never"
                for v in range(ct):  # v = wg * NTW + jj
                    for i in range(ksteps):
                        slot = i >> slot_shift
                        a = np.zeros((64, 16))
                        for wq in range(4):
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                off = v * 4096 + wq * 1024 + lane * 16 + (i >> 2) * 512 + (i & 3) * 4
                                q = int(wflat[off // 4])
                                for reg, sh in enumerate((0, 8, 4, 12)):  # a0..a3
                                    row = 16 * wq + g + 8 * (reg & 1)
                                    e = g * 8 + 2 * wq + (reg & 1)
                                    s, z = sslot[v, slot, e], zslot[v, slot, e]
                                    for h in range(2):
                                        code = (q >> (sh + 16 * h)) & 0xF
                                        a[row, 2 * t + h + 8 * (reg >> 1)] = (code - z) * s
                        b = np.zeros((16, TB))  # B[k][token] through the 128-byte-swizzled descriptor
                        start = (i >> 2) * TB * 128 + (i & 3) * 32  # atom column, 32 B per k16 step
                        for kk in range(16):
                            for n_ in range(TB):
                                row = start + (n_ >> 3) * 1024 + (n_ & 7) * 128  # SBO 1024 B per 8 rows
                                chunk = ((row & 127) >> 4) + (kk >> 3)  # 16-byte chunk in the row, then XOR row % 8
                                off = (row & ~127) + ((chunk ^ (n_ & 7)) << 4) + (kk & 7) * 2
                                b[kk, n_] = xbuf[off // 2]
                        acc[v] += a @ b
                if st == ks - 1 or u == u1 - 1:  # the block ends here or the CTA's range does
                    whole = first_st == 0 and st == ks - 1
                    rank = 0 if whole else c - owner(blk * ks)
                    assert rank < max_parts
                    for v in range(ct):
                        nt = blk * ct + v
                        if nt >= nt_all:
                            continue
                        for wq in range(4):
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                for j in range(TB // 8):
                                    for e in range(4):
                                        r = 16 * wq + g + 8 * (e >> 1)
                                        tok = 8 * j + 2 * t + (e & 1)
                                        if tok0 + tok < m:
                                            if whole:
                                                y[tok0 + tok, nt * 64 + r] = acc[v][r, tok]
                                            else:
                                                ws[rank, tok, nt * 64 + r] = acc[v][r, tok]
                    if not whole:
                        parts = owner(blk * ks + ks - 1) - owner(blk * ks) + 1
                        arrived[blk] += 1
                        if arrived[blk] == parts:  # the last to arrive sums the slots in rank order
                            _emulate_partial_sum(y, ws[:parts], blk, tok0, m, n_out, TB, ct, nt_all * 64, threads)
                    acc[:] = 0
                    first_st = 0
    return y


@pytest.mark.parametrize("m,ctas,TB,NTW,g,NWG", [(40, 7, 32, 1, 64, 2), (9, 2, 64, 2, 64, 2), (20, 5, 32, 2, 16, 2),
                                                 (12, 3, 32, 1, 32, 2), (70, 4, 64, 1, 128, 2), (33, 3, 32, 1, 256, 2),
                                                 (40, 5, 32, 1, 64, 3), (70, 1, 64, 1, 16, 3), (9, 4, 64, 1, 128, 3)])
def test_wgmma_index_math_emulated(m, ctas, TB, NTW, g, NWG):
    """N = 130 (clamped tiles), K = 520 (zero past K inside the last stage), G = 16 (4 groups per
    stage) .. 256 (a group over 2 stages), CTA counts that split column blocks at odd points (parts
    of 2-3 CTAs) or give whole blocks, partial token blocks, 2 or 3 warpgroups per CTA (3: 384 threads,
    24 activation rows per pass, so at 32 / 64 tokens some passes lie past the block and are skipped):
    the emulated kernel equals x @ W^T."""
    n, k = 130, 520 if g < 256 else 512
    qweight, scales, zeros = _weights(n, k, g, seed=5)
    packed = prepack_w4a16(qweight, scales, zeros, k, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = _emulate_wgmma(x.numpy(), packed, ctas, TB, NTW, NWG)
    ref = (x @ dequantize_int4(qweight, scales, zeros, k, g).double().t()).numpy()
    assert np.allclose(y[:, :n], ref, rtol=1e-6, atol=1e-6)


def test_wgmma_pack_is_a_permutation_of_the_packed_words():
    """Every word of the mma.sync layout appears exactly once in the wgmma layout, at the index the
    kernel reads for (tile, k16 step, lane, warp), and the stages' padding past KT is zero."""
    from quasar_kernels.w4a16_cuda import wgmma_pack

    qweight, scales, zeros = _weights(130, 200, 32, seed=1)
    packed = prepack_w4a16(qweight, scales, zeros, 200, 32)
    qpk = packed["qpk"]
    qwg = wgmma_pack(packed)
    nt, kt = qpk.shape[:2]
    assert qwg.shape == (nt, -(-kt // 8), 4, 2, 32, 4)
    for tile, step, lane, w in [(0, 0, 0, 0), (2, kt - 1, 31, 3), (1, 5, 17, 2), (2, 9, 4, 1)]:
        assert qwg[tile, step // 8, w, (step % 8) // 4, lane, step % 4] == qpk[tile, step, lane, w]
    assert qwg.flatten()[qwg.flatten() != 0].sort().values.equal(qpk.flatten()[qpk.flatten() != 0].sort().values)
    assert kt % 8 and (qwg[:, -1].permute(0, 1, 2, 4, 3).reshape(nt, 4, 8, 32)[:, :, kt % 8:] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_wgmma_probe_layouts():
    """One wgmma with the wgmma kernel's layout assumptions — A fragments in registers as in
    mma.m16n8k16 per warp, B as K-major 128-byte-swizzled token rows (1024-byte atoms, SBO 1024 B),
    the D fragment mapping of the epilogue — on small integers (exact in bf16 and fp32): D = A @ B.
    Run before the kernel's own tests: a failure here is a layout assumption, not the pipeline; the
    message says whether the hardware read B unswizzled."""
    from quasar_kernels.w4a16_cuda import _load, wgmma_available

    ok, why = wgmma_available()
    if not ok:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-4, 5, (64, 16), generator=gen).to(torch.bfloat16)
    b = torch.randint(-4, 5, (16, 32), generator=gen).to(torch.bfloat16)
    d = _load().wgmma_probe(a.cuda(), b.cuda()).cpu()
    ref = a.float() @ b.float()
    # what an unswizzled read of the staged rows would give: chunk k // 8 of row n holds the staged
    # chunk c with c ^ (n % 8) == k // 8 (zeros past the 2 chunks written)
    alt = torch.zeros(16, 32)
    for k in range(16):
        for n in range(32):
            c = (k >> 3) ^ (n & 7)
            alt[k, n] = b[c * 8 + (k & 7), n].float() if c < 2 else 0.0
    hint = " (it matches B read unswizzled)" if torch.equal(d, a.float() @ alt) else ""
    assert torch.equal(d, ref), f"wgmma layout probe: max |D - A @ B| = {(d - ref).abs().max():.1f}{hint}"


def test_wgmma_plan_tunes_once_per_token_block(monkeypatch):
    """A ragged batch changes M from step to step: the wgmma planner times its configurations once per
    number of token blocks (33..64 rows share one 64-token block), not once per M; the timed input
    has the block's full row count."""
    import quasar_kernels.splitk as splitk
    import quasar_kernels.w4a16_cuda as wc

    timed_rows = []
    monkeypatch.setattr(wc, "_PLANS", {})
    monkeypatch.setattr(wc, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(splitk, "disk_get", lambda dev, key: None)
    monkeypatch.setattr(splitk, "disk_put", lambda *a: None)
    monkeypatch.setattr(splitk, "graph_time_us", lambda fns, **kw: 1.0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(wc, "w4a16_cuda_linear", lambda x, packed: torch.ones(x.shape[0], 4))

    def fake_wgmma(x, packed, bias=None, *, config=None):
        timed_rows.append(x.shape[0])
        return torch.ones(x.shape[0], 4)

    monkeypatch.setattr(wc, "w4a16_wgmma_linear", fake_wgmma)
    qweight, scales, zeros = _weights(128, 512, 128)
    packed = prepack_w4a16(qweight, scales, zeros, 512, 128)
    dev = torch.device("cpu")
    plans = [wc.wgmma_plan(m, packed, dev) for m in (33, 40, 64)]
    assert set(timed_rows) == {64} and len(timed_rows) > 1  # one sweep, at the block's 64 rows
    assert plans[0] is plans[1] is plans[2] and plans[0]["tb"] == 64
    n_first = len(timed_rows)
    wc.wgmma_plan(65, packed, dev)  # 65 rows: one 128-token block, a new sweep
    assert set(timed_rows[n_first:]) == {128}


def test_wgmma_staging_build_is_chosen_by_name_and_keys_its_plans(monkeypatch):
    """QUASAR_WGMMA_STAGING picks the wgmma kernel's staging build: each name maps to its own compile
    flag and build directory, tuned plans of one build are never reused by another (the source hash
    that keys them differs), and an unknown name is refused in one line naming the choices."""
    from quasar_kernels import w4a16_cuda as wc

    seen = {}
    for mode, flag in (("", None), ("cp.async", None), ("tma", "-DQB_WG_TMA=1"), ("ws", "-DQB_WG_WS=1"),
                       ("pdl", "-DQB_WG_PDL=1")):
        monkeypatch.setenv("QUASAR_WGMMA_STAGING", mode)
        monkeypatch.setattr(wc, "_SRC_HASH", None)
        assert wc.WGMMA_STAGINGS[wc.wgmma_staging()] == ([flag] if flag else [])
        seen[mode] = (wc._source_hash(), wc._build_dir().name)
    assert seen[""] == seen["cp.async"]
    assert len({seen[m][0] for m in ("cp.async", "tma", "ws", "pdl")}) == 4  # plan keys
    assert len({seen[m][1] for m in ("cp.async", "tma", "ws", "pdl")}) == 4  # build directories
    monkeypatch.setenv("QUASAR_WGMMA_STAGING", "tmaa")
    with pytest.raises(ValueError, match=r"QUASAR_WGMMA_STAGING='tmaa'.*cp\.async, tma, ws"):
        wc.wgmma_staging()
