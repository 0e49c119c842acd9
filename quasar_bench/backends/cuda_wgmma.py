"""Our W4A16 kernel on Hopper's warpgroup MMAs (quasar_kernels/w4a16_cuda.py: w4a16_wgmma_linear), for
batched verification: the verify GEMM has M = B (k + 1) rows, past the 16 the mma.sync kernel
(`cuda`) computes per pass over the weights. Same prepacked weights as `cuda` (one re-layout per
module, shared). Needs an sm_90 GPU and a group size of 16 times a power of two (16, 32, 64, 128, ...).

`auto` gives it 9 to 192 rows (192: the largest verify GEMM of the batch experiments, 32 x (5 + 1)).
At 16 rows it beats the mma.sync kernel on every Qwen3-8B shape (one H200, µs: gate+up 38.8 vs 51.9,
down 24.3 vs 27.3, qkv 18.9 vs 22.5, o 14.6 vs 16.5; results/gpu/w4a16_backends_wgmma7c_h200.md and
w4a16_cuda_h200.md, two sessions whose common cells drift 3-7 %), and both kernels take the same time
from 9 to 16 rows (the mma.sync kernel computes one 16-row tile there, the wgmma kernel one 32-token
tile up to 32). Up to 8 rows the mma.sync kernel's 8-row build keeps them (1.3-1.8x cuBLAS at 1-6
rows, above the wgmma kernel's 1.26x at 16-32; the wgmma kernel was not timed below 16 rows). Against
Triton (results/gpu/w4a16_backends_wgmma7c_h200.md) it wins on gate+up, down and lm_head at every M
measured but down at 64, and loses on the narrow attention projections (qkv / o) at 64 and 128 rows;
per Qwen3-8B layer it is 22 % faster at 32 rows, even at 64 and faster from 128 on. Past 192 rows
nothing is measured, so Triton keeps them. Keeps its own re-layout of the weights beside the mma.sync
one (`wgmma_pack`: a second int4 copy) for conflict-free loads."""
from __future__ import annotations

import torch

from ..errors import QuasarError
from . import Backend


class CudaWgmma(Backend):
    name = "cuda_wgmma"
    min_rows = 9  # up to 8 rows the mma.sync kernel's 8-row build (weights as the A operand) is faster
    max_rows = 192

    @property
    def label(self):
        """`cuda_wgmma`, or `cuda_wgmma[ws]` etc. when QUASAR_WGMMA_STAGING selects a candidate staging
        build: its rows must not pass for the shipped kernel's."""
        from quasar_kernels.w4a16_cuda import wgmma_staging

        try:
            staging = wgmma_staging()
        except ValueError as e:
            raise QuasarError(str(e)) from None
        return self.name if staging == "cp.async" else f"{self.name}[{staging}]"

    def available(self):
        if not torch.cuda.is_available():
            return False, "the wgmma kernel needs a CUDA device; none is visible"
        from quasar_kernels.w4a16_cuda import wgmma_available

        return wgmma_available()

    def w4a16(self, mod, x):
        from quasar_kernels.w4a16_cuda import prepack_w4a16, w4a16_wgmma_linear

        g = mod.group_size
        if g % 16 or (g // 16) & (g // 16 - 1):
            raise QuasarError(f"the wgmma kernel needs a group size of 16 times a power of two; this model's is {g}: "
                              "use verifier.kernel=triton (or cuda)")

        # the mma.sync backend's re-layout: both kernels read the same packed tensors
        store = mod.prepared
        if "cuda" not in store:
            store["cuda"] = prepack_w4a16(mod.qweight, mod.scales, mod.zeros, mod.in_features, mod.group_size)
        return w4a16_wgmma_linear(x, store["cuda"], mod.bias)


BACKEND = CudaWgmma()
