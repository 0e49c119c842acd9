"""Quantized linear modules holding the packed tensors of packing.py, and the RTN transforms.

Modules (drop-in replacements for nn.Linear inside the native runtime or a transformers model):

    Int4Linear  W4A16: qweight int32 [Kp//8, N], scales/zeros fp16 [Kp//G, N], in_features, group_size
    Int8Linear  W8A16: qweight int8 [N, K], scales fp16 [N]
    W8A8Linear  int8 weights as Int8Linear + int8 activations with per-token dynamic scales; an
                optional per-input-channel `smooth` [K] (SmoothQuant): the module computes
                W8A8(x / smooth) with the weight stored already multiplied by smooth.

forward(x) calls the kernel backend named by the module's `kernel` (verifier.kernel; `auto`
picks per device: quasar_bench/backends). On CPU that is the pure-torch reference of
quasar_kernels/reference.py. For W8A8 the reference quantizes the activations per token exactly like the
kernels (absmax/127, round half away from zero) and sums the int8 products exactly, so W8A8 outputs
do not depend on the batch size (T=1 AR steps and T=k+1 verify steps agree bit for bit).

A module records its kind (class name) and buffers; `from_state` rebuilds it from them (the
verifier cache), so a new quantized module class needs no edit elsewhere to be cached.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .backends import resolve
from .errors import QuasarError
from .packing import SCALE_DTYPE, check_int4_group, dequantize_int4, dequantize_int8, pack_int4, quantize_int4_rtn, quantize_int8_rtn

# Names of the decoder-layer linears, transformers' naming (runtime.py).
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
QUANT_MODULES: dict[str, type] = {}  # class name -> class, for the verifier cache


def _cat_bias(mods):
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=mods[0].qweight.dtype
                                                                       if mods[0].qweight.is_floating_point()
                                                                       else torch.float32, device=m.qweight.device)
                      for m in mods])


class _QuantLinear(nn.Module):
    """Shared bits: bias, the kernel backend, per-backend prepared weights, cache state."""

    op = "base"  # the backend op this module calls (backends.OPS)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        QUANT_MODULES[cls.__name__] = cls

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None
        self.kernel = "auto"
        self.prepared: dict = {}  # backend name -> what it derived from the packed weights
        self._backends: dict = {}  # (device type, rows) -> backend

    def set_kernel(self, name: str) -> None:
        self.kernel, self._backends, self.prepared = name, {}, {}

    def backend(self, device_type: str, rows: int | None = None):
        """The backend this module's kernel setting picks for an input of `rows` activation rows
        (`auto` may pick by M: backends.Backend.max_rows)."""
        key = (device_type, rows)
        if key not in self._backends:
            self._backends[key] = resolve(self.kernel, device_type, self.op, rows)
        return self._backends[key]

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        return getattr(self.backend(x.device.type, rows), self.op)(self, self._prepare_input(x))

    def _prepare_input(self, x):
        return x

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): re-derive prepared weights on the new device
        self.prepared, self._backends = {}, {}
        return super()._apply(fn, recurse)

    @classmethod
    def concat(cls, mods) -> "_QuantLinear | None":
        """One module computing the outputs of `mods` (same input) side by side, or None."""
        return None

    def state_info(self) -> dict:
        """What from_state needs besides the buffers."""
        return {"in_features": self.in_features}

    @classmethod
    def from_state(cls, buffers: dict, info: dict) -> "_QuantLinear":
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


class Int4Linear(_QuantLinear):
    """W4A16, asymmetric, groups of `group_size` input channels (packing.py int4 format)."""

    op = "w4a16"

    def __init__(self, qweight, scales, zeros, in_features: int, group_size: int, bias=None):
        check_int4_group(group_size)
        super().__init__(in_features, qweight.shape[1], bias)
        kp = qweight.shape[0] * 8
        if kp % group_size or kp < in_features or kp - in_features >= group_size:
            raise QuasarError(f"int4 tensors hold {kp} packed input channels, which does not fit "
                              f"in_features={in_features} with group_size={group_size}; re-quantize")
        if scales.shape != (kp // group_size, qweight.shape[1]) or zeros.shape != scales.shape:
            raise QuasarError(f"int4 scales/zeros must be [{kp // group_size}, {qweight.shape[1]}], got "
                              f"{tuple(scales.shape)}/{tuple(zeros.shape)}; re-quantize")
        self.group_size = group_size
        self.register_buffer("qweight", qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())
        self.register_buffer("zeros", zeros.to(SCALE_DTYPE).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        codes, scales, zeros = quantize_int4_rtn(linear.weight, group_size)
        return cls(pack_int4(codes), scales, zeros, linear.in_features, group_size, linear.bias)

    def dequantize(self):
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)

    def state_info(self):
        return {"in_features": self.in_features, "group_size": self.group_size}

    @classmethod
    def from_state(cls, b, info):
        return cls(b["qweight"], b["scales"], b["zeros"], info["in_features"], info["group_size"], b.get("bias"))

    @classmethod
    def concat(cls, mods):
        if len({(m.in_features, m.group_size) for m in mods}) != 1:
            return None
        cat = lambda name: torch.cat([getattr(m, name) for m in mods], 1)  # noqa: E731 (N is dim 1)
        return cls(cat("qweight"), cat("scales"), cat("zeros"), mods[0].in_features, mods[0].group_size,
                   _cat_bias(mods))

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Linear(_QuantLinear):
    """W8A16: symmetric per-output-channel int8 weights, activations in the model's dtype."""

    op = "w8a16"

    def __init__(self, qweight, scales, bias=None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        if qweight.dtype != torch.int8 or scales.shape != (qweight.shape[0],):
            raise QuasarError("int8 weights must be int8 [N, K] with scales [N] (packing.py); re-quantize")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8_rtn(linear.weight)
        return cls(q, s, linear.bias)

    def dequantize(self):
        return dequantize_int8(self.qweight, self.scales)

    @classmethod
    def from_state(cls, b, info):
        return cls(b["qweight"], b["scales"], b.get("bias"))

    @classmethod
    def concat(cls, mods):
        return cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]), _cat_bias(mods))


