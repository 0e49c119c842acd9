"""Verifier precisions: each one a transform of a loaded model's runtime into a new runtime.

    build_verifier(loaded, vcfg, cache_dir) -> runtime      (vcfg: conf/verifier/NAME.yaml + overrides)
    verifier_names() -> sorted names

`loaded.runtime` is never mutated: a transform clones the module tree (sharing every unchanged
tensor) and replaces modules in the clone (quant.clone_runtime), or, for pruning, takes
runtime.with_layers(keep). Dropping the returned runtime frees what the transform added.

    reference       the loaded model as it is (a clone with its own KV cache)
    fp32/bf16/fp16  the model cast to that dtype
    int8            W8A16, symmetric per-output-channel RTN
    w8a8            int8 weights per channel + int8 activations per token (dynamic), SmoothQuant
                    smoothing (alpha); lm_head kept in high precision
    int4            W4A16, asymmetric, groups of group_size (128) along K; method rtn | gptq
    pruned          drop `share` of decoder layers by `criterion` (block_influence | last)

Embeddings, the final norm and lm_head stay in the loaded model's precision in every quantized
verifier. Quantized and pruned results are cached under cache_dir/verifiers/<model fingerprint>/
as NAME-<hash of parameters>.safetensors + .json: a second build with the same model and
parameters loads them instead of quantizing again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from .calibration import CalibrationSpec, calibration_ids, model_fingerprint
from .errors import QuasarError
from .packing import check_int4_group, quantize_int8_rtn
from .quant import (Int4Linear, Int8Linear, W8A8Linear, _QuantLinear, cast_runtime, clone_runtime,
                    decoder_linears, rtn_transform)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
def _get(vcfg, key, default=None):
    try:
        v = vcfg.get(key, default)
    except AttributeError:
        v = default
    return default if v is None else v


def _check_bits(vcfg, bits: int, name: str) -> None:
    b = _get(vcfg, "bits", bits)
    if int(b) != bits:
        other = {4: "int4", 8: "int8 or w8a8"}.get(int(b), "int4, int8 or w8a8")
        raise QuasarError(f"verifier {name} stores {bits}-bit weights, got bits={b}; the packed format holds "
                          f"4-bit (verifier=int4) or 8-bit (verifier=int8/w8a8) codes — use {other}")


def _group_size(vcfg) -> int:
    g = _get(vcfg, "group_size", 128)
    try:
        g = int(g)
    except (TypeError, ValueError):
        raise QuasarError(f"verifier.group_size={g!r} is not an integer; use a multiple of 8, e.g. 128") from None
    check_int4_group(g)
    return g


def _params(vcfg, name: str) -> dict:
    """The validated parameters of a precision (also the cache key)."""
    if name in ("int8",):
        _check_bits(vcfg, 8, name)
        return {}
    if name == "w8a8":
        _check_bits(vcfg, 8, name)
        alpha = float(_get(vcfg, "alpha", 0.5))
        if not 0.0 <= alpha <= 1.0:
            raise QuasarError(f"verifier.alpha={alpha} must lie in [0, 1] (SmoothQuant migration strength, e.g. 0.5)")
        return {"alpha": alpha, "calibration": CalibrationSpec.from_cfg(vcfg).__dict__}
    if name == "int4":
        _check_bits(vcfg, 4, name)
        method = _get(vcfg, "method", "rtn")
        if method not in ("rtn", "gptq"):
            raise QuasarError(f"unknown verifier.method={method!r} for int4; choose rtn or gptq")
        p = {"group_size": _group_size(vcfg), "method": method}
        if method == "gptq":
            damp = float(_get(vcfg, "damp", 0.01))
            if not 0 < damp < 1:
                raise QuasarError(f"verifier.damp={damp} must lie in (0, 1) (GPTQ dampening, e.g. 0.01)")
            p.update(damp=damp, calibration=CalibrationSpec.from_cfg(vcfg).__dict__)
        return p
    if name == "pruned":
        from .pruning import CRITERIA, check_share

        criterion = _get(vcfg, "criterion", "block_influence")
        if criterion not in CRITERIA:
            raise QuasarError(f"unknown verifier.criterion={criterion!r}; choose one of {', '.join(CRITERIA)}")
        share = _get(vcfg, "share", 0.25)
        p = {"share": check_share(share), "criterion": criterion}
        if criterion == "block_influence":
            p["calibration"] = CalibrationSpec.from_cfg(vcfg).__dict__
        return p
    return {}


# ------------------------------------------------------------------------------------------------
# on-disk cache
# ------------------------------------------------------------------------------------------------
class _Cache:
    def __init__(self, loaded, cache_dir: Path | None, name: str, params: dict):
        self.dir = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "name": name, **params}, sort_keys=True)
                                 .encode()).hexdigest()[:16]
            self.dir = Path(cache_dir) / "verifiers" / model_fingerprint(loaded)
            self.stem = f"{name}-{key}"
        self.name, self.params = name, params

    @property
    def meta_path(self):
        return self.dir / f"{self.stem}.json"

    @property
    def tensor_path(self):
        return self.dir / f"{self.stem}.safetensors"

    def load(self):
        if self.dir is None or not self.meta_path.exists():
            return None
        meta = json.loads(self.meta_path.read_text())
        tensors = {}
        if meta.get("has_tensors"):
            if not self.tensor_path.exists():
                return None
            from safetensors.torch import load_file

            tensors = load_file(str(self.tensor_path))
        return meta, tensors

    def save(self, meta: dict, tensors: dict | None = None) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "name": self.name, "params": self.params, **meta,
                "has_tensors": bool(tensors)}
        if tensors:
            from safetensors.torch import save_file

            tmp = self.tensor_path.with_name(self.tensor_path.name + f".tmp{os.getpid()}")
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, self.tensor_path)
        tmp = self.meta_path.with_name(self.meta_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.meta_path)  # json last: it marks the entry complete


def _resolve(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _set_module(root, path: str, module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, attr, module)


def _state_of(runtime, norm_paths: list[str]) -> tuple[dict, dict]:
    """(meta, tensors) describing every quantized linear and the given (changed) norm weights."""
    kinds, tensors = {}, {}
    for path, mod in runtime.named_modules():
        if isinstance(mod, _QuantLinear):
            kinds[path] = {"kind": type(mod).__name__, "in_features": mod.in_features,
                           "group_size": getattr(mod, "group_size", None)}
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    tensors[f"{path}.{bname}"] = b
    for p in norm_paths:
        tensors[f"{p}.weight"] = _resolve(runtime, p).weight
    return {"modules": kinds, "norms": norm_paths}, tensors


def _runtime_from_state(loaded, meta: dict, tensors: dict):
    new = clone_runtime(loaded.runtime)
    device, dtype = new.device, new.dtype

    def t(key):
        return tensors[key].to(device) if key in tensors else None

    for path, info in meta["modules"].items():
        kind = info["kind"]
        if kind == "Int4Linear":
            mod = Int4Linear(t(f"{path}.qweight"), t(f"{path}.scales"), t(f"{path}.zeros"), info["in_features"],
                             info["group_size"], t(f"{path}.bias"))
        elif kind == "Int8Linear":
            mod = Int8Linear(t(f"{path}.qweight"), t(f"{path}.scales"), t(f"{path}.bias"))
        elif kind == "W8A8Linear":
            mod = W8A8Linear(t(f"{path}.qweight"), t(f"{path}.scales"), t(f"{path}.bias"), t(f"{path}.smooth"))
        else:
            raise QuasarError(f"verifier cache entry names an unknown module kind {kind}; delete "
                              f"{Path('cache_dir') / 'verifiers'} and rebuild")
        _set_module(new, path, mod)
    for p in meta.get("norms", []):
        _resolve(new, p).weight = nn.Parameter(t(f"{p}.weight").to(dtype), requires_grad=False)
    return new


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------
def _reference(loaded, vcfg, cache_dir):
    return clone_runtime(loaded.runtime)


def _cast(name):
    def build(loaded, vcfg, cache_dir):
        return cast_runtime(loaded.runtime, _DTYPES[name])
    return build


def _quantized(name, make):
    """Builder for a quantized verifier: cache lookup, else make(loaded, vcfg, params, cache_dir)
    -> (runtime, changed norm paths), then cache."""
    def build(loaded, vcfg, cache_dir):
        params = _params(vcfg, name)
        clone_runtime(loaded.runtime)  # native-runtime check before any work
        cache = _Cache(loaded, cache_dir, name, params)
        hit = cache.load()
        if hit is not None:
            log.info("verifier %s: loaded from cache %s", name, cache.meta_path)
            return _runtime_from_state(loaded, *hit)
        runtime, norms = make(loaded, vcfg, params, cache_dir)
        meta, tensors = _state_of(runtime, norms)
        cache.save(meta, tensors)
        return runtime
    return build


def _make_int8(loaded, vcfg, params, cache_dir):
    return rtn_transform(loaded.runtime, Int8Linear.from_linear), []


def _make_int4(loaded, vcfg, params, cache_dir):
    g = params["group_size"]
    if params["method"] == "rtn":
        return rtn_transform(loaded.runtime, lambda lin: Int4Linear.from_linear(lin, g)), []
    from .gptq import gptq_runtime

    seqs = calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir)
    new = clone_runtime(loaded.runtime)
    gptq_runtime(new, seqs, g, params["damp"], log=log.debug)
    return new, []


@torch.inference_mode()
def activation_absmax(runtime, seqs) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| entering each decoder linear, over the calibration sequences."""
    stats, handles = {}, []
    probe = clone_runtime(runtime)
    for i, parent, name, lin in decoder_linears(probe):
        key = f"layers.{i}.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{name}"

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


