"""The CPU product every native-runtime linear and every reference-backend verifier runs
(quasar_kernels.reference.linear: a oneDNN-packed weight from 3 rows on) against float64 numpy, and
the exact int8 products of W8A8 against int64 numpy."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from quasar_kernels import reference as R


def np_linear(x, w, b):
    y = x.double().numpy() @ w.double().numpy().T
    return y + b.double().numpy() if b is not None else y


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 17, 130])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("min_rows", [1, 3])
def test_linear_equals_float64_product(rows, with_bias, min_rows, monkeypatch):
    monkeypatch.setattr(R, "PACK_MIN_ROWS", min_rows)  # 1 and 2 rows on either path
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 257, generator=g)
    b = torch.randn(300, generator=g) if with_bias else None
    x = torch.randn(2, rows, 257, generator=g)  # 3-d input: rows of both batch entries in one product
    y = R.linear(x, w, b)
    assert y.shape == (2, rows, 300) and y.dtype == torch.float32
    ref = np.stack([np_linear(x[i], w, b) for i in range(2)])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_packed_weight_follows_in_place_changes_and_replacement():
    w = torch.randn(64, 48)
    x = torch.randn(5, 48)
    before = R.linear(x, w)
    w.mul_(-2.0)  # a calibration step that rescales a weight in place must not see the stale pack
    np.testing.assert_allclose(R.linear(x, w).numpy(), np_linear(x, w, None), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(R.linear(x, w).numpy(), -2.0 * before.numpy(), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        wi = torch.randn(64, 48)
        np.testing.assert_allclose(R.linear(x, wi).numpy(), np_linear(x, wi, None), rtol=1e-4, atol=1e-4)


def test_packed_and_plain_paths_agree():
    w, x = torch.randn(512, 96), torch.randn(7, 96)
    try:
        R.CPU_PACKED = False
        plain = R.linear(x, w)
    finally:
        R.CPU_PACKED = True
    torch.testing.assert_close(R.linear(x, w), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [100, 1024, 2500])
def test_int8_products_are_exact_integers(k):
    g = torch.Generator().manual_seed(k)
    wq = torch.randint(-127, 128, (40, k), generator=g, dtype=torch.int8)
    xq = torch.full((6, k), 127, dtype=torch.int8)  # the largest sums: |sum| = 127^2 k
    xq[1:] = torch.randint(-127, 128, (5, k), generator=g, dtype=torch.int8)
    got = R.int8_matmul_exact(xq, R.exact_chunks(wq))
    ref = xq.numpy().astype(np.int64) @ wq.numpy().astype(np.int64).T
    assert got.dtype == torch.float64 and np.array_equal(got.numpy().astype(np.int64), ref)


@pytest.mark.parametrize("value", ["0", "1"])
def test_packing_switch_from_the_environment(value):
    """QUASAR_CPU_PACKED=0 (the packs double fp32 weight memory) sends every product to F.linear:
    no packed copy is made."""
    code = ("import torch; from quasar_kernels import reference as R; w = torch.randn(64, 32); "
            "R.linear(torch.randn(5, 32), w); print(R.cpu_packed(), R._ONEDNN, len(R._packed))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QUASAR_CPU_PACKED": value})
    assert r.returncode == 0, r.stderr
    on, onednn, packs = r.stdout.split()
    if value == "0":
        assert (on, packs) == ("False", "0")
    else:
        assert on == onednn and packs == ("1" if onednn == "True" else "0")


@pytest.mark.parametrize("times,want", [((1.0, 0.5), 1), ((1.0, 0.95, 1.0, 0.8), 2), ((1.0, 0.9, 1.0, 0.5), 1),
                                        ((1.0, 1.2, 1.0, 1.0), 3), ((1.0, 0.91, 1.0, 0.91), 3)])
def test_probe_gives_the_pack_the_fewest_rows_where_it_is_clearly_faster(times, want):
    """Timings (F.linear, packed) at 1 row then at 2: the pack takes 1- or 2-row products only where
    it needs at most 90 % of F.linear's time; each timed sweep computes the same products both ways."""
    it, outs = iter(times), []

    def timer(sweep):
        outs.append(sweep())
        return next(it)

    assert R.probe_pack_min_rows(timer) == want
    for plain, pack in zip(outs[::2], outs[1::2]):
        assert len(plain) == len(pack) == 32
        torch.testing.assert_close(torch.stack(pack), torch.stack(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value,packs", [("1", "1"), ("3", "0"), ("bogus", None)])
def test_pack_min_rows_from_the_environment(value, packs):
    """QUASAR_CPU_PACK_MIN_ROWS sets the fewest rows that use the pack: a 1-row product packs its
    weight at 1, not at 3; anything but 1, 2, 3 or auto is refused, naming the variable."""
    code = ("import torch; from quasar_kernels import reference as R; w = torch.randn(64, 32); "
            "R.linear(torch.randn(1, 32), w); print(R.pack_min_rows(), len(R._packed))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QUASAR_CPU_PACK_MIN_ROWS": value})
    if packs is None:
        assert r.returncode != 0 and "QUASAR_CPU_PACK_MIN_ROWS='bogus'" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    if R._ONEDNN:
        assert r.stdout.split() == [value, packs]
