"""The project's one packed weight format for int4 and int8 linears.

Both the CPU torch path and the Triton kernels (quasar_kernels/) read exactly these tensors.

int4 (W4A16, asymmetric, groups along K):
  weight W [N, K] (nn.Linear layout: out_features x in_features) is split into groups of
  `group_size` consecutive input channels. K is zero-padded up to Kp = ceil(K / G) * G so a
  last partial group is allowed (SmolLM2 has K = 576 = 4.5 x 128); padded columns get code = zero
  point, i.e. weight 0, and kernels mask activations past K.
    qweight: int32 [Kp // 8, N]   nibble j (bits 4j..4j+3) of qweight[i, n] = code of W[n, 8i + j]
    scales:  float16 [Kp // G, N]
    zeros:   float16 [Kp // G, N] zero point in code units (an integer 0..15 stored as float)
    W[n, k] ~= (code[k, n] - zeros[k // G, n]) * scales[k // G, n]
  Codes are unsigned 0..15. G must be a multiple of 8.

int8 (W8A16 and the weights of W8A8, symmetric per output channel):
    qweight: int8 [N, K]          same layout as the float weight
    scales:  float16 [N]
    W[n, k] ~= qweight[n, k] * scales[n]
"""
from __future__ import annotations

import torch

from .errors import QuasarError

SCALE_DTYPE = torch.float16


def check_int4_group(group_size: int) -> None:
    if group_size < 8 or group_size % 8 != 0:
        raise QuasarError(
            f"int4 group_size={group_size} cannot be packed: the format needs a positive multiple of 8 "
            "(e.g. verifier.group_size=128)"
        )


def quantize_int4_rtn(weight: torch.Tensor, group_size: int = 128):
    """Round-to-nearest asymmetric int4 with one (scale, zero) per group of input channels.

    Returns (codes uint8 [N, Kp], scales [Kp//G, N], zeros [Kp//G, N]) before packing.
    """
    check_int4_group(group_size)
    w = weight.detach().float()
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    groups = kp // group_size
    # Pad by repeating nothing: padded columns do not take part in min/max of their group.
    wg = torch.full((n, kp), float("nan"), dtype=torch.float32, device=w.device)
    wg[:, :k] = w
    wg = wg.view(n, groups, group_size)
    wmin = torch.nan_to_num(wg, nan=float("inf")).amin(-1).clamp(max=0.0)
    wmax = torch.nan_to_num(wg, nan=float("-inf")).amax(-1).clamp(min=0.0)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-8)
    scale = scale.to(SCALE_DTYPE).float()  # quantize against the scale that is stored
    zero = torch.round(-wmin / scale).clamp(0, 15)
    codes = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15)
    codes = torch.where(torch.isnan(codes), zero[..., None].expand_as(codes), codes)
    codes = codes.view(n, kp).to(torch.uint8)
    return codes, scale.t().contiguous().to(SCALE_DTYPE), zero.t().contiguous().to(SCALE_DTYPE)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, Kp] (values 0..15) -> qweight int32 [Kp // 8, N]."""
    n, kp = codes.shape
    if kp % 8:
        raise QuasarError(f"int4 packing needs K padded to a multiple of 8, got {kp}")
    c = codes.to(torch.int64).t().reshape(kp // 8, 8, n)
    shifts = (torch.arange(8, device=codes.device, dtype=torch.int64) * 4).view(1, 8, 1)
    packed = (c << shifts).sum(1)  # < 2**32, fits int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [Kp // 8, N] -> codes uint8 [N, Kp]."""
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(8, device=q.device, dtype=torch.int64) * 4).view(1, 8, 1)
    codes = (q.unsqueeze(1) >> shifts) & 0xF  # [Kp//8, 8, N]
    return codes.reshape(-1, q.shape[1]).t().to(torch.uint8).contiguous()


def dequantize_int4(qweight, scales, zeros, in_features: int, group_size: int, dtype=torch.float32):
    """Packed int4 -> float weight [N, K] (the pure-torch reference every kernel is checked against)."""
    codes = unpack_int4(qweight).float()  # [N, Kp]
    n, kp = codes.shape
    g = kp // group_size
    s = scales.float().t().reshape(n, g, 1)
    z = zeros.float().t().reshape(n, g, 1)
    w = (codes.view(n, g, group_size) - z) * s
    return w.view(n, kp)[:, :in_features].to(dtype)


def quantize_int8_rtn(weight: torch.Tensor):
    """Symmetric per-output-channel int8: (qweight int8 [N, K], scales [N])."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-8).to(SCALE_DTYPE).float()
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(SCALE_DTYPE)


def dequantize_int8(qweight, scales, dtype=torch.float32):
    return (qweight.float() * scales.float()[:, None]).to(dtype)
