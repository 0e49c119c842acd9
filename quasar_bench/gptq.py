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

On the generic runtime (any transformers family, `gptq_generic`) the same algorithm runs the
family's own decoder layers: each layer's call (attention masks, position embeddings) is captured
once from a forward, then replayed layer by layer on the partly quantized hidden states; the
groups are found rather than named: the linears a layer calls on one and the same input tensor
(q/k/v, gate/up, Falcon's parallel query_key_value and dense_h_to_4h) form a group, in call order.
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

    if not getattr(runtime, "is_native", False):
        return gptq_generic(runtime, seqs, group_size, damp, log)
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


def _layer_calls(runtime, seqs) -> tuple[list, list[list]]:
    """(input hidden states of the first layer per sequence [1, T, H], per layer per sequence the
    rest of its call (args, kwargs)), captured from one forward per sequence."""
    layers, first, calls = runtime.layers, [], [[] for _ in runtime.layers]

    def catch(li):
        def hook(mod, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if li == 0:
                first.append(h)
            calls[li].append((args[1:] if args else (), kwargs))
        return hook
    handles = [layer.register_forward_pre_hook(catch(li), with_kwargs=True) for li, layer in enumerate(layers)]
    try:
        for s in seqs:
            runtime.run_uncached(torch.tensor(s, device=runtime.device))
    finally:
        for h in handles:
            h.remove()
    return first, calls


def _run_layer(layer, h, call):
    args, kwargs = call
    out = layer(h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _input_groups(layer, linears, h, call) -> list[list]:
    """The layer's linears (parent, name, module) grouped by the input tensor they are called on,
    in call order; linears the layer never calls are left out."""
    seen = []  # (input tensor, [linears]); the tensors are held so no id is reused meanwhile
    handles = []
    for entry in linears:
        def hook(mod, args, entry=entry):
            for x, group in seen:
                if x is args[0]:
                    group.append(entry)
                    return
            seen.append((args[0], [entry]))
        handles.append(entry[2].register_forward_pre_hook(hook))
    try:
        _run_layer(layer, h, call)
    finally:
        for handle in handles:
            handle.remove()
    return [group for _, group in seen]


@torch.inference_mode()
def gptq_generic(runtime, seqs: list[list[int]], group_size: int = 128, damp: float = 0.01, log=None):
    """gptq_runtime on the generic runtime (module docstring); linears never called in a forward
    have no Hessian and are rounded to nearest."""
    from .quant import Int4Linear, decoder_linears

    device = runtime.device
    hs, calls = _layer_calls(runtime, seqs)
    by_layer = {}
    for li, parent, name, lin in decoder_linears(runtime):
        by_layer.setdefault(li, []).append((parent, name, lin))
    for li, layer in enumerate(runtime.layers):
        linears = by_layer.get(li, [])
        groups = _input_groups(layer, linears, hs[0], calls[li][0])
        for group in groups:
            hook = HessianHook(group[0][2].in_features)
            handle = group[0][2].register_forward_pre_hook(hook)
            try:
                for h, call in zip(hs, calls[li]):
                    _run_layer(layer, h, call)
            finally:
                handle.remove()
            W = torch.cat([lin.weight.detach().float().cpu() for _, _, lin in group], 0)
            codes, scales, zeros = gptq_quantize_weight(W, hook.H, group_size, damp)
            row = 0
            for parent, name, lin in group:
                n = lin.out_features
                setattr(parent, name, Int4Linear(pack_int4(codes[row : row + n]), scales[:, row : row + n],
                                                 zeros[:, row : row + n], lin.in_features, group_size, lin.bias).to(device))
                row += n
        called = {id(lin) for group in groups for _, _, lin in group}
        for parent, name, lin in linears:
            if id(lin) not in called:
                setattr(parent, name, Int4Linear.from_linear(lin, group_size))
        hs = [_run_layer(layer, h, call) for h, call in zip(hs, calls[li])]
        if log is not None:
            log(f"gptq: layer {li + 1}/{runtime.num_layers} done")
    return runtime
