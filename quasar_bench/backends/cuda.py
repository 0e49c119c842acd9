"""Our CUDA W4A16 kernel (quasar_kernels/w4a16_cuda.py: mma.sync on re-laid-out int4 weights, built with
torch.utils.cpp_extension on first use and cached on disk). The weights are re-laid out once per
module (`prepack_w4a16`); the packed format they come from is unchanged."""
from __future__ import annotations

import torch

from . import Backend


class Cuda(Backend):
    name = "cuda"
    # One 16-row mma tile per pass over the weights: at M = 32 it reads them twice, at M = 192
    # twelve times (results/gpu/batch.md: 56 ms per verify step at M = 190 vs 11 ms for bf16).
    max_rows = 16

    def available(self):
        if not torch.cuda.is_available():
            return False, "the CUDA kernel needs a CUDA device; none is visible"
        from quasar_kernels.w4a16_cuda import available

        return available()

    def w4a16(self, mod, x):
        from quasar_kernels.w4a16_cuda import prepack_w4a16, w4a16_cuda_linear

        packed = self.prepared(mod, lambda: prepack_w4a16(mod.qweight, mod.scales, mod.zeros, mod.in_features,
                                                            mod.group_size))
        return w4a16_cuda_linear(x, packed, mod.bias)


BACKEND = Cuda()
