"""Quantized checkpoints written by the standard tools, read into the packed format of packing.py.

A checkpoint folder holds config.json (its `quantization_config`; old AutoGPTQ folders keep it in
quantize_config.json instead) and safetensors files. Two families are read:

GPTQ (AutoGPTQ, GPTQModel, the layout transformers and vLLM load), 4-bit, per linear `P`:
    P.qweight int32 [K/8, N]   nibble j (bits 4j..4j+3) of qweight[i, n] = code of W[n, 8i+j], 0..15
    P.qzeros  int32 [G, N/8]   nibble j of qzeros[g, c] = zero point of group g, output 8c+j
    P.scales  fp16  [G, N]     P.g_idx int32 [K] = group of input k;  W[n, k] = (code - zero) * scale
  `checkpoint_format: gptq` (v1, the default and AutoGPTQ's) stores every zero point minus one;
  GPTQModel reads it back by adding 0x11111111 to each int32 word (a stored nibble 0xF, which only
  a zero point of 0 produces, carries into the next nibble), and so does this reader. `gptq_v2`
  stores them as they are. qweight is exactly our int4 layout; only the zero points are unpacked.
compressed-tensors (llmcompressor), per linear `P`:
  pack-quantized (W4A16):  P.weight_packed int32 [N, K/8]: nibble j of [n, i] = q(W[n, 8i+j]) + 8,
    q signed -8..7; P.weight_scale [N, G] (group) or [N, 1] (channel); asymmetric:
    P.weight_zero_point int32 [N/8, G] packed along N, nibble j of [r, g] = zp[8r+j, g] + 8;
    W = (q - zp) * scale. So code = q + 8 and zero = zp + 8 (8 when symmetric).
  int-quantized (W8A8 / W8A16): P.weight int8 [N, K], P.weight_scale [N, 1], symmetric per
    channel; with `input_activations` {dynamic, token, symmetric, 8-bit} it is W8A8 (per-token
    dynamic activation scales, our W8A8Linear), without, W8A16 (Int8Linear).
Groups must be contiguous runs of input channels (the packed format's); act-order checkpoints whose
g_idx permutes them are refused. Scales become fp16, the packed format's dtype: exact for fp16 and
for bf16 scales above 2^-16; a lossy conversion (fp32 scales) is logged with its size.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from .errors import QuasarError
from .packing import SCALE_DTYPE, pack_int4, unpack_int4
from .quant import Int4Linear, Int8Linear, W8A8Linear

log = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors")


def quantization_config(folder) -> dict | None:
    """The folder's quantization config (config.json's `quantization_config`, else AutoGPTQ's
    quantize_config.json), or None for a full-precision folder (or a hub id: not a local folder)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        q = json.loads(cfg_path.read_text()).get("quantization_config")
        if q:
            return q
    side = folder / "quantize_config.json"
    if side.is_file():
        return {"quant_method": "gptq", **json.loads(side.read_text())}
    return None


def describe(q: dict) -> str:
    """One phrase naming a checkpoint's format, e.g. `GPTQ 4-bit g128 (gptq)`."""
    method = q.get("quant_method")
    if method == "gptq":
        return f"GPTQ {q.get('bits')}-bit g{q.get('group_size')} ({_gptq_version(q)})"
    if method == "compressed-tensors":
        w, a = _ct_scheme(q)
        kind = f"W{w.get('num_bits')}A{a.get('num_bits') if a else 16}"
        return f"compressed-tensors {q.get('format')} {kind}"
    return str(method)


def check_supported(q: dict, folder) -> None:
    """Refuse a checkpoint this reader cannot turn into the packed format (before any loading)."""
    method = q.get("quant_method")
    if method not in FORMATS:
        raise QuasarError(f"{folder} is a {method!r} quantized checkpoint; verifier=checkpoint reads "
                          f"{' and '.join(FORMATS)} (GPTQ and llmcompressor) checkpoints")
    if method == "gptq":
        _gptq_checks(q, folder)
    else:
        _ct_checks(q, folder)


