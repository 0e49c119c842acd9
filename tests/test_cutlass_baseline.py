"""The CUTLASS baseline of the kernel table (quasar_kernels/cutlass_w4a16.py): the mapping of this project's
int4 onto CUTLASS's form (CPU), the errors where it cannot be built, and on a Hopper GPU every instance
against the fp32 product with the weight it is given."""
import importlib
import sys

import pytest
import torch

from quasar_bench.packing import dequantize_int4, pack_int4, quantize_int4_rtn

G = 128


def _cw():
    # imported when a test runs, not when pytest collects this file: importing the quasar_kernels package
    # imports triton, and tests/test_kernels.py must be the first to import it (it sets TRITON_INTERPRET=1)
    return importlib.import_module("quasar_kernels.cutlass_w4a16")


def _quantized(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    return quantize_int4_rtn(w, G)


def test_cutlass_form_packs_signed_nibbles_low_first():
    cw = _cw()
    codes, scales, zeros = _quantized(64, 256)
    form = cw.cutlass_form(codes, scales, zeros, G)
    b = form["w"].to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    signed = lambda v: torch.where(v >= 8, v - 16, v)  # noqa: E731  (two's complement of a nibble)
    assert torch.equal(signed(lo), codes[:, 0::2].to(torch.int16) - 8)
    assert torch.equal(signed(hi), codes[:, 1::2].to(torch.int16) - 8)
    assert form["w"].shape == (64, 128) and form["scale"].dtype == torch.bfloat16 and form["zero"].shape == scales.shape


def test_cutlass_weight_matches_ours_to_bf16_rounding_of_scale_and_zero():
    cw = _cw()
    codes, scales, zeros = _quantized(128, 512, seed=1)
    form = cw.cutlass_form(codes, scales, zeros, G)
    ours = dequantize_int4(pack_int4(codes), scales, zeros, 512, G)  # s * (c - z), fp32
    theirs = cw.dequantized(codes, form)
    s = scales.float().t().repeat_interleave(G, dim=1)  # [N, K]
    # bf16 keeps 8 significant bits: |c - 8| <= 8 and |8 - z| <= 8 steps, each off by at most 2^-8 relative
    assert ((theirs - ours).abs() / s).max() <= 16 * 2.0 ** -8 + 1e-6
    assert ((theirs - ours).abs() / s).mean() < 0.02


def test_cutlass_form_rejects_shapes_it_cannot_tile():
    cw = _cw()
    codes, scales, zeros = _quantized(64, 256)
    with pytest.raises(ValueError, match="multiples of 64"):
        cw.cutlass_form(codes[:60], scales[:, :60], zeros[:, :60], G)


def test_missing_package_names_the_install_command(monkeypatch):
    cw = _cw()
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # import fails as if not installed
    with pytest.raises(cw.CutlassUnavailable, match="pip install nvidia-cutlass==4.2.0.0"):
        cw.cutlass_include_dirs()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0), reason="a Hopper GPU builds it")
def test_extension_refuses_without_a_hopper_gpu():
    cw = _cw()
    with pytest.raises(cw.CutlassUnavailable, match="Hopper"):
        cw.extension()


def _hopper_with_cutlass():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    cw = _cw()
    try:
        cw.cutlass_include_dirs()
    except cw.CutlassUnavailable:
        return False
    return True


@pytest.mark.skipif(not _hopper_with_cutlass(), reason="needs a Hopper GPU and nvidia-cutlass")
@pytest.mark.parametrize("m", [16, 64, 128])
def test_every_instance_matches_the_fp32_product_on_gpu(m):
    cw = _cw()
    n, k = 256, 1024
    codes, scales, zeros = _quantized(n, k, seed=m)
    codes, scales, zeros = codes.cuda(), scales.cuda(), zeros.cuda()
    prepared = cw.prepare(codes, scales, zeros, G)
    w = cw.dequantized(codes, prepared)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = x.float() @ w.t()
    ran = set()
    for name, splits in cw.candidates():
        try:
            out = cw.linear(x, prepared, name, splits)
        except ValueError:  # the library cannot run this split at this shape: refused before launch
            continue
        ran.add(name)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, splits, err)
    # every instance file registered itself (the binding's registry, against the files on disk) and ran at least once
    files = {f.stem for f in cw.CSRC.glob("c*.cu")}
    assert set(cw.extension().names()) == files and ran == files
