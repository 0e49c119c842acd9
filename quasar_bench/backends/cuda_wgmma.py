"""Our W4A16 kernel on Hopper's warpgroup MMAs (quasar_kernels/w4a16_cuda.py: w4a16_wgmma_linear), for
batched verification: the verify GEMM has M = B (k + 1) rows, past the 16 the mma.sync kernel
(`cuda`) computes per pass over the weights. Same prepacked weights as `cuda` (one re-layout per
module, shared). Needs an sm_90 GPU and a group size that is a multiple of 16."""
from __future__ import annotations

import torch

from . import Backend


class CudaWgmma(Backend):
    name = "cuda_wgmma"

    def available(self):
        if not torch.cuda.is_available():
            return False, "the wgmma kernel needs a CUDA device; none is visible"
        from quasar_kernels.w4a16_cuda import wgmma_available

        return wgmma_available()

    def w4a16(self, mod, x):
        from quasar_kernels.w4a16_cuda import prepack_w4a16, w4a16_wgmma_linear

        # the mma.sync backend's re-layout: both kernels read the same packed tensors
        store = mod.prepared
        if "cuda" not in store:
            store["cuda"] = prepack_w4a16(mod.qweight, mod.scales, mod.zeros, mod.in_features, mod.group_size)
        return w4a16_wgmma_linear(x, store["cuda"], mod.bias)


BACKEND = CudaWgmma()
