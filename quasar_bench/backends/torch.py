"""torch's own weight-only kernels: `_weight_int4pack_mm` (tinygemm, W4A16, bf16 activations,
group 32/64/128/256) and `_weight_int8pack_mm` (W8A16). A baseline to compare ours against."""
from __future__ import annotations

import torch

from quasar_bench.errors import QuasarError
from quasar_bench.packing import unpack_int4

from . import Backend


def int4pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int):
    """Our int4 weights (codes uint8 [N, Kp], scales/zeros [Kp/G, N]) in tinygemm's layout:
    W = (q - 8) * s + zero_t, so zero_t = (8 - z) * s. Returns (packed, scales_and_zeros [K/G, N, 2])."""
    c = codes[:, :k].to(torch.int32)
    w_uint8 = (c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(w_uint8, 8)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


class Torch(Backend):
    name = "torch"

    def available(self):
        if not torch.cuda.is_available():
            return False, "torch's int4/int8 weight-only kernels run on CUDA here; no CUDA device is visible"
        return True, ""

    def w4a16(self, mod, x):
        if x.dtype != torch.bfloat16 or mod.group_size not in (32, 64, 128, 256) or mod.in_features % mod.group_size:
            raise QuasarError("verifier.kernel=torch (tinygemm) needs bf16 activations, group_size 32/64/128/256 "
                              f"and in_features a multiple of it (got {x.dtype}, g{mod.group_size}, K={mod.in_features})")
        packed, sz = self.prepared(mod, lambda: int4pack(unpack_int4(mod.qweight), mod.scales, mod.zeros,
                                                          mod.in_features))
        x2 = x.reshape(-1, x.shape[-1])
        y = torch._weight_int4pack_mm(x2, packed, mod.group_size, sz)
        if mod.bias is not None:
            y = y + mod.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1)

    def w8a16(self, mod, x):
        scales = self.prepared(mod, lambda: mod.scales.to(x.dtype))
        x2 = x.reshape(-1, x.shape[-1])
        y = torch._weight_int8pack_mm(x2, mod.qweight, scales)
        if mod.bias is not None:
            y = y + mod.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1)


BACKEND = Torch()