class W8A8Linear(Int8Linear):
    """int8 weights per channel x int8 activations per token (dynamic scales); optional smoothing
    vector: y = W8A8(x / smooth) with qweight quantized from W * smooth."""

    op = "w8a8"

    def __init__(self, qweight, scales, bias=None, smooth=None):
        super().__init__(qweight, scales, bias)
        if smooth is not None:
            if smooth.shape != (self.in_features,):
                raise QuasarError(f"w8a8 smooth vector must be [{self.in_features}]; re-quantize")
            self.register_buffer("smooth", smooth.float().contiguous())
        else:
            self.smooth = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> "W8A8Linear":
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()[None, :]
        q, s = quantize_int8_rtn(w)
        return cls(q, s, linear.bias, smooth)

    def _prepare_input(self, x):
        return x if self.smooth is None else (x / self.smooth.to(x.dtype))

    @classmethod
    def from_state(cls, b, info):
        return cls(b["qweight"], b["scales"], b.get("bias"), b.get("smooth"))

    @classmethod
    def concat(cls, mods):
        smooth = [m.smooth for m in mods]
        if any(x is None for x in smooth) and any(x is not None for x in smooth):
            return None
        if smooth[0] is not None and not all(torch.equal(smooth[0], x) for x in smooth[1:]):
            return None  # different input scales: one GEMM cannot serve them
        return cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]), _cat_bias(mods),
                   smooth[0])


# ---------------------------------------------------------------------------------------------
# module-tree helpers and RTN transforms
# ---------------------------------------------------------------------------------------------

def decoder_linears(runtime):
    """(layer index, parent module, attribute name, nn.Linear) for every decoder-layer linear;
    lm_head and embeddings are not included (kept in high precision). On the native runtime the
    seven Llama projections; on the generic one every nn.Linear inside a decoder layer, whatever
    the family names it (q_proj, qkv_proj, query_key_value, dense_h_to_4h, ...)."""
    out = []
    for i, layer in enumerate(runtime.layers):
        if not getattr(runtime, "is_native", False):
            found = [(i, parent, name, mod) for parent in layer.modules() for name, mod in parent.named_children()
                     if isinstance(mod, nn.Linear)]
            in_linears = {id(p) for *_, mod in found for p in mod.parameters()}
            other = [n for n, p in layer.named_parameters() if p.dim() >= 2 and id(p) not in in_linears]
            if not found or other:  # quantizing only part of a layer's matrices would be another precision
                raise QuasarError(f"decoder layer {i} ({type(layer).__name__}) holds weight matrices outside "
                                  f"nn.Linear ({', '.join(other[:3]) or 'all of them'}: e.g. GPT-2's Conv1D, fused MoE "
                                  "experts); the quantized verifiers replace nn.Linear modules only: pick int8/int4/"
                                  "w8a8 on another model, or verifier=pruned / a cast")
            out += found
            continue
        for name in ATTN_LINEARS:
            out.append((i, layer.self_attn, name, getattr(layer.self_attn, name)))
        for name in MLP_LINEARS:
            out.append((i, layer.mlp, name, getattr(layer.mlp, name)))
    return out