def _make_w8a8(loaded, vcfg, params, cache_dir):
    alpha = params["alpha"]
    seqs = calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir)
    stats = activation_absmax(loaded.runtime, seqs)
    new = clone_runtime(loaded.runtime)
    device, dtype = new.device, new.dtype
    norms = []
    for i, layer in enumerate(new.layers):
        # q/k/v and gate/up: smoothing folded into the preceding RMSNorm weight (exact)
        for norm_name, parent, names in (("input_layernorm", layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                         ("post_attention_layernorm", layer.mlp, ("gate_proj", "up_proj"))):
            lins = [getattr(parent, n) for n in names]
            key = f"layers.{i}.{'self_attn' if norm_name == 'input_layernorm' else 'mlp'}.{names[0]}"
            s = smooth_scales(stats[key], [lin.weight for lin in lins], alpha).to(device)
            norm = getattr(layer, norm_name)
            norm.weight = nn.Parameter((norm.weight.detach().float() / s).to(dtype), requires_grad=False)
            norms.append(f"layers.{i}.{norm_name}")
            for n, lin in zip(names, lins):
                q, sc = quantize_int8_rtn(lin.weight.detach().float() * s[None, :])
                setattr(parent, n, W8A8Linear(q, sc, lin.bias, None))
        # o_proj and down_proj: no norm in front: per-input-channel scale inside the module
        for parent, n in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            lin = getattr(parent, n)
            key = f"layers.{i}.{'self_attn' if n == 'o_proj' else 'mlp'}.{n}"
            s = smooth_scales(stats[key], [lin.weight], alpha).to(device)
            setattr(parent, n, W8A8Linear.from_linear(lin, smooth=s))
    return new, norms


def _pruned(loaded, vcfg, cache_dir):
    from .pruning import block_influence, choose_layers

    params = _params(vcfg, "pruned")
    rt = loaded.runtime
    if not hasattr(rt, "with_layers"):
        raise QuasarError("verifier=pruned needs the native runtime (llama/qwen2/qwen3/mistral); "
                          "the loaded model uses the generic transformers path")
    cache = _Cache(loaded, cache_dir, "pruned", params)
    hit = cache.load()
    if hit is not None:
        keep = hit[0]["keep"]
    else:
        influence = None
        if params["criterion"] == "block_influence":
            seqs = calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir)
            influence = block_influence(rt, seqs)
        keep = choose_layers(rt.num_layers, params["share"], params["criterion"], influence)
        dropped = [i for i in range(rt.num_layers) if i not in keep]
        cache.save({"keep": keep, "dropped": dropped, "block_influence": influence})
        log.info("verifier pruned: dropping layers %s", dropped)
    new = rt.with_layers(keep)
    new.pruned_layers = [i for i in range(rt.num_layers) if i not in keep]
    return new


BUILDERS = {
    "reference": _reference,
    "fp32": _cast("fp32"),
    "bf16": _cast("bf16"),
    "fp16": _cast("fp16"),
    "int8": _quantized("int8", _make_int8),
    "w8a8": _quantized("w8a8", _make_w8a8),
    "int4": _quantized("int4", _make_int4),
    "pruned": _pruned,
}


def verifier_names() -> list[str]:
    return sorted(BUILDERS)


def build_verifier(loaded, vcfg, cache_dir: Path | None = None):
    """A new runtime serving `loaded`'s model at the precision vcfg.name (loaded.runtime untouched)."""
    name = _get(vcfg, "name")
    if name not in BUILDERS:
        raise QuasarError(f"unknown verifier {name!r}; choose one of {', '.join(verifier_names())}")
    return BUILDERS[name](loaded, vcfg, Path(cache_dir) if cache_dir is not None else None)
