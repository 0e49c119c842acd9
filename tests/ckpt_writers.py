"""Quantized checkpoints written the way the standard tools write them, for tests.

GPTQ: no maintained GPTQ library installs here, so the layout is written from its specification
(GPTQModel's `pack_original` and its v2 -> v1 zero-point conversion) with plain integer loops,
independently of quasar_bench.packing. compressed-tensors: its own compressors and config writer.
Each writer returns the dequantized weight of every quantized linear, computed by the format's own
rule (not by quasar_bench), keyed by the checkpoint's module name.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_names(hf):
    return [f"model.layers.{i}.{n}" for i in range(hf.config.num_hidden_layers) for n in LINEARS]


def _save(folder: Path, hf, tensors: dict, qconfig: dict | None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = hf.config.to_dict()
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))


def _plain_tensors(hf, quantized):
    """Every tensor but the quantized linears' weights (tied lm_head saved once, as transformers does)."""
    out = {}
    for k, v in hf.state_dict().items():
        if k.endswith(".weight") and k[: -len(".weight")] in quantized:
            continue
        if k == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        out[k] = v.detach().clone()
    return out


def _pack_nibbles_along_rows(vals: np.ndarray) -> np.ndarray:
    """[R, C] ints 0..15 -> uint32 [R/8, C]: word i holds rows 8i..8i+7, row 8i+j at bits 4j."""
    out = np.zeros((vals.shape[0] // 8, vals.shape[1]), dtype=np.uint32)
    for i in range(out.shape[0]):
        for j in range(8):
            out[i] |= vals[8 * i + j].astype(np.uint32) << np.uint32(4 * j)
    return out


def write_gptq(folder, hf, group_size=32, fmt="gptq", sym=False, act_order=False, seed=0):
    """GPTQ 4-bit checkpoint of `hf` (RTN codes: the layout, not the rounding, is what is tested).

    fmt="gptq" (v1) stores zero - 1 as GPTQModel's v2 -> v1 conversion does: 0x11111111
    subtracted from each packed word, so a zero point of 0 borrows from its neighbour. act_order:
    columns are assigned to groups through a permuted g_idx, as desc_act=true writes them."""
    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    quantized = linear_names(hf)
    tensors = _plain_tensors(hf, set(quantized))
    deq = {}
    for name in quantized:
        w = hf.get_submodule(name).weight.detach().float()
        n, k = w.shape
        groups = -(-k // group_size)
        g_idx = torch.arange(k) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(k, generator=gen)]
        codes = torch.empty(n, k, dtype=torch.int64)
        scales = torch.empty(groups, n)
        zeros = torch.empty(groups, n, dtype=torch.int64)
        for g in range(groups):
            cols = (g_idx == g).nonzero().flatten()
            wg = w[:, cols]
            if sym:
                s = (wg.abs().amax(1) / 7.5).clamp(min=1e-6).half().float()
                z = torch.full((n,), 8, dtype=torch.int64)
            else:
                lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
                s = ((hi - lo) / 15).clamp(min=1e-6).half().float()
                z = torch.round(-lo / s).clamp(0, 15).long()
            if g == 0 and not sym:
                z[0] = 0  # exercise the v1 borrow: a zero point of 0
            codes[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], 0, 15).long()
            scales[g], zeros[g] = s, z
        deq[name] = (codes - zeros[g_idx].t()).float() * scales[g_idx].t()
        qweight = _pack_nibbles_along_rows(codes.t().numpy())  # [K/8, N]
        qzeros = _pack_nibbles_along_rows(zeros.t().numpy()).T  # [G, N/8]: packed along N
        if fmt == "gptq":
            qzeros = (qzeros.astype(np.int64) - 0x11111111) & 0xFFFFFFFF
        tensors[f"{name}.qweight"] = torch.from_numpy(qweight.astype(np.int64)).to(torch.int64).to(torch.int32)
        tensors[f"{name}.qzeros"] = torch.from_numpy(np.ascontiguousarray(qzeros).astype(np.uint32).view(np.int32))
        tensors[f"{name}.scales"] = scales.half()
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        if hf.get_submodule(name).bias is not None:
            tensors[f"{name}.bias"] = hf.get_submodule(name).bias.detach().half()
    _save(folder, hf, tensors, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order,
                                "sym": sym, "checkpoint_format": fmt, "true_sequential": True})
    return deq


def write_compressed_tensors(folder, hf, scheme: str = "W4A16", group_size=32, symmetric=False):
    """A compressed-tensors checkpoint written by compressed-tensors itself: per linear, its
    calculate_qparams (min/max observer), its compressor, its ModelCompressor config writer.
    scheme W4A16 (pack-quantized, group) or W8A8 (int-quantized weights, dynamic per-token
    activations). Scales are stored in fp16; the dequantized weights are compressed-tensors' own
    decompression with the scales in fp32 (an exact product, as the packed format computes)."""
    from compressed_tensors.compressors import ModelCompressor, NaiveQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    folder = Path(folder)
    if scheme == "W4A16":
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
        qscheme, compressor, fmt = QuantizationScheme(targets=["Linear"], weights=args), PackedQuantizationCompressor, \
            "pack-quantized"
    else:
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        qscheme, compressor, fmt = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts), \
            NaiveQuantizationCompressor, "int-quantized"
    quantized = linear_names(hf)
    tensors = _plain_tensors(hf, set(quantized))
    deq = {}
    for name in quantized:
        w = hf.get_submodule(name).weight.detach().float()
        wg = w.view(w.shape[0], -1, group_size) if scheme == "W4A16" else w[:, None, :]
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        scale = scale.half().float()  # stored fp16: quantize against the stored value
        sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp.to(torch.int8)}
        packed = compressor.compress(sd, qscheme)
        back = compressor.decompress({**packed, "weight_scale": scale}, qscheme)
        deq[name] = back["weight"].float()
        for k, v in packed.items():
            tensors[f"{name}.{k}"] = v.half() if k == "weight_scale" else v
    _save(folder, hf, tensors, None)
    config = QuantizationConfig(config_groups={"group_0": qscheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"])
    ModelCompressor(quantization_config=config).update_config(str(folder))
    return deq
