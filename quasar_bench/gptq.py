"""GPTQ (Frantar et al., 2022) for the int4 verifier, written here because neither maintained
library runs in this environment (docs/verifiers.md says why); auto-gptq is archived and not used.

The standard algorithm, as in the reference implementation (IST-DASLab/gptq `fasterquant`):
  H = 2/n · XᵀX from the calibration activations entering the linear;
  dead inputs (H_jj = 0) get H_jj = 1 and weight 0; dampening H += λ·mean(diag H)·I (λ = 0.01);
  Hinv = upper Cholesky factor of H⁻¹; columns quantized left to right in blocks of 128, the
  quantization error of each column spread over the not-yet-quantized columns through Hinv;
  static groups: the (scale, zero) of a group is computed from the error-updated weights when its
  first column is reached, with exactly the asymmetric int4 rule of packing.quantize_int4_rtn
  (fp16 scale, integer zero point 0..15). act-order off.
Layers are processed in order, and inside a layer "true sequential" ([q,k,v], [o], [gate,up],
[down]): each group's inputs come from the model whose earlier linears are already quantized.
Linears sharing an input (q/k/v, gate/up) share H and are quantized as one stacked matrix (GPTQ
treats rows independently, so this is the same result, with fewer column steps).
Output: the packed int4 format of packing.py.
"""
from __future__ import annotations

import torch

from .packing import SCALE_DTYPE, check_int4_group, pack_int4
from .runtime import causal_mask

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def group_params(w: torch.Tensor):
    """(scale, zero) [N] for a group of columns w [N, g], the rule of packing.quantize_int4_rtn."""
    wmin = w.amin(1).clamp(max=0.0)
    wmax = w.amax(1).clamp(min=0.0)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-8).to(SCALE_DTYPE).float()
    zero = torch.round(-wmin / scale).clamp(0, 15)
    return scale, zero


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, group_size: int = 128,
                         damp: float = 0.01, blocksize: int = 128):
    """GPTQ one weight [N, K] given H [K, K]. Returns (codes uint8 [N, Kp], scales [Kp//G, N] fp16,
    zeros [Kp//G, N] fp16), the unpacked int4 format of packing.py (padded columns: code = zero)."""
    check_int4_group(group_size)
    blocksize = group_size * max(1, blocksize // group_size)  # a group never straddles two blocks
    W = weight.detach().double().clone()
    n, k = W.shape
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    kp = -(-k // group_size) * group_size
    groups = kp // group_size
    codes = torch.empty(n, kp, dtype=torch.float64)
    scales = torch.empty(groups, n, dtype=torch.float64)
    zeros = torch.empty(groups, n, dtype=torch.float64)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                end = min(col + group_size, k)  # inside this block, error-updated
                scale, zero = group_params(W1[:, i : i + end - col])
                scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            c = torch.clamp(torch.round(w / scale) + zero, 0, 15)
            q = (c - zero) * scale
            codes[:, col] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if kp > k:  # padded columns: code = the zero point of the last group -> weight 0
        codes[:, k:] = zeros[-1][:, None]
    return codes.to(torch.uint8), scales.to(SCALE_DTYPE), zeros.to(SCALE_DTYPE)


class HessianHook:
    """Forward-pre hook accumulating H = 2/n · XᵀX over every row of every call."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


@torch.inference_mode()
def _run_block(runtime, layer, hs):
    out = []
    for h in hs:
        t = h.shape[0]
        cos = runtime.rope_cos[:t].to(h.dtype)
        sin = runtime.rope_sin[:t].to(h.dtype)
        out.append(layer(h, cos, sin, None, 0, causal_mask(torch.arange(t, device=h.device), t, h.dtype)))
    return out


@torch.inference_mode()
def gptq_runtime(runtime, seqs: list[list[int]], group_size: int = 128, damp: float = 0.01, log=None):
    """Quantize every decoder linear of `runtime` (a clone: modules are replaced in place) with GPTQ
    on calibration sequences `seqs`. Returns the runtime."""
    from .quant import Int4Linear

    device = runtime.device
    hs = [runtime.embed_tokens(torch.tensor(s, device=device)) for s in seqs]
    for li, layer in enumerate(runtime.layers):
        for parent_name, names in GROUPS:
            parent = getattr(layer, parent_name)
            lins = [getattr(parent, nm) for nm in names]
            hook = HessianHook(lins[0].in_features)
            handle = lins[0].register_forward_pre_hook(hook)
            try:
                _run_block(runtime, layer, hs)
            finally:
                handle.remove()
            W = torch.cat([lin.weight.detach().float().cpu() for lin in lins], 0)
            codes, scales, zeros = gptq_quantize_weight(W, hook.H, group_size, damp)
            row = 0
            for nm, lin in zip(names, lins):
                n = lin.out_features
                q = Int4Linear(pack_int4(codes[row : row + n]), scales[:, row : row + n], zeros[:, row : row + n],
                               lin.in_features, group_size, lin.bias).to(device)
                setattr(parent, nm, q)
                row += n
        hs = _run_block(runtime, layer, hs)
        if log is not None:
            log(f"gptq: layer {li + 1}/{len(runtime.layers)} done")
    return runtime