# ------------------------------------------------------------------------------------------------
# tensors of a checkpoint folder (one file, shards with an index, or AutoGPTQ's named file)
# ------------------------------------------------------------------------------------------------
class Tensors:
    """name -> tensor, read lazily from the folder's safetensors files, straight onto `device`."""

    def __init__(self, folder, device="cpu"):
        from safetensors import safe_open

        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise QuasarError(f"{folder} holds no .safetensors file; save the checkpoint with safetensors")
        self._open = {f: safe_open(str(f), framework="pt", device=str(device)) for f in files}
        self._where = {k: f for f, h in self._open.items() for k in h.keys()}

    def __contains__(self, name):
        return name in self._where

    def get(self, name) -> torch.Tensor:
        if name not in self._where:
            raise QuasarError(f"the checkpoint has no tensor {name}; it does not match the reference model's "
                              "architecture, or is incomplete")
        return self._open[self._where[name]].get_tensor(name)


def _fp16_scales(s: torch.Tensor, name: str) -> torch.Tensor:
    h = s.to(SCALE_DTYPE)
    if s.dtype != SCALE_DTYPE and not torch.equal(h.to(s.dtype), s):
        rel = ((h.float() - s.float()).abs() / s.float().abs().clamp(min=1e-30)).max().item()
        log.warning("%s: %s scales rounded to fp16 (the packed format's), max relative change %.2e",
                    name, s.dtype, rel)
    return h


def _shape(t, shape, name):
    if tuple(t.shape) != tuple(shape):
        raise QuasarError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} for "
                          "the reference model's layer; is model.reference_path the model this was quantized from?")


def _bias(src, prefix, lin):
    return src.get(f"{prefix}.bias").to(lin.weight.dtype) if f"{prefix}.bias" in src else None


