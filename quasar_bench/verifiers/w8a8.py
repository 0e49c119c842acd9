"""W8A8 (Quasar's released setting): int8 weights per output channel, int8 activations with
per-token dynamic scales, SmoothQuant smoothing with migration strength alpha; lm_head kept."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import QuasarError
from ..packing import quantize_int8_rtn
from ..quant import W8A8Linear, clone_runtime, decoder_linears
from . import Precision, calibration_params, check_bits


def _params(vcfg) -> dict:
    check_bits(vcfg, 8)
    alpha = float(vcfg.alpha)
    if not 0.0 <= alpha <= 1.0:
        raise QuasarError(f"verifier.alpha={alpha} must lie in [0, 1] (SmoothQuant migration strength, e.g. 0.5)")
    return {"alpha": alpha, "calibration": calibration_params(vcfg)}


def keyed_linears(runtime) -> list[tuple[str, object, str, object]]:
    """(statistics key, parent, attribute, linear) of every decoder linear. The key names the same
    linear in every clone of the runtime: native, layer/block/name; generic, layer/position in it."""
    out, position = [], {}
    for i, parent, name, lin in decoder_linears(runtime):
        if getattr(runtime, "is_native", False):
            key = f"layers.{i}.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{name}"
        else:
            position[i] = position.get(i, -1) + 1
            key = f"layers.{i}.{position[i]}"
        out.append((key, parent, name, lin))
    return out


@torch.inference_mode()
def activation_absmax(runtime, seqs) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| entering each decoder linear, over the calibration sequences."""
    stats, handles = {}, []
    probe = clone_runtime(runtime)
    for key, _, _, lin in keyed_linears(probe):
        def hook(mod, args, key=key):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            stats[key] = m if key not in stats else torch.maximum(stats[key], m)
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for s in seqs:
            probe.hidden_states(torch.tensor(s, device=probe.device))
    finally:
        for h in handles:
            h.remove()
    return stats


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j: column j of the stacked weights)."""
    w_max = torch.cat([w.detach().float().abs().cpu() for w in weights], 0).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def _build(loaded, vcfg, params, cache_dir):
    from ..calibration import CalibrationSpec, calibration_ids

    alpha = params["alpha"]
    seqs = calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir)
    stats = activation_absmax(loaded.runtime, seqs)
    new = clone_runtime(loaded.runtime)
    device, dtype = new.device, new.dtype
    if not getattr(new, "is_native", False):
        # Any family: every linear divides its input by its own smoothing vector inside the module
        # (norms differ by family: Gemma's 1 + w, LayerNorm biases, Falcon's one norm for attention
        # and MLP), the same product as folding it into the norm in front.
        for key, parent, name, lin in keyed_linears(new):
            s = smooth_scales(stats[key], [lin.weight], alpha).to(device) if key in stats else None
            setattr(parent, name, W8A8Linear.from_linear(lin, smooth=s))
        return new
    for i, layer in enumerate(new.layers):
        # q/k/v and gate/up: smoothing folded into the preceding RMSNorm weight (exact)
        for norm_name, parent, names in (("input_layernorm", layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                         ("post_attention_layernorm", layer.mlp, ("gate_proj", "up_proj"))):
            lins = [getattr(parent, n) for n in names]
            key = f"layers.{i}.{'self_attn' if norm_name == 'input_layernorm' else 'mlp'}.{names[0]}"
            s = smooth_scales(stats[key], [lin.weight for lin in lins], alpha).to(device)
            norm = getattr(layer, norm_name)
            norm.weight = nn.Parameter((norm.weight.detach().float() / s).to(dtype), requires_grad=False)
            for n, lin in zip(names, lins):
                q, sc = quantize_int8_rtn(lin.weight.detach().float() * s[None, :])
                setattr(parent, n, W8A8Linear(q, sc, lin.bias, None))
        # o_proj and down_proj: no norm in front: per-input-channel scale inside the module
        for parent, n in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            lin = getattr(parent, n)
            key = f"layers.{i}.{'self_attn' if n == 'o_proj' else 'mlp'}.{n}"
            s = smooth_scales(stats[key], [lin.weight], alpha).to(device)
            setattr(parent, n, W8A8Linear.from_linear(lin, smooth=s))
    return new


PRECISIONS = [Precision("w8a8", _build, _params, cached=True)]