# Per-runtime state a clone never shares: the native KV cache and CUDA graphs, the generic cache.
_PER_RUNTIME = ("k_cache", "v_cache", "graphs", "cache")


def clone_runtime(runtime):
    """A new runtime object (native or generic) with its own module tree and KV cache, sharing
    every tensor with `runtime` (which is left untouched). Replace submodules of the clone freely."""
    import copy

    memo = {}
    for t in list(runtime.parameters()) + list(runtime.buffers()):
        memo[id(t)] = t
    state = [attr for attr in _PER_RUNTIME if hasattr(runtime, attr)]
    for attr in state:
        if getattr(runtime, attr) is not None:
            memo[id(getattr(runtime, attr))] = None
    new = copy.deepcopy(runtime, memo)
    for attr in state:
        setattr(new, attr, None)
    new.cache_len = 0
    return new


def same_weights_runtime(runtime):
    """A runtime on `runtime`'s weights, unchanged, with its own KV cache (the reference verifier):
    clone_runtime on the native runtime; on the generic path, a new wrapper of the same model."""
    if getattr(runtime, "is_native", False):
        return clone_runtime(runtime)
    return runtime.sibling()


def cast_runtime(runtime, dtype: torch.dtype):
    """Clone with every floating parameter cast to dtype (new tensors; RoPE tables stay fp32)."""
    new = clone_runtime(runtime)
    done = {}
    for mod in new.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = p if p.dtype == dtype or not p.is_floating_point() else \
                    nn.Parameter(p.detach().to(dtype), requires_grad=False)
            mod._parameters[name] = done[id(p)]
    return new


def rtn_transform(runtime, make, lm_head: bool = False) -> object:
    """Clone `runtime` and replace each decoder linear (and with `lm_head`, the LM head: a separate
    quantized copy when it is tied to the embeddings, which stay as they are) by make(linear)."""
    new = clone_runtime(runtime)
    for _, parent, name, lin in decoder_linears(new):
        setattr(parent, name, make(lin))
    if lm_head:
        new.lm_head = make(new.lm_head)
    return new


def set_kernel(runtime, name: str) -> list[str]:
    """Point every quantized linear of `runtime` at kernel backend `name`; the ops it uses."""
    ops = set()
    for mod in runtime.modules():
        if isinstance(mod, _QuantLinear):
            mod.set_kernel(name)
            ops.add(mod.op)
    return sorted(ops)


# q/k/v and gate/up read the same input: one GEMM each instead of three and two.
FUSIONS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def concat_linears(mods):
    """One module for `mods` side by side along the output dim, or None when they cannot share one."""
    kinds = {type(m) for m in mods}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if issubclass(kind, nn.Linear):
        if len({m.in_features for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods])
        biases = [m.bias for m in mods]
        fused = kind(w.shape[1], w.shape[0], bias=any(b is not None for b in biases), device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=w.dtype,
                                                                                              device=w.device)
                                                 for b, m in zip(biases, mods)]), requires_grad=False)
        return fused
    if issubclass(kind, _QuantLinear):
        fused = kind.concat(mods)
        if fused is not None:
            fused.set_kernel(mods[0].kernel)
        return fused
    return None


def fuse_projections(runtime):
    """A clone of a native runtime whose attention and MLP run q/k/v and gate/up as one GEMM each
    (the same outputs, split after the call); blocks that cannot be fused keep their linears."""
    new = clone_runtime(runtime)
    for layer in new.layers:
        for parent_name, names, fused_name in FUSIONS:
            parent = getattr(layer, parent_name)
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods):
                continue
            fused = concat_linears(mods)
            if fused is None:
                continue
            setattr(parent, fused_name, fused)
            parent.split_sizes = [m.out_features for m in mods]
            for n in names:
                delattr(parent, n)
    new.kernel_ops = getattr(runtime, "kernel_ops", [])
    new.kept_layers = getattr(runtime, "kept_layers", None)
    return new