def _pad_codes(qweight, zeros, k: int, group_size: int):
    """qweight [ceil8(K)/8, N] -> [Kp/8, N] with the padded inputs at their group's zero (weight 0)."""
    kp = -(-k // group_size) * group_size
    if qweight.shape[0] * 8 == kp:
        return qweight
    codes = unpack_int4(qweight)[:, :k]
    pad = zeros[-1].to(torch.uint8)[:, None].expand(-1, kp - k)
    return pack_int4(torch.cat([codes, pad], 1))


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------
def _gptq_version(q) -> str:
    return q.get("checkpoint_format") or q.get("format") or "gptq"


def _gptq_checks(q, folder):
    if int(q.get("bits", 0)) != 4:
        raise QuasarError(f"{folder}: GPTQ bits={q.get('bits')}; the packed format holds 4-bit GPTQ (re-quantize "
                          "with bits=4, or use verifier=int8 for 8-bit)")
    if _gptq_version(q) not in ("gptq", "gptq_v2"):
        raise QuasarError(f"{folder}: GPTQ checkpoint_format={_gptq_version(q)!r} is a kernel-specific layout; "
                          "re-save it as gptq or gptq_v2")
    if q.get("dynamic"):
        raise QuasarError(f"{folder}: per-module GPTQ overrides (`dynamic`) are not read; quantize every "
                          "layer with one bits/group_size")
    if q.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise QuasarError(f"{folder}: GPTQ pack_dtype={q.get('pack_dtype')}; only int32 words are read")


def _gptq_module(q, src: Tensors, prefix: str, lin) -> Int4Linear | None:
    if f"{prefix}.qweight" not in src:
        return None
    k, n = lin.in_features, lin.out_features
    g = int(q.get("group_size", 128))
    g = k if g == -1 else g
    groups = -(-k // g)
    qweight, qzeros, scales = (src.get(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales"))
    _shape(qweight, (-(-k // 8), n), f"{prefix}.qweight")
    _shape(qzeros, (groups, n // 8), f"{prefix}.qzeros")
    _shape(scales, (groups, n), f"{prefix}.scales")
    if f"{prefix}.g_idx" in src:
        g_idx = src.get(f"{prefix}.g_idx").to(torch.int64).cpu()
        if not torch.equal(g_idx, torch.arange(k) // g):
            raise QuasarError(f"{prefix}: act-order GPTQ (desc_act=true, g_idx permutes the groups) cannot be "
                              "packed into contiguous groups; re-quantize with desc_act=false, or with "
                              "static_groups=true")
    words = qzeros.to(torch.int64) & 0xFFFFFFFF
    if _gptq_version(q) == "gptq":  # v1 stored zero - 1: add one to every nibble as GPTQModel does
        words = (words + 0x11111111) & 0xFFFFFFFF
    zeros = unpack_int4(words.t()).to(SCALE_DTYPE)  # [G, N]
    bias = _bias(src, prefix, lin)
    return Int4Linear(_pad_codes(qweight, zeros, k, g), _fp16_scales(scales, prefix), zeros, k, g, bias)


# ------------------------------------------------------------------------------------------------
# compressed-tensors
# ------------------------------------------------------------------------------------------------
def _ct_scheme(q) -> tuple[dict, dict | None]:
    schemes = {json.dumps([grp.get("weights"), grp.get("input_activations")], sort_keys=True)
               for grp in (q.get("config_groups") or {}).values()}
    if len(schemes) != 1:
        raise QuasarError(f"compressed-tensors config with {len(schemes)} different schemes; one scheme for "
                          "every quantized linear is read")
    w, a = json.loads(schemes.pop())
    return w or {}, a


def _ct_checks(q, folder):
    w, a = _ct_scheme(q)
    fmt = q.get("format")
    if q.get("quantization_status", "compressed") != "compressed":
        raise QuasarError(f"{folder}: compressed-tensors quantization_status={q.get('quantization_status')!r}; "
                          "save the model compressed (save_compressed=True)")
    if w.get("type", "int") != "int" or w.get("dynamic"):
        raise QuasarError(f"{folder}: compressed-tensors weights of type {w.get('type')} are not read; "
                          "int weights (W4A16 pack-quantized, W8A8 / W8A16 int-quantized) are")
    if fmt == "pack-quantized":
        if w.get("num_bits") != 4 or w.get("strategy") not in ("group", "channel") or a is not None:
            raise QuasarError(f"{folder}: pack-quantized with {w.get('num_bits')}-bit {w.get('strategy')} weights"
                              f"{' and quantized activations' if a else ''}; W4A16 with group or channel "
                              "scales is read")
    elif fmt == "int-quantized":
        if w.get("num_bits") != 8 or w.get("strategy") != "channel" or not w.get("symmetric", True):
            raise QuasarError(f"{folder}: int-quantized weights must be 8-bit symmetric per channel (the packed "
                              f"int8 format), got {w.get('num_bits')}-bit {w.get('strategy')}")
        if a is not None and not (a.get("num_bits") == 8 and a.get("dynamic") is True and a.get("strategy") == "token"
                                  and a.get("symmetric", True) and a.get("type", "int") == "int"):
            raise QuasarError(f"{folder}: activations {a.get('num_bits')}-bit {a.get('strategy')} "
                              f"dynamic={a.get('dynamic')}; W8A8 with dynamic symmetric per-token int8 activations "
                              "is read")
    else:
        raise QuasarError(f"{folder}: compressed-tensors format {fmt!r} is not read; pack-quantized (W4A16) and "
                          "int-quantized (W8A8, W8A16) are")


def _ct_module(q, src: Tensors, prefix: str, lin):
    k, n = lin.in_features, lin.out_features
    bias = _bias(src, prefix, lin)
    w, a = _ct_scheme(q)
    if f"{prefix}.weight_g_idx" in src:
        g_idx = src.get(f"{prefix}.weight_g_idx").to(torch.int64).cpu()
        if not torch.equal(g_idx, torch.arange(k) // int(w.get("group_size") or k)):
            raise QuasarError(f"{prefix}: act-order (actorder=group: weight_g_idx permutes the groups) cannot be "
                              "packed into contiguous groups; re-quantize with actorder=static or weight")
    if f"{prefix}.weight_packed" in src:
        g = k if w.get("strategy") == "channel" else int(w["group_size"])
        if k % g or g % 8:
            raise QuasarError(f"{prefix}: in_features={k} with group size {g}: the packed format needs whole "
                              "groups of a multiple of 8 inputs")
        packed, scale = src.get(f"{prefix}.weight_packed"), src.get(f"{prefix}.weight_scale")
        _shape(packed, (n, k // 8), f"{prefix}.weight_packed")
        _shape(scale, (n, k // g), f"{prefix}.weight_scale")
        if w.get("symmetric", True):
            zeros = torch.full((k // g, n), 8.0, dtype=SCALE_DTYPE, device=packed.device)
        else:
            zp = src.get(f"{prefix}.weight_zero_point")
            _shape(zp, (-(-n // 8), k // g), f"{prefix}.weight_zero_point")
            zeros = unpack_int4(zp)[:, :n].to(SCALE_DTYPE)  # [G, N]: stored zp + 8 = our zero point
        return Int4Linear(packed.t().contiguous(), _fp16_scales(scale.t(), prefix), zeros, k, g, bias)
    if f"{prefix}.weight_scale" in src:
        qw, scale = src.get(f"{prefix}.weight"), src.get(f"{prefix}.weight_scale")
        _shape(qw, (n, k), f"{prefix}.weight")
        _shape(scale.reshape(-1), (n,), f"{prefix}.weight_scale")
        if qw.dtype != torch.int8:
            raise QuasarError(f"{prefix}.weight is {qw.dtype}, expected int8 (int-quantized)")
        cls = W8A8Linear if a is not None else Int8Linear
        return cls(qw, _fp16_scales(scale.reshape(-1), prefix), bias)
    return None


# ------------------------------------------------------------------------------------------------
def _hf_name(runtime_name: str) -> str:
    """Native runtime parameter name -> the transformers checkpoint's (runtime.native_from_hf)."""
    return runtime_name if runtime_name.startswith("lm_head") else f"model.{runtime_name}"


def check_same_architecture(folder, hf_config) -> None:
    """The checkpoint's config must describe the reference model's shapes."""
    ck = json.loads((Path(folder) / "config.json").read_text()) if (Path(folder) / "config.json").is_file() else {}
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    diff = [f"{k} {ck[k]} vs {getattr(hf_config, k, None)}" for k in keys
            if k in ck and ck[k] != getattr(hf_config, k, None)]
    if diff:
        raise QuasarError(f"the quantized checkpoint {folder} is not the reference model's architecture ("
                          + ", ".join(diff) + "); point model.reference_path at the model it was quantized from")


@torch.inference_mode()
def checkpoint_runtime(runtime, folder):
    """A clone of the native `runtime` (the reference model, left untouched) whose every weight is
    the checkpoint's: quantized linears as packed modules, every other tensor (embeddings, norms
    -- SmoothQuant folds its smoothing into them --, unquantized linears, lm_head) as stored."""
    from .quant import clone_runtime

    folder = Path(folder)
    q = quantization_config(folder)
    if q is None:
        raise QuasarError(f"{folder} has no quantization_config in config.json (nor a quantize_config.json): "
                          "not a quantized checkpoint")
    check_supported(q, folder)
    make = _gptq_module if q["quant_method"] == "gptq" else _ct_module
    new = clone_runtime(runtime)
    device, dtype = new.device, new.dtype
    src = Tensors(folder, device)
    quantized = []
    for path, mod in list(new.named_modules()):
        if isinstance(mod, nn.Linear):
            qmod = make(q, src, _hf_name(path), mod)
            if qmod is not None:
                parent, _, attr = path.rpartition(".")
                setattr(new.get_submodule(parent) if parent else new, attr, qmod.to(device))
                quantized.append(path)
    if not quantized:
        raise QuasarError(f"{folder}: no quantized linear found ({describe(q)}); the tensor names do not match "
                          "the model's (model.layers.<i>.self_attn.q_proj...)")
    names = {}  # every parameter left (embeddings, norms, unquantized linears) -> its first name
    for n, t in new.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), n)
    replaced = {}  # id of the reference's parameter -> the checkpoint's (tied weights stay tied)
    for mod in new.modules():
        for attr, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                name = _hf_name(names[id(p)])
                t = src.get(name)  # a missing weight is refused: never the reference's in its place
                _shape(t, p.shape, name)
                replaced[id(p)] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
            mod._parameters[attr] = replaced[id(p)]
    log.info("checkpoint %s (%s): %d quantized linears", folder, describe(q), len(quantized))
    return new
