"""gemlite's A16W4 Triton kernels (mobiusml/gemlite, an optional extra: `pip install gemlite`), a
baseline for our W4A16 kernels. Our int4 weights (codes, scales, zeros; W = (q - zero) * scale) are
handed to `GemLiteLinear.pack` once per module; gemlite keeps its own layout and autotunes on first
use. Not installed: refused with one line, never replaced by another backend."""
from __future__ import annotations

import importlib.util

import torch

from quasar_bench.errors import QuasarError
from quasar_bench.packing import unpack_int4

from . import Backend


def gemlite_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, group_size: int,
                   bias, dtype: torch.dtype):
    """A GemLiteLinear computing our int4 weights: codes uint8 [N, Kp], scales/zeros [Kp/G, N]."""
    from gemlite import DType, GemLiteLinear

    kind = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}[dtype]
    n = codes.shape[0]
    lin = GemLiteLinear(4, group_size=group_size, in_features=k, out_features=n, input_dtype=kind, output_dtype=kind)
    lin.pack(codes[:, :k].contiguous(), scales.t().contiguous().to(dtype), zeros.t().contiguous().to(dtype),
             None if bias is None else bias.to(dtype))
    return lin


class Gemlite(Backend):
    name = "gemlite"

    def available(self):
        if not torch.cuda.is_available():
            return False, "gemlite's kernels run on CUDA; no CUDA device is visible"
        if importlib.util.find_spec("gemlite") is None:
            return False, "gemlite is not installed: `pip install gemlite` (an optional baseline)"
        return True, ""

    def w4a16(self, mod, x):
        if x.dtype not in (torch.bfloat16, torch.float16) or mod.in_features % mod.group_size:
            raise QuasarError("verifier.kernel=gemlite needs bf16/fp16 activations and in_features a multiple of "
                              f"group_size (got {x.dtype}, K={mod.in_features}, g{mod.group_size})")
        lin = self.prepared(mod, lambda: gemlite_linear(unpack_int4(mod.qweight), mod.scales, mod.zeros,
                                                        mod.in_features, mod.group_size, mod.bias, x.dtype))
        return lin(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


BACKEND = Gemlite()
