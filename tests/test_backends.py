"""Kernel backends against independent math. The `reference` backend (the CPU path) is checked
against numpy in float64; the GPU backends ("triton", "torch", "cuda") against the reference on a
CUDA device when one is present (CI has none: there the Triton kernels themselves are tested under
TRITON_INTERPRET=1 in test_kernels.py, and the GPU benchmark checks every backend before timing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from quasar_bench.backends import get_backend, resolve
from quasar_bench.errors import QuasarError
from quasar_bench.packing import unpack_int4
from quasar_bench.quant import Int4Linear, Int8Linear, W8A8Linear


def _np_int4_weight(mod):
    codes = unpack_int4(mod.qweight).double().numpy()  # [N, Kp]
    g = mod.group_size
    s = np.repeat(mod.scales.double().numpy().T, g, axis=1)
    z = np.repeat(mod.zeros.double().numpy().T, g, axis=1)
    return ((codes - z) * s)[:, : mod.in_features]


def test_reference_backend_w4a16_matches_numpy():
    torch.manual_seed(0)
    lin = nn.Linear(200, 40, bias=True)
    mod = Int4Linear.from_linear(lin, 32)
    mod.set_kernel("reference")
    x = torch.randn(6, 200)
    ref = x.double().numpy() @ _np_int4_weight(mod).T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(mod(x).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_reference_backend_w8a8_sums_exactly():
    # K = 3000 > 1024: the exact fp32-chunk path; compare with int64 sums of the same codes
    torch.manual_seed(1)
    lin = nn.Linear(3000, 24, bias=False)
    mod = W8A8Linear.from_linear(lin)
    mod.set_kernel("reference")
    x = torch.randn(3, 3000) * 4
    xs = x.double().numpy()
    sx = np.maximum(np.abs(xs).max(-1) / 127.0, 1e-10)
    v = xs / sx[:, None]
    xq = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int64)
    acc = xq @ mod.qweight.numpy().astype(np.int64).T  # exact integers
    ref = (acc * mod.scales.double().numpy()[None, :]).astype(np.float32) * sx[:, None].astype(np.float32)
    np.testing.assert_array_equal(mod(x).numpy(), ref.astype(np.float32))


def test_reference_backend_w8a16_and_cache_follows_device():
    torch.manual_seed(2)
    lin = nn.Linear(64, 16, bias=False)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(2, 64)
    w = mod.qweight.double().numpy() * mod.scales.double().numpy()[:, None]
    np.testing.assert_allclose(mod(x).double().numpy(), x.double().numpy() @ w.T, rtol=1e-5, atol=1e-6)
    assert "reference" in mod.prepared
    mod.to(torch.float32)  # moving the module drops what backends derived from the old tensors
    assert mod.prepared == {}


def test_auto_is_reference_on_cpu_and_gpu_backends_refuse_cpu():
    assert resolve("auto", "cpu", "w4a16").name == "reference"
    for name, op in (("triton", "w4a16"), ("torch", "w4a16"), ("gemlite", "w4a16"), ("cuda", "w4a16"),
                     ("cuda_wgmma", "w4a16")):
        with pytest.raises(QuasarError, match="not cpu"):
            resolve(name, "cpu", op)
    with pytest.raises(QuasarError, match="has no w8a16 kernel"):
        resolve("gemlite", "cuda", "w8a16")
    with pytest.raises(QuasarError, match="has no w8a8 kernel"):
        resolve("torch", "cuda", "w8a8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU backends need a CUDA device")
@pytest.mark.parametrize("name", ["triton", "torch", "cuda", "gemlite", "cuda_wgmma"])
@pytest.mark.parametrize("m", [1, 6, 16, 40])
def test_gpu_backend_matches_reference_on_cuda(name, m):
    b = get_backend(name)
    if not b.available()[0]:
        pytest.skip(b.available()[1])
    torch.manual_seed(m)
    lin = nn.Linear(512, 384, bias=False).cuda().bfloat16()
    mods = [Int4Linear.from_linear(lin, 128), Int8Linear.from_linear(lin)]
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    for mod in mods:
        if not b.supports(mod.op):
            continue
        mod.set_kernel("reference")
        ref = mod(x).float()
        mod.set_kernel(name)
        out = mod(x).float()
        assert torch.isfinite(out).all()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_auto_picks_by_row_count_and_explicit_backend_does_not(monkeypatch):
    """`auto` gives a backend only inputs of at most its max_rows activation rows (rows = all
    leading dims), the next backend in AUTO the rest; the row label says so; a backend named
    explicitly runs at every M."""
    import quasar_bench.backends as backends
    from quasar_bench.backends import Backend, describe, register_backend

    calls = []

    class SmallM(Backend):
        name, devices, max_rows = "small_m_test", ("cpu",), 4

        def w4a16(self, mod, x):
            calls.append(x.numel() // x.shape[-1])
            return get_backend("reference").w4a16(mod, x)

    register_backend(SmallM())
    monkeypatch.setitem(backends.AUTO, "cpu", ("small_m_test", "reference"))
    torch.manual_seed(3)
    mod = Int4Linear.from_linear(nn.Linear(64, 8, bias=False), 32)
    for shape in ((3, 64), (1, 4, 64), (5, 64), (2, 3, 64)):
        mod(torch.randn(*shape))
    assert calls == [3, 4]  # 5 and 2 x 3 = 6 rows went to the reference
    assert describe("auto", "cpu", "w4a16") == "small_m_test(M<=4)>reference"
    assert describe("small_m_test", "cpu", "w4a16") == "small_m_test"
    mod.set_kernel("small_m_test")
    mod(torch.randn(9, 64))
    assert calls == [3, 4, 9]


def test_auto_honours_row_ranges_in_order_and_describes_each_range(monkeypatch):
    """A backend listed first with a row range [min_rows, max_rows] takes exactly that range; rows
    outside it fall to the next backend whose range fits (a gap between ranges to the last), and
    the row label lists the backend of every range of M in increasing M."""
    import quasar_bench.backends as backends
    from quasar_bench.backends import Backend, describe, register_backend, resolve

    class Mid(Backend):
        name, devices, min_rows, max_rows = "mid_rows_test", ("cpu",), 7, 12

        def w4a16(self, mod, x):
            return get_backend("reference").w4a16(mod, x)

    class Small(Backend):
        name, devices, max_rows = "few_rows_test", ("cpu",), 4

        def w4a16(self, mod, x):
            return get_backend("reference").w4a16(mod, x)

    register_backend(Mid())
    register_backend(Small())
    monkeypatch.setitem(backends.AUTO, "cpu", ("mid_rows_test", "few_rows_test", "reference"))
    picked = {rows: resolve("auto", "cpu", "w4a16", rows).name for rows in (1, 4, 5, 6, 7, 12, 13, 500)}
    assert picked == {1: "few_rows_test", 4: "few_rows_test", 5: "reference", 6: "reference",
                      7: "mid_rows_test", 12: "mid_rows_test", 13: "reference", 500: "reference"}
    assert resolve("auto", "cpu", "w4a16").name == "few_rows_test"  # rows unknown: the smallest input
    assert describe("auto", "cpu", "w4a16") == "few_rows_test(M<=4)>reference(M<=6)>mid_rows_test(M<=12)>reference"
    monkeypatch.setattr(Small, "max_rows", 6)
    assert describe("auto", "cpu", "w4a16") == "few_rows_test(M<=6)>mid_rows_test(M<=12)>reference"


def test_wgmma_backend_refuses_group_sizes_it_cannot_stage():
    """A group of 48 channels (3 k16 steps) would straddle the wgmma kernel's stages: one line names
    the backends that take it, before any GPU work."""
    torch.manual_seed(0)
    mod = Int4Linear.from_linear(nn.Linear(192, 16, bias=False), 48)
    with pytest.raises(QuasarError, match="group size of 16 times a power of two; this model's is 48.*kernel=triton"):
        get_backend("cuda_wgmma").w4a16(mod, torch.randn(20, 192))


def test_rows_name_a_candidate_staging_build_of_the_wgmma_kernel(monkeypatch):
    """QUASAR_WGMMA_STAGING builds the wgmma kernel another way: the rows' kernel label says so
    (explicitly chosen and inside auto's per-range label), so its numbers never pass for the shipped
    build's; a name that is no build is refused in one line."""
    import quasar_bench.backends as backends
    from quasar_bench.backends import describe

    class FakeWgmma(type(get_backend("cuda_wgmma"))):  # the real label logic, available on CPU
        devices, min_rows, max_rows = ("cpu",), 9, 192

        def available(self):
            return True, ""

    fake = FakeWgmma()
    monkeypatch.setitem(backends._REGISTERED, fake.name, fake)  # restored after the test
    monkeypatch.setitem(backends.AUTO, "cpu", (fake.name, "reference"))
    monkeypatch.delenv("QUASAR_WGMMA_STAGING", raising=False)
    assert describe("cuda_wgmma", "cuda", "w4a16") == "cuda_wgmma"
    assert describe("auto", "cpu", "w4a16") == "reference(M<=8)>cuda_wgmma(M<=192)>reference"
    monkeypatch.setenv("QUASAR_WGMMA_STAGING", "ws")
    assert describe("cuda_wgmma", "cuda", "w4a16") == "cuda_wgmma[ws]"
    assert describe("auto", "cpu", "w4a16") == "reference(M<=8)>cuda_wgmma[ws](M<=192)>reference"
    monkeypatch.setenv("QUASAR_WGMMA_STAGING", "bogus")
    with pytest.raises(QuasarError, match="QUASAR_WGMMA_STAGING='bogus'.*cp.async, tma, ws"):
        describe("cuda_wgmma", "cuda", "w4a16")
